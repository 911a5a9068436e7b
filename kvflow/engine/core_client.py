"""The engine core in its own process, driven over ZMQ with msgspec messages.

The server's event loop does HTTP, tokenisation and detokenisation; if the step loop shared that
process, every step would stall them and the reverse. So `EngineCore` runs in its own process
(`run_engine_core`): it pulls request specs and finish orders, steps while there is work, and
pushes each step's token outputs with scheduler stats. `CoreClient` is the API side: it has its
launcher start the process (a local child, or a Ray actor: kvflow/engine/core_launcher.py), waits
for its READY, sends without blocking, receives in an asyncio task, and is told by the launcher
the moment the core ends, so a dead core is noticed at once, with its cause.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import json
import logging
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

import msgspec
import zmq
import zmq.asyncio

from kvflow.config import EngineConfig
from kvflow.engine.core import EngineCoreOutput, EngineStats
from kvflow.engine.core_launcher import CoreLauncher, LocalCoreLauncher
from kvflow.engine.input_processor import CoreRequestSpec, build_core_requests
from kvflow.engine.request import RequestStatus
from kvflow.sampling import SamplingParams

logger = logging.getLogger(__name__)

_IDLE_POLL_MS = 500  # how often an idle core checks that its parent is still alive
_TRANSFER_POLL_MS = 1  # how often a core with only KV transfers in flight checks on them


# ---------------------------------------------------------------- messages
class AddRequests(msgspec.Struct, tag="add"):
    specs: list[CoreRequestSpec]


class FinishRequests(msgspec.Struct, tag="finish"):
    """(core id, finish status value, stop reason): aborts, or stop strings found by the API side."""

    items: list[tuple[str, str, str | None]]


class Shutdown(msgspec.Struct, tag="shutdown"):
    pass


class CoreStats(msgspec.Struct):
    engine: EngineStats
    prefix_queried_tokens: int
    prefix_hit_tokens: int


class Ready(msgspec.Struct, tag="ready"):
    num_blocks: int
    pid: int
    kv_address: str | None = None  # a prefill instance: where decode instances pull KV from
    host: str | None = None


class StepOutputs(msgspec.Struct, tag="outputs"):
    outputs: list[EngineCoreOutput]
    # Core ids first scheduled since the last message -> monotonic time (queue-time metric).
    scheduled_times: dict[str, float]
    stats: CoreStats
    # Decode instance: KV loads finished since the last message (core id, KV bytes, wire bytes, seconds).
    kv_transfers: list[tuple[str, int, int, float]] = []
    # Prefill instance: transfers acknowledged since the last message (transfer id, exposed seconds).
    kv_sent: list[tuple[str, float]] = []


class CoreFailed(msgspec.Struct, tag="error"):
    message: str


ToCore = AddRequests | FinishRequests | Shutdown
FromCore = Ready | StepOutputs | CoreFailed


def _enc_hook(obj: Any) -> Any:
    if isinstance(obj, SamplingParams):
        return obj.model_dump()
    raise NotImplementedError(f"cannot encode {type(obj).__name__}")


def _dec_hook(typ: type, obj: Any) -> Any:
    if typ is SamplingParams:
        return SamplingParams.model_construct(**obj)  # validated on the API side already
    raise NotImplementedError(f"cannot decode {typ}")


class EngineDeadError(RuntimeError):
    """The engine-core process is gone; no request can be served any more."""


class CoreUnreachableError(EngineDeadError):
    """The core's socket has no connection: it died and its launcher has not said so yet, or the
    network to it is down. Nothing was sent; a router may try another instance."""


# ------------------------------------------------------------ core process
def run_engine_core(config: EngineConfig, input_addr: str, output_addr: str, parent_pid: int | None) -> None:
    """Entry point of the engine-core process: build the core, then serve until told to stop.

    `parent_pid`: the API process, whose death ends this one (a child process); None when
    something else owns the core's lifetime (a Ray actor dies with the job that created it).
    """
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the API process, which stops us
    if parent_pid is not None:
        _die_with_parent()
    if config.cpu_cores:
        os.sched_setaffinity(0, config.cpu_cores)
    threads = config.num_threads or (len(config.cpu_cores) if config.cpu_cores else None)
    if threads:
        import torch

        torch.set_num_threads(threads)
    ctx = zmq.Context()
    inbox = ctx.socket(zmq.PULL)
    inbox.connect(input_addr)
    outbox = ctx.socket(zmq.PUSH)
    outbox.setsockopt(zmq.SNDHWM, 0)
    outbox.connect(output_addr)
    encoder = msgspec.msgpack.Encoder(enc_hook=_enc_hook)
    try:
        _CoreLoop(config, inbox, outbox, encoder, parent_pid).run()
        gc.freeze()  # a fast exit: no final full collection over torch's objects
    except BaseException as exc:  # report the cause before dying, then exit non-zero
        outbox.send(encoder.encode(CoreFailed(f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")))
        outbox.close(linger=2000)
        raise
    finally:
        ctx.destroy(linger=2000)


def _die_with_parent() -> None:
    """Linux: get SIGKILL when the API process dies, so a crashed server leaves no orphan."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the parent-pid check in the loop still catches it


