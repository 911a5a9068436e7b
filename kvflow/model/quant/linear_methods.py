"""Quantised linear methods: a layer holds its `QuantizedWeight` as buffers and computes x·Wᵀ from it.

No dense copy of the weight is kept (that is the point: memory). Each method's computation is a
*kernel* `(x [M, K], weight, bias) -> [M, N]` looked up per call by (method name, device type):
the reference kernels here run on any device (GGUF blocks: dequantise, then `F.linear`; int8: codes
times activations, then scales; bipolar: one ±1 matmul per bit plane), and faster ones (the C++ CPU
kernels, a Triton bit-plane kernel) replace them with `register_kernel`, without touching the
model or the loader. `cpu_kernel_weights` gives the C++ CPU forward the codes of the formats its
quantised projections run (the same kernels, csrc/cpu_quant_forward.h); where those cannot run a weight
it is None, the forward declines the model and the runner takes the PyTorch modules, which run every method.

On CPU, q8_0 / q4_0 / q4_k / int8 / bipolar run the C++ kernels of `kernels.py` (`quant_matmul`) wherever
`kernels.unsupported_reason` allows (else the reference, said once in the log). Activations: the GGUF
block formats keep them in float by default ("exact": the kernels equal the reference up to fp32
rounding); `use_activations("q8")` (the engine's `--quant-activations q8`) switches a layer to
llama.cpp's arithmetic, activations rounded to int8 per block of 32 (method "q8_0-a8" etc., a lossy
option whose reference rounds the activations the same way). int8 weights choose at load: W8A16
(float activations, "exact") or W8A8 (per-token int8 activations, the kernels' "q8" mode). Where the CPU has
AVX-512 VNNI, int8 W8A8 and q8_0 / q4_0 in q8 mode hold their codes VNNI-packed instead
(`QuantizedLinear.arrange`, methods "int8-w8a8-vnni", "q8_0-a8-vnni", "q4_0-a8-vnni"), for one kernel that runs
every batch size without reordering the weight per call: int8 bit for bit the row-major kernels' result, the
GGUF blocks up to fp32 summation order.

Which layers: every projection a checkpoint gives quantised (or that `--quantization` quantises at
load). The embedding and the LM head stay in the model's dtype unless a checkpoint (a GGUF file)
hands the head over quantised.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F

from kvflow.config import QUANT_ACTIVATIONS
from kvflow.model.linear import CpuKernelWeights, Linear, LinearMethod, QuantKernelSpec
from kvflow.model.quant import bipolar, bitplane_cuda, int8, kernels
from kvflow.model.quant.formats import get_format
from kvflow.model.quant.weights import QuantizedWeight

logger = logging.getLogger(__name__)

LinearKernel = Callable[[torch.Tensor, QuantizedWeight, "torch.Tensor | None"], torch.Tensor]
_KERNELS: dict[tuple[str, str], LinearKernel] = {}
BUFFER_PREFIX = "quant_"


def register_kernel(method: str, device_type: str, kernel: LinearKernel) -> None:
    """Run `method` (a `QuantizedLinear.name`, e.g. "q4_k" or "int8-w8a8") with `kernel` on
    `device_type` ("cpu", "cuda") instead of its reference computation."""
    _KERNELS[(method, device_type)] = kernel


def unregister_kernel(method: str, device_type: str) -> None:
    _KERNELS.pop((method, device_type), None)


def kernel_for(method: str, device_type: str) -> LinearKernel | None:
    return _KERNELS.get((method, device_type))


# On CUDA the bipolar methods run the Triton bit-plane kernels (the torch references where Triton is missing).
for _method, _kernel in bitplane_cuda.method_kernels().items():
    register_kernel(_method, "cuda", _kernel)


def _gguf_reference(x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """Dequantise the blocks (float32, transient), then the dense product."""
    return F.linear(x, get_format(qw.format).dequantize(qw).to(x.dtype), bias)


ACTIVATION_MODES = QUANT_ACTIVATIONS  # of the GGUF block formats: float, or llama.cpp's int8 blocks of 32
Q8_BLOCK = 32


def q8_activations(x: torch.Tensor) -> torch.Tensor:
    """x [..., K] as llama.cpp's q8 blocks see it, in fp32: per block of 32 along K, d = max|x| / 127 and
    x̂ = d · round(x · (1/d)) (ties to even), the very fp32 operations of the C++ kernels."""
    x32 = x.float()
    k = x32.shape[-1]
    groups = F.pad(x32, (0, -k % Q8_BLOCK)).unflatten(-1, (-1, Q8_BLOCK))
    d = groups.abs().amax(dim=-1, keepdim=True) / 127.0
    inverse = torch.where(d > 0, 1.0 / torch.where(d > 0, d, 1.0), 0.0)
    return (torch.round(groups * inverse) * d).flatten(-2)[..., :k]


def _gguf_q8_reference(x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """llama.cpp's arithmetic: the activations rounded to int8 blocks, times the dequantised weights (fp32)."""
    out = F.linear(q8_activations(x), get_format(qw.format).dequantize(qw)).to(x.dtype)
    return out if bias is None else out + bias


