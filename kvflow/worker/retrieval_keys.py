"""SpeContext on the worker: the retrieval head's key cache, and each step's selection and loads.

**Key cache.** The retrieval head's keys live beside the target's cache, per KV block and slot
([blocks, block_size, kv_heads, head_dim] fp32, a few percent of the target's bytes per token;
counted in the memory budget), written for every token an engine with a retrieval head computes, so
a block found in the prefix cache has its keys too. A key is a pure function of the token window
and the position, so each slot also records the window and position it was computed from;
before a sequence is scored, the entries not yet checked for it are compared with its own tokens and
recomputed where they differ (KV that arrived by another path, a block reused since): a stale key
is never scored.

**A step.** For each SpeContext decode: score its candidates with the head's query for the new
token, select K entries per KV head, plan the elastic move against what its buffer holds, and hand
the moves to the loader, which copies them layer by layer ahead of the forward (a thread on CPU, a
side stream on CUDA); layer l's attention waits only for layer l's copies.
"""

from __future__ import annotations

import bisect
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from kvflow.attention.kv_spec import LayerKV
from kvflow.attention.specontext_ops import (
    buffer_moves,
    elastic_rows,
    load_into_buffer,
    reduced_table,
    retrieval_scores,
    select_tokens,
)
from kvflow.model.retrieval_head import RetrievalHead
from kvflow.worker.kv_residency import SpillTier
from kvflow.worker.step import KVPolicyOp, ScheduledChunk, SpeContextResult


