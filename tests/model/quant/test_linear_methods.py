"""Quantised linear methods: a layer keeps only its quantised tensors, computes what the dense layer
of its dequantised weight computes, and runs a registered kernel in place of its reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kvflow.model.linear import Linear
from kvflow.model.quant.formats import dequantize, quantize
from kvflow.model.quant.linear_methods import QuantizedLinear, register_kernel, unregister_kernel

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
    assert layer.method.cpu_kernel_weights(layer) is None  # the C++ forward declines: PyTorch modules run it


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

    register_kernel("q8_0", "cpu", kernel)
    try:
        out = layer(torch.ones(2, 256))
    finally:
        unregister_kernel("q8_0", "cpu")
    assert calls == ["q8_0"] and torch.allclose(out, torch.ones(2, 256) @ dense.t())


def test_a_method_fits_only_its_own_layer():
    qw = quantize(torch.randn(40, 256), "q8_0")
    with pytest.raises(ValueError, match="40x256 q8_0 weight cannot go on a 32x256 layer"):
        Linear(256, 32).use(QuantizedLinear(qw))
    with pytest.raises(ValueError, match="float activations"):
        QuantizedLinear(qw, activation_bits=8)
