"""The prefill side of a KV transfer: serve each finished prompt's KV blocks to the decode
instance that pulls them, layer by layer, then hand the blocks back to the engine to free.

The engine thread registers transfers (`expect` when the step computing a prompt's last chunk
starts, `layer_done` after each layer, `complete` once the first token is sampled) and frees the
blocks `collect` returns. Puller connections are served on threads, which only read the blocks
of transfers the engine has not freed; the engine frees nothing a puller may still read. A KIVI
sequence's newest tokens are in its ring slot, not its blocks, and the slot is freed with the
request: the engine thread copies those rows out as each layer is written (`layer_done`, `complete`).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from dataclasses import dataclass, field
from multiprocessing import shared_memory

import torch

from kvflow.attention.kv_spec import KVCacheSpec, LayerKV
from kvflow.config import KVTransferConfig
from kvflow.kv_transfer.base import SentRecord
from kvflow.kv_transfer.wire import Ack, Channel, Done, Failed, Header, Layer, ProtocolError, Pull, expect

logger = logging.getLogger(__name__)


@dataclass
class _Transfer:
    transfer_id: str
    block_ids: list[int]
    num_tokens: int
    residual_slot: int | None = None  # KIVI: the request's ring slot while it runs
    residual: list[torch.Tensor | None] = field(default_factory=list)  # KIVI: each layer's ring rows, once copied
    layers_ready: int = 0
    done: Done | None = None
    failed: str | None = None
    held: bool = False  # the engine handed the blocks over (the request finished): release when done
    pulling: bool = False
    finished_at: float = field(default_factory=time.monotonic)
    claimed_at: float | None = None  # a decode instance asked for it


@dataclass
class SenderStats:
    transfers: int = 0  # acknowledged by a decode instance


class KVSender:
    def __init__(self, spec: KVCacheSpec, caches: list[LayerKV], config: KVTransferConfig) -> None:
        self.spec = spec
        self.caches = caches
        self.config = config
        self.num_layers = spec.num_layers
        self.stats = SenderStats()
        self._cond = threading.Condition()
        self._transfers: dict[str, _Transfer] = {}
        self._in_step: list[_Transfer] = []
        self._release: list[list[int]] = []  # block lists the engine thread frees in `collect`
        self._sent: list[SentRecord] = []  # finished transfers not yet reported
        self._abandoned: set[str] = set()  # pulls that failed before their request finished
        self._closed = False
        self._listener = socket.create_server((config.host, config.port), backlog=128)
        host, port = self._listener.getsockname()[:2]
        self.address = f"{host}:{port}"
        threading.Thread(target=self._accept_loop, name="kvflow-kv-sender", daemon=True).start()

    # ------------------------------------------------------------ engine thread
    def expect(self, transfer_id: str, block_ids: list[int], num_tokens: int,
               residual_slot: int | None = None) -> None:
        """The step about to run computes this prompt's last chunk: pullers may start on its layers."""
        with self._cond:
            transfer = _Transfer(transfer_id, list(block_ids), num_tokens, residual_slot)
            self._transfers[transfer_id] = transfer
            self._in_step.append(transfer)
            self._cond.notify_all()

    def layer_done(self, layer: int) -> None:
        with self._cond:
            for transfer in self._in_step:
                self._copy_residual(transfer, layer + 1)
                transfer.layers_ready = layer + 1
            self._cond.notify_all()

    def end_step(self) -> None:
        with self._cond:
            for transfer in self._in_step:
                self._copy_residual(transfer, self.num_layers)
                transfer.layers_ready = self.num_layers
            self._in_step.clear()
            self._cond.notify_all()

    def complete(self, transfer_id: str, block_ids: list[int], num_tokens: int, done: Done,
                 residual_slot: int | None = None) -> bool:
        """The request finished with its first token: the sender takes its blocks (True), unless its
        puller already gave up on it (False: the engine frees them now). `residual_slot`: its KIVI ring
        slot, still its own until this returns."""
        with self._cond:
            if transfer_id in self._abandoned:
                self._abandoned.discard(transfer_id)
                return False
            transfer = self._transfers.get(transfer_id)
            if transfer is None:  # whole-request mode, or registered by no earlier step
                transfer = _Transfer(transfer_id, list(block_ids), num_tokens, residual_slot)
                self._transfers[transfer_id] = transfer
            self._copy_residual(transfer, self.num_layers)
            transfer.layers_ready = self.num_layers
            transfer.done = done
            transfer.held = True
            transfer.finished_at = time.monotonic()
            self._cond.notify_all()
            return True

    def _copy_residual(self, transfer: _Transfer, num_layers: int) -> None:
        """Copy the ring rows of the transfer's first `num_layers` layers not copied yet (engine thread)."""
        while len(transfer.residual) < num_layers:
            layer = len(transfer.residual)
            rows = None
            if transfer.residual_slot is not None:
                rows = self.spec.gather_residual(self.caches[layer], transfer.residual_slot, transfer.num_tokens)
            transfer.residual.append(rows)

    def fail(self, transfer_id: str, reason: str) -> None:
        """The request ended without a first token (aborted): pullers get `Failed`."""
        with self._cond:
            self._abandoned.discard(transfer_id)
            transfer = self._transfers.pop(transfer_id, None)
            if transfer is not None:
                transfer.failed = reason
                self._cond.notify_all()

    def drop(self, transfer_id: str) -> None:
        """Nobody will pull this (the request was aborted): free its blocks unless a pull is under way."""
        with self._cond:
            transfer = self._transfers.get(transfer_id)
            if transfer is not None and transfer.held and not transfer.pulling:
                del self._transfers[transfer_id]
                self._release.append(transfer.block_ids)

    def collect_sent(self) -> list[SentRecord]:
        """Transfers acknowledged since the last call."""
        with self._cond:
            sent, self._sent = self._sent, []
        return sent

    def collect(self) -> list[list[int]]:
        """Block lists to free now: pulled transfers, and held ones nobody pulled in time."""
        now = time.monotonic()
        with self._cond:
            for transfer in list(self._transfers.values()):
                if transfer.held and not transfer.pulling and now - transfer.finished_at > self.config.timeout_s:
                    logger.warning("KV transfer %s was not pulled within %.0f s; freeing its blocks",
                                   transfer.transfer_id, self.config.timeout_s)
                    del self._transfers[transfer.transfer_id]
                    self._release.append(transfer.block_ids)
            released, self._release = self._release, []
        return released

    @property
    def num_held(self) -> int:
        """Requests whose blocks the sender holds (pulled or not), freed ones not yet collected included."""
        with self._cond:
            return sum(1 for t in self._transfers.values() if t.held) + len(self._release)

    def close(self) -> None:
        self._closed = True
        try:
            self._listener.close()
        except OSError:
            pass

    # ---------------------------------------------------------------- pullers
    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), name="kvflow-kv-send", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        transfer: _Transfer | None = None
        shm: shared_memory.SharedMemory | None = None
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.settimeout(self.config.timeout_s)
        channel = Channel(conn)
        try:
            pull = expect(channel.recv(), Pull)
            transfer = self._claim(pull.transfer_id)
            if transfer is None:
                channel.send(Failed(f"no KV for {pull.transfer_id!r} here (unknown, aborted or timed out)"))
                return
            start = pull.start  # an n > 1 sibling whose puller shares the first tokens with its leader
            if not 0 <= start <= transfer.num_tokens:
                raise ProtocolError(f"pull starts at token {start} of {transfer.num_tokens}")
            nbytes = self.spec.wire_nbytes(transfer.num_tokens, start)
            if self.config.transport == "shm":
                shm = shared_memory.SharedMemory(create=True, size=max(1, nbytes * self.num_layers))
            channel.send(Header(transfer.transfer_id, self.num_layers, transfer.num_tokens, self.spec.wire_format,
                                nbytes, shm.name if shm else None, start))
            for layer in range(self.num_layers):
                self._wait(transfer, lambda t, n=layer: t.layers_ready > n)
                if self.config.layer_send_delay_s:
                    time.sleep(self.config.layer_send_delay_s)
                raw = self.spec.gather(self.caches[layer], transfer.block_ids, transfer.num_tokens, start,
                                       transfer.residual[layer])
                if shm is not None:
                    offset = layer * nbytes
                    torch.frombuffer(shm.buf, dtype=torch.uint8, count=nbytes, offset=offset).copy_(raw)
                    channel.send(Layer(layer, offset))
                else:
                    channel.send(Layer(layer))
                    channel.send_raw(memoryview(raw.numpy()))
            self._wait(transfer, lambda t: t.done is not None)
            assert transfer.done is not None
            channel.send(transfer.done)
            expect(channel.recv(), Ack)
            acked = time.monotonic()
            with self._cond:
                self.stats.transfers += 1
                start = max(transfer.finished_at, transfer.claimed_at or acked)
                self._sent.append(SentRecord(transfer.transfer_id, acked - start))
        except (OSError, ProtocolError, TimeoutError) as exc:
            logger.warning("KV transfer %s failed: %s", transfer.transfer_id if transfer else "?", exc)
            try:
                channel.send(Failed(str(exc)))
            except OSError:
                pass
        finally:
            conn.close()
            if shm is not None:
                shm.close()
                shm.unlink()
            if transfer is not None:
                self._finish(transfer)

    def _claim(self, transfer_id: str) -> _Transfer | None:
        """Wait (up to the timeout) for the engine to register the transfer; mark it as being pulled."""
        deadline = time.monotonic() + self.config.timeout_s
        with self._cond:
            while True:
                transfer = self._transfers.get(transfer_id)
                if transfer is not None and not transfer.pulling:
                    transfer.pulling = True
                    transfer.claimed_at = time.monotonic()
                    return transfer
                left = deadline - time.monotonic()
                if left <= 0 or self._closed:
                    return None
                self._cond.wait(min(left, 0.5))

    def _wait(self, transfer: _Transfer, ready) -> None:
        deadline = time.monotonic() + self.config.timeout_s
        with self._cond:
            while not ready(transfer):
                if transfer.failed is not None:
                    raise ProtocolError(transfer.failed)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"the prefill instance made no progress for {self.config.timeout_s:.0f} s")
                self._cond.wait(min(left, 0.5))

    def _finish(self, transfer: _Transfer) -> None:
        """Drop the transfer; if the engine handed its blocks over, queue them to be freed."""
        with self._cond:
            if self._transfers.get(transfer.transfer_id) is transfer:
                del self._transfers[transfer.transfer_id]
            if transfer.held:
                self._release.append(transfer.block_ids)
            else:
                transfer.failed = transfer.failed or "transfer ended before the request finished"
                self._abandoned.add(transfer.transfer_id)
