"""Quantised linear methods: a layer keeps only its quantised tensors, computes what the dense layer
of its dequantised weight computes, and runs a registered kernel in place of its reference."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from kvflow.config import RunnerConfig
from kvflow.model.linear import Linear
from kvflow.model.quant import kernels
from kvflow.model.quant.formats import dequantize, quantize
from kvflow.model.quant.linear_methods import (
    QuantizedLinear,
    kernel_for,
    q8_activations,
    register_kernel,
    unregister_kernel,
    use_activations,
)

CASES = [("q8_0", {}, None), ("q4_0", {}, None), ("q4_k", {}, None), ("int8", {}, None), ("int8", {}, 8),
         ("bipolar", {"bits": 3, "group_size": 32}, None), ("bipolar", {"bits": 4, "group_size": 64}, 6)]


def _layer(fmt: str, params: dict, act_bits: int | None, bias: bool = True) -> tuple[Linear, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    layer = Linear(256, 40, bias=bias).requires_grad_(False)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(40, 256, generator=g) * 0.05)
        if bias:
            layer.bias.copy_(torch.randn(40, generator=g))
    qw = quantize(layer.weight.detach(), fmt, **params)
    layer.use(QuantizedLinear(qw, act_bits))
    return layer, dequantize(qw)


@pytest.mark.parametrize(("fmt", "params", "act_bits"), CASES)
def test_a_quantised_layer_computes_its_dequantised_weights_product(fmt, params, act_bits):
    layer, dense = _layer(fmt, params, act_bits)
    assert "weight" not in dict(layer.named_parameters())  # no dense copy kept
    assert {n for n, _ in layer.named_buffers()} == {"quant_" + k for k in layer.method.keys}
    x = torch.randn(3, 5, 256, generator=torch.Generator().manual_seed(1))
    got = layer(x)
    assert got.shape == (3, 5, 40)
    reference = F.linear(x.double(), dense.double(), layer.bias.double())
    if act_bits is None:
        assert torch.allclose(got.double(), reference, rtol=1e-5, atol=1e-5)
    else:  # activations rounded too: int8 per token, or A-bit bipolar
        rel = float((got.double() - reference).norm() / reference.norm())
        assert rel < {8: 0.01, 6: 0.05}[act_bits]
    # The C++ forward runs every format here on its quantised kernels (bipolar: its planes, fp32 [N, 2, K/G]
    # scales then offsets, and its activation bits).
    # W8A8 int8 codes are VNNI-packed where the CPU has it (bytes: codes, then column sums).
    weights = layer.method.cpu_kernel_weights(layer)
    if kernels.load_extension() is not None:
        packed = fmt == "int8" and act_bits == 8 and kernels.int8_vnni_available()
        assert weights.quant.format == ("int8-vnni" if packed else fmt) and weights.quant.shape == (40, 256)
        assert weights.quant.q8 == (act_bits == 8 and fmt != "bipolar")
        assert weights.weight.dtype == (torch.int8 if fmt == "int8" and not packed else torch.uint8)
        if fmt == "bipolar":
            assert (weights.quant.bits, weights.quant.group) == (params["bits"], params["group_size"])
            assert weights.quant.scales.shape == (40, 2, 256 // params["group_size"])
            assert weights.quant.activation_bits == (act_bits or 0)


def test_layers_run_in_bfloat16():
    layer, dense = _layer("q4_k", {}, None)
    layer = layer.to(torch.bfloat16)  # the bias is cast; uint8 blocks are left alone
    x = torch.randn(4, 256, dtype=torch.bfloat16)
    got = layer(x)
    assert got.dtype == torch.bfloat16
    assert torch.allclose(got.float(), F.linear(x.float(), dense, layer.bias.float()), rtol=0.02, atol=0.05)


def test_a_registered_kernel_replaces_the_reference():
    layer, dense = _layer("q8_0", {}, None, bias=False)
    calls = []

    def kernel(x, qw, bias):
        calls.append(qw.format)
        return x @ dequantize(qw).t()

    registered = kernel_for("q8_0", "cpu")  # the C++ kernel, put back afterwards
    register_kernel("q8_0", "cpu", kernel)
    try:
        out = layer(torch.ones(2, 256))
        unregister_kernel("q8_0", "cpu")
        assert torch.allclose(layer(torch.ones(2, 256)), out)  # the reference again
    finally:
        if registered is not None:
            register_kernel("q8_0", "cpu", registered)
    assert calls == ["q8_0"] and torch.allclose(out, torch.ones(2, 256) @ dense.t())


def test_a_method_fits_only_its_own_layer():
    qw = quantize(torch.randn(40, 256), "q8_0")
    with pytest.raises(ValueError, match="40x256 q8_0 weight cannot go on a 32x256 layer"):
        Linear(256, 32).use(QuantizedLinear(qw))
    with pytest.raises(ValueError, match="float activations"):
        QuantizedLinear(qw, activation_bits=8)


# ----------------------------------------------------------------------------- the C++ CPU kernels
#: (format, activation bits at load, activation mode): every method the C++ kernels run on CPU.
CPU_CASES = [("q8_0", None, "exact"), ("q4_0", None, "exact"), ("q4_k", None, "exact"), ("q8_0", None, "q8"),
             ("q4_0", None, "q8"), ("q4_k", None, "q8"), ("int8", None, "exact"), ("int8", 8, "exact")]
needs_kernels = pytest.mark.skipif(kernels.load_extension() is None, reason="the C++ quantised kernels cannot build")


@needs_kernels
@pytest.mark.parametrize(("fmt", "act_bits", "mode"), CPU_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_layers_run_the_cpp_kernels_equal_to_their_reference(fmt, act_bits, mode, dtype, monkeypatch):
    """Decode rows (the GEMV) and a prefill's (the GEMM) go through `quant_matmul` in the method's mode and
    give its torch reference's result up to fp32 rounding (bf16: one rounding of the output and of W)."""
    layer, dense = _layer(fmt, {}, act_bits)
    assert layer.method.use_activations(mode) == (fmt != "int8")
    expected_mode = "q8" if mode == "q8" or act_bits == 8 else "exact"
    calls = []
    real, real_vnni = kernels.quant_matmul, kernels.int8_vnni_matmul

    def spy(x, qw, activation="exact", **kw):
        calls.append(activation)
        return real(x, qw, activation, **kw)

    def spy_vnni(*args):
        calls.append("vnni")
        return real_vnni(*args)

    monkeypatch.setattr(kernels, "quant_matmul", spy)
    monkeypatch.setattr(kernels, "int8_vnni_matmul", spy_vnni)
    packed = act_bits == 8 and kernels.int8_vnni_available()  # W8A8 on VNNI-packed codes
    layer = layer.to(dtype)
    qw = layer.method.weight(layer)
    for rows in (3, 20):
        x = torch.randn(rows, 256, generator=torch.Generator().manual_seed(rows)).to(dtype)
        got = layer(x)
        reference = layer.method.reference(x, qw, layer.bias)
        if dtype == torch.float32:
            assert torch.allclose(got, reference, rtol=1e-5, atol=1e-5)
        else:
            assert float((got.float() - reference.float()).norm() / reference.float().norm()) < 8e-3
        exact = F.linear(x.double(), dense.double(), layer.bias.double())  # the q8 bound: activations moved
        assert float((got.double() - exact).norm() / exact.norm()) < (0.01 if expected_mode == "q8" else 8e-3)
    assert calls == ["vnni" if packed else expected_mode] * 2