class RetrievalKeyCache:
    def __init__(self, head: RetrievalHead, num_blocks: int, block_size: int, device: torch.device) -> None:
        c = head.config
        self.head = head
        self.block_size = block_size
        self.window = c.window
        self.keys = torch.zeros(num_blocks, block_size, c.num_kv_heads, c.head_dim, dtype=torch.float32,
                                device=device)
        # What each slot's key was computed from: -2 marks a slot never written (no real window holds -2).
        self.windows = torch.full((num_blocks, block_size, c.window), -2, dtype=torch.int32, device=device)
        self.positions = torch.full((num_blocks, block_size), -1, dtype=torch.int32, device=device)

    def chunk_windows(self, chunks: Sequence[ScheduledChunk]) -> torch.Tensor:
        """[T, window] token windows of the step's tokens, in the step's order (proposals included)."""
        rows = []
        w = self.window
        for c in chunks:
            tokens = c.request.all_token_ids
            known = c.num_tokens - len(c.spec_token_ids)
            lo = max(0, c.start - (w - 1))
            ids = [-1] * (w - 1 - (c.start - lo)) + tokens[lo : c.start + known] + list(c.spec_token_ids)
            rows.append(torch.tensor(ids, dtype=torch.long).unfold(0, w, 1))
        return torch.cat(rows).to(self.keys.device)

    def store(self, windows: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """Compute and write the keys of tokens with these windows [T, w], positions and slots."""
        block, offset = slot_mapping // self.block_size, slot_mapping % self.block_size
        self.keys[block, offset] = self.head.keys(windows, positions)
        self.windows[block, offset] = windows.to(torch.int32)
        self.positions[block, offset] = positions.to(torch.int32)

    def verify(self, table: torch.Tensor, token_ids: list[int], start: int, end: int) -> int:
        """Make the keys of entries [start, end) of a sequence (positions = entries: SpeContext never
        shifts) match its tokens, recomputing those that do not; returns how many were recomputed."""
        if end <= start:
            return 0
        w, bs = self.window, self.block_size
        lo = max(0, start - (w - 1))
        ids = torch.tensor([-1] * (w - 1 - (start - lo)) + token_ids[lo:end], dtype=torch.long)
        windows = ids.unfold(0, w, 1).to(self.keys.device)  # [end - start, w]
        entries = torch.arange(start, end, device=self.keys.device)
        block, offset = table[entries // bs], entries % bs
        wrong = (self.windows[block, offset] != windows.to(torch.int32)).any(-1) | (self.positions[block, offset]
                                                                                   != entries.to(torch.int32))
        if not bool(wrong.any()):
            return 0
        slots = block[wrong] * bs + offset[wrong]
        self.store(windows[wrong], entries[wrong], slots)
        return int(wrong.sum())

    def candidate_keys(self, table: torch.Tensor, length: int) -> torch.Tensor:
        """Keys of entries [0, length) of a sequence: [length, kv_heads, head_dim]."""
        nb = -(-length // self.block_size)
        return self.keys[table[:nb]].flatten(0, 1)[:length]


@dataclass
class Offload:
    """A row's older KV in the offload tier (`--kv-resident-memory`, kvflow/core/kv_residency.py): layers
    [tier_layer, L) of its first `tier_blocks` blocks before the step, [offload_layer, L) of its first
    `offload_blocks` after it; `table` its blocks."""

    tier_layer: int
    tier_blocks: int
    offload_layer: int
    offload_blocks: int
    table: list[int]

    def spills(self, layer: int) -> list[int]:
        """The blocks of `layer` that go to the tier this step."""
        if layer < self.offload_layer:
            return []
        start = self.tier_blocks if layer >= self.tier_layer else 0
        return self.table[start : self.offload_blocks]


@dataclass
class StepMoves:
    """Every SpeContext row's moves of one step, as cache coordinates (the same in every layer):
    token `src_block[i], src_offset[i]` of KV head `heads[i]` goes to `dst_block[i], dst_offset[i]`.
    With an offload tier: a move reads the tier in layers >= `tier_from[i]` (where its source block's
    layer is there), and the `offloads` go to the tier once every layer's moves are done."""

    heads: torch.Tensor
    src_block: torch.Tensor
    src_offset: torch.Tensor
    dst_block: torch.Tensor
    dst_offset: torch.Tensor
    tier_from: torch.Tensor | None = None
    offloads: list[Offload] = field(default_factory=list)
    _thresholds: list[int] | None = field(default=None, repr=False)
    _splits: dict[int, tuple[tuple[torch.Tensor, ...], ...]] = field(default_factory=dict, repr=False)

    @classmethod
    def gather(cls, rows: list[tuple[torch.Tensor, ...]], offloads: list[Offload] | None = None) -> StepMoves:
        """From each row group's `buffer_moves` and `tier_from` (`_plan_rows`)."""
        heads, src_block, src_offset, dst_block, dst_offset, tier_from = (torch.cat(column) for column in zip(*rows))
        return cls(heads, src_block, src_offset, dst_block, dst_offset, tier_from, offloads or [])

    def apply(self, layer: int, cache: LayerKV, tier: SpillTier | None = None) -> None:
        """One layer's moves, one indexed copy per cache component (and source)."""
        coords = (self.heads, self.src_block, self.src_offset, self.dst_block, self.dst_offset)
        if tier is None or self.tier_from is None:
            load_into_buffer(cache, *coords)
            return
        from_pool, from_tier = self._split(layer, coords)
        load_into_buffer(cache, *from_pool)
        load_into_buffer(cache, *from_tier, source=tier.parts(layer))
        tier.read_tokens += len(from_tier[0])

    def _split(self, layer: int, coords: tuple[torch.Tensor, ...]) -> tuple[tuple[torch.Tensor, ...], ...]:
        """The moves that read the pool and those that read the tier in `layer`: the same for every layer
        between two of the rows' thresholds, so made once per such range."""
        assert self.tier_from is not None
        if self._thresholds is None:
            self._thresholds = sorted(set(self.tier_from.tolist()))
            self._splits = {}
        key = bisect.bisect_right(self._thresholds, layer)  # how many thresholds are <= layer
        if key not in self._splits:
            in_tier = self.tier_from <= layer
            self._splits[key] = (tuple(c[~in_tier] for c in coords), tuple(c[in_tier] for c in coords))
        return self._splits[key]

    def offload(self, layer: int, tier: SpillTier | None) -> int:
        """Move this layer's blocks that leave memory into the tier (after its moves: a move may read
        them); returns the bytes given back."""
        blocks = [b for offload in self.offloads for b in offload.spills(layer)]
        return tier.spill(layer, blocks) if blocks and tier is not None else 0


def spare_cpu_core() -> bool:
    """Whether a thread beside torch's intra-op threads would get a core of its own."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return torch.get_num_threads() < cores


class ElasticLoader:
    """Runs a step's buffer moves layer by layer ahead of the forward; `wait(layer)` returns when
    that layer's are done. CUDA: a side stream the compute stream waits on per layer. CPU: a worker
    thread (torch's copies release the GIL) where a core is spare (`overlap`, default
    `spare_cpu_core()`); else the moves run before the forward, since a third thread on cores the
    forward's threads already fill slows every kernel (batch 16 on 2 cores: 0.70x full attention's
    decode with the thread, 0.86x without)."""

    def __init__(self, device: torch.device, overlap: bool | None = None, tier: SpillTier | None = None) -> None:
        """`tier`: the offload tier of `--kv-resident-memory` (moves read from it and blocks go to it)."""
        self.device = device
        self.tier = tier
        cpu_thread = device.type != "cuda" and (spare_cpu_core() if overlap is None else overlap)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="kvflow-specontext") if cpu_thread else None
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def start(self, kv_caches: list[LayerKV], moves: StepMoves) -> StepLoads:
        loads = StepLoads(len(kv_caches), self._stream)
        loads.moves = moves  # alive until the step ends: the side stream may still read them
        if self._stream is not None:
            self._stream.wait_stream(torch.cuda.current_stream(self.device))  # last step's KV is written
            with torch.cuda.stream(self._stream):
                for layer, cache in enumerate(kv_caches):
                    moves.apply(layer, cache)
                    loads.cuda_events[layer].record(self._stream)
            return loads
        if self._pool is None:
            loads.run(kv_caches, moves, self.tier)
        else:
            self._pool.submit(loads.run, kv_caches, moves, self.tier)
        return loads

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)


class StepLoads:
    """One step's moves in flight."""

    def __init__(self, num_layers: int, stream: torch.cuda.Stream | None) -> None:
        self.done = [threading.Event() for _ in range(num_layers)]
        self.cuda_events = [torch.cuda.Event() for _ in range(num_layers)] if stream is not None else []
        self.error: BaseException | None = None
        self.moves: StepMoves | None = None
        self.offloaded = threading.Event()  # the step's blocks are in the tier (after every layer's moves)

    def run(self, kv_caches: list[LayerKV], moves: StepMoves, tier: SpillTier | None = None) -> None:
        """Every layer's moves in order, each announced when done; then the blocks that leave memory
        (the forward never reads them: it reads the buffers and the windows)."""
        try:
            with torch.inference_mode():
                for layer, cache in enumerate(kv_caches):
                    moves.apply(layer, cache, tier)
                    self.done[layer].set()
                for layer in range(len(kv_caches)):
                    moves.offload(layer, tier)
        except BaseException as exc:  # surfaced to the forward, which waits on it
            self.error = exc
            for event in self.done:
                event.set()
        finally:
            self.offloaded.set()

    def wait(self, layer: int) -> None:
        if self.cuda_events:
            torch.cuda.current_stream().wait_event(self.cuda_events[layer])
            return
        self.done[layer].wait()
        if self.error is not None:
            raise RuntimeError("SpeContext's buffer loads failed") from self.error

    def wait_all(self) -> None:
        """Every layer's moves are done (the step's end: nothing may still write the buffers)."""
        if self.cuda_events:
            self.cuda_events[-1].synchronize()
            return
        for layer in range(len(self.done)):
            self.wait(layer)
        self.offloaded.wait()
        if self.error is not None:
            raise RuntimeError("SpeContext's moves to the offload tier failed") from self.error


Plan = tuple[StepMoves, torch.Tensor, list[int], dict[str, SpeContextResult]]


def plan_specontext(keys: RetrievalKeyCache, chunks: Sequence[ScheduledChunk], rows: list[int],
                    windows: torch.Tensor, positions: torch.Tensor, token_starts: list[int],
                    block_tables: torch.Tensor, block_size: int, bytes_per_head_token: int) -> Plan:
    """Each SpeContext decode row's selection, moves and reduced read. Returns the rows' moves, their
    reduced tables [R, max], context lengths over them, and what each request's policy keeps
    (its buffer's new contents, entries verified, tokens moved; `bytes_per_head_token`: the KV of one
    token of one KV head, every layer). Rows with the same budget and sinks are planned together: one
    query projection, one scoring product over their candidates (padded to the longest), one top-K,
    one elastic plan."""
    groups: dict[tuple[int, int], list[int]] = {}
    for row in rows:
        op: KVPolicyOp = chunks[row].kv_op  # type: ignore[assignment]
        groups.setdefault((op.budget, op.sink_tokens), []).append(row)
    moves: list[tuple[torch.Tensor, ...]] = []
    planned: dict[int, tuple[list[int], int]] = {}  # row -> (reduced table, context length)
    results: dict[str, SpeContextResult] = {}
    offloads: list[Offload] = []
    for (budget, sinks), members in groups.items():
        moves.append(_plan_rows(keys, chunks, members, budget, sinks, windows, positions, token_starts, block_tables,
                                block_size, bytes_per_head_token, planned, results, offloads))
    tables = [planned[row][0] for row in rows]
    width = max(len(t) for t in tables)
    padded = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.long, device=block_tables.device)
    return StepMoves.gather(moves, offloads), padded, [planned[row][1] for row in rows], results


def _plan_rows(keys: RetrievalKeyCache, chunks: Sequence[ScheduledChunk], rows: list[int], budget: int, sinks: int,
               windows: torch.Tensor, positions: torch.Tensor, token_starts: list[int], block_tables: torch.Tensor,
               block_size: int, bytes_per_head_token: int, planned: dict[int, tuple[list[int], int]],
               results: dict[str, SpeContextResult], offloads: list[Offload]) -> tuple[torch.Tensor, ...]:
    """plan_specontext for rows sharing a budget and sinks; fills `planned`, `results` and `offloads`,
    returns the moves and, per move, the first layer it reads from the offload tier."""
    device = block_tables.device
    ops: list[KVPolicyOp] = [chunks[row].kv_op for row in rows]  # type: ignore[misc]
    num_entries = [chunks[row].start + 1 for row in rows]  # this token included (SpeContext never shifts)
    blocks = [-(-n // block_size) for n in num_entries]
    candidates = [(nb - op.window_blocks) * block_size for nb, op in zip(blocks, ops)]
    tables = block_tables[rows]
    recomputed = [keys.verify(tables[i], chunks[row].request.all_token_ids, ops[i].verified_tokens, candidates[i])
                  for i, row in enumerate(rows)]
    starts = torch.tensor([token_starts[row] for row in rows], dtype=torch.long, device=windows.device)
    q = keys.head.queries(windows[starts], positions[starts])  # [R, KVH, G, D]
    lengths = torch.tensor(candidates, dtype=torch.long, device=device)
    span = -(-max(candidates) // block_size)
    candidate_keys = keys.keys[tables[:, :span]].flatten(1, 2)  # [R, span·bs, KVH, D]
    scores = retrieval_scores(q, candidate_keys, keys.head.scale, lengths)
    selected = select_tokens(scores, budget, sinks, lengths)  # [R, KVH, K]
    held = torch.stack([op.buffer_tokens.to(device) if op.buffer_tokens is not None
                        else torch.full_like(selected[0], -1) for op in ops])
    row_idx, heads, slots, entries, contents = elastic_rows(held, selected)
    buffers = torch.tensor([op.dest_block_ids for op in ops], dtype=torch.long, device=device)
    moved = torch.bincount(row_idx, minlength=len(rows)).tolist()
    for i, (row, op) in enumerate(zip(rows, ops)):
        reduced, length = reduced_table(buffers[i], tables[i], num_entries[i], op.window_blocks, block_size)
        planned[row] = (reduced.tolist(), length)
        kept = 0 if op.buffer_tokens is None else int(budget * held.shape[1] - moved[i])
        results[chunks[row].request.request_id] = SpeContextResult(
            contents[i].cpu(), max(candidates[i], op.verified_tokens), moved[i], moved[i] * bytes_per_head_token, kept,
            recomputed[i])
    tier_layer = torch.tensor([op.tier_layer for op in ops], dtype=torch.long, device=device)
    tier_blocks = torch.tensor([op.tier_blocks for op in ops], dtype=torch.long, device=device)
    in_tier = entries // block_size < tier_blocks[row_idx]
    tier_from = torch.where(in_tier, tier_layer[row_idx], torch.iinfo(torch.long).max)
    offloads.extend(Offload(op.tier_layer, op.tier_blocks, op.offload_layer, op.offload_blocks,
                            tables[i, : op.offload_blocks].tolist())
                    for i, op in enumerate(ops) if (op.offload_layer, op.offload_blocks) != (op.tier_layer,
                                                                                            op.tier_blocks))
    return (*buffer_moves(tables, heads, slots, entries, buffers, block_size, rows=row_idx), tier_from)


def engine_retrieval_head(config, device: torch.device, embedding: torch.Tensor) -> RetrievalHead | None:
    """The retrieval head an engine loads, reading the model's `embedding`: `--retrieval-model`, or,
    for `--kv-policy specontext` on the shipped model, the shipped one. None: no SpeContext on this
    engine. Raises ValueError when the head cannot serve the model (another KV-head layout,
    vocabulary or embedding width)."""
    from pathlib import Path

    from kvflow.assets import default_model_path, default_retrieval_path
    from kvflow.model.retrieval_head import RetrievalHeadConfig, load_retrieval_head

    cache, model = config.cache, config.model
    path = cache.retrieval_model
    if path is None:
        if cache.kv_policy != "specontext":
            return None
        if Path(model.path).resolve() != default_model_path().resolve():
            raise ValueError("kv_policy specontext needs --retrieval-model DIR, a retrieval head distilled from this "
                             f"model ({model.path}): train one with `kvflow train --preset tiny-retrieval --teacher "
                             "MODEL_DIR` (only the shipped tiny has one built in)")
        path = str(default_retrieval_path())
    c = RetrievalHeadConfig.from_dir(path)
    if c.num_kv_heads != model.num_kv_heads:
        raise ValueError(f"the retrieval head {path} scores {c.num_kv_heads} KV heads; the model has "
                         f"{model.num_kv_heads}: distil one from this model (`kvflow train --preset tiny-retrieval "
                         "--teacher DIR`)")
    return load_retrieval_head(path, embedding, device)