_declined: set[tuple[str, str]] = set()


def _cpu_kernel(activation: str, reference: LinearKernel, activation_bits: int | None = None) -> LinearKernel:
    """The C++ kernels in `activation` mode (bipolar: `activation_bits`) where they run the weight and input,
    else `reference` (logged once per format and reason)."""

    def kernel(x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None) -> torch.Tensor:
        reason = kernels.unsupported_reason(qw, x.dtype, activation_bits)
        if reason is None:
            out = kernels.quant_matmul(x, qw, activation, activation_bits=activation_bits)
            return out if bias is None else out + bias
        if (qw.format, reason) not in _declined:
            _declined.add((qw.format, reason))
            logger.info("%s layers take the torch reference on CPU: %s", qw.format, reason)
        return reference(x, qw, bias)

    return kernel


def _register_cpu_kernels() -> None:
    for fmt in ("q8_0", "q4_0", "q4_k"):
        register_kernel(fmt, "cpu", _cpu_kernel("exact", _gguf_reference))
        register_kernel(f"{fmt}-a8", "cpu", _cpu_kernel("q8", _gguf_q8_reference))
    register_kernel("int8-w8a16", "cpu", _cpu_kernel("exact", int8.linear_w8a16))
    register_kernel("int8-w8a8", "cpu", _cpu_kernel("q8", int8.linear_w8a8))
    register_kernel("int8-w8a8-vnni", "cpu", _int8_vnni_kernel)
    for fmt in kernels.GGUF_VNNI:
        register_kernel(f"{fmt}-a8-vnni", "cpu", _gguf_vnni_kernel)
    register_kernel("bipolar", "cpu", _cpu_kernel("exact", bipolar.bitplane_linear))
    for a_bits in bipolar.BITS:
        register_kernel(f"bipolar-a{a_bits}", "cpu", _cpu_kernel("exact", _abit_reference(a_bits), a_bits))


