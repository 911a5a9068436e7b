"""How an engine-core process is started, watched and stopped.

`CoreClient` speaks to an engine core over two ZMQ sockets and does not care where it runs. A
launcher says where: `LocalCoreLauncher` spawns a child process on this host and talks over IPC
sockets (the default, colocated or disaggregated on one machine); the Ray launcher
(kvflow/disagg/ray_launcher.py) starts the core as an actor somewhere in a Ray cluster and talks
over TCP. Both report the core's end once, with a reason, so the client can fail its requests.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
from abc import ABC, abstractmethod
from collections.abc import Callable

from kvflow.config import EngineConfig


class CoreLauncher(ABC):
    @property
    def bind_host(self) -> str | None:
        """Where the client binds its sockets: None = IPC files on this host; else tcp on this address."""
        return None

    @abstractmethod
    def start(self, config: EngineConfig, input_addr: str, output_addr: str) -> None:
        """Start the core; it connects to the two addresses and sends READY when its model is loaded."""

    @abstractmethod
    def is_alive(self) -> bool: ...

    @abstractmethod
    def watch(self, on_exit: Callable[[], None]) -> None:
        """Call `on_exit` once, on the running event loop, when the core ends (for whatever reason)."""

    @abstractmethod
    async def stop(self, timeout: float) -> bool:
        """After a Shutdown message: wait up to `timeout` for the core to exit, then force it.
        True if it exited by itself."""

    @abstractmethod
    async def exit_reason(self) -> str:
        """Why the core ended: exit code, signal, or the cluster's account of it."""


class LocalCoreLauncher(CoreLauncher):
    """The engine core as a spawned child process that dies with this one."""

    def __init__(self) -> None:
        self._process: multiprocessing.process.BaseProcess | None = None
        self._watched = False

    def start(self, config: EngineConfig, input_addr: str, output_addr: str) -> None:
        from kvflow.engine.core_process import run_engine_core

        spawn = multiprocessing.get_context("spawn")
        self._process = spawn.Process(target=run_engine_core, name="kvflow-engine-core", daemon=True,
                                      args=(config, input_addr, output_addr, os.getpid()))
        self._process.start()

    def is_alive(self) -> bool:
        return self._process is not None and self._process.is_alive()

    def watch(self, on_exit: Callable[[], None]) -> None:
        assert self._process is not None
        loop = asyncio.get_running_loop()
        sentinel = self._process.sentinel

        def fired() -> None:
            loop.remove_reader(sentinel)
            self._watched = False
            on_exit()

        loop.add_reader(sentinel, fired)
        self._watched = True

    def _unwatch(self) -> None:
        if self._watched and self._process is not None:
            try:
                asyncio.get_running_loop().remove_reader(self._process.sentinel)
            except (ValueError, OSError):
                pass
            self._watched = False

    async def stop(self, timeout: float) -> bool:
        self._unwatch()
        process = self._process
        if process is None:
            return True
        await asyncio.to_thread(process.join, timeout)
        clean = not process.is_alive()
        if not clean:
            process.terminate()
            await asyncio.to_thread(process.join, 2)
        if process.is_alive():
            process.kill()
            await asyncio.to_thread(process.join, 2)
        return clean

    async def exit_reason(self) -> str:
        assert self._process is not None
        await asyncio.to_thread(self._process.join, 1)
        return exit_text(self._process.exitcode)


def exit_text(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"
