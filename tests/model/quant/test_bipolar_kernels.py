"""The bipolar CPU kernels (csrc/cpu_bipolar.h: the masked-add bit-plane GEMV, the dequantised-tile GEMM)
against an fp64 product of the weights dequantised independently (codes read bit by bit in numpy); the
A-bit popcount kernel (csrc/cpu_bipolar_abit.h) against bipolar.bitplane_linear_abit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvflow.model.quant import bipolar, kernels
from kvflow.model.quant.weights import QuantizedWeight

ext = kernels.load_extension()
pytestmark = pytest.mark.skipif(ext is None, reason="the quantised-weight CPU kernels could not be built here")

#: The GEMV's kernels: AVX-512's decomposition and decoded planes (groups of whole 16-lane vectors) where
#: built, and the scalar loops.
GEMV_KERNELS = ["planes", "decoded", "scalar"] if ext is not None and ext.has_avx512 else ["scalar"]


def numpy_dequantized(qw) -> np.ndarray:
    """w = s · Σ_i (2 b_i − 1)·2^i + o in fp64, each bit read from the packed planes with numpy."""
    planes = qw.data["planes"].numpy()  # [N, bits, K/8]
    bits = np.unpackbits(planes, axis=-1, bitorder="little").astype(np.float64)  # [N, bits, K]
    v = ((2 * bits - 1) * (2.0 ** np.arange(planes.shape[1]))[None, :, None]).sum(1)  # [N, K]
    group = qw.params["group_size"]
    s = np.repeat(qw.data["scales"].double().numpy(), group, axis=1)
    o = np.repeat(qw.data["offsets"].double().numpy(), group, axis=1)
    return s * v + o


def weight(n: int, k: int, bits: int, group: int, seed: int = 0):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05 + 0.01
    return bipolar.quantize_bipolar(w, bits, group)


def relative_error(got: torch.Tensor, want: np.ndarray) -> float:
    return float(np.abs(got.double().numpy() - want).max() / np.abs(want).max())


@pytest.mark.parametrize("kernel", GEMV_KERNELS)
@pytest.mark.parametrize("bits", list(bipolar.BITS))
@pytest.mark.parametrize("rows", [1, 2, 5, 8])
def test_the_bitplane_gemv_equals_the_fp64_product(kernel, bits, rows):
    qw = weight(37, 192, bits, 64, seed=bits)  # N not a multiple of the 16-row work unit
    x = torch.randn(rows, 192, generator=torch.Generator().manual_seed(rows))
    want = x.double().numpy() @ numpy_dequantized(qw).T
    got = kernels.quant_matmul(x, qw, path="gemv", kernel=kernel)
    assert got.dtype == torch.float32 and got.shape == (rows, 37)
    assert relative_error(got, want) < 2e-6


@pytest.mark.parametrize("kernel", GEMV_KERNELS)
@pytest.mark.parametrize("bits", list(bipolar.BITS))
@pytest.mark.parametrize("rows", [1, 3, 8])
def test_bf16_activations_give_the_fp32_products_rounded_once(kernel, bits, rows):
    """bf16 rows (exact in fp32): the decoded kernel's bf16 dot products (n ≤ 5, groups of 32s) and every other
    kernel equal the fp64 product up to fp32 summation and the output's one bf16 rounding."""
    qw = weight(21, 320, bits, 32 if bits % 2 else 64, seed=bits)
    x = torch.randn(rows, 320, generator=torch.Generator().manual_seed(rows)).bfloat16()
    want = x.double().numpy() @ numpy_dequantized(qw).T
    got = kernels.quant_matmul(x, qw, path="gemv", kernel=kernel)
    assert got.dtype == torch.bfloat16
    assert np.abs(got.double().numpy() - want).max() <= 2 ** -8 * np.abs(want).max()


@pytest.mark.parametrize(("group", "kernel"), [(16, "planes"), (32, "decoded"), (8, "scalar"), (24, "scalar"),
                                               (8, "auto"), (64, "auto")])
def test_group_sizes_and_the_auto_choice(group, kernel):
    if kernel in ("planes", "decoded") and kernel not in GEMV_KERNELS:
        pytest.skip("no AVX-512 build")
    qw = weight(20, 96 if group != 64 else 128, 3, group)
    k = qw.shape[1]
    x = torch.randn(3, k, generator=torch.Generator().manual_seed(2))
    got = kernels.quant_matmul(x, qw, path="gemv", kernel=kernel)
    assert relative_error(got, x.double().numpy() @ numpy_dequantized(qw).T) < 2e-6


def test_without_a_vector_gemv_every_row_count_takes_the_tiles():
    """Groups of 24 (not whole 16-lane vectors): "auto" multiplies dequantised tiles even for one row, faster
    than the scalar GEMV, which stays available when asked for."""
    qw = weight(20, 96, 3, 24)
    x = torch.randn(1, 96, generator=torch.Generator().manual_seed(5))
    auto = kernels.quant_matmul(x, qw)
    assert torch.equal(auto, kernels.quant_matmul(x, qw, path="mm"))
    scalar = kernels.quant_matmul(x, qw, kernel="scalar")
    assert relative_error(scalar, auto.double().numpy()) < 2e-6


