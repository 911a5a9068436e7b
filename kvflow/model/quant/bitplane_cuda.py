"""The CUDA kernels of the bipolar linear methods ("bipolar", "bipolar-a2".."bipolar-a8"): the Triton
bit-plane kernels (triton/bitplane.py) when Triton is importable and supports the weight, else the
torch references (`bipolar.bitplane_linear`, `bitplane_linear_abit`), saying why once in the log.

This module imports no Triton itself (Triton is the optional `gpu` extra): the kernels' module is
imported on the first call, so linear_methods can register these at import on any machine.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from types import ModuleType

import torch

from kvflow.model.quant import bipolar
from kvflow.model.quant.weights import QuantizedWeight

logger = logging.getLogger(__name__)

Kernel = Callable[[torch.Tensor, QuantizedWeight, "torch.Tensor | None"], torch.Tensor]


@functools.cache
def triton_kernels() -> ModuleType | None:
    """triton_bitplane, or None (logged once) where Triton cannot be imported."""
    try:
        from kvflow.model.quant.triton import bitplane as triton_bitplane
    except ImportError as exc:
        logger.warning("bipolar weights run the torch bit-plane reference on CUDA: Triton is not importable "
                       "(%s); pip install 'kvflow[gpu]' for the Triton kernels", exc)
        return None
    return triton_bitplane


@functools.cache
def _fallback_once(reason: str) -> None:
    logger.warning("bipolar weights run the torch bit-plane reference on CUDA: %s", reason)


def bipolar_kernel(act_bits: int | None) -> Kernel:
    """The kernel of "bipolar" (`act_bits` None: float activations) or "bipolar-a{act_bits}"."""
    def reference(x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None) -> torch.Tensor:
        if act_bits is None:
            return bipolar.bitplane_linear(x, qw, bias)
        return bipolar.bitplane_linear_abit(x, qw, bias, act_bits)

    def kernel(x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None) -> torch.Tensor:
        tb = triton_kernels()
        if tb is None:
            return reference(x, qw, bias)
        reason = tb.check_supported(qw, x, act_bits)
        if reason is not None:
            _fallback_once(reason)
            return reference(x, qw, bias)
        if act_bits is None:
            return tb.bitplane_linear_triton(x, qw, bias)
        return tb.bitplane_linear_abit_triton(x, qw, bias, act_bits)

    return kernel


def method_kernels() -> dict[str, Kernel]:
    """Every bipolar method name -> its CUDA kernel (what linear_methods registers for "cuda")."""
    return {"bipolar": bipolar_kernel(None), **{f"bipolar-a{a}": bipolar_kernel(a) for a in bipolar.BITS}}
