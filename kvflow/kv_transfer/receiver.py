"""The decode side of a KV transfer: pull a request's KV from its prefill instance into blocks
this instance has already allocated, on a thread per transfer, and report the first token.

The engine thread starts loads and collects their results (`collect`); a load's blocks belong
to the loading thread until its result is collected, so a cancelled load is freed only then.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from multiprocessing import resource_tracker, shared_memory

import torch

from kvflow.attention.kv_spec import KVCacheSpec, LayerKV
from kvflow.config import KVTransferConfig
from kvflow.kv_transfer.base import LoadResult
from kvflow.kv_transfer.wire import Ack, Channel, Done, Header, Layer, ProtocolError, Pull, done_limit, expect

logger = logging.getLogger(__name__)


def parse_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"KV source address must be HOST:PORT, got {address!r}")
    return host, int(port)


class KVReceiver:
    def __init__(self, spec: KVCacheSpec, caches: list[LayerKV], config: KVTransferConfig) -> None:
        self.spec = spec
        self.caches = caches
        self.config = config
        self._lock = threading.Lock()
        self._results: list[LoadResult] = []
        self._cancelled: dict[str, threading.Event] = {}
        self._sockets: dict[str, socket.socket] = {}

    @property
    def num_loading(self) -> int:
        with self._lock:
            return len(self._cancelled)

    def start(self, request_id: str, transfer_id: str, source: str, block_ids: list[int], num_tokens: int,
              start: int = 0, residual_slot: int | None = None) -> None:
        """Pull prompt tokens [start, num_tokens) into `block_ids` (the ones before are already there)
        and, for KIVI, the newest ones into ring slot `residual_slot`."""
        cancel = threading.Event()
        with self._lock:
            self._cancelled[request_id] = cancel
        threading.Thread(target=self._load,
                         args=(request_id, transfer_id, source, list(block_ids), num_tokens, start, residual_slot,
                               cancel),
                         name="kvflow-kv-recv", daemon=True).start()

    def cancel(self, request_id: str) -> None:
        """Stop a load at the next layer (its result still arrives, as a failure, through `collect`)."""
        with self._lock:
            event = self._cancelled.get(request_id)
            sock = self._sockets.get(request_id)
        if event is not None:
            event.set()
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in recv
            except OSError:
                pass

    def collect(self) -> list[LoadResult]:
        with self._lock:
            results, self._results = self._results, []
        return results

    # ---------------------------------------------------------------- thread
    def _load(self, request_id: str, transfer_id: str, source: str, block_ids: list[int], num_tokens: int,
              start: int, residual_slot: int | None, cancel: threading.Event) -> None:
        started = time.monotonic()
        result = LoadResult(request_id)
        shm: shared_memory.SharedMemory | None = None
        try:
            with socket.create_connection(parse_address(source), timeout=self.config.timeout_s) as sock:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                with self._lock:
                    self._sockets[request_id] = sock
                if cancel.is_set():
                    raise ProtocolError("cancelled")
                channel = Channel(sock)
                channel.send(Pull(transfer_id, start))
                header = expect(channel.recv(), Header)
                self._check(header, num_tokens, start)
                if header.shm_name is not None:
                    shm = _attach(header.shm_name)
                staging = torch.empty(header.layer_nbytes, dtype=torch.uint8) if shm is None else None
                for _ in range(self.spec.num_layers):
                    layer = expect(channel.recv(), Layer)
                    if not 0 <= layer.index < self.spec.num_layers:
                        raise ProtocolError(f"layer index {layer.index} out of range")
                    if shm is None:
                        channel.recv_into(memoryview(staging.numpy()))
                        raw = staging
                    else:
                        raw = torch.frombuffer(shm.buf, dtype=torch.uint8, count=header.layer_nbytes,
                                               offset=layer.offset)
                    if cancel.is_set():
                        raise ProtocolError("cancelled")
                    self.spec.scatter(self.caches[layer.index], block_ids, raw, start, num_tokens, residual_slot)
                    del raw
                    result.payload_bytes += header.layer_nbytes
                result.extra = expect(channel.recv(done_limit(num_tokens)), Done)
                result.num_tokens = num_tokens
                channel.send(Ack())
                # Over shm the layers' bytes cross in the segment: count them as moved too.
                result.wire_bytes = channel.bytes_received + (result.payload_bytes if shm is not None else 0)
        except Exception as exc:  # noqa: BLE001 - any failure is this load's; the request recomputes locally
            if not isinstance(exc, (OSError, ProtocolError, TimeoutError, ValueError)):
                logger.exception("KV load %s failed", transfer_id)
            result.extra, result.num_tokens = None, 0
            result.error = f"{type(exc).__name__}: {exc}" if str(exc) != "cancelled" else "cancelled"
        finally:
            if shm is not None:
                shm.close()
            result.seconds = time.monotonic() - started
            with self._lock:
                self._cancelled.pop(request_id, None)
                self._sockets.pop(request_id, None)
                self._results.append(result)

    def _check(self, header: Header, num_tokens: int, start: int) -> None:
        spec = self.spec
        mine = (spec.num_layers, num_tokens, start, spec.wire_format)
        theirs = (header.num_layers, header.num_tokens, header.start, header.kv_format)
        if mine != theirs:
            raise ProtocolError(f"KV mismatch: this instance expects (layers, tokens, start, KV format) = {mine}, "
                                f"the prefill instance sends {theirs}")
        if header.layer_nbytes != spec.wire_nbytes(num_tokens, start):
            raise ProtocolError(f"layer size {header.layer_nbytes} does not match the shape")


def _attach(name: str) -> shared_memory.SharedMemory:
    """Open the prefill side's segment; it owns (and unlinks) it, so this process must not track it."""
    shm = shared_memory.SharedMemory(name=name)
    try:
        resource_tracker.unregister(shm._name, "shared_memory")  # type: ignore[attr-defined]
    except Exception:
        pass
    return shm
