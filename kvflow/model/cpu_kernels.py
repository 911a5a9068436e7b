"""kvflow's C++ CPU forward (kvflow/csrc/cpu_model.cpp): build it once, then run a step in one call.

The extension is compiled on first use with the machine's own instruction set (`-march=native`)
and cached under ``$KVFLOW_CACHE`` (default ``~/.cache/kvflow``) in a folder named by a hash of
the source and its headers, the flags, the torch version and the CPU's feature flags, so a changed
file, a new torch or a different CPU never picks up a stale or illegal build, and by a hash of the
source folder's path, so two checkouts on one machine keep a build each (torch's build.ninja names
the source path: sharing a folder, each would rebuild the other's). The compile takes about a minute,
once; it is announced on stderr with its progress (a process's logging may not be set up, as in the
engine-core process). Building needs a C++ compiler
and ninja (a kvflow dependency); where either is missing, or the build fails, the engine logs why
and runs the PyTorch modules instead, which compute the same model. It runs a model whose linear
layers' methods all give it their weights (`LinearMethod.cpu_kernel_weights`), plainly or all
oneDNN-prepacked (quantised projections: q8_0, q4_0, q4_k, int8 codes on cpu_quant.h's kernels),
over a dense, int8, fp8 or KIVI (kivi4, kivi2) KV cache in the head-major layout; for
any other model or cache `CpuForward` raises `CpuForwardUnsupported`, and the runner logs why and takes
the modules.

``KVFLOW_CPU_ISA`` picks the instruction set instead of this machine's: ``avx2`` (x86-64-v3: AVX2 and
FMA, no AVX-512, the baseline of the x86-64 container image) or ``generic`` (the architecture's
baseline, x86-64 or armv8-a: every kernel takes its plain C++ loops, as on an edge box without
AVX-512). Such a portable build is keyed by the ISA instead of this CPU's flags, so a build made on
one machine (a container image's build stage) loads on another.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any, TextIO

import torch
import torch.nn as nn

from kvflow.attention.kivi import KiviStep
from kvflow.attention.kv_policy_ops import block_attention_mass
from kvflow.attention.kv_spec import KVCacheSpec, LayerKV
from kvflow.attention.shared_prefix import SharedPrefixGroups
from kvflow.model.block_zoo import BlockZoo
from kvflow.model.linear import CpuKernelWeights, Linear
from kvflow.model.lora import LoRASlots

logger = logging.getLogger(__name__)

CSRC = Path(__file__).resolve().parent.parent / "csrc"
SOURCE = CSRC / "cpu_model.cpp"  # includes the headers beside it (cpu_attention.h)
EXTENSION = "kvflow_cpu_model"
LIBRARY = f"{EXTENSION}.so"  # what torch's load() leaves in the build folder
#: Seconds between "still compiling" lines while the kernels build.
PROGRESS_INTERVAL = 10.0
# -ffp-contract=off: PyTorch rounds `a * b` before adding `c`; a fused multiply-add would not.
# -fopenmp: at::parallel_for is inline and runs serially without it (libgomp is torch's own).
ISA_ENV = "KVFLOW_CPU_ISA"
#: -march of each portable ISA per machine architecture (``native``: -march=native, everywhere).
PORTABLE_MARCH = {"x86_64": {"avx2": "x86-64-v3", "generic": "x86-64"},
                  "aarch64": {"generic": "armv8-a"}, "arm64": {"generic": "armv8-a"}}


def cpu_isa() -> str:
    """The ISA the kernels are built for: ``$KVFLOW_CPU_ISA``, default ``native``."""
    return os.environ.get(ISA_ENV, "").strip().lower() or "native"


def march(isa: str, machine: str | None = None) -> str:
    """-march for `isa` on `machine` (default: this one); ValueError naming the choices when unknown."""
    if isa == "native":
        return "native"
    machine = machine or platform.machine()
    choices = PORTABLE_MARCH.get(machine, {})
    if isa not in choices:
        raise ValueError(f"{ISA_ENV}={isa!r} is not an ISA for {machine}; choose from "
                         f"{', '.join(['native', *choices])}")
    return choices[isa]


def _march_or_native() -> str:
    try:
        return march(cpu_isa())
    except ValueError as e:
        logger.warning("%s; building for this machine (-march=native)", e)
        return "native"


CFLAGS = ["-O3", f"-march={_march_or_native()}", "-ffp-contract=off", "-fno-math-errno", "-fopenmp"]
_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


#: Steps with a prefill chunk longer than this run the PyTorch modules even when the C++ CPU
#: forward is on. Its attention works on query tiles of 8 and beats SDPA's flash kernel at every
#: length measured (bf16 TTFT, C++ vs modules: `135m` 163 vs 212 ms at 256 tokens, 837 vs 1,052 at
#: 1,024, 2,077 vs 2,399 at 2,000; `500m` 13.2 vs 13.8 s at 4,096), but its lead shrinks with
#: length, so longer chunks stay with SDPA. Both paths share the KV cache.
CPU_FORWARD_MAX_CHUNK = 4096

def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def isa_key() -> str:
    """What a build depends on of the CPU: its feature flags for a native build, else the portable -march."""
    native = "-march=native" in CFLAGS
    return _cpu_flags() if native else next(f for f in CFLAGS if f.startswith("-march="))


def build_dir() -> Path:
    """Where this source, compiled for this CPU and torch, lives: one folder per content and per checkout."""
    key = hashlib.sha256()
    sources = [path.read_bytes() for path in (SOURCE, *sorted(CSRC.glob("*.h")))]
    for part in (*sources, " ".join(CFLAGS).encode(), torch.__version__.encode(), isa_key().encode()):
        key.update(part)
    return cache_root() / "cpu_model" / f"{key.hexdigest()[:16]}-{checkout_key(CSRC)}"


def cache_root() -> Path:
    return Path(os.environ.get("KVFLOW_CACHE", Path.home() / ".cache" / "kvflow"))


def checkout_key(sources: Path) -> str:
    """A build folder's suffix naming the checkout whose `sources` it compiles: torch's build.ninja names the
    source paths, so two checkouts sharing one folder would rebuild each other's build, silently, on each switch."""
    return hashlib.sha256(str(sources.resolve()).encode()).hexdigest()[:8]


