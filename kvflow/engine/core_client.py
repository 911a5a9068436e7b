"""`CoreClient`: the API process's side of an engine core running in its own process.

It has its launcher start the process (a local child, or a Ray actor: kvflow/engine/core_launcher.py;
the process itself is kvflow/engine/core_process.py), waits for its READY, sends without blocking,
receives in an asyncio task, and is told by the launcher the moment the core ends, so a dead core
is noticed at once, with its cause.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
import time
from collections.abc import Callable

import msgspec
import zmq
import zmq.asyncio

from kvflow.config import EngineConfig
from kvflow.engine.core_launcher import CoreLauncher, LocalCoreLauncher
from kvflow.engine.input_processor import CoreRequestSpec
from kvflow.engine.messages import (
    AddRequests,
    CoreFailed,
    FinishRequests,
    FromCore,
    Ready,
    Shutdown,
    StepOutputs,
    ToCore,
    dec_hook,
    enc_hook,
)

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine-core process is gone; no request can be served any more."""


class CoreUnreachableError(EngineDeadError):
    """The core's socket has no connection: it died and its launcher has not said so yet, or the
    network to it is down. Nothing was sent; a router may try another instance."""




# ---------------------------------------------------------------- API side
class CoreClient:
    """Owns one engine core (started by its launcher) and its two sockets; calls back with every
    `StepOutputs`, and once with a reason if the core dies."""

    def __init__(self, config: EngineConfig, on_outputs: Callable[[StepOutputs], None],
                 on_death: Callable[[str], None], launcher: CoreLauncher | None = None) -> None:
        self.config = config
        self.on_outputs = on_outputs
        self.on_death = on_death
        self.launcher = launcher or LocalCoreLauncher()
        self.num_blocks = 0  # blocks of tokens its KV cache holds
        self.kv_layer_groups = 1
        self.pid: int | None = None
        self.host: str | None = None  # the core's host name (from its READY)
        self.kv_address: str | None = None
        self.kv_format = ""  # the KV-cache spec's wire format, from the core's Ready
        self.dead_reason: str | None = None
        self._started = False
        self._last_error: str | None = None
        self._stopping = False
        self._dir: str | None = None
        # Sockets are made in `start`, so a client that is never started holds nothing.
        self._sync_ctx: zmq.Context | None = None
        self._async_ctx: zmq.asyncio.Context | None = None
        self._inbox: zmq.Socket | None = None
        self._outbox: zmq.asyncio.Socket | None = None
        self._encoder = msgspec.msgpack.Encoder(enc_hook=enc_hook)
        self._decoder = msgspec.msgpack.Decoder(FromCore, dec_hook=dec_hook)
        self._receiver: asyncio.Task | None = None

    @property
    def alive(self) -> bool:
        return self.dead_reason is None and self._started

    def _bind(self) -> tuple[str, str]:
        """Bind both sockets where the launcher's core can reach them; return their addresses."""
        self._sync_ctx, self._async_ctx = zmq.Context(), zmq.asyncio.Context()
        self._inbox = self._sync_ctx.socket(zmq.PUSH)  # to the core; never blocks (no high-water mark)
        self._inbox.setsockopt(zmq.SNDHWM, 0)
        self._outbox = self._async_ctx.socket(zmq.PULL)
        host = self.launcher.bind_host
        if host is None:
            self._dir = tempfile.mkdtemp(prefix="kvflow-")
            input_addr, output_addr = f"ipc://{self._dir}/input", f"ipc://{self._dir}/output"
            self._inbox.bind(input_addr)
            self._outbox.bind(output_addr)
            return input_addr, output_addr
        in_port = self._inbox.bind_to_random_port(f"tcp://{host}")
        out_port = self._outbox.bind_to_random_port(f"tcp://{host}")
        return f"tcp://{host}:{in_port}", f"tcp://{host}:{out_port}"

    async def start(self, timeout: float = 900.0) -> None:
        """Start the core and wait until its model is loaded; raise with its error if it fails."""
        input_addr, output_addr = self._bind()
        assert self._outbox is not None
        self.launcher.start(self.config, input_addr, output_addr)
        deadline = time.monotonic() + timeout
        while True:
            if await self._outbox.poll(200):
                message = self._decoder.decode(await self._outbox.recv())
                if isinstance(message, Ready):
                    self.num_blocks, self.pid, self.kv_address = message.num_blocks, message.pid, message.kv_address
                    self.host, self.kv_format = message.host, message.kv_format
                    self.kv_layer_groups = message.kv_layer_groups
                    break
                if isinstance(message, CoreFailed):
                    await self.launcher.stop(5)
                    raise RuntimeError(f"the engine core failed to start:\n{message.message}")
            elif not self.launcher.is_alive():
                raise RuntimeError(f"the engine core exited during startup ({await self.launcher.exit_reason()})")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the engine core did not start within {timeout:.0f} s")
        self._started = True
        self.launcher.watch(self._on_exit)
        self._receiver = asyncio.create_task(self._receive_loop(), name="kvflow-core-outputs")

    def add(self, specs: list[CoreRequestSpec]) -> None:
        self._send(AddRequests(specs))

    def finish(self, items: list[tuple[str, str, str | None]]) -> None:
        """Abort (status "abort") or stop (status "stop" with the stop string) core requests."""
        if items and self.alive:
            self._send(FinishRequests(items))

    def _send(self, message: ToCore) -> None:
        if not self.alive or self._inbox is None:
            raise EngineDeadError(self.dead_reason or "the engine core is not running")
        try:
            self._inbox.send(self._encoder.encode(message), zmq.NOBLOCK)
        except zmq.Again:  # no high-water mark: only a lost connection makes a PUSH refuse
            raise CoreUnreachableError("the engine core is not connected (it is dying, or its host is "
                                       "unreachable)") from None

    async def _receive_loop(self) -> None:
        assert self._outbox is not None
        while True:
            message = self._decoder.decode(await self._outbox.recv())
            if isinstance(message, StepOutputs):
                try:
                    self.on_outputs(message)
                except Exception:  # a bug in output handling must not kill the receiver
                    logger.exception("failed to process engine outputs")
            elif isinstance(message, CoreFailed):
                self._last_error = message.message
                logger.error("engine core failed:\n%s", message.message)

    def _on_exit(self) -> None:
        """The core ended: unless we asked it to, this is a failure to report."""
        if not self._stopping:
            asyncio.get_running_loop().create_task(self._declare_dead())

    async def _declare_dead(self) -> None:
        await asyncio.sleep(0.05)  # let the receiver pick up a last CoreFailed message
        reason = f"the engine core process died ({await self.launcher.exit_reason()})"
        if self._last_error:
            reason += f": {self._last_error.splitlines()[0]}"
        self.dead_reason = reason
        logger.error("%s; the server cannot serve requests any more", reason)
        self.on_death(reason)

    async def shutdown(self, timeout: float = 10.0) -> None:
        """Ask the core to stop, then have the launcher force it if it does not; close the sockets."""
        self._stopping = True
        if self._inbox is None:
            return  # never started
        if self.launcher.is_alive():
            try:
                self._inbox.send(self._encoder.encode(Shutdown()), zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
        if not await self.launcher.stop(timeout):
            logger.warning("engine core did not stop within %.0f s; terminated it", timeout)
        if self._receiver is not None:
            self._receiver.cancel()
            try:
                await self._receiver
            except (asyncio.CancelledError, Exception):
                pass
        assert self._outbox is not None and self._sync_ctx is not None and self._async_ctx is not None
        self._inbox.close(linger=0)
        self._outbox.close(linger=0)
        self._sync_ctx.term()
        self._async_ctx.term()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
