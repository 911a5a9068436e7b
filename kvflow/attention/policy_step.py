"""One step's KV-policy work inside the attention layers: the runner builds a `PolicyStep` when a
step has sequences whose policy needs the queries (Quest reads, H2O attention mass, SnapKV
selection), and each attention layer calls it around the backend:

    meta_l = step.layer_metadata(layer, q, kv_cache, meta, backend, scale)  # Quest: fewer blocks
    out = backend.forward(q, k, v, kv_cache, meta_l, ...)
    step.after_attention(layer, q, kv_cache, meta_l, backend, scale)       # H2O mass, SnapKV copy

A Quest row reads a reduced block table (its chosen blocks, in order) as if it were a shorter
sequence, so every backend reads block subsets with its ordinary decode kernel; a SpeContext row
reads its buffer blocks and newest blocks the same way, in every layer (its selection is global). The C++ CPU
forward calls the same work through its `before_attention` / `after_attention` hooks
(`cpu_reads`, `after_attention`), so the choices are the same on every path.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Protocol

import torch

from kvflow.attention.backend import AttentionBackend, AttentionMetadata
from kvflow.attention.kivi import compact_sequence, read_sequence
from kvflow.attention.kv_policy_ops import (
    MassFn,
    SelectFn,
    block_attention_mass,
    compact_tokens,
    quest_select,
    snapkv_select,
)
from kvflow.attention.kv_spec import LayerKV

#: Quest reads every block in the first layers, whose attention is spread too evenly for the bound
#: to rank blocks (the paper's setting).
QUEST_DENSE_LAYERS = 2


@dataclass
class QuestRows:
    """Decode rows (indices among the step's sequences) that read only their best blocks."""

    rows: list[int]
    read_blocks: list[int]  # blocks read per row, in all
    sink_blocks: list[int]  # leading blocks always read
    window_blocks: list[int]  # newest blocks always read (at least the query's own)


@dataclass
class SnapJob:
    """A sequence whose prompt ends this step: keep `budget` tokens per kv head, copied into `dest`."""

    seq: int  # index among the step's sequences
    budget: int
    window: int  # observation window: the prompt's last queries, all in this chunk
    dest: torch.Tensor  # block ids the kept tokens are written to


class LayerLoads(Protocol):
    """KV moved into place ahead of the forward (SpeContext's buffer loads, kvflow/worker/retrieval_keys.py)."""

    def wait(self, layer: int) -> None:
        """Return once layer `layer`'s moves are done (raise if they failed)."""

    def wait_all(self) -> None:
        """Return once every layer's moves are done."""


@dataclass
class SpeContextReads:
    """Decode rows that read their SpeContext buffer and window blocks, the same in every layer."""

    rows: list[int]
    tables: torch.Tensor  # [R, width]: buffer blocks, then window blocks
    lens: list[int]  # context length over them
    loads: LayerLoads


@dataclass
class PolicyStep:
    key_bounds: list[torch.Tensor] | None = None  # per layer, Quest's per-block key min/max
    quest: QuestRows | None = None
    h2o_rows: list[int] = field(default_factory=list)  # decode rows whose block mass is wanted
    block_mass: torch.Tensor | None = None  # [num_decodes, max_blocks], summed over layers and heads
    snaps: list[SnapJob] = field(default_factory=list)
    specontext: SpeContextReads | None = None
    select_fn: SelectFn = quest_select  # Quest's choice: PyTorch, or the C++ CPU kernel
    mass_fn: MassFn = block_attention_mass  # H2O's block mass where the backend gives none: PyTorch or C++
    # Per step, made on first use: Quest rows, their tables and context lengths; for cpu_reads the
    # two buffers handed to the kernel.
    _quest_rows: tuple[torch.Tensor, torch.Tensor, list[int]] | None = field(default=None, repr=False)
    _cpu_buffers: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)
    _specontext_view: AttentionMetadata | None = field(default=None, repr=False)

    def _quest_choice(self, layer: int, q: torch.Tensor,
                      meta: AttentionMetadata, scale: float) -> tuple[torch.Tensor, torch.Tensor, list[int]] | None:
        """Quest rows' blocks in this layer: (rows, their reduced tables, context lengths over them);
        None where this layer reads everything."""
        quest = self.quest
        if quest is None or layer < QUEST_DENSE_LAYERS or self.key_bounds is None:
            return None
        if self._quest_rows is None:
            rows = torch.tensor(quest.rows, device=q.device)
            self._quest_rows = (rows, meta.block_tables[rows], [meta.seq_lens_list[r] for r in quest.rows])
        rows, row_tables, kv_lens = self._quest_rows
        chosen, lens = self.select_fn(q[rows], self.key_bounds[layer], row_tables, kv_lens, quest.read_blocks,
                                      quest.sink_blocks, quest.window_blocks, meta.block_size, scale)
        return rows, chosen, lens

    def _reduced_reads(self, layer: int, q: torch.Tensor, meta: AttentionMetadata,
                       scale: float) -> tuple[list[int], torch.Tensor, list[int]] | None:
        """Every row that reads a reduced table in this layer (Quest's choice, SpeContext's buffer and
        window): (rows, tables [R, width], context lengths); None where all read everything. A
        SpeContext row waits here for its buffer's moves of this layer."""
        if self.specontext is not None:
            self.specontext.loads.wait(layer)
        quest = self._quest_choice(layer, q, meta, scale)
        if self.specontext is None:
            return None if quest is None else (self.quest.rows, quest[1], quest[2])
        sc = self.specontext
        if quest is None:
            return sc.rows, sc.tables, sc.lens
        width = max(quest[1].shape[1], sc.tables.shape[1])
        tables = torch.zeros(len(self.quest.rows) + len(sc.rows), width, dtype=sc.tables.dtype, device=q.device)
        tables[: len(self.quest.rows), : quest[1].shape[1]] = quest[1]
        tables[len(self.quest.rows) :, : sc.tables.shape[1]] = sc.tables
        return self.quest.rows + sc.rows, tables, quest[2] + sc.lens

    def cpu_reads(self, layer: int, q: torch.Tensor, meta: AttentionMetadata, kv_positions: torch.Tensor,
                  scale: float) -> list[torch.Tensor]:
        """The C++ forward's `before_attention`: [] or [block_tables, kv_positions] for this layer
        (decodes come first in a step, one token each, so a Quest row's token is its row). The two
        tensors handed back are the same buffers every layer (the kernel has read them before the
        next layer writes them)."""
        fixed = self.specontext is not None and self.quest is None  # the same reads in every layer
        if fixed and self._cpu_buffers is not None:
            self.specontext.loads.wait(layer)
            return list(self._cpu_buffers)
        choice = self._reduced_reads(layer, q, meta, scale)
        if choice is None:
            return []
        rows, chosen, lens = choice
        if self._cpu_buffers is None:
            self._cpu_buffers = (meta.block_tables.clone(), kv_positions.clone())
        tables, positions = self._cpu_buffers
        tables[rows, : chosen.shape[1]] = chosen
        positions[rows] = torch.tensor(lens, dtype=torch.long, device=q.device) - 1
        return [tables, positions]

    def layer_metadata(self, layer: int, q: torch.Tensor, kv_cache: LayerKV, meta: AttentionMetadata,
                       backend: AttentionBackend, scale: float) -> AttentionMetadata:
        """The metadata this layer attends with: Quest rows get their chosen blocks, SpeContext rows
        their buffer and window blocks."""
        reuse = self.specontext is not None and self.quest is None  # the same reads in every layer
        if reuse and self._specontext_view is not None:
            self.specontext.loads.wait(layer)
            return self._specontext_view
        choice = self._reduced_reads(layer, q, meta, scale)
        if choice is None:
            return meta
        rows, chosen, lens = choice
        tables = meta.block_tables.clone()
        tables[rows, : chosen.shape[1]] = chosen  # (a reduced table is never wider than the row's own)
        seq_lens_list = list(meta.seq_lens_list)
        for r, n in zip(rows, lens):
            seq_lens_list[r] = n
        view = dataclasses.replace(
            meta, block_tables=tables, seq_lens=torch.tensor(seq_lens_list, dtype=torch.long, device=q.device),
            seq_lens_list=seq_lens_list, max_seq_len=max(seq_lens_list), extra={}, policy=None,
            shared_prefix=None,  # Quest rows read other blocks than their tables' shared ones
        )
        backend.prepare(view)
        if self.block_mass is not None:
            view.extra["block_mass"] = self.block_mass
        if reuse:
            self._specontext_view = view
        return view

    def after_attention(self, layer: int, q: torch.Tensor, kv_cache: LayerKV, meta: AttentionMetadata,
                        backend: AttentionBackend | None, scale: float) -> None:
        """H2O: add the layer's block mass where the backend did not (None: the C++ forward, which
        does not); SnapKV: select and copy."""
        if self.h2o_rows and self.block_mass is not None and not getattr(backend, "returns_block_mass", False):
            rows = torch.tensor(self.h2o_rows, device=q.device)
            lens = [meta.seq_lens_list[r] for r in self.h2o_rows]
            nb = -(-max(lens) // meta.block_size)
            mass = self.mass_fn(q[rows], kv_cache, meta.block_tables[rows, :nb], lens, scale)
            self.block_mass[rows, :nb] += mass
        starts = meta.query_start_loc
        for job in self.snaps:
            end = int(starts[job.seq + 1])
            table, kv_len = meta.block_tables[job.seq], meta.seq_lens_list[job.seq]
            if meta.kivi is not None:  # read from blocks and ring, re-quantised in new groups (after the store)
                kivi, slot = meta.kivi, int(meta.kivi.slots[job.seq])
                keys, values = read_sequence(kv_cache, table, kv_len, kivi.quantised_after_list[job.seq], slot)
                keep = snapkv_select(q[end - job.window : end], kv_cache, table, kv_len, job.budget, scale, keys)
                compact_sequence(kv_cache, keys, values, keep, job.dest, slot, kivi.residual)
                continue
            keep = snapkv_select(q[end - job.window : end], kv_cache, table, kv_len, job.budget, scale)
            compact_tokens(kv_cache, table, keep, job.dest)