def jit_build(name: str, source: Path, directory: Path) -> ModuleType:
    """torch's JIT build of extension `name` from `source` into `directory`, with this build's flags (a no-op
    load where it is built and current). The quantised-weight kernels build through it too."""
    from torch.utils.cpp_extension import load

    return load(name=name, sources=[str(source)], extra_cflags=CFLAGS, extra_ldflags=["-fopenmp"],
                build_directory=str(directory), verbose=False)


def _build(directory: Path) -> ModuleType:
    return jit_build(EXTENSION, SOURCE, directory)


def build_announced(directory: Path, build: Callable[[Path], ModuleType], stream: TextIO | None = None,
                    interval: float = PROGRESS_INTERVAL, library: str = LIBRARY,
                    what: str = "the C++ CPU kernels") -> ModuleType:
    """`build(directory)`; where the folder holds no `library` yet, say on `stream` (stderr) that `what`
    compiles, once and for about a minute, then every `interval` s that it still does, then how long it took,
    so a first start is not a silent minute. Silent when the library is there (a load from the cache)."""
    if (directory / library).exists():
        return build(directory)
    out = sys.stderr if stream is None else stream

    def say(message: str) -> None:
        print(f"kvflow: {message}", file=out, flush=True)

    say(f"compiling {what} for this machine, once (about a minute) into {directory}")
    start = time.monotonic()
    done = threading.Event()

    def progress() -> None:
        while not done.wait(interval):
            say(f"still compiling {what}... {time.monotonic() - start:.0f} s")

    reporter = threading.Thread(target=progress, name="kvflow-kernel-build-progress", daemon=True)
    reporter.start()
    built = False
    try:
        module = build(directory)
        built = True
    finally:
        done.set()
        reporter.join()
        seconds = time.monotonic() - start
        say(f"compiled {what} in {seconds:.0f} s" if built else f"compiling {what} failed after {seconds:.0f} s")
    return module


