"""GGUF block formats q8_0, q4_0 and q4_k, byte for byte as llama.cpp writes them.

Each row of a [N, K] weight is a run of blocks along K; ``data["blocks"]`` is uint8
[N, K / block_size * block_bytes], exactly the bytes of a GGUF tensor (little-endian fp16 scales):

- q8_0: blocks of 32, 34 bytes: fp16 d, then 32 int8 codes; w = d * q.
- q4_0: blocks of 32, 18 bytes: fp16 d, then 16 bytes whose low nibbles are weights 0..15 of the
  block and high nibbles weights 16..31; w = d * (q - 8).
- q4_k: super-blocks of 256, 144 bytes: fp16 d, fp16 dmin, 12 bytes holding eight 6-bit scales and
  eight 6-bit mins (sub-blocks of 32), then 128 bytes of nibbles: each 32-byte run covers 64 weights,
  low nibbles the first 32, high nibbles the next 32; w = d * sc_j * q - dmin * m_j.

The quantisers reproduce llama.cpp's reference ones (`quantize_row_q8_0_ref`, `quantize_row_q4_0_ref`,
`quantize_row_q4_K_ref` with `make_qkx2_quants`) operation for operation in float32, vectorised over
blocks. Bit-exactness needs the same rounding at every step, so sums that llama.cpp accumulates
element by element are accumulated in the same order here (a loop over the 32 positions of a
sub-block, each step one vector operation over all sub-blocks), never with a pairwise `sum`.
Dequantisation runs in torch (any device) and equals llama.cpp's `dequantize_row_*` exactly.
"""

from __future__ import annotations

import numpy as np
import torch

F32 = np.float32
QK8_0 = QK4_0 = 32
QK_K = 256
Q8_0_BYTES, Q4_0_BYTES, Q4_K_BYTES = 34, 18, 144


def _as_blocks(w: torch.Tensor, block: int) -> np.ndarray:
    """float32 [N*K/block, block] view of a weight (a copy only where the input needs one)."""
    n, k = w.shape
    if k % block:
        raise ValueError(f"in_features {k} is not a multiple of the block size {block}")
    return w.detach().to("cpu", torch.float32).contiguous().numpy().reshape(-1, block)


def _fp16_bytes(v: np.ndarray) -> np.ndarray:
    """float32 [B] -> the little-endian bytes [B, 2] of its fp16 rounding (nearest even, as ggml)."""
    return v.astype("<f2").view(np.uint8).reshape(-1, 2)


def _fp16_value(b: torch.Tensor) -> torch.Tensor:
    """Little-endian fp16 bytes [..., 2] (uint8) -> float32 [...]."""
    lo, hi = b[..., 0].to(torch.int32), b[..., 1].to(torch.int32)
    return (lo | (hi << 8)).to(torch.int16).view(torch.float16).float()


def _finish(blocks: np.ndarray, n: int) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(blocks)).reshape(n, -1)


def _roundf(v: np.ndarray) -> np.ndarray:
    """C's roundf: halves away from zero (exactly: floor(2 * frac) is exact in float32)."""
    a = np.abs(v)
    whole = np.floor(a)
    return np.sign(v) * (whole + np.floor(F32(2) * (a - whole)))


# ---------------------------------------------------------------------------- q8_0
def quantize_q8_0(w: torch.Tensor) -> torch.Tensor:
    x = _as_blocks(w, QK8_0)
    d = np.abs(x).max(axis=1) / F32(127)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, F32(0), F32(1) / d).astype(F32)
    qs = _roundf(x * inv[:, None]).astype(np.int8)
    return _finish(np.concatenate([_fp16_bytes(d), qs.view(np.uint8)], axis=1), w.shape[0])


def dequantize_q8_0(blocks: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    b = blocks.reshape(-1, Q8_0_BYTES)
    d = _fp16_value(b[:, :2])
    q = b[:, 2:].contiguous().view(torch.int8).float()
    return (q * d[:, None]).reshape(shape)


# ---------------------------------------------------------------------------- q4_0
def quantize_q4_0(w: torch.Tensor) -> torch.Tensor:
    x = _as_blocks(w, QK4_0)
    # The signed value of largest magnitude (the first one on ties) maps to -8.
    peak = np.take_along_axis(x, np.abs(x).argmax(axis=1)[:, None], axis=1)[:, 0]
    d = peak / F32(-8)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, F32(0), F32(1) / d).astype(F32)
    q = np.minimum(np.trunc(x * inv[:, None] + F32(8.5)), F32(15)).astype(np.uint8)
    qs = q[:, :16] | (q[:, 16:] << np.uint8(4))
    return _finish(np.concatenate([_fp16_bytes(d), qs], axis=1), w.shape[0])


