"""A step's paged-attention inputs from per-sequence lengths and block tables: the one place that
turns (tokens before, tokens now, blocks) into positions, slot mapping and `AttentionMetadata`,
for the model runner and for a draft model running beside it (spec_decode/draft.py)."""

from __future__ import annotations

import torch

from kvflow.attention.backend import AttentionMetadata
from kvflow.attention.shared_prefix import GPU_MIN_SAVED_TOKENS, find_shared_prefixes


def paged_step_inputs(seq_lens: list[int], query_lens: list[int], block_ids: list[list[int]], block_size: int,
                      device: torch.device, shifts: list[int] | None = None, shared_prefix: bool = False,
                      sliding_window: int | None = None, query_heads_per_kv: int = 1,
                      shared_prefix_min_saved: int | None = None,
                      ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[list[int]]]:
    """Each sequence computes its last `query_lens[i]` of `seq_lens[i]` cache entries (single-token
    sequences first, so the backend can batch them as decodes). Returns the tokens' positions (cache
    index plus the sequence's `shifts`: what its KV policy dropped before it), cache indices, the
    metadata and the padded block tables. `shared_prefix`: also find the decodes that share leading
    blocks (shared_prefix.py; the caller knows whether its attention can use them), none where the
    model has a `sliding_window` in any layer, or where they save fewer tokens of reads than
    `shared_prefix_min_saved` (default: GPU_MIN_SAVED_TOKENS on CUDA, none elsewhere)."""
    max_blocks = max(len(ids) for ids in block_ids)
    tables = [ids + [0] * (max_blocks - len(ids)) for ids in block_ids]
    seq_lens_t = torch.tensor(seq_lens, dtype=torch.long, device=device)
    query_lens_t = torch.tensor(query_lens, dtype=torch.long, device=device)
    query_start_loc = torch.zeros(len(seq_lens) + 1, dtype=torch.long, device=device)
    torch.cumsum(query_lens_t, 0, out=query_start_loc[1:])
    block_tables = torch.tensor(tables, dtype=torch.long, device=device)
    num_tokens = sum(query_lens)
    seq_index = torch.repeat_interleave(torch.arange(len(seq_lens), device=device), query_lens_t,
                                        output_size=num_tokens)
    kv_positions = (seq_lens_t - query_lens_t)[seq_index] + (
        torch.arange(num_tokens, device=device) - query_start_loc[:-1][seq_index]
    )
    positions = kv_positions
    if shifts is not None and any(shifts):
        positions = kv_positions + torch.tensor(shifts, dtype=torch.long, device=device)[seq_index]
    slot_mapping = block_tables[seq_index, kv_positions // block_size] * block_size + kv_positions % block_size
    meta = AttentionMetadata(
        slot_mapping=slot_mapping,
        seq_lens=seq_lens_t,
        query_lens=query_lens_t,
        query_start_loc=query_start_loc,
        block_tables=block_tables,
        num_decodes=sum(1 for n in query_lens if n == 1),
        max_query_len=max(query_lens),
        max_seq_len=max(seq_lens),
        block_size=block_size,
        token_seq_index=seq_index,
        seq_lens_list=seq_lens,
        query_lens_list=query_lens,
    )
    if shared_prefix:
        meta.shared_prefix = find_shared_prefixes(
            block_ids, seq_lens, meta.num_decodes, block_size, device, sliding_window, query_heads_per_kv,
            min_saved_tokens=shared_prefix_min_saved if shared_prefix_min_saved is not None
            else GPU_MIN_SAVED_TOKENS if torch.device(device).type == "cuda" else 0)
    return positions, kv_positions, meta, tables