@functools.cache
def load_extension() -> ModuleType | None:
    """The compiled extension, or None (with the reason logged) where it cannot be built."""
    try:
        from torch.utils.cpp_extension import verify_ninja_availability

        verify_ninja_availability()
        directory = build_dir()
        directory.mkdir(parents=True, exist_ok=True)
        return build_announced(directory, _build)
    except Exception as e:  # noqa: BLE001 - any build failure means: run the PyTorch modules
        logger.warning("kvflow's C++ CPU kernels are unavailable, running the PyTorch modules instead: %s", e)
        return None


def cpu_kernels_available(device: torch.device, dtype: torch.dtype) -> bool:
    """True where the C++ forward can run this model: a CPU device, a supported dtype, a build."""
    return device.type == "cpu" and dtype in _SUPPORTED_DTYPES and load_extension() is not None


def decode_gemv_available() -> bool:
    """True where the C++ build has the decode GEMV (compiled for a CPU with AVX512-BF16)."""
    ext = load_extension()
    return ext is not None and bool(ext.has_decode_gemv)


class CpuForwardUnsupported(Exception):
    """This model cannot run in the C++ forward (the runner takes the PyTorch modules)."""


def _kernel_weights(layer: Linear) -> CpuKernelWeights:
    weights = layer.method.cpu_kernel_weights(layer)
    if weights is None:
        raise CpuForwardUnsupported(f"the C++ forward cannot run {layer.method.name} linear weights")
    return weights


def _layer_slots(layer: nn.Module, cfg: Any, kinds: set[bool]) -> list[torch.Tensor]:
    """A decoder layer's weights as the C++ forward's 16 (or 24, quantised) slots; adds to `kinds` whether its
    float projections are prepacked."""
    attn, mlp = layer.self_attn, layer.mlp
    qkv, o, gate_up, down = (_kernel_weights(m) for m in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj,
                                                           mlp.down_proj))
    kinds.update(w.packed for w in (qkv, o, gate_up, down) if w.quant is None)
    quantised = [w for w in (qkv, o, gate_up, down) if w.quant is not None]
    if quantised and cfg.dtype not in (torch.float32, torch.bfloat16):
        raise CpuForwardUnsupported(f"the C++ forward runs quantised weights with float32 or bfloat16 "
                                    f"activations, not {cfg.dtype}")
    empty = torch.empty(0)
    q_norm = attn.q_norm.weight.detach() if attn.q_norm is not None else empty
    k_norm = attn.k_norm.weight.detach() if attn.k_norm is not None else empty
    return [
        layer.input_layernorm.weight.detach(), qkv.weight, _or_empty(qkv.bias), q_norm, k_norm, o.weight,
        _or_empty(o.bias), layer.post_attention_layernorm.weight.detach(), gate_up.weight,
        _or_empty(gate_up.bias), down.weight, _or_empty(down.bias),
        _or_empty(qkv.decode_copy), _or_empty(o.decode_copy), _or_empty(gate_up.decode_copy),
        _or_empty(down.decode_copy),
        *(slot for w in (qkv, o, gate_up, down) for slot in quant_slots(w)),
    ]


def _or_empty(t: torch.Tensor | None) -> torch.Tensor:
    """The C++ side takes an empty tensor for "none"."""
    return torch.empty(0) if t is None else t


#: Quantised formats as csrc/cpu_quant_forward.h numbers them.
_QUANT_FORMATS = ("q8_0", "q4_0", "q4_k", "int8", "bipolar", "int8-vnni", "q8_0-vnni", "q4_0-vnni")


def quant_slots(weights: CpuKernelWeights) -> list[torch.Tensor]:
    """A projection's quantisation (spec int64 [format, N, K, q8, bits, group], int8's scales or bipolar's
    scales and offsets) as the C++ forward takes it (cpu_quant_forward.h); two empty tensors for float weights."""
    q = weights.quant
    if q is None:
        return [torch.empty(0), torch.empty(0)]
    rounding = q.activation_bits if q.format == "bipolar" else int(q.q8)  # bipolar: its activation bits
    spec = torch.tensor([_QUANT_FORMATS.index(q.format), q.shape[0], q.shape[1], rounding, q.bits, q.group],
                        dtype=torch.long)
    return [spec, _or_empty(q.scales)]


