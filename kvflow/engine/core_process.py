"""The engine-core process: build an `EngineCore`, then serve the API process until told to stop.

The server's event loop does HTTP, tokenisation and detokenisation; if the step loop shared that
process, every step would stall them and the reverse. So `EngineCore` runs in its own process: it
pulls request specs and finish orders, steps while there is work, and pushes each step's token
outputs with scheduler stats (kvflow/engine/messages.py). `core_client.py` is the API side.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import signal
import socket
import threading
import time
import traceback
from typing import Any

import msgspec
import zmq

from kvflow.config import EngineConfig
from kvflow.core.request import RequestStatus
from kvflow.engine.core import EngineCoreOutput
from kvflow.engine.input_processor import build_core_requests
from kvflow.engine.messages import (
    AddRequests,
    CoreFailed,
    CoreStats,
    FinishRequests,
    FromCore,
    Ready,
    Shutdown,
    StepOutputs,
    ToCore,
    dec_hook,
    enc_hook,
)

_IDLE_POLL_MS = 500  # how often an idle core checks that its parent is still alive
_TRANSFER_POLL_MS = 1  # how often a core with only KV transfers in flight checks on them


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
    encoder = msgspec.msgpack.Encoder(enc_hook=enc_hook)
    try:
        _CoreLoop(config, inbox, outbox, encoder, parent_pid).run()
        gc.freeze()  # a fast exit: no final full collection over torch's objects
    except BaseException as exc:  # report the cause before dying, then exit non-zero
        outbox.send(encoder.encode(CoreFailed(f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")))
        outbox.close(linger=2000)
        if parent_pid is not None:  # a spawned child: the parent reports it (one line, traceback at debug)
            raise SystemExit(1) from None
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
        from kvflow.kv_transfer.base import make_connector

        self.core = EngineCore(config, make_connector(config))
        self.inbox, self.outbox, self.encoder = inbox, outbox, encoder
        self.parent_pid = parent_pid
        self.decoder = msgspec.msgpack.Decoder(ToCore, dec_hook=dec_hook)
        self.requests: dict[str, Any] = {}  # core id -> Request not yet reported as scheduled
        # True: the first stats go out right after READY, so the server's gauges (KV blocks, cache
        # config) are filled before the first request, not after it.
        self.stats_dirty = True
        self.step_tokens: list[int] = []  # tokens of each step since the last message
        # KV-transfer events not sent yet: loads (core id, KV bytes, wire bytes, s), sends (transfer id, s).
        self.kv_loads: list[tuple[str, int, int, float]] = []
        self.kv_sent: list[tuple[str, float]] = []

    def run(self) -> None:
        connector = self.core.connector
        kv = self.core.kv
        self._send(Ready(kv.num_token_blocks, os.getpid(), connector.address if connector else None,
                         socket.gethostname(), self.core.runner.kv_spec.wire_format, kv.layer_groups))
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
                if self.core.num_steps > steps:
                    self.step_tokens.append(self.core.last_step_tokens)
                events = self.core.drain_events()
                self.kv_loads += [(r.request_id, r.payload_bytes, r.wire_bytes, r.seconds) for r in events.loads]
                self.kv_sent += [(r.transfer_id, r.exposed_seconds) for r in events.sent]
                # Blocks freed outside a step (a pulled transfer) change the stats too.
                if outputs or self.stats_dirty or events.blocks_released or self.kv_loads or self.kv_sent:
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
        self._send(StepOutputs(outputs, scheduled, stats, self.kv_loads, self.kv_sent, self.step_tokens))
        self.kv_loads, self.kv_sent, self.step_tokens = [], [], []
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
