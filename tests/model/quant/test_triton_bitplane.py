"""The Triton bit-plane kernels (kvflow/model/quant/triton/bitplane.py) against exact integer
references (bipolar.bitplane_matmul_int, popcount_matmul) and an fp64 product of the dequantised
weights. Without a GPU they run under Triton's interpreter, so shapes stay small."""

from __future__ import annotations

import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("triton was imported without TRITON_INTERPRET=1 and there is no GPU: its kernels "
                    "cannot run here", allow_module_level=True)
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton's first import: jit reads it then
pytest.importorskip("triton", reason="the bit-plane kernels need Triton (pip install 'kvflow[gpu]')")

from kvflow.model.quant import bipolar as bp  # noqa: E402
from kvflow.model.quant.triton import bitplane as tb  # noqa: E402
from kvflow.model.quant.weights import QuantizedWeight  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
N = 40  # not a multiple of any output tile
# The interpreter holds bf16 as raw uint16 and its tl.dot multiplies those: bf16 runs on a GPU only.
ON_GPU_ONLY = pytest.mark.skipif(not torch.cuda.is_available(), reason="Triton's interpreter has no bf16 tl.dot")


def _random_codes(n: int, k: int, bits: int, group: int, seed: int) -> tuple[torch.Tensor, QuantizedWeight]:
    """Random codes with power-of-two scales and offsets per group (every product exact in fp32)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randint(0, 1 << bits, (n, k), generator=g)
    groups = k // group
    scales = torch.pow(2.0, torch.randint(-2, 2, (n, groups), generator=g).float()).half()
    offsets = torch.pow(2.0, torch.randint(-3, 1, (n, groups), generator=g).float()).half()
    offsets *= torch.randint(0, 2, (n, groups), generator=g).half() * 2 - 1
    qw = QuantizedWeight("bipolar", (n, k), {"planes": bp.pack_planes(u, bits), "scales": scales,
                                             "offsets": offsets}, {"bits": bits, "group_size": group})
    return u, qw


def _to(qw: QuantizedWeight, device: torch.device) -> QuantizedWeight:
    return QuantizedWeight(qw.format, qw.shape, {k: t.to(device) for k, t in qw.data.items()}, qw.params)


@pytest.mark.parametrize("group", [32, 64])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_integer_accumulation_is_exact(bits, group):
    """Integer activations, power-of-two scales and offsets: every schedule, split or not, gives the
    integer reference Σ_g s_g · (x_g·v_g) + o_g · Σx_g exactly (rounded once to the output dtype)."""
    k = 2 * group
    _, qw = _random_codes(N, k, bits, group, seed=bits * 100 + group)
    g = torch.Generator().manual_seed(bits)
    x = torch.randint(-8, 9, (5, k), generator=g)
    dots = bp.bitplane_matmul_int(x, qw.data["planes"], group).double()  # [M, N, G]
    x_sums = x.reshape(5, -1, group).sum(-1).double()  # [M, G]
    expected = (dots * qw.data["scales"].double()).sum(-1) + x_sums @ qw.data["offsets"].double().t()
    dev_qw = _to(qw, DEVICE)
    cases = [(torch.float32, 5, False, None), (torch.float16, 1, True, None), (torch.float16, 5, False, 2),
             (torch.float32, 1, True, 2)]
    if torch.cuda.is_available():  # see ON_GPU_ONLY
        cases += [(torch.bfloat16, 1, True, None), (torch.bfloat16, 5, False, 2)]
    for dtype, m, planewise, splits in cases:
        y = tb.bitplane_linear_triton(x[:m].to(DEVICE, dtype), dev_qw, None, planewise=planewise, num_splits=splits)
        assert y.dtype == dtype and y.shape == (m, N)
        assert bool(expected[:m].to(dtype).isfinite().all())  # exact means exact, not inf == inf
        assert torch.equal(y.cpu(), expected[:m].to(dtype)), (dtype, m, planewise, splits)


@pytest.mark.parametrize(("bits", "group", "dtype", "m"), [
    (2, 32, torch.float32, 1), (3, 64, torch.float16, 5), (4, 64, torch.float16, 1),
    (4, 32, torch.float32, 7), (8, 64, torch.float16, 1), (8, 32, torch.float32, 3),
    pytest.param(3, 64, torch.bfloat16, 5, marks=ON_GPU_ONLY),
    pytest.param(8, 64, torch.bfloat16, 1, marks=ON_GPU_ONLY),
])
def test_linear_matches_fp64_dequantised_weights(bits, group, dtype, m):
    """Real weights through quantize_bipolar, with bias: within fp32 accumulation (or the 16-bit
    output's rounding) of x · Wᵀ + b computed in fp64 from the dequantised weights, both schedules;
    and as close to the torch reference, bitplane_linear."""
    g = torch.Generator().manual_seed(bits + group + m)
    k = 3 * group
    w = torch.randn(N, k, generator=g) * 0.05
    qw = bp.quantize_bipolar(w, bits, group)
    x = torch.randn(m, k, generator=g).to(dtype)
    bias = torch.randn(N, generator=g).to(dtype)
    expected = x.double() @ bp.dequantize_bipolar(qw, torch.float64).t() + bias.double()
    tol = 2e-5 if dtype == torch.float32 else 1e-2
    dev_qw = _to(qw, DEVICE)
    for planewise in (False, True):
        y = tb.bitplane_linear_triton(x.to(DEVICE), dev_qw, bias.to(DEVICE), planewise=planewise).cpu()
        assert y.dtype == dtype
        torch.testing.assert_close(y.double(), expected, rtol=tol, atol=tol)
    torch.testing.assert_close(y, bp.bitplane_linear(x, qw, bias), rtol=tol, atol=tol)


def test_fp32_scales_and_a_split_that_leaves_a_short_last_share():
    """Scales too small for fp16 are stored fp32; 5 groups over 2 splits (3 + 2) sum like no split."""
    g = torch.Generator().manual_seed(7)
    w = torch.randn(N, 5 * 32, generator=g) * 1e-5
    qw = bp.quantize_bipolar(w, 4, 32)
    assert qw.data["scales"].dtype == torch.float32
    x = torch.randn(2, 5 * 32, generator=g)
    bias = torch.randn(N, generator=g)
    expected = x.double() @ bp.dequantize_bipolar(qw, torch.float64).t() + bias.double()
    dev_qw = _to(qw, DEVICE)
    for splits in (1, 2):
        cfg = tb.launch_config(2, N, dev_qw, torch.float32, DEVICE, num_splits=splits)
        assert (cfg.num_splits, cfg.groups_per_split) == ((1, 5) if splits == 1 else (2, 3))
        y = tb.bitplane_linear_triton(x.to(DEVICE), dev_qw, bias.to(DEVICE), num_splits=splits).cpu()
        torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("bits", "act_bits", "group"), [(2, 8, 32), (3, 3, 64), (8, 2, 32)])
def test_abit_integer_part_is_exact(bits, act_bits, group):
    """Unit scales and offsets: y / sx is Σ_g x'_g·v_g + Σ x'_g, integers the int8 MMAs give exactly;
    popcount_matmul and plane_sums (the popcount reference) give the same, and y is their fp32 product
    with the token scale, rounded once."""
    k = 2 * group
    _, qw = _random_codes(N, k, bits, group, seed=bits + act_bits)
    qw.data["scales"].fill_(1)
    qw.data["offsets"].fill_(1)
    x = torch.randn(3, k, generator=torch.Generator().manual_seed(act_bits))
    # Codes and token scales as the kernel's wrapper makes them, on its device (CUDA divides by a scalar
    # through its reciprocal: a scale may differ from the CPU's in the last bit).
    u, sx = (t.cpu() for t in bp.quantize_activations_bipolar(x.to(DEVICE), act_bits))
    a_planes = bp.pack_planes(u, act_bits)
    x_codes = bp.odd_values(u, act_bits)
    integer = (bp.popcount_matmul(a_planes, qw.data["planes"], group).sum(-1)
               + bp.plane_sums(a_planes, group).sum(-1)[:, None])
    assert torch.equal(integer, bp.bitplane_matmul_int(x_codes, qw.data["planes"], group).sum(-1)
                       + x_codes.sum(-1)[:, None])
    # One split: split-K programs each scale their partial sum, and torch adds them (more roundings; a
    # GPU's SM count makes decode calls split).
    y = tb.bitplane_linear_abit_triton(x.to(DEVICE), _to(qw, DEVICE), None, act_bits, num_splits=1).cpu()
    assert torch.equal(y, (integer.double() * sx.double()[:, None]).float())


@pytest.mark.parametrize(("bits", "act_bits", "m", "splits"), [(4, 4, 1, None), (4, 8, 5, 2)])
def test_abit_matches_the_popcount_reference(bits, act_bits, m, splits):
    """Real weights, bf16 activations and bias: as bitplane_linear_abit (the same activation codes;
    fp32 against its fp64 recombination), split or not."""
    g = torch.Generator().manual_seed(bits * act_bits)
    w = torch.randn(N, 128, generator=g) * 0.05
    qw = bp.quantize_bipolar(w, bits, 64)
    x = torch.randn(m, 128, generator=g).bfloat16()
    bias = torch.randn(N, generator=g).bfloat16()
    y = tb.bitplane_linear_abit_triton(x.to(DEVICE), _to(qw, DEVICE), bias.to(DEVICE), act_bits,
                                       num_splits=splits).cpu()
    torch.testing.assert_close(y, bp.bitplane_linear_abit(x, qw, bias, act_bits), rtol=1e-2, atol=1e-2)


def test_unsupported_inputs_say_why():
    _, qw = _random_codes(8, 48, 2, 16, seed=0)
    x = torch.zeros(1, 48)
    assert tb.check_supported(qw, x) is None
    assert "multiple of 32" in tb.check_supported(qw, x, act_bits=4)
    assert "fp16, bf16 or fp32" in tb.check_supported(qw, x.double())
    _, qw8 = _random_codes(8, 48, 2, 8, seed=0)
    with pytest.raises(ValueError, match="multiple of 16"):
        tb.bitplane_linear_triton(x, qw8, None)
    with pytest.raises(ValueError, match=r"in \[2, 8\]"):
        tb.bitplane_linear_abit_triton(torch.zeros(1, 64), _random_codes(8, 64, 2, 32, seed=0)[1], None, 9)


@pytest.mark.slow
def test_kernels_compile_for_ampere_and_hopper_without_16_bit_spills():
    """The launches the wrappers make for a 500m matrix compile to cubins (kvflow.model.quant.
    triton/compile_check.py, in a process without TRITON_INTERPRET), with no 16-bit register spills."""
    import subprocess

    try:
        from triton.backends.nvidia.compiler import get_ptxas
        if not os.path.exists(get_ptxas(90).path):
            pytest.skip("triton's NVIDIA backend has no ptxas")
    except ImportError:
        pytest.skip("triton's NVIDIA backend is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"TRITON_DEFAULT_FP_FUSION": "1"}
    result = subprocess.run([sys.executable, "-m", "kvflow.model.quant.triton.compile_check", "--arch", "80", "90",
                             "--dtype", "bfloat16", "--bits", "2", "8", "--rows", "1", "256"],
                            env=env, capture_output=True, text=True, timeout=900)
    log = result.stdout[-3000:] + result.stderr[-2000:]
    assert result.returncode == 0 and "24/24 launches compile" in result.stdout, log