def quest_select_cpp(ext: ModuleType, q: torch.Tensor, bounds: torch.Tensor, tables: torch.Tensor,
                     kv_lens: list[int], read_blocks: list[int], sink_blocks: list[int], window_blocks: list[int],
                     block_size: int, scale: float) -> tuple[torch.Tensor, list[int]]:
    """The C++ `quest_select` kernel with kv_policy_ops.quest_select's signature."""
    def longs(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long)

    chosen, lens = ext.quest_select(q.contiguous(), bounds, tables.contiguous(), longs(kv_lens), longs(read_blocks),
                                    longs(sink_blocks), longs(window_blocks), block_size, scale)
    return chosen, lens.tolist()


def kivi_step_tensors(step: KiviStep, query_start: torch.Tensor | list[int]) -> list[torch.Tensor]:
    """A KiviStep as the C++ KIVI kernels take it (cpu_kivi.h): per sequence its ring slot, chunk start,
    Q before the step and the flat index of its first token (`query_start`, e.g. query_start_loc[:-1]);
    then the groups to quantise and the ring writes."""
    starts = torch.as_tensor(query_start, dtype=torch.long)[: step.slots.numel()]
    return [t.contiguous() for t in (
        step.slots, step.starts, step.quantised, starts, step.group_from_step, step.group_step_index,
        step.group_ring_slot, step.group_ring_index, step.group_block, step.group_index, step.group_offset,
        step.ring_step_index, step.ring_slot, step.ring_index)]


