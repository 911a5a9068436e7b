"""Quantised KV formats in PyTorch: the reference every kernel (C++, Triton) must reproduce.

int8 (symmetric, one scale per token and kv head): for a row x of head_dim values,

    amax  = max |x|                       (in fp32, over the row)
    scale = amax / 127                    (stored, fp32)
    code  = round_half_even(x * (127 / amax)), in [-127, 127]   (0 where amax == 0)

and the row reads back as code * scale. Every implementation computes `127 / amax` once in fp32
and multiplies, so codes agree bit for bit across them. Attention reads the codes and folds the
scales into the scores (q . k = scale_k * (q . code_k)) and into the softmax weights
(sum_j p_j v_j = sum_j (p_j * scale_vj) * code_vj), so no dequantised copy of a cache is made.

fp8_e4m3 (one scale per layer, kv head and keys/values): code = float8_e4m3fn(clamp(x / scale,
±448)), rounded to nearest even, read back as code * scale. The scales are given (`--kv-scale`,
the same for every head) or calibrated once, from the first step that stores KV (the first
prompt): per kv head, scale = 2 * max|x| / 448, so the prompt's largest value sits one binade
below the format's largest and later, larger values have room before they saturate. Calibration
happens in the PyTorch backends (`calibrate_fp8`); the C++ forward runs once the scales are set.
"""

from __future__ import annotations

import torch

from kvflow.attention.kv_spec import KVCacheSpec, LayerKV

INT8_MAX = 127
FP8_MAX = 448.0  # largest finite float8_e4m3fn
FP8_HEADROOM = 2.0  # a calibrated scale leaves one binade above the first prompt's largest value


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows x [..., D] -> (codes int8 [..., D], scales fp32 [..., 1])."""
    x32 = x.float()
    amax = x32.abs().amax(dim=-1, keepdim=True)
    # Tensor by tensor: one correctly rounded division each (a number divided by a tensor would be
    # PyTorch's reciprocal-then-multiply, rounded twice).
    limit = torch.full_like(amax, INT8_MAX)
    inv = torch.where(amax > 0, limit / amax, torch.zeros_like(amax))
    codes = torch.round(x32 * inv).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return codes, amax / limit


def dequantize_int8(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """codes [..., D] * scales [..., 1], in fp32, then cast to `dtype`."""
    return (codes.float() * scales).to(dtype)


def store_int8(cache: tuple[torch.Tensor, torch.Tensor], k: torch.Tensor, v: torch.Tensor,
               slot_block: torch.Tensor, slot_offset: torch.Tensor) -> None:
    """Quantise a step's k, v [T, kv_heads, D] into their slots of an int8 layer cache (codes, scales)."""
    codes, scales = cache
    for half, x in enumerate((k, v)):
        c, s = quantize_int8(x)
        codes[half][slot_block, :, slot_offset] = c
        scales[half][slot_block, :, slot_offset] = s


def quantize_fp8(x: torch.Tensor, head_scales: torch.Tensor) -> torch.Tensor:
    """Rows x [..., kv_heads, D] with their heads' scales [kv_heads, 1] -> float8_e4m3fn codes."""
    return (x.float() / head_scales).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def dequantize_fp8(codes: torch.Tensor, head_scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """codes [..., kv_heads, D] * their heads' scales [kv_heads, 1], in fp32, then cast to `dtype`."""
    return (codes.float() * head_scales).to(dtype)


def fp8_calibrated(head_scales: torch.Tensor) -> bool:
    """Whether a layer's scales [2, kv_heads, 1] are set (0 marks "not calibrated yet")."""
    return bool((head_scales != 0).all())


def kv_scales_set(spec: KVCacheSpec, caches: list[LayerKV]) -> bool:
    """Whether every layer's per-head scales are set (true at once for formats without them)."""
    if spec.kv_dtype != "fp8_e4m3":
        return True
    return all(fp8_calibrated(spec.parts(layer)[1]) for layer in caches)


def calibrate_fp8(head_scales: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Set a layer's uncalibrated scales [2, kv_heads, 1] from a step's k, v [T, kv_heads, D]."""
    if fp8_calibrated(head_scales):
        return
    for half, x in enumerate((k, v)):
        amax = x.float().abs().amax(dim=(0, 2))[:, None]  # [kv_heads, 1]
        scale = torch.where(amax > 0, amax * (FP8_HEADROOM / FP8_MAX), torch.ones_like(amax))
        head_scales[half] = torch.where(head_scales[half] == 0, scale, head_scales[half])


def store_fp8(cache: tuple[torch.Tensor, torch.Tensor], k: torch.Tensor, v: torch.Tensor,
              slot_block: torch.Tensor, slot_offset: torch.Tensor) -> None:
    """Calibrate the layer's scales if needed, then quantise a step's k, v [T, kv_heads, D] into
    their slots of an fp8 layer cache (codes, head_scales)."""
    codes, head_scales = cache
    calibrate_fp8(head_scales, k, v)
    for half, x in enumerate((k, v)):
        codes[half][slot_block, :, slot_offset] = quantize_fp8(x, head_scales[half])