def _int8_vnni_kernel(x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """W8A8 on VNNI-packed codes (a layer packs them only where this kernel runs): fp32 or bf16 activations,
    else the reference on the unpacked codes."""
    scales = qw.data["scales"].float()  # fp32 whatever a module's `.to(dtype)` made of them
    if x.dtype in (torch.float32, torch.bfloat16):
        out = kernels.int8_vnni_matmul(x, qw.data["vnni"], scales, *qw.shape)
        return out if bias is None else out + bias
    codes = kernels.unpack_int8_vnni(qw.data["vnni"], *qw.shape)
    return int8.linear_w8a8(x, QuantizedWeight("int8", qw.shape, {"qweight": codes, "scales": scales}), bias)


def _gguf_vnni_kernel(x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """q8_0 / q4_0 with llama.cpp's q8 activations on VNNI-packed blocks: fp32 or bf16 activations, else the
    reference on the unpacked blocks."""
    if x.dtype in (torch.float32, torch.bfloat16):
        out = kernels.gguf_vnni_matmul(x, qw.data["vnni"], qw.format, *qw.shape)
        return out if bias is None else out + bias
    blocks = kernels.GGUF_VNNI[qw.format][1](qw.data["vnni"], *qw.shape)
    return _gguf_q8_reference(x, QuantizedWeight(qw.format, qw.shape, {"blocks": blocks}), bias)


def _abit_reference(a_bits: int) -> LinearKernel:
    def abit(x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None) -> torch.Tensor:
        return bipolar.bitplane_linear_abit(x, qw, bias, a_bits)

    return abit


_register_cpu_kernels()


#: The methods whose CPU kernel reads VNNI-packed codes where the CPU has AVX-512 VNNI (csrc/cpu_vnni_packed.h).
VNNI_METHODS = frozenset({"int8-w8a8", "q8_0-a8", "q4_0-a8"})
VNNI_SUFFIX = "-vnni"


class QuantizedLinear(LinearMethod):
    """A layer's weight in one format of `formats.FORMATS`, with the reference kernel of its family."""

    def __init__(self, weight: QuantizedWeight, activation_bits: int | None = None) -> None:
        fmt = get_format(weight.format)
        self.format = weight.format
        self.shape = weight.shape
        self.params = dict(weight.params)
        self.keys = tuple(weight.data)
        self.activation_bits = activation_bits
        self.vnni = False  # the codes held VNNI-packed (see `arrange`)
        self._pending: QuantizedWeight | None = weight
        if fmt.family == "gguf":
            if activation_bits is not None:
                raise ValueError(f"{weight.format} runs with float activations (activation_bits must be None)")
            self.name, self.reference = weight.format, _gguf_reference
        elif fmt.family == "int8":
            if activation_bits not in (None, 8):
                raise ValueError(f"int8 weights run with float (W8A16) or int8 (W8A8) activations, "
                                 f"not {activation_bits}-bit")
            self.name = "int8-w8a8" if activation_bits == 8 else "int8-w8a16"
            self.reference = int8.linear_w8a8 if activation_bits == 8 else int8.linear_w8a16
        else:
            if activation_bits is None:
                self.name, self.reference = "bipolar", bipolar.bitplane_linear
            else:
                if activation_bits not in bipolar.BITS:
                    raise ValueError(f"bipolar activation bits must be in [2, 8], got {activation_bits}")
                self.name, self.reference = f"bipolar-a{activation_bits}", _abit_reference(activation_bits)

    @property
    def rounds_activations(self) -> bool:  # type: ignore[override]
        return self.activation_bits is not None or self.name.startswith(f"{self.format}-a8")

    def use_activations(self, mode: str, layer: Linear | None = None) -> bool:
        """GGUF block formats: "exact" (float activations) or "q8" (llama.cpp's int8 blocks of 32, lossy).
        False (nothing changed) for the other families, whose activations are chosen at load. With `layer`, its
        codes are then held in the layout the new mode's CPU kernel reads (`arrange`); a layer whose codes are
        packed must be given."""
        if mode not in ACTIVATION_MODES:
            raise ValueError(f"quantised activations are one of {', '.join(ACTIVATION_MODES)}, not {mode!r}")
        if get_format(self.format).family != "gguf":
            return False
        if self.vnni and layer is None:
            raise ValueError("this layer holds VNNI-packed codes: switch it with use_activations(mode, layer)")
        self.name, self.reference = ((f"{self.format}-a8", _gguf_q8_reference) if mode == "q8"
                                     else (self.format, _gguf_reference))
        if layer is not None:
            self.arrange(layer)
        return True

    def process_weights(self, layer: Linear) -> None:
        """Register the format's tensors as the layer's buffers and drop its dense weight."""
        qw = self._pending
        if qw is None:
            raise RuntimeError("a QuantizedLinear holds one layer's weight: make one per layer")
        if (layer.out_features, layer.in_features) != tuple(qw.shape):
            raise ValueError(f"a {qw.shape[0]}x{qw.shape[1]} {qw.format} weight cannot go on a "
                             f"{layer.out_features}x{layer.in_features} layer")
        for key, tensor in qw.data.items():
            layer.register_buffer(BUFFER_PREFIX + key, tensor)
        if "weight" in layer._parameters:
            del layer.weight  # a shared matrix (a tied head's) lives on in its owner
        self._pending = None
        self.arrange(layer)

    def arrange(self, layer: Linear) -> None:
        """Hold the codes in the layout this method's CPU kernel reads: VNNI-packed for int8 W8A8 and for q8_0 / q4_0
        with q8 activations where the CPU has AVX-512 VNNI (one kernel for every batch size, no per-call reorder of the
        weight; csrc/cpu_vnni_packed.h), else as the format stores them. The packed bytes replace the format's
        tensors (the same size, give or take a panel's padding); `weight` unpacks them for the reference path."""
        base = self.name.removesuffix(VNNI_SUFFIX)
        on_cpu = getattr(layer, BUFFER_PREFIX + self.keys[0]).device.type == "cpu"
        want = base in VNNI_METHODS and on_cpu and kernels.int8_vnni_available()
        if want != self.vnni:
            data = self.weight(layer).data  # the format's own tensors
            for key in self.keys:
                delattr(layer, BUFFER_PREFIX + key)
            if want:
                data = _pack_vnni(self.format, data, *self.shape)
            self.keys, self.vnni = tuple(data), want
            for key, tensor in data.items():
                layer.register_buffer(BUFFER_PREFIX + key, tensor)
        self.name = base + (VNNI_SUFFIX if want else "")

    def weight(self, layer: Linear) -> QuantizedWeight:
        """The layer's weight in its format's own tensors, over its buffers (wherever `.to()` moved them;
        VNNI-packed codes unpacked, a copy)."""
        stored = self.stored_weight(layer)
        if not self.vnni:
            return stored
        return QuantizedWeight(self.format, self.shape, _unpack_vnni(self.format, stored.data, *self.shape),
                               self.params)

    def stored_weight(self, layer: Linear) -> QuantizedWeight:
        """The weight as the layer holds it, which is what its kernels take (VNNI-packed codes under "vnni")."""
        return QuantizedWeight(self.format, self.shape, {k: getattr(layer, BUFFER_PREFIX + k) for k in self.keys},
                               self.params)

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, layer.in_features)
        kernel = kernel_for(self.name, flat.device.type)
        if kernel is not None:
            out = kernel(flat, self.stored_weight(layer), layer.bias)
        else:
            out = self.reference(flat, self.weight(layer), layer.bias)
        return out.view(*x.shape[:-1], layer.out_features)

    def cpu_kernel_weights(self, layer: Linear) -> CpuKernelWeights | None:
        """The codes and what they are, for the C++ forward's quantised projections (the same kernels and
        mode as `apply` on CPU); None where those kernels cannot run the weight (a K they cannot block, A-bit
        bipolar groups that are not whole 64s, no build): the forward then declines the model."""
        if self.vnni:
            scales = layer.quant_scales.float().contiguous() if self.format == "int8" else None
            spec = QuantKernelSpec(f"{self.format}{VNNI_SUFFIX}", tuple(self.shape), scales, True)
            return CpuKernelWeights(layer.quant_vnni, _detached(layer.bias), None, packed=False, quant=spec)
        qw = self.weight(layer)
        bipolar_a_bits = self.activation_bits if self.format == "bipolar" else None
        if kernels.unsupported_reason(qw, torch.float32, bipolar_a_bits) is not None:
            return None
        codes, scales = kernels.kernel_tensors(qw)
        if self.format == "bipolar":
            spec = QuantKernelSpec(self.format, tuple(self.shape), scales, False, qw.params["bits"],
                                   qw.params["group_size"], bipolar_a_bits or 0)
        else:
            spec = QuantKernelSpec(self.format, tuple(self.shape), scales,
                                   self.name.endswith("-a8") or self.name == "int8-w8a8")
        return CpuKernelWeights(codes, _detached(layer.bias), None, packed=False, quant=spec)


def _pack_vnni(fmt: str, data: dict[str, torch.Tensor], n: int, k: int) -> dict[str, torch.Tensor]:
    if fmt == "int8":
        return {"vnni": kernels.pack_int8_vnni(data["qweight"]), "scales": data["scales"].float()}
    return {"vnni": kernels.GGUF_VNNI[fmt][0](data["blocks"], n, k)}


def _unpack_vnni(fmt: str, data: dict[str, torch.Tensor], n: int, k: int) -> dict[str, torch.Tensor]:
    if fmt == "int8":
        return {"qweight": kernels.unpack_int8_vnni(data["vnni"], n, k), "scales": data["scales"]}
    return {"blocks": kernels.GGUF_VNNI[fmt][1](data["vnni"], n, k)}


def is_quantized(layer: Linear) -> bool:
    return isinstance(layer.method, QuantizedLinear)


def use_activations(layers: list[Linear], mode: str) -> int:
    """Every GGUF-format quantised layer of `layers` to activation `mode` (see the top); how many changed."""
    return sum(layer.method.use_activations(mode, layer) for layer in layers if is_quantized(layer))


def _detached(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach()
