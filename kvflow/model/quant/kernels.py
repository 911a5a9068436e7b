"""C++ CPU kernels for quantised linear weights (kvflow/csrc/cpu_quant.h, cpu_bipolar.h, cpu_bipolar_abit.h):
`quant_matmul(x, qw)`.

`y = x · Wᵀ` for W in GGUF's q8_0, q4_0, q4_k blocks (llama.cpp's bytes as `QuantizedWeight` holds
them), int8 with per-output-channel scales, or bipolar bit planes, x fp32 or bf16 [..., K]. A few rows
(decode) run a GEMV that streams each weight row once (AVX-512 VNNI where the CPU has it; bipolar: its
planes decoded into weights in registers, or decomposed into one masked add per plane); more rows
(prefill) dequantise tiles of W into x's dtype and multiply them with oneDNN (see cpu_quant.h).

`activation` chooses the GEMV's arithmetic: "exact" keeps fp32 activations (the result is the
dequantised weights' product up to fp32 rounding); "q8" is llama.cpp's own approach, quantising each
activation row to int8 per 32-value block (int8 weights: per token, i.e. W8A8) for VNNI integer
dot products, so each activation moves by up to half its block's quantisation step. Bipolar runs
"exact" (float activations) or, with `activation_bits`, its A-bit variant: activations rounded per token
onto the odd grid, every product a popcount of two bit planes (csrc/cpu_bipolar_abit.h; groups of whole 64s).
Rows beyond the GEMV's batch (8) take the dequantised-tile GEMM; in "q8" mode it multiplies the activation rows as the
integer arithmetic sees them (d·q), so a row's result does not depend on how many rows share its call.

The extension is its own build (cpu_quant.cpp), compiled on first use like the C++ forward's
(kvflow/model/cpu_kernels.py, whose flags and CPU fingerprint it reuses), cached under
``$KVFLOW_CACHE/cpu_quant/<hash>-<checkout>`` and announced on stderr while it compiles; without a
compiler or ninja, or when the build fails, a warning says why and `quant_matmul` raises
`QuantKernelUnsupported`, so callers take their torch path.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import re
from pathlib import Path
from types import ModuleType

import torch

from kvflow.model import cpu_kernels
from kvflow.model.quant.weights import QuantizedWeight

logger = logging.getLogger(__name__)

SOURCE = cpu_kernels.CSRC / "cpu_quant.cpp"
EXTENSION = "kvflow_cpu_quant"
#: Formats these kernels run.
FORMATS = ("q8_0", "q4_0", "q4_k", "int8", "bipolar")
ACTIVATIONS = ("exact", "q8")
#: The formats the AVX2 GEMV kernels cover (others run the AVX-512 or the scalar ones).
AVX2_FORMATS = ("q8_0", "q4_0", "q4_k")
_BLOCK = {"q8_0": 32, "q4_0": 32, "q4_k": 256, "int8": 1, "bipolar": 8}
_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"', re.MULTILINE)


class QuantKernelUnsupported(Exception):
    """These kernels cannot run this weight, input or machine; the caller takes its torch path."""


def local_includes(source: Path) -> list[Path]:
    """The headers beside `source` that it includes, directly or through another one, sorted."""
    seen: set[Path] = set()
    pending = [source]
    while pending:
        for name in _INCLUDE.findall(pending.pop().read_text()):
            path = source.parent / name
            if path.exists() and path not in seen:
                seen.add(path)
                pending.append(path)
    return sorted(seen)


def build_dir() -> Path:
    """Where this source and its headers, compiled with these flags for this CPU and torch, live: one folder per
    content and per checkout (as the C++ forward's)."""
    key = hashlib.sha256()
    for path in (SOURCE, *local_includes(SOURCE)):
        key.update(path.read_bytes())
    for part in (" ".join(cpu_kernels.CFLAGS), torch.__version__, cpu_kernels.isa_key()):
        key.update(part.encode())
    return cpu_kernels.cache_root() / "cpu_quant" / f"{key.hexdigest()[:16]}-{cpu_kernels.checkout_key(SOURCE.parent)}"


def _build(directory: Path) -> ModuleType:
    return cpu_kernels.jit_build(EXTENSION, SOURCE, directory)


@functools.cache
def load_extension() -> ModuleType | None:
    """The compiled extension, or None (with the reason logged) where it cannot be built."""
    try:
        from torch.utils.cpp_extension import verify_ninja_availability

        verify_ninja_availability()
        directory = build_dir()
        directory.mkdir(parents=True, exist_ok=True)
        return cpu_kernels.build_announced(directory, _build, library=f"{EXTENSION}.so",
                                           what="the quantised-weight CPU kernels")
    except Exception as e:  # noqa: BLE001 - any build failure means: the callers' torch path
        logger.warning("kvflow's quantised-weight CPU kernels are unavailable; quantised linear layers take "
                       "their torch path instead: %s", e)
        return None


def gemv_kernels(fmt: str, activation_bits: int | None = None) -> tuple[str, ...]:
    """The decode GEMV kernels `quant_matmul`'s `kernel` may name for weights of `fmt` (where this build has them)."""
    if fmt == "bipolar":
        return ("auto", "popcnt", "scalar") if activation_bits else ("auto", "planes", "decoded", "scalar")
    return ("auto", "avx512", "avx2", "scalar") if fmt in AVX2_FORMATS else ("auto", "avx512", "scalar")


def unsupported_reason(qw: QuantizedWeight, x_dtype: torch.dtype = torch.bfloat16,
                       activation_bits: int | None = None) -> str | None:
    """Why `quant_matmul` cannot run this weight with activations of `x_dtype` (bipolar: rounded to
    `activation_bits`); None where it can."""
    if qw.format not in FORMATS:
        return f"the CPU quantised kernels run {', '.join(FORMATS)}, not {qw.format}"
    if x_dtype not in (torch.float32, torch.bfloat16):
        return f"the CPU quantised kernels take float32 or bfloat16 activations, not {x_dtype}"
    if qw.in_features % _BLOCK[qw.format]:
        return f"{qw.format} needs in_features a multiple of {_BLOCK[qw.format]}, not {qw.in_features}"
    if activation_bits and qw.format == "bipolar" and qw.params["group_size"] % 64:
        return (f"the popcount kernel of A-bit bipolar needs groups of whole 64-bit words, not "
                f"{qw.params['group_size']}")
    if load_extension() is None:
        return "kvflow's quantised-weight CPU kernels could not be built on this machine (see the warning logged)"
    return None


def kernel_tensors(qw: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The codes (contiguous bytes) and, for int8, the fp32 row scales (bipolar: its planes, and its group
    scales and offsets as fp32 [N, 2, K/G]), as the kernels read them."""
    if qw.format == "int8":  # scales in fp32 whatever a module's `.to(dtype)` made of them (N values)
        return qw.data["qweight"].contiguous(), qw.data["scales"].float().contiguous()
    if qw.format == "bipolar":
        params = torch.stack([qw.data["scales"].float(), qw.data["offsets"].float()], dim=1)
        return qw.data["planes"].contiguous(), params.contiguous()
    return qw.data["blocks"].contiguous(), None


#: Output columns per panel of the VNNI-packed layouts (csrc/cpu_vnni_packed.h's kPanelCols).
VNNI_PANEL = 32


def int8_vnni_available() -> bool:
    """Whether this machine's build has the VNNI-packed kernels (AVX-512 VNNI): int8 W8A8; q8_0, q4_0 in q8 mode."""
    ext = load_extension()
    return ext is not None and bool(ext.has_int8_vnni)


def _panels(codes: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Byte codes [N, K] (K a multiple of 4) as panels of 32 output columns, each [K/4, 32, 4], zero beyond N,
    flattened; and the panel count."""
    n, k = codes.shape
    panels = -(-n // VNNI_PANEL)
    padded = torch.zeros(panels * VNNI_PANEL, k, dtype=codes.dtype, device=codes.device)
    padded[:n] = codes
    return padded.view(panels, VNNI_PANEL, k // 4, 4).permute(0, 2, 1, 3).reshape(-1), panels


def _unpanel(flat: torch.Tensor, n: int, k: int) -> torch.Tensor:
    panels = -(-n // VNNI_PANEL)
    return flat.view(panels, k // 4, VNNI_PANEL, 4).permute(0, 2, 1, 3).reshape(panels * VNNI_PANEL, k)[:n].contiguous()


def pack_int8_vnni(codes: torch.Tensor) -> torch.Tensor:
    """int8 codes [N, K] in csrc/cpu_vnni_packed.h's layout, as one byte tensor: panels of 32 output columns, each
    [ceil(K/4), 32, 4] (zero beyond N and K), then every padded column's code sum as int32."""
    n, k = codes.shape
    padded = torch.zeros(n, -(-k // 4) * 4, dtype=torch.int8, device=codes.device)
    padded[:, :k] = codes
    blocks, panels = _panels(padded)
    sums = torch.zeros(panels * VNNI_PANEL, dtype=torch.int32, device=codes.device)
    sums[:n] = padded.sum(dim=1, dtype=torch.int32)
    return torch.cat([blocks, sums.view(torch.int8)]).view(torch.uint8)


def unpack_int8_vnni(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The int8 codes [N, K] that `pack_int8_vnni` packed."""
    k_padded = -(-k // 4) * 4
    size = -(-n // VNNI_PANEL) * VNNI_PANEL * k_padded
    return _unpanel(packed[:size].view(torch.int8), n, k_padded)[:, :k].contiguous()


def pack_q8_0_vnni(blocks: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """q8_0 blocks ([N, K/32 · 34] bytes: fp16 d, 32 int8 codes) in csrc/cpu_vnni_packed.h's q8_0 layout: the codes
    + 128 in panels of 32 output columns ([K/4, 32, 4] each), then each panel's block scales, fp16 [K/32, 32]."""
    nb = k // 32
    rows = blocks.reshape(n, nb, 34)
    codes = rows[..., 2:].reshape(n, k) ^ 0x80
    scales = rows[..., :2].reshape(n, nb * 2)
    packed_codes, _ = _panels(codes)
    return torch.cat([packed_codes, _panel_scales(scales, n, nb)])


def unpack_q8_0_vnni(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The q8_0 blocks ([N, K/32 · 34] bytes) that `pack_q8_0_vnni` packed."""
    nb, panels = k // 32, -(-n // VNNI_PANEL)
    size = panels * VNNI_PANEL * k
    codes = _unpanel(packed[:size], n, k) ^ 0x80
    return _blocks(_unpanel_scales(packed[size:], n, nb), codes.view(n, nb, 32))


def pack_q4_0_vnni(blocks: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """q4_0 blocks ([N, K/32 · 18] bytes: fp16 d, then 16 bytes whose low nibbles are codes 0..15 and high nibbles
    16..31) in csrc/cpu_vnni_packed.h's q4_0 layout: the codes in panels of 32 output columns as q8_0's, two k4
    steps per 128 bytes (the even step's in the low nibbles), then each panel's block scales, fp16 [K/32, 32]."""
    nb = k // 32
    rows = blocks.reshape(n, nb, 18)
    qs = rows[..., 2:]
    codes = torch.cat([qs & 0x0F, qs >> 4], dim=2).reshape(n, k)
    panel_codes, panels = _panels(codes)
    steps = panel_codes.view(panels, k // 8, 2, VNNI_PANEL * 4)
    nibbles = steps[:, :, 0] | (steps[:, :, 1] << 4)
    return torch.cat([nibbles.reshape(-1), _panel_scales(rows[..., :2].reshape(n, nb * 2), n, nb)])


def unpack_q4_0_vnni(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The q4_0 blocks ([N, K/32 · 18] bytes) that `pack_q4_0_vnni` packed."""
    nb, panels = k // 32, -(-n // VNNI_PANEL)
    size = panels * VNNI_PANEL * k // 2
    nibbles = packed[:size].view(panels, k // 8, 1, VNNI_PANEL * 4)
    steps = torch.cat([nibbles & 0x0F, nibbles >> 4], dim=2).reshape(-1)
    codes = _unpanel(steps, n, k).view(n, nb, 32)
    qs = codes[..., :16] | (codes[..., 16:] << 4)
    return _blocks(_unpanel_scales(packed[size:], n, nb), qs)


def _panel_scales(scales: torch.Tensor, n: int, nb: int) -> torch.Tensor:
    """Block scales (fp16 bytes [N, K/32 · 2]) per panel of 32 output columns: [K/32, 32, 2] each, flattened."""
    panels = -(-n // VNNI_PANEL)
    padded = torch.zeros(panels * VNNI_PANEL, nb * 2, dtype=torch.uint8, device=scales.device)
    padded[:n] = scales
    return padded.view(panels, VNNI_PANEL, nb, 2).permute(0, 2, 1, 3).reshape(-1)


def _unpanel_scales(flat: torch.Tensor, n: int, nb: int) -> torch.Tensor:
    panels = -(-n // VNNI_PANEL)
    return flat.view(panels, nb, VNNI_PANEL, 2).permute(0, 2, 1, 3).reshape(-1, nb, 2)[:n]


def _blocks(scales: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """GGUF blocks [N, K/32 · bytes]: each block's 2 scale bytes, then its code bytes."""
    return torch.cat([scales, codes], dim=2).reshape(scales.shape[0], -1).contiguous()


#: The GGUF block formats with a VNNI-packed layout, and their packers / unpackers.
GGUF_VNNI = {"q8_0": (pack_q8_0_vnni, unpack_q8_0_vnni), "q4_0": (pack_q4_0_vnni, unpack_q4_0_vnni)}


def _vnni_extension() -> ModuleType:
    ext = load_extension()
    if ext is None or not ext.has_int8_vnni:
        raise QuantKernelUnsupported("this machine's build has no AVX-512 VNNI kernels")
    return ext


def int8_vnni_matmul(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """W8A8 `x · Wᵀ` (x fp32 or bf16 [..., K] on the CPU) for int8 weights packed by `pack_int8_vnni`, with
    fp32 row scales [N]: per-token int8 activations, bit for bit what `quant_matmul(x, qw, "q8")` gives."""
    y = _vnni_extension().int8_vnni_linear(x.reshape(-1, k), packed, scales, n, k)
    return y.view(*x.shape[:-1], n)


def gguf_vnni_matmul(x: torch.Tensor, packed: torch.Tensor, fmt: str, n: int, k: int) -> torch.Tensor:
    """`x · Wᵀ` for q8_0 or q4_0 (`fmt`) weights packed by `GGUF_VNNI[fmt]`, with llama.cpp's arithmetic
    (activations rounded to int8 per block of 32): `quant_matmul(x, qw, "q8")`'s result up to fp32 summation order."""
    y = _vnni_extension().gguf_vnni_linear(x.reshape(-1, k), packed, fmt, n, k)
    return y.view(*x.shape[:-1], n)


def quant_matmul(x: torch.Tensor, qw: QuantizedWeight, activation: str = "exact", *, path: str = "auto",
                 kernel: str = "auto", tile_rows: int = 1024, activation_bits: int | None = None) -> torch.Tensor:
    """`x · Wᵀ` for x [..., K] (fp32 or bf16, CPU), in x's dtype; raises QuantKernelUnsupported where the
    kernels cannot run it. `path` ("auto", "gemv", "mm") and `kernel` (the GEMV's: "auto", or one of the
    extension's `kernels`: "avx512", "avx2" for q8_0/q4_0/q4_k, "scalar" — the plain loops; bipolar: "planes",
    "decoded" or "scalar", see csrc/cpu_bipolar.h; A-bit: "popcnt" or "scalar") exist for tests and benchmarks;
    `tile_rows`: the "mm" GEMM's tile. `activation_bits` (bipolar only): the A-bit variant."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, not {activation!r}")
    if qw.format == "bipolar" and activation != "exact":
        raise ValueError("bipolar weights take float activations (activation='exact') or, with activation_bits, "
                         "their own A-bit rounding")
    if activation_bits is not None and qw.format != "bipolar":
        raise ValueError(f"activation_bits is bipolar's A-bit variant; {qw.format} rounds with activation='q8'")
    reason = unsupported_reason(qw, x.dtype, activation_bits)
    if reason is None and x.device.type != "cpu":
        reason = f"the quantised kernels run on the CPU, not {x.device}"
    if reason is not None:
        raise QuantKernelUnsupported(reason)
    ext = load_extension()
    assert ext is not None  # unsupported_reason checked
    weight, scales = kernel_tensors(qw)
    n, k = qw.shape
    flat = x.reshape(-1, k)
    if qw.format == "bipolar" and activation_bits:
        y = ext.bipolar_linear_abit(flat, weight, scales, n, k, qw.params["bits"], qw.params["group_size"],
                                    activation_bits, kernel)
    elif qw.format == "bipolar":
        y = ext.bipolar_linear(flat, weight, scales, n, k, qw.params["bits"], qw.params["group_size"], path, kernel,
                               tile_rows)
    else:
        y = ext.quant_linear(flat, weight.contiguous(), scales, qw.format, n, k, activation, path, kernel, tile_rows)
    return y.view(*x.shape[:-1], n)


def dequantize(qw: QuantizedWeight) -> torch.Tensor:
    """The weight in fp32 [N, K], dequantised by the C++ kernels' own decoder."""
    ext = load_extension()
    if ext is None or qw.format not in FORMATS:
        raise QuantKernelUnsupported(unsupported_reason(qw) or "no build")
    weight, scales = kernel_tensors(qw)
    if qw.format == "bipolar":
        return ext.bipolar_dequantize(weight, scales, *qw.shape, qw.params["bits"], qw.params["group_size"])
    return ext.dequantize(weight.contiguous(), scales, qw.format, *qw.shape)
