"""q8_0, q4_0 and q4_k are llama.cpp's bytes: quantisation byte-exact against gguf's numpy reference
(q8_0, q4_0) and llama.cpp's own C reference quantiser (q4_k, through llama-cpp-python's libggml where
installed; gguf has no q4_k quantiser), dequantisation equal to gguf's, and q4_k's defining
properties checked on their own."""

from __future__ import annotations

import ctypes
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf import quants

from kvflow.model.quant import gguf_blocks as gb

GGML = {"q8_0": T.Q8_0, "q4_0": T.Q4_0, "q4_k": T.Q4_K}
QUANTIZE = {"q8_0": gb.quantize_q8_0, "q4_0": gb.quantize_q4_0, "q4_k": gb.quantize_q4_k}
DEQUANTIZE = {"q8_0": gb.dequantize_q8_0, "q4_0": gb.dequantize_q4_0, "q4_k": gb.dequantize_q4_k}


def hard_weights(k: int, seed: int = 0) -> torch.Tensor:
    """Rows that exercise the corner cases: zeros, constants, one sign only, tiny and huge values,
    outliers, ties on the largest magnitude, values already on a 4-bit grid."""
    g = torch.Generator().manual_seed(seed)
    rows = [
        torch.randn(24, k, generator=g) * 0.05,
        torch.randn(8, k, generator=g) * 0.05 - 0.2,
        -torch.rand(8, k, generator=g),
        torch.rand(8, k, generator=g),
        torch.zeros(2, k), torch.full((2, k), 0.25), torch.full((2, k), -0.25),
        torch.randn(4, k, generator=g) * 1e-6,
        torch.randn(4, k, generator=g) * 30,
        torch.randint(-8, 8, (8, k), generator=g).float() * 0.01,
    ]
    outliers = torch.randn(8, k, generator=g)
    outliers[:, ::7] *= 50
    ties = torch.randn(4, k, generator=g)
    ties[:, 3], ties[:, 9] = 2.0, -2.0  # same magnitude: the first one sets q4_0's sign
    return torch.cat(rows + [outliers, ties])


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0"])
def test_quantisation_is_byte_exact_with_gguf(fmt):
    w = hard_weights(256)
    ours = QUANTIZE[fmt](w)
    assert ours.dtype == torch.uint8 and ours.shape == (w.shape[0], 256 // 32 * {"q8_0": 34, "q4_0": 18}[fmt])
    assert np.array_equal(ours.numpy(), quants.quantize(w.numpy(), GGML[fmt]))


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0", "q4_k"])
def test_dequantisation_equals_gguf(fmt):
    """Arbitrary valid bytes (random codes and scales, finite fp16 d), not only what we produce."""
    rng = np.random.default_rng(1)
    nbytes = {"q8_0": 34, "q4_0": 18, "q4_k": 144}[fmt]
    blocks = rng.integers(0, 256, size=(6, 4, nbytes), dtype=np.uint8)
    blocks[..., 0:2] = rng.uniform(-0.1, 0.1, size=(6, 4)).astype(np.float16)[..., None].view(np.uint8)
    if fmt == "q4_k":
        blocks[..., 2:4] = rng.uniform(0, 0.1, size=(6, 4)).astype(np.float16)[..., None].view(np.uint8)
    blocks = blocks.reshape(6, -1)
    k = 4 * (256 if fmt == "q4_k" else 32)
    ours = DEQUANTIZE[fmt](torch.from_numpy(blocks), (6, k))
    assert np.array_equal(ours.numpy(), quants.dequantize(blocks, GGML[fmt]))


def _libggml() -> ctypes.CDLL | None:
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        return None
    lib = Path(spec.origin).parent / "lib" / "libggml-base.so"
    if not lib.is_file():
        return None
    ggml = ctypes.CDLL(str(lib))
    if not hasattr(ggml, "quantize_row_q4_K_ref"):
        return None
    ggml.quantize_row_q4_K_ref.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    ggml.quantize_row_q4_K_ref.restype = None
    return ggml


def test_q4_k_is_byte_exact_with_llama_cpp():
    """llama.cpp's `quantize_row_q4_K_ref` (make_qkx2_quants, 6-bit packed scales and mins) in C."""
    ggml = _libggml()
    if ggml is None:
        pytest.skip("llama-cpp-python's libggml (the C reference q4_k quantiser) is not installed")
    w = torch.cat([hard_weights(512, seed=2), torch.randn(64, 512, generator=torch.Generator().manual_seed(3))])
    x = np.ascontiguousarray(w.numpy(), dtype=np.float32)
    expected = np.zeros((x.shape[0], 2 * 144), dtype=np.uint8)
    ggml.quantize_row_q4_K_ref(x.ctypes.data, expected.ctypes.data, x.size)
    assert np.array_equal(gb.quantize_q4_k(w).numpy(), expected)


def test_q4_k_scales_and_mins_pack_into_twelve_bytes_and_back():
    ls = torch.arange(64, dtype=torch.uint8).reshape(8, 8)  # every 6-bit value, in every slot
    lm = torch.flip(ls, dims=[1]).roll(3, dims=0)
    packed = gb._pack_scales_k4(ls.numpy(), lm.numpy())
    sc, mn = gb.unpack_scales_k4(torch.from_numpy(packed))
    assert torch.equal(sc, ls.int()) and torch.equal(mn, lm.int())


def test_q4_k_round_trips_what_it_can_represent_and_bounds_the_error():
    """A weight already on q4_k's grid (per sub-block d_j * q - m_j with 6-bit sc, m and fp16 d, dmin)
    quantises back to itself; for any weight, each value is within half a step (plus the fit's slack)."""
    g = torch.Generator().manual_seed(4)
    d, dmin = torch.tensor(0.01).half().float(), torch.tensor(0.02).half().float()
    sc = torch.randint(1, 64, (16, 8), generator=g).float()
    sc[:, 0] = 63  # the largest scale sets d = max / 63 exactly
    mn = torch.randint(0, 64, (16, 8), generator=g).float()
    mn[:, 0] = 63
    q = torch.randint(0, 16, (16, 8, 32), generator=g).float()
    q[..., 0], q[..., 1] = 0, 15  # every sub-block spans its grid, so the min/max fit lands on it
    w = ((d * sc)[..., None] * q - (dmin * mn)[..., None]).reshape(16, 256)
    back = gb.dequantize_q4_k(gb.quantize_q4_k(w), (16, 256))
    assert torch.allclose(back, w, rtol=0, atol=1e-6)

    w = torch.randn(32, 512, generator=g) * 0.05
    blocks = gb.quantize_q4_k(w)
    err = (gb.dequantize_q4_k(blocks, (32, 512)) - w).abs().reshape(32, 2, 8, 32)
    d = gb._fp16_value(blocks.reshape(-1, 144)[:, :2]).reshape(32, 2, 1, 1)
    sc, _ = gb.unpack_scales_k4(blocks.reshape(-1, 144)[:, 4:16])
    step = d * sc.reshape(32, 2, 8, 1).float()
    assert bool((err <= step * 1.25 + 1e-6).all())
    assert float((gb.dequantize_q4_k(blocks, (32, 512)) - w).norm() / w.norm()) < 0.1


def test_widths_that_do_not_divide_into_blocks_are_refused():
    with pytest.raises(ValueError, match="multiple of the block size 256"):
        gb.quantize_q4_k(torch.randn(4, 704))