class _CoreLoop:
    def __init__(self, config: EngineConfig, inbox: zmq.Socket, outbox: zmq.Socket,
                 encoder: msgspec.msgpack.Encoder, parent_pid: int | None) -> None:
        from kvflow.engine.core import EngineCore

        self.core = EngineCore(config)
        self.inbox, self.outbox, self.encoder = inbox, outbox, encoder
        self.parent_pid = parent_pid
        self.decoder = msgspec.msgpack.Decoder(ToCore, dec_hook=_dec_hook)
        self.requests: dict[str, Any] = {}  # core id -> Request not yet reported as scheduled
        self.stats_dirty = False

    def run(self) -> None:
        connector = self.core.connector
        self._send(Ready(self.core.kv.num_blocks, os.getpid(), connector.address if connector else None,
                         socket.gethostname()))
        try:
            self._loop()
        finally:
            self.core.close()

    def _loop(self) -> None:
        path = self.core.config.step_log
        log = StepLog(path) if path else None
        try:
            self._serve(log)
        finally:
            if log is not None:
                log.close()

    def _serve(self, log: StepLog | None) -> None:
        stalled = False  # the last step had nothing to compute
        while True:
            busy = self.core.has_unfinished_requests()
            pending = self.core.transfers_pending
            # Only KV transfers in flight (nothing to compute until they land): poll, don't spin.
            timeout = _TRANSFER_POLL_MS if pending and stalled else (0 if busy else _IDLE_POLL_MS)
            if self.inbox.poll(timeout):
                while True:
                    try:
                        message = self.decoder.decode(self.inbox.recv(zmq.NOBLOCK))
                    except zmq.Again:
                        break
                    if isinstance(message, Shutdown):
                        return
                    self._handle(message)
            if self.parent_pid is not None and os.getppid() != self.parent_pid:
                return  # the API process is gone
            if self.core.has_unfinished_requests() or pending:
                steps = self.core.num_steps
                started = time.perf_counter()
                outputs = self.core.step()
                stalled = self.core.num_steps == steps and not outputs
                # Blocks freed outside a step (a pulled transfer) change the stats too.
                freed, self.core.scheduler.blocks_released = self.core.scheduler.blocks_released, False
                if outputs or self.stats_dirty or freed:
                    self._send_outputs(outputs)
                if log is not None and self.core.num_steps > steps:
                    log.write(started, time.perf_counter() - started, *self.core.last_shape)
            else:
                if self.stats_dirty:
                    self._send_outputs([])
                if log is not None:
                    log.flush()  # idle: a killed core still leaves its steps on disk

    def _handle(self, message: AddRequests | FinishRequests) -> None:
        if isinstance(message, AddRequests):
            for request in build_core_requests(message.specs):
                self.core.add_request(request)
                self.requests[request.request_id] = request
        else:
            for core_id, status, stop_reason in message.items:
                self.core.abort_request(core_id, RequestStatus(status), stop_reason)
                self.requests.pop(core_id, None)
        self.stats_dirty = True

    def _send_outputs(self, outputs: list[EngineCoreOutput]) -> None:
        scheduled = {}
        for core_id, request in list(self.requests.items()):
            if request.scheduled_time is not None or request.finished:
                if request.scheduled_time is not None:
                    scheduled[core_id] = request.scheduled_time
                del self.requests[core_id]
        kv_stats = self.core.kv.stats
        stats = CoreStats(self.core.stats(), kv_stats.queried_tokens, kv_stats.hit_tokens)
        records, self.core.scheduler.transfer_records = self.core.scheduler.transfer_records, []
        connector = self.core.connector
        sent = [(r.transfer_id, r.exposed_seconds) for r in connector.collect_sent()] if connector else []
        self._send(StepOutputs(outputs, scheduled, stats, records, sent))
        self.stats_dirty = False

    def _send(self, message: FromCore) -> None:
        self.outbox.send(self.encoder.encode(message))


class StepLog:
    """One JSON line per step: start (perf_counter s), seconds (the step and sending its outputs),
    prompt chunks [new, before] and decode contexts."""

    def __init__(self, path: str) -> None:
        self._file = open(path, "a", buffering=1 << 16)

    def write(self, start: float, seconds: float, chunks: list[tuple[int, int]], contexts: list[int]) -> None:
        self._file.write(json.dumps({"t": round(start, 6), "s": round(seconds, 7), "p": chunks, "d": contexts}) + "\n")

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()


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
        self.num_blocks = 0
        self.pid: int | None = None
        self.host: str | None = None  # the core's host name (from its READY)
        self.kv_address: str | None = None
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
        self._encoder = msgspec.msgpack.Encoder(enc_hook=_enc_hook)
        self._decoder = msgspec.msgpack.Decoder(FromCore, dec_hook=_dec_hook)
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
                    self.host = message.host
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
