"""VNNI-packed codes (csrc/cpu_vnni_packed.h): int8 W8A8 (`kernels.pack_int8_vnni` / `int8_vnni_matmul`), and
q8_0 and q4_0 with q8 activations (`kernels.GGUF_VNNI` / `gguf_vnni_matmul`). The layouts against naive loops;
int8 bit for bit against the row-major kernels and an exact integer reference, q8_0 and q4_0 against an fp64
reference of the same rounded activations; all at every batch size and at shapes that do not fill a panel; and
the layers that hold them, switching layouts with their activation mode."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kvflow.model.linear import Linear
from kvflow.model.quant import int8, kernels
from kvflow.model.quant.formats import dequantize, quantize
from kvflow.model.quant.linear_methods import QuantizedLinear, q8_activations, use_activations

pytestmark = pytest.mark.skipif(not kernels.int8_vnni_available(), reason="no AVX-512 VNNI build on this machine")

SHAPES = [(96, 64), (37, 7), (33, 130), (1, 4), (200, 1536)]  # (N, K): whole and partial panels, K not a multiple of 4


def naive_pack(codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The layout element by element: (panel, k4, column, j) = W[32·panel + column, 4·k4 + j], and the column sums."""
    n, k = codes.shape
    panels, k4s = -(-n // 32), -(-k // 4)
    blocks = torch.zeros(panels, k4s, 32, 4, dtype=torch.int8)
    sums = torch.zeros(panels * 32, dtype=torch.int32)
    for row in range(n):
        for col in range(k):
            blocks[row // 32, col // 4, row % 32, col % 4] = codes[row, col]
            sums[row] += int(codes[row, col])
    return blocks, sums


@pytest.mark.parametrize(("n", "k"), SHAPES[:4])
def test_the_packed_layout_is_the_documented_one(n, k):
    codes = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=torch.Generator().manual_seed(n * k))
    packed = kernels.pack_int8_vnni(codes)
    blocks, sums = naive_pack(codes)
    assert packed.dtype == torch.uint8 and packed.numel() == blocks.numel() + 4 * sums.numel()
    assert torch.equal(packed[: blocks.numel()].view(torch.int8), blocks.flatten())
    assert torch.equal(packed[blocks.numel():].view(torch.int32), sums)
    assert torch.equal(kernels.unpack_int8_vnni(packed, n, k), codes)


def exact_w8a8(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Per-token int8 activations (d = max|x| / 127, x · (1/d) rounded to even), an int64 product, then
    (d · s) · acc in fp32: what every W8A8 kernel computes."""
    x32 = x.float()
    d = x32.abs().amax(dim=1) / 127.0
    inverse = torch.where(d > 0, 1.0 / torch.where(d > 0, d, 1.0), 0.0)
    q = torch.round(x32 * inverse[:, None]).clamp(-127, 127).long()
    acc = q @ codes.long().t()
    return ((d[:, None] * scales[None, :]) * acc.float()).to(x.dtype)


@pytest.mark.parametrize(("n", "k"), SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_kernel_equals_the_row_major_kernels_and_the_integer_reference(n, k, dtype):
    g = torch.Generator().manual_seed(n + k)
    qw = int8.quantize_int8(torch.randn(n, k, generator=g))
    packed = kernels.pack_int8_vnni(qw.data["qweight"])
    for rows in (1, 3, 8, 9, 64, 300):  # the GEMV's rows, a tile's remainder, several row blocks
        x = (torch.randn(rows, k, generator=g) * 3).to(dtype)
        x[0] = 0  # a zero row: scale 0, outputs 0
        got = kernels.int8_vnni_matmul(x, packed, qw.data["scales"], n, k)
        assert got.dtype == dtype and got.shape == (rows, n)
        assert torch.equal(got, exact_w8a8(x, qw.data["qweight"], qw.data["scales"]))
        assert torch.equal(got, kernels.quant_matmul(x, qw, "q8"))
        assert not got[0].any()


def test_a_w8a8_layer_holds_only_the_packed_codes_and_runs_them():
    g = torch.Generator().manual_seed(0)
    layer = Linear(130, 70, bias=True).requires_grad_(False)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(70, 130, generator=g))
        layer.bias.copy_(torch.randn(70, generator=g))
    qw = int8.quantize_int8(layer.weight)
    layer.use(QuantizedLinear(qw, activation_bits=8))
    assert layer.method.name == "int8-w8a8-vnni"
    buffers = dict(layer.named_buffers())
    assert set(buffers) == {"quant_vnni", "quant_scales"}  # no row-major copy kept
    assert buffers["quant_vnni"].numel() == 3 * (-(-130 // 4) * 32 * 4) + 3 * 32 * 4
    assert torch.equal(layer.method.weight(layer).data["qweight"], qw.data["qweight"])  # unpacked for the reference
    x = torch.randn(2, 6, 130, generator=g)
    expected = exact_w8a8(x.reshape(-1, 130), qw.data["qweight"], qw.data["scales"]) + layer.bias
    assert torch.equal(layer(x), expected.view(2, 6, 70))
    reference = layer.method.reference(x.reshape(-1, 130), layer.method.weight(layer), layer.bias)
    assert torch.allclose(reference, layer(x).reshape(-1, 70), rtol=1e-5, atol=1e-5)


def test_the_kernel_refuses_a_weight_of_another_shape():
    packed = kernels.pack_int8_vnni(torch.zeros(40, 64, dtype=torch.int8))
    with pytest.raises(RuntimeError, match="contiguous bytes"):
        kernels.int8_vnni_matmul(torch.zeros(2, 64), packed, torch.ones(20), 20, 64)  # one panel, not two
    with pytest.raises(RuntimeError, match="x must be"):
        kernels.int8_vnni_matmul(torch.zeros(2, 64, dtype=torch.float16), packed, torch.ones(40), 40, 64)


# ----------------------------------------------------------------------------- q8_0 and q4_0
Q8_SHAPES = [(96, 64), (37, 32), (70, 256), (1, 1536)]


def naive_gguf_pack(fmt: str, blocks: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The documented layout element by element: codes (q8_0: + 128; q4_0: as stored, k4 step 2t in the low
    nibbles and 2t + 1 in the high ones) at (panel, k4, column, j) = W[32·panel + column, 4·k4 + j], then the
    block scales at (panel, block, column)."""
    size = {"q8_0": 34, "q4_0": 18}[fmt]
    rows = blocks.reshape(n, k // 32, size)
    panels = -(-n // 32)
    codes = torch.zeros(panels, k // 4, 32, 4, dtype=torch.int32)
    scales = torch.zeros(panels, k // 32, 32, 2, dtype=torch.uint8)
    for row in range(n):
        for col in range(k):
            block, i = rows[row, col // 32], col % 32
            code = int(block[2 + i]) ^ 0x80 if fmt == "q8_0" else (int(block[2 + i % 16]) >> (4 * (i // 16))) & 0xF
            codes[row // 32, col // 4, row % 32, col % 4] = code
        for b in range(k // 32):
            scales[row // 32, b, row % 32] = rows[row, b, :2]
    if fmt == "q4_0":
        steps = codes.view(panels, k // 8, 2, 128)
        codes = steps[:, :, 0] | (steps[:, :, 1] << 4)
    return torch.cat([codes.flatten().to(torch.uint8), scales.flatten()])


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0"])
@pytest.mark.parametrize(("n", "k"), Q8_SHAPES[:3])
def test_the_packed_gguf_layouts_are_the_documented_ones(fmt, n, k):
    blocks = quantize(torch.randn(n, k, generator=torch.Generator().manual_seed(n)), fmt).data["blocks"]
    pack, unpack = kernels.GGUF_VNNI[fmt]
    packed = pack(blocks, n, k)
    assert torch.equal(packed, naive_gguf_pack(fmt, blocks, n, k))
    assert packed.numel() == blocks.numel() + (-n % 32) * (k // 32) * ({"q8_0": 34, "q4_0": 18}[fmt])
    assert torch.equal(unpack(packed, n, k), blocks.reshape(n, -1))


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0"])
@pytest.mark.parametrize(("n", "k"), Q8_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_gguf_kernels_are_llama_cpp_arithmetic_whatever_the_rows(fmt, n, k, dtype):
    """fp64 of the same int8-rounded activations times the dequantised blocks, to fp32 summation order; and a
    row's result is the same bits whichever rows share its call (the decode and the batched tiles)."""
    g = torch.Generator().manual_seed(n + k)
    qw = quantize(torch.randn(n, k, generator=g) * 0.05, fmt)
    packed = kernels.GGUF_VNNI[fmt][0](qw.data["blocks"], n, k)
    dense = dequantize(qw).double()
    x = (torch.randn(300, k, generator=g) * 3).to(dtype)
    x[1] = 0  # a zero row: scales 0, outputs 0
    alone = torch.cat([kernels.gguf_vnni_matmul(x[m:m + 1], packed, fmt, n, k) for m in range(3)])
    for rows in (1, 2, 3, 8, 64, 300):
        got = kernels.gguf_vnni_matmul(x[:rows], packed, fmt, n, k)
        assert got.dtype == dtype and got.shape == (rows, n)
        reference = q8_activations(x[:rows]).double() @ dense.t()
        tol = 1e-5 if dtype == torch.float32 else 8e-3
        assert float((got.double() - reference).norm() / reference.norm()) < tol
        assert torch.equal(got[: min(rows, 3)], alone[: min(rows, 3)])
        assert rows == 1 or not got[1].any()


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0"])
def test_a_gguf_layer_packs_for_q8_activations_and_unpacks_for_exact_ones(fmt):
    g = torch.Generator().manual_seed(3)
    layer = Linear(256, 70, bias=True).requires_grad_(False)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(70, 256, generator=g) * 0.05)
        layer.bias.copy_(torch.randn(70, generator=g))
    qw = quantize(layer.weight, fmt)
    layer.use(QuantizedLinear(qw))
    blocks = qw.data["blocks"].clone()
    x = torch.randn(5, 256, generator=g)
    exact = layer(x)
    assert use_activations([layer], "q8") == 1
    assert layer.method.name == f"{fmt}-a8-vnni" and set(dict(layer.named_buffers())) == {"quant_vnni"}
    assert layer.method.rounds_activations
    reference = F.linear(q8_activations(x), dequantize(qw), layer.bias)
    assert torch.allclose(layer(x), reference, rtol=1e-5, atol=1e-5)
    spec = layer.method.cpu_kernel_weights(layer).quant
    assert (spec.format, spec.q8, spec.scales) == (f"{fmt}-vnni", True, None)
    with pytest.raises(ValueError, match="VNNI-packed"):
        layer.method.use_activations("exact")  # the layout goes with the mode: the layer must come along
    assert use_activations([layer], "exact") == 1
    assert layer.method.name == fmt and torch.equal(layer.quant_blocks, blocks.reshape(layer.quant_blocks.shape))
    assert torch.equal(layer(x), exact)