def dequantize_q4_0(blocks: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    b = blocks.reshape(-1, Q4_0_BYTES)
    d = _fp16_value(b[:, :2])
    qs = b[:, 2:]
    q = torch.cat([qs & 0x0F, qs >> 4], dim=1).to(torch.int8) - 8
    return (q.float() * d[:, None]).reshape(shape)


# ---------------------------------------------------------------------------- q4_k
def _make_qkx2_quants(x: np.ndarray, w: np.ndarray, nmax: int = 15, rmin: float = -1.0, rdelta: float = 0.1,
                      nstep: int = 20) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """llama.cpp's `make_qkx2_quants` (squared error) for S sub-blocks at once: x, w float32 [S, n].

    Fits x ~ scale * L + min (min <= 0, L in [0, nmax]) by trying nstep + 1 grid stretches and a
    weighted least-squares refit for each. Returns (scale [S], -min [S], L uint8 [S, n])."""
    n = x.shape[1]
    lo = np.minimum(x.min(axis=1), F32(0))
    hi = x.max(axis=1)
    sum_w, sum_x = w[:, 0].copy(), w[:, 0] * x[:, 0]
    for i in range(1, n):
        sum_w = sum_w + w[:, i]
        sum_x = sum_x + w[:, i] * x[:, i]
    flat = hi == lo
    span = np.where(flat, F32(1), hi - lo)  # flat sub-blocks are answered at the end

    def codes(iscale: np.ndarray, mn: np.ndarray) -> np.ndarray:
        return np.clip(np.rint(iscale[:, None] * (x - mn[:, None])), 0, nmax).astype(F32)

    def error(scale: np.ndarray, mn: np.ndarray, L: np.ndarray) -> np.ndarray:
        total = np.zeros_like(scale)
        for i in range(n):
            diff = scale * L[:, i] + mn - x[:, i]
            total = total + w[:, i] * (diff * diff)
        return total

    iscale = F32(nmax) / span
    scale = F32(1) / iscale
    mn = lo
    L = codes(iscale, lo)
    best = error(scale, lo, L)
    for step in range(nstep + 1):
        # llama.cpp measures the grid from the best min so far (it moves as refits win)
        with np.errstate(divide="ignore", invalid="ignore"):
            span = np.where(flat, F32(1), hi - mn)
            iscale = (F32(rmin) + F32(rdelta) * F32(step) + F32(nmax)) / span
            aux = codes(iscale, mn)
        sum_l = np.zeros_like(sum_w)
        sum_l2 = np.zeros_like(sum_w)
        sum_xl = np.zeros_like(sum_w)
        for i in range(n):
            wl = w[:, i] * aux[:, i]
            sum_l = sum_l + wl
            sum_l2 = sum_l2 + wl * aux[:, i]
            sum_xl = sum_xl + wl * x[:, i]
        det = sum_w * sum_l2 - sum_l * sum_l
        ok = det > 0
        safe = np.where(ok, det, F32(1))
        with np.errstate(divide="ignore", invalid="ignore"):
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / safe
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / safe
            positive = this_min > 0
            this_scale = np.where(positive, sum_xl / np.where(positive, sum_l2, F32(1)), this_scale)
        this_min = np.where(positive, F32(0), this_min)
        cur = error(this_scale, this_min, aux)
        better = ok & (cur < best)
        L = np.where(better[:, None], aux, L)
        best = np.where(better, cur, best)
        scale = np.where(better, this_scale, scale)
        mn = np.where(better, this_min, mn)
    scale = np.where(flat, F32(0), scale)
    mn = np.where(flat, lo, mn)
    L = np.where(flat[:, None], F32(0), L)
    return scale.astype(F32), (-mn).astype(F32), L.astype(np.uint8)


def _pack_scales_k4(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and mins [B, 8] -> llama.cpp's 12-byte layout: bytes 0-3 hold scales 0-3
    (low 6 bits) and the high 2 bits of scales 4-7; bytes 4-7 mins 0-3 and the high bits of mins 4-7;
    bytes 8-11 the low nibbles of scales 4-7 (low) and mins 4-7 (high)."""
    out = np.zeros((ls.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    out[:, 4:8] = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    out[:, 8:12] = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    return out


def unpack_scales_k4(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 12-byte field [B, 12] (uint8) -> 6-bit scales and mins, each [B, 8] (llama.cpp's
    `get_scale_min_k4` for j = 0..7)."""
    s = scales.to(torch.int32)
    sc = torch.cat([s[:, 0:4] & 63, (s[:, 8:12] & 0xF) | ((s[:, 0:4] >> 6) << 4)], dim=1)
    mn = torch.cat([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], dim=1)
    return sc, mn


def quantize_q4_k(w: torch.Tensor) -> torch.Tensor:
    x = _as_blocks(w, QK_K)
    nb = x.shape[0]
    sub = x.reshape(-1, 32)
    sum_x2 = np.zeros(sub.shape[0], dtype=F32)
    for i in range(32):
        sum_x2 = sum_x2 + sub[:, i] * sub[:, i]
    av_x = np.sqrt(sum_x2 / F32(32))
    weights = av_x[:, None] + np.abs(sub)
    scales, mins, L = _make_qkx2_quants(sub, weights)
    scales, mins, L = scales.reshape(nb, 8), mins.reshape(nb, 8), L.reshape(nb, 8, 32)
    max_scale = np.maximum(scales.max(axis=1), F32(0))
    max_min = np.maximum(mins.max(axis=1), F32(0))
    with np.errstate(divide="ignore"):
        inv_scale = np.where(max_scale > 0, F32(63) / max_scale, F32(0)).astype(F32)
        inv_min = np.where(max_min > 0, F32(63) / max_min, F32(0)).astype(F32)
    # nearest_int, then the C uint8_t conversion (modulo 256), then MIN(63, .)
    ls = np.minimum(np.rint(inv_scale[:, None] * scales).astype(np.int64) & 0xFF, 63).astype(np.uint8)
    lm = np.minimum(np.rint(inv_min[:, None] * mins).astype(np.int64) & 0xFF, 63).astype(np.uint8)
    d16 = (max_scale / F32(63)).astype(np.float16)
    dmin16 = (max_min / F32(63)).astype(np.float16)
    d = d16.astype(F32)[:, None] * ls.astype(F32)
    dm = dmin16.astype(F32)[:, None] * lm.astype(F32)
    requant = d != 0  # where d is 0 llama.cpp keeps make_qkx2_quants' codes
    with np.errstate(divide="ignore", invalid="ignore"):
        fresh = np.clip(np.rint((x.reshape(nb, 8, 32) + dm[..., None]) / np.where(requant, d, F32(1))[..., None]),
                        0, 15).astype(np.uint8)
    L = np.where(requant[..., None], fresh, L).reshape(nb, 4, 2, 32)
    qs = (L[:, :, 0] | (L[:, :, 1] << np.uint8(4))).reshape(nb, 128)
    head = np.concatenate([d16.astype("<f2").view(np.uint8).reshape(-1, 2),
                           dmin16.astype("<f2").view(np.uint8).reshape(-1, 2)], axis=1)
    return _finish(np.concatenate([head, _pack_scales_k4(ls, lm), qs], axis=1), w.shape[0])


def dequantize_q4_k(blocks: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    b = blocks.reshape(-1, Q4_K_BYTES)
    d, dmin = _fp16_value(b[:, 0:2]), _fp16_value(b[:, 2:4])
    sc, mn = unpack_scales_k4(b[:, 4:16])
    scale = (d[:, None] * sc.float())[..., None]  # [B, 8, 1]: d1 = d * sc, as llama.cpp rounds it
    shift = (dmin[:, None] * mn.float())[..., None]
    qs = b[:, 16:].reshape(-1, 4, 32)
    q = torch.stack([qs & 0x0F, qs >> 4], dim=2).reshape(-1, 8, 32).float()
    return (scale * q - shift).reshape(shape)
