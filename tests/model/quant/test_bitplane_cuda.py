"""The bipolar methods' CUDA kernels (kvflow/model/quant/bitplane_cuda.py): registered for "cuda" by
linear_methods, the Triton kernels where they can run, else the torch references with one log line.
Without a GPU the same kernels are registered for "cpu" here and run under Triton's interpreter."""

from __future__ import annotations

import logging
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

from kvflow.model.linear import Linear  # noqa: E402
from kvflow.model.quant import bipolar, bitplane_cuda  # noqa: E402
from kvflow.model.quant.linear_methods import (  # noqa: E402
    QuantizedLinear,
    kernel_for,
    register_kernel,
    unregister_kernel,
)
from kvflow.model.quant.triton import bitplane as triton_bitplane  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def on_device():
    """The bipolar kernels as DEVICE runs them (registered for "cpu" too when there is no GPU)."""
    if DEVICE.type == "cuda":
        yield
        return
    before = {method: kernel_for(method, "cpu") for method in bitplane_cuda.method_kernels()}
    for method, kernel in bitplane_cuda.method_kernels().items():
        register_kernel(method, "cpu", kernel)
    yield
    for method, kernel in before.items():  # the C++ kernel registered for "bipolar" comes back
        unregister_kernel(method, "cpu")
        if kernel is not None:
            register_kernel(method, "cpu", kernel)


def _layer(bits: int, group: int, act_bits: int | None) -> Linear:
    g = torch.Generator().manual_seed(bits)
    layer = Linear(128, 40, bias=True).requires_grad_(False)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(40, 128, generator=g) * 0.05)
        layer.bias.copy_(torch.randn(40, generator=g))
    layer.use(QuantizedLinear(bipolar.quantize_bipolar(layer.weight.detach(), bits, group), act_bits))
    return layer.to(DEVICE)


def test_every_bipolar_method_has_a_cuda_kernel():
    names = ["bipolar", *[f"bipolar-a{a}" for a in range(2, 9)]]
    assert all(kernel_for(name, "cuda") is not None for name in names)


@pytest.mark.parametrize("act_bits", [None, 4])
def test_a_layer_runs_the_triton_kernel(on_device, monkeypatch, act_bits):
    """layer(x) goes through the Triton kernel (counted) and matches the torch reference."""
    calls = []
    name = "bitplane_linear_triton" if act_bits is None else "bitplane_linear_abit_triton"
    real = getattr(triton_bitplane, name)
    monkeypatch.setattr(triton_bitplane, name, lambda *a, **k: calls.append(1) or real(*a, **k))
    layer = _layer(3, 32, act_bits)
    x = torch.randn(2, 3, 128, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    y = layer(x)
    assert calls == [1] and y.shape == (2, 3, 40)
    qw = layer.method.weight(layer)
    flat = x.reshape(-1, 128)
    ref = (bipolar.bitplane_linear(flat, qw, layer.bias) if act_bits is None
           else bipolar.bitplane_linear_abit(flat, qw, layer.bias, act_bits))
    torch.testing.assert_close(y.reshape(-1, 40), ref, rtol=1e-5, atol=1e-5)


def test_without_triton_the_reference_runs_and_says_so_once(on_device, monkeypatch, caplog):
    bitplane_cuda.triton_kernels.cache_clear()
    monkeypatch.setitem(sys.modules, "kvflow.model.quant.triton.bitplane", None)  # import fails ...
    monkeypatch.delattr(sys.modules["kvflow.model.quant.triton"], "bitplane")  # ... also `from package import`
    try:
        layer = _layer(2, 32, None)
        x = torch.randn(3, 128, generator=torch.Generator().manual_seed(0)).to(DEVICE)
        with caplog.at_level(logging.WARNING, logger=bitplane_cuda.__name__):
            y = layer(x)
            layer(x)
        assert torch.equal(y, bipolar.bitplane_linear(x, layer.method.weight(layer), layer.bias))
        assert len([r for r in caplog.records if "not importable" in r.getMessage()]) == 1
    finally:
        bitplane_cuda.triton_kernels.cache_clear()


def test_an_unsupported_group_size_takes_the_reference(on_device, caplog):
    """A-bit needs groups of 32 (int8 MMA's K): a 16-group layer runs bitplane_linear_abit, logged once."""
    bitplane_cuda._fallback_once.cache_clear()
    layer = _layer(2, 16, 4)
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    with caplog.at_level(logging.WARNING, logger=bitplane_cuda.__name__):
        y = layer(x)
        layer(x)
    assert torch.equal(y, bipolar.bitplane_linear_abit(x, layer.method.weight(layer), layer.bias, 4))
    assert len([r for r in caplog.records if "multiple of 32" in r.getMessage()]) == 1