@needs_kernels
def test_inputs_the_kernels_cannot_run_take_the_reference_logged_once(caplog):
    layer, dense = _layer("q4_k", {}, None)
    layer = layer.to(torch.float16)
    x = torch.randn(2, 256).half()
    with caplog.at_level(logging.INFO, logger="kvflow.model.quant.linear_methods"):
        first, second = layer(x), layer(x)
    assert torch.equal(first, second)
    assert torch.allclose(first.float(), F.linear(x.float(), dense, layer.bias.float()), rtol=0.01, atol=0.02)
    assert caplog.text.count("take the torch reference") == 1 and "float16" in caplog.text


def test_activation_modes_are_checked():
    layer, _ = _layer("q8_0", {}, None)
    assert layer.method.use_activations("q8") and layer.method.name == "q8_0-a8"
    assert layer.method.use_activations("exact") and layer.method.name == "q8_0"
    with pytest.raises(ValueError, match="exact, q8"):
        layer.method.use_activations("q4")
    bipolar_layer, _ = _layer("bipolar", {"bits": 3, "group_size": 32}, None)
    assert use_activations([layer, bipolar_layer], "q8") == 1 and bipolar_layer.method.name == "bipolar"
    with pytest.raises(ValueError, match="quant_activations"):
        RunnerConfig(quant_activations="int4")


def test_methods_say_whether_they_round_their_activations():
    """What the bench's fast-path check relaxes its fp32 strictness on (kvflow/bench/fast_path_check.py)."""
    layer, _ = _layer("q8_0", {}, None)
    assert not layer.method.rounds_activations
    layer.method.use_activations("q8")
    assert layer.method.rounds_activations
    assert _layer("int8", {}, 8)[0].method.rounds_activations
    assert not _layer("int8", {}, None)[0].method.rounds_activations
    assert _layer("bipolar", {"bits": 4, "group_size": 64}, 6)[0].method.rounds_activations
    assert not Linear(8, 8).method.rounds_activations


def test_q8_activations_round_each_block_of_32_to_int8():
    x = torch.tensor([[0.5, -1.27, 0.004] + [0.0] * 29 + [2.0, 1.0] + [0.0] * 30])
    got = q8_activations(x)
    d0, d1 = 1.27 / 127, 2.0 / 127
    assert torch.allclose(got[0, :3], torch.tensor([round(0.5 / d0) * d0, -1.27, 0.0]), atol=1e-7)
    assert torch.allclose(got[0, 32:34], torch.tensor([2.0, round(1.0 / d1) * d1]), atol=1e-7)
    assert (got[0, 3:32] == 0).all()
