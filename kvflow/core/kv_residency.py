"""SpeContext's adaptive memory, scheduler side: a memory model that decides, each step, how many layers
keep their full KV in memory and which move their older KV to the offload tier (`--kv-resident-memory`).

A SpeContext decode reads, in every layer, its buffer blocks (the tokens the retrieval head chose) and
its newest window blocks; the rest of its blocks are only a *source* the elastic loader copies chosen
tokens from. That source may be memory or a file: the paper keeps whole layers' KV in GPU memory while it
fits, and moves layers to CPU memory as sequences grow. Here memory is RAM and the tier a file
(kvflow/worker/kv_residency.py); a block's pages can go back to the OS one layer at a time.

**The model.** A layer-block is one layer's KV of one block (`B` bytes); releasing one gives back at least
`R` ≤ B bytes, the pages wholly inside its key and value chunks (R = B when a chunk is whole pages:
`tiny` in fp32 at 16 tokens per block; `135m` in bf16 needs 32). The pool's memory is every block ever
handed out, in every layer (`touched`: the pages they lie on), less what its released layers gave back
(`BlockPool.released_layers`; never-used blocks cost nothing, freed ones are handed out first). For a
global threshold f, every SpeContext sequence of the step keeps layers [0, f) of its older blocks (before
its window; only blocks it alone holds) and releases layers [f, L) of them. Memory at f is

    M(f) = touched − (released + Σ_seq saving_seq(f)) · R,
    saving_seq(f) = n_old · (f_seq − min(f_seq, f)) + (n − n_old) · (L − min(f_seq, f)),

where f_seq and n_old are what the sequence released before (layers [f_seq, L) of its first n_old blocks)
and n its older blocks now. The step takes the largest f with M(f) ≤ cap: all layers stay while
everything fits, and the upper layers leave first as sequences grow (their loads are needed last in
the forward, so a slower source has the longest to overlap). A sequence's threshold only goes down;
a block's released layers come back only when it is handed out again. When even f = 0 does not fit
(prompts, full-attention requests and the SpeContext sequences' windows and buffers alone exceed the cap)
the step runs anyway, counted in `over_cap_steps`, with a warning.

M counts at least what the kernel does (`ReleasableCache.resident_bytes`, mincore; equal when R = B): a
run of neighbouring blocks also gives back the pages they share. Checked in
tests/engine/test_specontext_residency.py and by `kvflow bench specontext --resident-memory`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from kvflow.core.kv_cache_manager import KVCacheManager
from kvflow.core.kv_policy import SpeContextPolicy
from kvflow.worker.step import ScheduledChunk

logger = logging.getLogger(__name__)


@dataclass
class _Row:
    chunk: ScheduledChunk
    policy: SpeContextPolicy
    layer: int  # f_seq: layers [layer, L) of the first `released` blocks are in the tier
    released: int  # n_old
    older: int  # n: older blocks it alone holds (a prefix of its table)


class KVResidency:
    """The memory model of one engine: `num_layers`, `layer_block_bytes`, and `cap_bytes` of memory for
    the KV blocks."""

    def __init__(self, kv: KVCacheManager, num_layers: int, layer_block_bytes: int, cap_bytes: int,
                 release_bytes: int | None = None, touched_bytes: Callable[[int], int] | None = None) -> None:
        """`release_bytes`: what releasing one layer-block gives back at least (pages wholly inside it;
        `ReleasableCache.release_per_layer_block`); None: all of it. `touched_bytes(n)`: the memory of the
        first n blocks written in every layer (`ReleasableCache.touched_bytes`: whole pages); None:
        n · layers · layer_block_bytes."""
        self.kv = kv
        self._touched = touched_bytes
        self._touched_at = (-1, 0)  # (blocks, their bytes): the last count asked
        self.num_layers = num_layers
        self.layer_block_bytes = layer_block_bytes
        self.release_bytes = layer_block_bytes if release_bytes is None else release_bytes
        if self.release_bytes <= 0:
            raise ValueError(f"kv_resident_memory: one layer's KV of one block is {layer_block_bytes} bytes per key "
                             "or value chunk, less than a memory page, so releasing it gives nothing back: use a "
                             "larger --block-size")
        self.cap_bytes = cap_bytes
        self._released: list[int] = []  # blocks whose every layer's pages the runner is to give back
        self.threshold = num_layers  # the last step's f
        self.over_cap_steps = 0
        self.offloaded_bytes = 0  # layer-blocks moved to the tier so far, in bytes (cumulative)

    def _touched_bytes(self) -> int:
        """The pages of every block ever handed out, in every layer (computed once per block count)."""
        blocks = len(self.kv.pool.blocks)
        if self._touched_at[0] != blocks:
            self._touched_at = (blocks, blocks * self.num_layers * self.layer_block_bytes if self._touched is None
                                else self._touched(blocks))
        return self._touched_at[1]

    def _bytes(self, released_layer_blocks: int) -> int:
        """Memory with this many layer-blocks released: every block ever handed out, in every layer, less
        what releasing gives back at least."""
        return self._touched_bytes() - released_layer_blocks * self.release_bytes

    @property
    def resident_bytes(self) -> int:
        """What the model counts in memory now: at least what the kernel does (equal when a layer-block's
        chunks are whole pages)."""
        return self._bytes(self.kv.pool.released_layers)

    def collect_dead(self) -> None:
        """Blocks no one will read again (freed, not in the prefix cache) give all their memory back."""
        pool = self.kv.pool
        for block_id in pool.take_dead():
            if pool.blocks[block_id].released_layers < self.num_layers:
                pool.release_layers(block_id, self.num_layers)
                self._released.append(block_id)

    def take_released(self) -> list[int]:
        """The blocks whose every layer the runner is to give back now (before the step runs: none of
        them is in it)."""
        self.collect_dead()
        out, self._released = self._released, []
        return out

    def plan(self, chunks: Sequence[ScheduledChunk]) -> None:
        """Choose this step's threshold and give each SpeContext decode its moves to the tier
        (`KVPolicyOp.tier_*`: where its older KV is before the step; `offload_*`: after it). Freed blocks
        give their memory back first, and cached ones too (least recently used first) while even f = 0
        would not fit."""
        self.collect_dead()
        rows = [self._row(c) for c in chunks if c.kv_op is not None and c.kv_op.name == "specontext"]
        L = self.num_layers
        for row in rows:  # by default nothing changes
            self._set(row, row.layer, row.released)
        pool = self.kv.pool
        while self._bytes(pool.released_layers + sum(self._saving(r, 0) for r in rows)) > self.cap_bytes:
            block_id = pool.evict_free_cached()
            if block_id is None:
                break
            pool.release_layers(block_id, L)
            self._released.append(block_id)
        if not rows:
            return
        released = pool.released_layers
        f = L
        while f > 0 and self._bytes(released + sum(self._saving(r, f) for r in rows)) > self.cap_bytes:
            f -= 1
        if f == 0 and self._bytes(released + sum(self._saving(r, 0) for r in rows)) > self.cap_bytes:
            self.over_cap_steps += 1
            if self.over_cap_steps == 1:
                logger.warning("the KV blocks need more than --kv-resident-memory %.3f GiB even with every "
                               "SpeContext sequence's older KV in the tier: prompts, full-attention requests and "
                               "the sequences' windows and buffers alone exceed it", self.cap_bytes / 2**30)
        self.threshold = f
        for row in rows:
            layer = min(row.layer, f)
            if layer == L or row.older == 0:
                continue
            # Its blocks before `released` already have layers [row.layer, L) out: only a lower threshold
            # changes them.
            start = row.released if layer == row.layer else 0
            for block_id in row.chunk.request.block_ids[start : row.older]:
                before = pool.blocks[block_id].released_layers
                self.offloaded_bytes += (L - layer - before) * self.layer_block_bytes
                pool.release_layers(block_id, L - layer)
            self._set(row, layer, row.older)

    def _row(self, chunk: ScheduledChunk) -> _Row:
        policy = chunk.request.kv_policy
        assert isinstance(policy, SpeContextPolicy)
        op = chunk.kv_op
        blocks = -(-(chunk.start + 1) // self.kv.block_size)
        table = chunk.request.block_ids
        pool = self.kv.pool
        older = policy.offloaded_blocks
        limit = blocks - op.window_blocks
        while older < limit and pool.blocks[table[older]].ref_cnt == 1:
            older += 1  # (a block another request holds stays whole: it reads every layer of it)
        layer = self.num_layers if policy.offload_layer is None else policy.offload_layer
        return _Row(chunk, policy, layer, policy.offloaded_blocks, older)

    def _saving(self, row: _Row, f: int) -> int:
        layer = min(row.layer, f)
        return row.released * (row.layer - layer) + (row.older - row.released) * (self.num_layers - layer)

    def _set(self, row: _Row, layer: int, blocks: int) -> None:
        """The op's tier fields (before: the policy's state; after: `layer`, `blocks`) and the new state."""
        op, policy = row.chunk.kv_op, row.policy
        op.tier_layer, op.tier_blocks = row.layer, row.released
        op.offload_layer, op.offload_blocks = layer, blocks
        policy.offload_layer = None if layer == self.num_layers else layer
        policy.offloaded_blocks = blocks if layer < self.num_layers else 0