class CpuForward:
    """The model's decoder stack as one C++ object; `__call__` matches `LlamaForCausalLM.forward`.

    It holds references to the model's own weight tensors (no copies) and to the KV caches, so
    it must be rebuilt if either is replaced.
    """

    def __init__(self, model: nn.Module, kv_spec: KVCacheSpec, kv_caches: list[LayerKV],
                 lora: LoRASlots | None = None, zoo: BlockZoo | None = None) -> None:
        """`lora`: the model's adapter slots (kvflow/model/lora.py); the forward reads them in place. `zoo`:
        variants whose own layers replace the base's for their rows (kvflow/model/block_zoo.py)."""
        if not getattr(model, "runs_cpu_forward", True):  # e.g. a long-conv model: no attention to run
            raise CpuForwardUnsupported(f"the C++ forward runs attention decoders, not {type(model).__name__}")
        ext = load_extension()
        if ext is None:
            raise RuntimeError("kvflow's C++ CPU kernels are not available on this machine")
        readable = kv_spec.is_dense or kv_spec.kv_dtype in ("int8", "fp8_e4m3") or kv_spec.kivi_bits
        if kv_spec.layout != "head_major" or not readable:
            raise CpuForwardUnsupported(f"the C++ forward cannot read a {kv_spec.kv_dtype} KV cache")
        if kv_spec.kivi_bits and kv_spec.components[2].dtype != model.config.dtype:
            raise CpuForwardUnsupported("the C++ forward reads a KIVI ring of the model's dtype")
        if kv_spec.is_dense and kv_spec.dtype != model.config.dtype:
            raise CpuForwardUnsupported(f"the C++ forward reads a KV cache of the model's dtype, "
                                        f"not {kv_spec.kv_dtype}")
        # One tensor per layer (dense), or (codes, scales) per layer (int8, fp8), or (codes, meta, ring) (KIVI):
        # codes, scales (meta) and rings in three lists.
        layer_parts = [kv_spec.parts(layer) for layer in kv_caches]
        codes = [parts[0] for parts in layer_parts]
        scales = [parts[1] for parts in layer_parts if len(parts) > 1]
        rings = [parts[2] for parts in layer_parts if len(parts) > 2]
        cfg = model.config
        layers: list[list[torch.Tensor]] = []
        windows: list[int] = []
        kinds: set[bool] = set()
        if zoo is not None and zoo.variants and cfg.qk_norm:
            raise CpuForwardUnsupported("the C++ forward runs a block zoo's variants without per-head q/k norms")
        for layer in model.layers:
            layers.append(_layer_slots(layer, cfg, kinds))
            windows.append(layer.self_attn.sliding_window or 0)
        variant_layers = [] if zoo is None else [(layer_idx, zoo.index(key), _layer_slots(block, cfg, kinds))
                                                 for (key, layer_idx), block in zoo.layers.items()]
        if len(kinds) > 1:
            raise CpuForwardUnsupported("the C++ forward runs plain or prepacked weights, not a mix of both")
        packed = kinds.pop() if kinds else False  # every projection quantised: no float ones to pack
        rotary = model.layers[0].self_attn.rotary
        self._model: Any = ext.CpuModel(
            model.embed_tokens.weight.detach(), layers, windows, model.norm.weight.detach(),
            rotary.cos.contiguous(), rotary.sin.contiguous(), codes, scales,
            cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rms_norm_eps, packed, rings, kv_spec.kivi_bits,
        )
        if lora is not None:
            self._model.set_lora(lora.cpp_tensors())
        for layer_idx, variant, slots in variant_layers:
            self._model.set_variant_layer(layer_idx, variant, slots)
        if zoo is not None:
            for key, norm in zoo.final_norms.items():
                self._model.set_variant_final_norm(zoo.index(key), norm.weight.detach())
        self._zoo = zoo
        self._ext = ext
        self._owner = model  # its `lm_head`, read at each call (compute_logits is its output widened to fp32)
        head = model.lm_head.method.cpu_kernel_weights(model.lm_head)
        if head is not None and head.quant is not None:
            head = None  # a quantised head (a GGUF file's): the model's compute_logits, on the same kernels
        self._head = head  # the LM head in the C++ forward's terms (None: its method has none)

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, seq_index: torch.Tensor,
                 slot_mapping: torch.Tensor, block_tables: torch.Tensor,
                 layer_hook: Callable[[int], None] | None = None,
                 kv_positions: torch.Tensor | None = None,
                 before_attention: Callable[[int, torch.Tensor], list[torch.Tensor]] | None = None,
                 after_attention: Callable[[int, torch.Tensor], None] | None = None,
                 kivi: KiviStep | None = None, query_start: torch.Tensor | None = None,
                 shared_prefix: SharedPrefixGroups | None = None,
                 lora_runs: list[tuple[int, int, int]] | None = None,
                 zoo_runs: dict[str, list[tuple[int, int]]] | None = None) -> torch.Tensor:
        """Final-norm hidden states [T, hidden] of a step's flat tokens (see AttentionMetadata);
        `layer_hook(l)` runs after each layer l; `kv_positions`: each token's cache index where a KV
        policy dropped tokens before it (default: its position). A KV policy's per-layer work runs
        around each layer's attention with its queries: `before_attention(l, q)` may return
        [block_tables, kv_positions] to attend with instead; `after_attention(l, q)` follows it. A KIVI
        cache needs the step's `kivi` bookkeeping and each sequence's first flat token (`query_start`).
        `shared_prefix`: decodes whose shared leading blocks attention reads once per group (not with
        Quest's reduced tables from `before_attention`). `lora_runs`: (slot, start, end) runs of tokens
        that add an adapter slot's delta to every projection (LoRASlots.set_runs; the C++ kernel of
        csrc/cpu_lora.h); `zoo_runs`: variant key ->
        runs of tokens its own layers compute (BlockZoo.set_runs)."""
        step = None if kivi is None else kivi_step_tensors(kivi, query_start)
        shared = None if shared_prefix is None else [shared_prefix.groups, shared_prefix.members]
        lora = torch.tensor(lora_runs, dtype=torch.long).view(-1, 3) if lora_runs else None
        zoo = None
        if zoo_runs:
            rows = sorted((start, end, self._zoo.index(key)) for key, spans in zoo_runs.items() for start, end in spans)
            zoo = torch.tensor([(v, start, end) for start, end, v in rows], dtype=torch.long).view(-1, 3)
        return self._model.forward(input_ids, positions, seq_index, slot_mapping, block_tables, layer_hook,
                                   kv_positions, before_attention, after_attention, step, shared, lora, zoo)

    def quest_select(self, q: torch.Tensor, bounds: torch.Tensor, tables: torch.Tensor, kv_lens: list[int],
                     read_blocks: list[int], sink_blocks: list[int], window_blocks: list[int], block_size: int,
                     scale: float) -> tuple[torch.Tensor, list[int]]:
        """Quest's blocks for decode rows: kv_policy_ops.quest_select, in C++ (the bounds read in place,
        no PyTorch op per step)."""
        return quest_select_cpp(self._ext, q, bounds, tables, kv_lens, read_blocks, sink_blocks, window_blocks,
                                block_size, scale)

    def block_mass(self, q: torch.Tensor, kv_cache: LayerKV, tables: torch.Tensor, kv_lens: list[int],
                   scale: float) -> torch.Tensor:
        """H2O's per-block attention mass [R, nb] (kv_policy_ops.block_attention_mass), read from the
        cache in place by the C++ kernel; head sizes that are not a multiple of 16 use the reference."""
        if q.shape[-1] % 16:
            return block_attention_mass(q, kv_cache, tables, kv_lens, scale)
        parts = (kv_cache,) if isinstance(kv_cache, torch.Tensor) else tuple(kv_cache)
        lens = torch.tensor(kv_lens, dtype=torch.long)
        return self._ext.block_mass(q.contiguous(), parts[0], tables.contiguous(), lens, scale,
                                    kv_scales=parts[1] if len(parts) > 1 else None)

    def fold_key_bounds(self, bounds: torch.Tensor, keys: torch.Tensor, slot_block: torch.Tensor,
                        slot_offset: torch.Tensor) -> None:
        """kv_policy_ops.fold_key_bounds in C++: one call per layer and step."""
        self._ext.fold_key_bounds(bounds, keys, slot_block, slot_offset)

    @property
    def has_draft_greedy(self) -> bool:
        """True where `draft_greedy` can run (the LM head has C++ kernel weights)."""
        return self._head is not None

    def draft_greedy(self, feeds: list[list[int]], starts: list[int], counts: list[int], tables: list[list[int]],
                     block_size: int) -> list[list[int]]:
        """A draft model's greedy proposals for a speculative pass in one C++ call (csrc/cpu_draft.h):
        sequence i's `feeds[i]` follow the `starts[i]` entries its cache holds; it proposes `counts[i]`
        (>= 1) tokens, each the argmax of `logits` after the last, writing the KV of all but the last.
        The same steps, kernels and KV writes as running the forward, `logits` and an argmax per step."""
        head = self._head
        assert head is not None, "the LM head has no C++ kernel weights (has_draft_greedy)"
        width = max(len(t) for t in tables)
        padded = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.long)
        out = self._model.draft_greedy(
            torch.tensor([t for f in feeds for t in f], dtype=torch.long),
            torch.tensor([len(f) for f in feeds], dtype=torch.long), torch.tensor(starts, dtype=torch.long),
            torch.tensor(counts, dtype=torch.long), padded, block_size, head.weight, _or_empty(head.bias),
            head.packed, _or_empty(head.decode_copy)).tolist()
        return [row[:n] for row, n in zip(out, counts)]

    def head_output(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head's output for these rows, in its own dtype: through the forward's own `linear` (the
        decode GEMV for a few rows where the head has its copy, `linear_f32` for a few fp32 rows, else the
        op the model's `compute_logits` runs), the very call `draft_greedy` makes; the model's head
        itself where its method has no C++ weights (a quantised head: its format's kernels)."""
        head = self._head
        if head is None:
            return self._owner.lm_head(hidden)
        return self._ext.linear(hidden.contiguous(), head.weight, _or_empty(head.bias), head.packed,
                                _or_empty(head.decode_copy))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 logits of these rows (the model's `compute_logits`: the head's output widened)."""
        return self.head_output(hidden).float()

    def greedy_tokens(self, hidden: torch.Tensor) -> list[int]:
        """Each row's argmax of its logits, as `logits(hidden).argmax(-1)` gives it (the first maximum; a
        NaN counts as the maximum), taken on the head's output in its own dtype by csrc/cpu_argmax.h:
        widening is exact and keeps the order, and the fp32 copy of rows x vocab is never made."""
        return self._ext.argmax_rows(self.head_output(hidden)).tolist()
