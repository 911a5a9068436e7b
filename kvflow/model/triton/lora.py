"""Triton kernels of multi-LoRA on GPUs: segmented shrink and expand (Punica's SGMV, S-LoRA's layout).

A step's tokens come in runs that share an adapter slot (kvflow/model/lora.py). Each run is cut into
tiles of `BLOCK_M` rows; `_shrink` computes t = x · A[slot]ᵀ for a tile ([rows, R], fp32, R = the
slot's stacked rank), `_expand` adds t · B[slot] into the base output for a tile and a block of
output columns. Every (rows, columns) block of the output belongs to one program, so the addition
needs no atomics. The slot index is read per tile, so one launch serves every adapter of the step.

Both products run in fp32 on tensor cores: "tf32x3" (~1e-6) for an fp32 model, whose outputs must match the
CPU's, plain tf32 for 16-bit models (their inputs are exact in tf32), "ieee" under the interpreter
(attention's `dot_precision`).

This module imports triton at the top (the optional `gpu` extra); lora.py imports it only on CUDA.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvflow.attention.triton._common import device_capability, dot_precision

BLOCK_M = 16
BLOCK_K = 32
BLOCK_N = 32


@triton.jit
def _shrink(x_ptr, a_ptr, t_ptr, tiles_ptr, K, R, stride_xm, stride_as, stride_ar, stride_tm,
            BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    tile = tl.program_id(0)
    slot = tl.load(tiles_ptr + tile * 3)
    start = tl.load(tiles_ptr + tile * 3 + 1)
    end = tl.load(tiles_ptr + tile * 3 + 2)
    rows = start + tl.arange(0, BLOCK_M)
    ranks = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :], mask=(rows[:, None] < end) & (ks[None, :] < K),
                    other=0.0).to(tl.float32)
        a = tl.load(a_ptr + slot * stride_as + ranks[None, :] * stride_ar + ks[:, None],
                    mask=(ranks[None, :] < R) & (ks[:, None] < K), other=0.0).to(tl.float32)
        acc += tl.dot(x, a, input_precision=PRECISION)
    tl.store(t_ptr + rows[:, None] * stride_tm + ranks[None, :], acc, mask=(rows[:, None] < end) & (ranks[None, :] < R))


@triton.jit
def _expand(t_ptr, b_ptr, out_ptr, tiles_ptr, N, R, stride_tm, stride_bs, stride_br, stride_om,
            BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    tile = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    slot = tl.load(tiles_ptr + tile * 3)
    start = tl.load(tiles_ptr + tile * 3 + 1)
    end = tl.load(tiles_ptr + tile * 3 + 2)
    rows = start + tl.arange(0, BLOCK_M)
    ranks = tl.arange(0, BLOCK_R)
    t = tl.load(t_ptr + rows[:, None] * stride_tm + ranks[None, :], mask=(rows[:, None] < end) & (ranks[None, :] < R),
                other=0.0)
    b = tl.load(b_ptr + slot * stride_bs + ranks[:, None] * stride_br + cols[None, :],
                mask=(cols[None, :] < N) & (ranks[:, None] < R), other=0.0).to(tl.float32)
    delta = tl.dot(t, b, input_precision=PRECISION)
    mask = (rows[:, None] < end) & (cols[None, :] < N)
    out = out_ptr + rows[:, None] * stride_om + cols[None, :]
    base = tl.load(out, mask=mask, other=0.0).to(tl.float32)
    tl.store(out, (base + delta).to(out_ptr.dtype.element_ty), mask=mask)


def run_tiles(runs: list[tuple[int, int, int]], device: torch.device) -> torch.Tensor:
    """(slot, start, end) runs cut into tiles of at most BLOCK_M rows, as an int64 [tiles, 3] tensor."""
    tiles = [(slot, s, min(s + BLOCK_M, end)) for slot, start, end in runs for s in range(start, end, BLOCK_M)]
    return torch.tensor(tiles, dtype=torch.long, device=device).view(-1, 3)


def lora_add(x: torch.Tensor, out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, tiles: torch.Tensor) -> None:
    """out[rows] += (x[rows] · A[slot]ᵀ) · B[slot] for every tile (slot, start, end); x [M, K], out [M, N],
    A [S, R, K], B [S, R, N] (LoRASlots' layout: a slot's output columns contiguous, so the expand's loads
    coalesce), each contiguous in its last dimension."""
    if tiles.numel() == 0:
        return
    m, k = x.shape
    n, r = b.shape[2], a.shape[1]
    x, a = x.contiguous(), a.contiguous()
    assert out.stride(1) == 1 and b.stride(2) == 1, "row-major output rows; B's output columns contiguous"
    block_r = max(16, triton.next_power_of_2(r))
    t = torch.empty(m, r, dtype=torch.float32, device=x.device)
    precision = dot_precision(x.dtype, device_capability(x.device))
    num_tiles = tiles.shape[0]
    _shrink[(num_tiles,)](x, a, t, tiles, k, r, x.stride(0), a.stride(0), a.stride(1), t.stride(0),
                          BLOCK_M=BLOCK_M, BLOCK_R=block_r, BLOCK_K=BLOCK_K,
                          PRECISION=precision)
    _expand[(num_tiles, triton.cdiv(n, BLOCK_N))](t, b, out, tiles, n, r, t.stride(0), b.stride(0), b.stride(1),
                                                   out.stride(0), BLOCK_M=BLOCK_M, BLOCK_R=block_r, BLOCK_N=BLOCK_N,
                                                   PRECISION=precision)
