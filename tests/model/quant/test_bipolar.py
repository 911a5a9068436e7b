"""Bipolar-INT: every code of every width round-trips; signed integers convert losslessly; the
bit-plane and popcount matmuls equal the integer matmul exactly; the float matmuls match an fp64
product of the dequantised weights."""

from __future__ import annotations

import pytest
import torch

from kvflow.model.quant import bipolar as bp


@pytest.mark.parametrize("bits", list(range(2, 9)))
def test_every_code_round_trips_through_bit_planes(bits):
    """All 2^n codes (several times over, in every byte position): planes -> codes -> odd values."""
    top = (1 << bits) - 1
    u = torch.arange(top + 1).repeat(3, 8)[:, : 8 * ((top + 1) * 8 // 8)]  # [3, K], K a multiple of 8
    u = torch.stack([u[0], u[1].roll(5), u[2].flip(0)])
    planes = bp.pack_planes(u, bits)
    assert planes.shape == (3, bits, u.shape[1] // 8) and planes.dtype == torch.uint8
    assert torch.equal(bp.codes_from_planes(planes), u)
    v = bp.odd_values(u, bits)
    expected = torch.tensor([sum((2 * ((c >> i) & 1) - 1) << i for i in range(bits)) for c in range(top + 1)])
    assert torch.equal(v[0, : top + 1], expected)  # Σ (2b_i − 1) 2^i, the definition
    assert set(expected.tolist()) == set(range(-top, top + 1, 2))  # the odd grid, symmetric, no zero


@pytest.mark.parametrize("bits", list(range(2, 9)))
def test_weights_on_the_grid_quantise_back_exactly(bits):
    """Every code in every group, with fp16-exact scale and offset: RTN recovers the codes and the values."""
    top = (1 << bits) - 1
    group = 8 * ((top + 1 + 7) // 8)
    u = torch.arange(group) % (top + 1)
    u = torch.stack([u, u.flip(0), u.roll(3)])  # [3, group]: min and max of every group are -top, +top
    scale = torch.tensor([[0.5], [0.0625], [0.001953125]])
    offset = torch.tensor([[0.25], [-1.0], [0.0]])
    w = scale * bp.odd_values(u, bits).float() + offset
    qw = bp.quantize_bipolar(w, bits, group)
    assert torch.equal(bp.codes_from_planes(qw.data["planes"]), u)
    assert torch.equal(bp.dequantize_bipolar(qw), w)


@pytest.mark.parametrize("bits", list(range(2, 9)))
def test_signed_integers_convert_losslessly(bits):
    """Every signed n-bit code, symmetric (w = s q: exact in fp32) and with integer zero points
    (w = s (q − z): exact in fp64 for scales of up to 24 − log2(2z + 1) significant bits)."""
    half = 1 << (bits - 1)
    q = torch.arange(-half, half).repeat(2, 8)
    q = q[:, : q.shape[1] // 8 * 8]
    k = q.shape[1]
    group = k // 2 if (k // 2) % 8 == 0 else k
    groups = k // group
    g = torch.Generator().manual_seed(bits)
    s = (torch.rand(2, groups, generator=g) * 0.1 + 1e-3).float()
    qw = bp.from_signed_int(q, s, bits, group)
    assert torch.equal(bp.codes_from_planes(qw.data["planes"]) - half, q)  # u = q + 2^(n-1)
    assert torch.equal(bp.odd_values(bp.codes_from_planes(qw.data["planes"]), bits), 2 * q + 1)
    expected = (s.repeat_interleave(group, 1) * q).float()
    assert torch.equal(bp.dequantize_bipolar(qw, torch.float64).float(), expected)

    z = torch.randint(-half, half, (2, groups), generator=g)
    s_short = (torch.randint(1, 1 << 12, (2, groups), generator=g).double() * 2.0**-14)  # 12 significant bits
    qwz = bp.from_signed_int(q, s_short, bits, group, zeros=z)
    expected = s_short.repeat_interleave(group, 1) * (q - z.repeat_interleave(group, 1))
    assert torch.equal(bp.dequantize_bipolar(qwz, torch.float64), expected)


def test_signed_codes_out_of_range_are_refused():
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        bp.from_signed_int(torch.full((1, 8), 8), torch.ones(1, 1), 4, 8)


@pytest.mark.parametrize("bits", [2, 3, 5, 8])
def test_bitplane_matmul_equals_the_integer_matmul_exactly(bits):
    g = torch.Generator().manual_seed(bits)
    m, n, k, group = 5, 11, 128, 32
    u = torch.randint(0, 1 << bits, (n, k), generator=g)
    x = torch.randint(-1000, 1000, (m, k), generator=g)
    got = bp.bitplane_matmul_int(x, bp.pack_planes(u, bits), group)  # [M, N, groups]
    v = bp.odd_values(u, bits)
    expected = torch.einsum("mgk,ngk->mng", x.reshape(m, -1, group), v.reshape(n, -1, group))
    assert got.dtype == torch.int64 and torch.equal(got, expected)


@pytest.mark.parametrize(("a_bits", "w_bits"), [(2, 2), (4, 3), (8, 4), (3, 8)])
def test_popcount_matmul_equals_the_integer_matmul_exactly(a_bits, w_bits):
    g = torch.Generator().manual_seed(a_bits * 10 + w_bits)
    m, n, k, group = 7, 9, 192, 64
    a = torch.randint(0, 1 << a_bits, (m, k), generator=g)
    u = torch.randint(0, 1 << w_bits, (n, k), generator=g)
    got = bp.popcount_matmul(bp.pack_planes(a, a_bits), bp.pack_planes(u, w_bits), group)
    xa, v = bp.odd_values(a, a_bits), bp.odd_values(u, w_bits)
    expected = torch.einsum("mgk,ngk->mng", xa.reshape(m, -1, group), v.reshape(n, -1, group))
    assert torch.equal(got, expected)
    assert torch.equal(bp.plane_sums(bp.pack_planes(a, a_bits), group), xa.reshape(m, -1, group).sum(-1))


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_bitplane_linear_matches_fp64_of_the_dequantised_weights(bits):
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(48, 256, generator=g) * 0.05
    x = torch.randn(6, 256, generator=g)
    bias = torch.randn(48, generator=g)
    qw = bp.quantize_bipolar(w, bits, 64)
    reference = x.double() @ bp.dequantize_bipolar(qw, torch.float64).t() + bias.double()
    got = bp.bitplane_linear(x, qw, bias)
    assert torch.allclose(got.double(), reference, rtol=1e-5, atol=1e-5)
    err = float((bp.dequantize_bipolar(qw) - w).norm() / w.norm())
    # RTN on a min/max grid: rms error = step / sqrt(12), step = range / (2^n − 1) (range of 64 normals ~ 4.8σ)
    assert err < {2: 0.5, 4: 0.09, 8: 0.006}[bits]


def test_abit_variant_matches_fp64_of_its_own_rounded_activations():
    """The A-bit path is exact integer arithmetic on the rounded activations, scaled in fp64."""
    g = torch.Generator().manual_seed(7)
    w = torch.randn(40, 128, generator=g) * 0.05
    x = torch.randn(5, 128, generator=g)
    qw = bp.quantize_bipolar(w, 3, 32)
    for a_bits in (4, 8):
        u, sx = bp.quantize_activations_bipolar(x, a_bits)
        x_rounded = sx.double()[:, None] * bp.odd_values(u, a_bits).double()
        reference = x_rounded @ bp.dequantize_bipolar(qw, torch.float64).t()
        got = bp.bitplane_linear_abit(x, qw, None, a_bits)
        assert torch.allclose(got.double(), reference, rtol=1e-5, atol=1e-6)
    exact = x.double() @ bp.dequantize_bipolar(qw, torch.float64).t()
    assert float((bp.bitplane_linear_abit(x, qw, None, 8).double() - exact).norm() / exact.norm()) < 0.01


def test_parameters_are_fp16_unless_a_group_needs_fp32():
    w = torch.randn(4, 64) * 0.05
    assert bp.quantize_bipolar(w, 4, 64).data["scales"].dtype == torch.float16
    tiny = torch.randn(4, 64) * 1e-6  # scales below fp16's normal range
    qw = bp.quantize_bipolar(tiny, 8, 64)
    assert qw.data["scales"].dtype == torch.float32
    assert float((bp.dequantize_bipolar(qw) - tiny).norm() / tiny.norm()) < 0.01