def test_avx512_refuses_groups_that_are_not_whole_vectors():
    if "planes" not in GEMV_KERNELS:
        pytest.skip("no AVX-512 build")
    for kernel in ("planes", "decoded"):
        with pytest.raises(RuntimeError, match="multiple of 16"):
            kernels.quant_matmul(torch.zeros(1, 96), weight(4, 96, 3, 24), path="gemv", kernel=kernel)
    with pytest.raises(RuntimeError, match="kernel is auto, planes, decoded or scalar"):
        kernels.quant_matmul(torch.zeros(1, 128), weight(4, 128, 3, 64), kernel="avx2")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [9, 40])
def test_more_rows_take_the_dequantised_tile_gemm(dtype, rows):
    qw = weight(70, 128, 4, 64)
    x = torch.randn(rows, 128, generator=torch.Generator().manual_seed(3)).to(dtype)
    want = x.double().numpy() @ numpy_dequantized(qw).T
    got = kernels.quant_matmul(x, qw, tile_rows=32)  # three tiles, the last one short
    assert got.dtype == dtype
    # fp32: the tile's weights are exact products; bf16 rounds each weight and the output once
    assert relative_error(got, want) < (2e-6 if dtype == torch.float32 else 2e-2)
    gemv = kernels.quant_matmul(x, qw, path="gemv")
    assert relative_error(gemv, want) < (2e-6 if dtype == torch.float32 else 1e-2)


def test_the_kernels_dequantiser_matches_the_reference_bit_for_bit():
    qw = weight(33, 256, 5, 32)
    np.testing.assert_array_equal(kernels.dequantize(qw).numpy(), bipolar.dequantize_bipolar(qw).numpy())


def test_lossless_signed_conversion_runs_on_the_kernels():
    """from_signed_int's planes (with fp16 scale and offset) through the GEMV equal the signed codes' product."""
    gen = torch.Generator().manual_seed(4)
    q = torch.randint(-8, 8, (24, 128), generator=gen)
    s = (torch.rand(24, 2, generator=gen) * 0.01 + 0.001).to(torch.float16)
    qw = bipolar.from_signed_int(q, s, 4, 64)
    x = torch.randn(2, 128, generator=gen)
    want = x.double().numpy() @ (q.double() * s.double().repeat_interleave(64, dim=1)).numpy().T
    assert relative_error(kernels.quant_matmul(x, qw), want) < 2e-6


def test_bipolar_takes_no_q8_mode():
    with pytest.raises(ValueError, match="float activations"):
        kernels.quant_matmul(torch.zeros(1, 128), weight(4, 128, 3, 64), "q8")


# ----------------------------------------------------------------------------- the A-bit variant (popcounts)
ABIT_KERNELS = (["popcnt", "scalar"] if ext is not None and ext.has_vpopcntdq else ["scalar"])


@pytest.mark.parametrize("kernel", ABIT_KERNELS)
@pytest.mark.parametrize(("bits", "act_bits", "group"), [(2, 2, 64), (3, 8, 64), (5, 4, 128), (8, 8, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_popcount_kernel_equals_the_a_bit_reference(kernel, bits, act_bits, group, dtype):
    """Exact integer dot products, combined in fp64 like bitplane_linear_abit: equal up to the fp64 summation
    order, i.e. the same output values but for a rare last-bit tie."""
    qw = weight(37, 640, bits, group, seed=bits)  # 10 words per row: the vector kernel's masked tail
    x = torch.randn(5, 640, generator=torch.Generator().manual_seed(act_bits)).to(dtype)
    x[3] = 0  # a zero row: its scale is 0, so is its output
    want = bipolar.bitplane_linear_abit(x, qw, None, act_bits)
    got = kernels.quant_matmul(x, qw, kernel=kernel, activation_bits=act_bits)
    assert got.dtype == dtype and torch.all(got[3] == 0)
    ulp = 2 ** -23 if dtype == torch.float32 else 2 ** -8
    assert torch.allclose(got.double(), want.double(), rtol=ulp, atol=0)


def test_a_bit_groups_must_be_whole_words():
    qw = weight(4, 128, 3, 32)
    assert "64-bit words" in kernels.unsupported_reason(qw, torch.float32, 4)
    with pytest.raises(kernels.QuantKernelUnsupported, match="64-bit words"):
        kernels.quant_matmul(torch.zeros(1, 128), qw, activation_bits=4)
    with pytest.raises(ValueError, match="bipolar's A-bit"):
        kernels.quant_matmul(torch.zeros(1, 128), QuantizedWeight("int8", (4, 128), {}), activation_bits=4)
