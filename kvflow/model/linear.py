"""Linear layers and their methods: how a layer's weight is held and applied, chosen at load.

Every projection of the model (and the LM head) is a `Linear`, whose `method` holds and applies its
weight: `DenseLinear` (the weight as loaded, `F.linear`: the reference), `PrepackedLinear` (oneDNN's
blocked layout on CPU, see below). Quantised weights and adapter-augmented layers are further
methods. A LoRA adapter is not a method but an addition after any of them (`Linear.adapter`, see
kvflow/model/lora.py): the low-rank delta is the same whether the base weight is dense, prepacked or
quantised, so adapters compose with every format. The C++ CPU forward asks each layer's method for
its weights in a form it can run (`cpu_kernel_weights`); a method that has none makes the runner
take the PyTorch modules, which run any method.

oneDNN prepacking: profiling the `135m` single stream showed matrix-vector products taking about
64% of a decode step. Plain `F.linear` on bf16 weights streams them from memory at about 10 GB/s,
a third of this machine's bandwidth. Once oneDNN has reordered the weights into its blocked
layout, the same products run 1.5–3.6× faster, at every batch size we measured (1 to 512 rows),
with bit-identical bf16 results, so the switch changes speed and nothing else. The reorder happens
once, after loading. PyTorch's inductor uses the same two ops when it freezes a model for CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

if TYPE_CHECKING:
    from kvflow.model.block_zoo import RowRoutes
    from kvflow.model.lora import SlotAdapter


@dataclass
class QuantKernelSpec:
    """A quantised weight in the C++ forward's terms (csrc/cpu_quant_forward.h); `weight` holds its codes."""

    # "q8_0", "q4_0", "q4_k" (llama.cpp's blocks), "int8", "bipolar"; VNNI-packed: "int8-vnni", "q8_0-vnni", "q4_0-vnni"
    format: str
    shape: tuple[int, int]  # [N, K]
    scales: torch.Tensor | None  # int8: fp32 [N]; bipolar: fp32 [N, 2, K/G], group scales then offsets
    q8: bool  # activations rounded to int8 (llama.cpp's blocks of 32; int8 weights: W8A8)
    bits: int = 0  # bipolar: bits per weight
    group: int = 0  # bipolar: weights per scale and offset
    activation_bits: int = 0  # bipolar: activations rounded to this many bits per token (0: float)


@dataclass
class CpuKernelWeights:
    """A layer's weights as the C++ CPU forward takes them."""

    weight: torch.Tensor  # plain [N, K], or oneDNN-packed when `packed`, or a quantised weight's codes
    bias: torch.Tensor | None
    decode_copy: torch.Tensor | None  # the decode GEMV's row-blocked copy (`block_rows`), if kept
    packed: bool
    quant: QuantKernelSpec | None = None  # quantised weights: what the codes are


class LinearMethod:
    """How a `Linear` holds its weight and computes `x W^T + b`."""

    name = "abstract"
    # Whether the method rounds its inputs (int8 activations): then a one-ulp change of an input can move
    # an output by a quantisation step, so two summation orders no longer agree to fp32 rounding.
    rounds_activations = False

    def process_weights(self, layer: Linear) -> None:
        """Once, after the checkpoint's weights are loaded: convert what the method needs. Never change
        `layer.weight` in place: a tied LM head shares it with the embedding."""

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def cpu_kernel_weights(self, layer: Linear) -> CpuKernelWeights | None:
        """The layer in the C++ CPU forward's terms; None where that forward cannot run this method."""
        return None


class DenseLinear(LinearMethod):
    """The weight as loaded, through `F.linear`: the reference every other method is checked against."""

    name = "dense"

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, layer.weight, layer.bias)

    def cpu_kernel_weights(self, layer: Linear) -> CpuKernelWeights:
        return CpuKernelWeights(layer.weight.detach(), _detached(layer.bias), None, packed=False)


class PrepackedLinear(LinearMethod):
    """The weight in oneDNN's blocked layout (inference only; the loaded weight is released).

    `decode_copy`: also keep it in the decode GEMV's row-blocked layout (`block_rows`), which the C++
    forward uses for steps of a few tokens. oneDNN's layout is opaque, so this is a second copy of the
    weight: memory traded for single-stream speed."""

    name = "onednn-prepacked"

    def __init__(self, decode_copy: bool = False) -> None:
        self.decode_copy = decode_copy

    def process_weights(self, layer: Linear) -> None:
        weight = layer.weight.detach()
        # The batch-size hint only picks the blocking; 1 (decode) is the case that matters most.
        layer.register_buffer("packed_weight", torch.ops.mkldnn._reorder_linear_weight(weight, 1), persistent=False)
        layer.register_buffer("blocked_weight", block_rows(weight) if self.decode_copy else None, persistent=False)
        del layer.weight  # the packed copy replaces it (a tied head's matrix lives on in the embedding)

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, layer.in_features)
        out = torch.ops.mkldnn._linear_pointwise(flat, layer.packed_weight, layer.bias, "none", [], "")
        return out.view(*x.shape[:-1], layer.out_features)

    def cpu_kernel_weights(self, layer: Linear) -> CpuKernelWeights:
        return CpuKernelWeights(layer.packed_weight, _detached(layer.bias), layer.blocked_weight, packed=True)


class Linear(nn.Module):
    """`y = x W^T + b`, computed by its method (dense until the loader chooses another)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.method: LinearMethod = DenseLinear()
        # LoRA slots (kvflow/model/lora.py): adds each token's adapter delta to the method's output.
        self.adapter: SlotAdapter | None = None
        # A block zoo (kvflow/model/block_zoo.py): variants whose own layer replaces this one for their rows.
        self.routes: RowRoutes | None = None

    @classmethod
    def sharing(cls, weight: nn.Parameter) -> Linear:
        """A bias-free layer over an existing matrix (a tied LM head over the embedding)."""
        with torch.device("meta"):
            layer = cls(weight.shape[1], weight.shape[0])
        layer.weight = weight
        return layer

    def use(self, method: LinearMethod) -> None:
        method.process_weights(self)
        self.method = method

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        active = self.routes.active() if self.routes is not None else None
        if active:
            out = self.routes.apply(x, active, lambda rows: self.method.apply(self, rows),
                                    lambda block, rows: block.method.apply(block, rows))
        else:
            out = self.method.apply(self, x)
        if self.adapter is not None:
            self.adapter.add(x, out)
        return out

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"method={self.method.name}")


def prepack_available(device: torch.device, dtype: torch.dtype) -> bool:
    """True where the packed path is bit-identical and faster: bf16 weights on a CPU with oneDNN."""
    return (
        device.type == "cpu"
        and dtype == torch.bfloat16
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


def block_rows(weight: torch.Tensor) -> torch.Tensor | None:
    """`weight` [N, K] as [N/4, K/32, 4, 32]: the layout of the C++ forward's decode GEMV, where a
    block of four output rows is one sequential stream. None where the shape does not divide."""
    n, k = weight.shape
    if weight.dtype != torch.bfloat16 or n % 4 or k % 32:
        return None
    return weight.detach().reshape(n // 4, 4, k // 32, 32).permute(0, 2, 1, 3).contiguous()


def linear_layers(model: nn.Module) -> list[Linear]:
    return [m for m in model.modules() if isinstance(m, Linear)]


def _detached(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach()
