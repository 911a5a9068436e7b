"""LoRA adapters in PEFT's format, and the slots that let one step run several of them beside the base.

An adapter directory holds `adapter_config.json` and `adapter_model.safetensors` (PEFT's
`save_pretrained`): per adapted projection, A [r, in] and B [out, r], applied as
y = x Wᵀ + s · (x Aᵀ) Bᵀ with s = lora_alpha / r (lora_alpha / √r with rsLoRA). `read_adapter` checks an
adapter against the base model before anything runs it: every tensor must name a projection the
model has (q/k/v/o, gate/up/down of a layer it has), with that projection's input and output sizes,
a rank within `max_lora_rank`, and only plain LoRA (no DoRA, no bias training, no fully trained
modules such as a new LM head); anything else is refused with the reason.

Our model fuses q/k/v into `qkv_proj` and gate/up into `gate_up_proj`. A fused projection's adapter is
the shards' adapters side by side: A stacks their A's (shard j in rows j·R … j·R + r), B is block
diagonal (shard j's rows read only shard j's columns), with the scale folded into B. One slot of
`LoRASlots` holds one adapter this way for every projection, padded with zeros to `max_lora_rank`
(zeros add exact zeros, so padding changes no output). A step's tokens come grouped in runs of one
slot (`LoRASlots.set_runs`); each projection adds, run by run, two small matmuls to the base output,
whatever the base method is (dense, prepacked, quantised). The C++ CPU forward runs the same two
products per run on the same slot tensors (csrc/cpu_model.cpp, `add_lora`); on CUDA, one launch of
the Triton shrink and expand kernels covers every run (model/triton/lora.py).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch.nn as nn

from kvflow.config import ModelConfig
from kvflow.model.linear import Linear

logger = logging.getLogger(__name__)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_WEIGHTS = ("adapter_model.bin", "adapter_model.pt")

#: PEFT target module -> (our fused projection, shard index within it).
LORA_TARGETS: dict[str, tuple[str, int]] = {
    "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
    "o_proj": ("o_proj", 0),
    "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
    "down_proj": ("down_proj", 0),
}
#: Our fused projections in a layer's order, with the sublayer that owns each.
PROJECTIONS: tuple[tuple[str, str], ...] = (("self_attn", "qkv_proj"), ("self_attn", "o_proj"),
                                            ("mlp", "gate_up_proj"), ("mlp", "down_proj"))
_SHARDS = {"qkv_proj": 3, "o_proj": 1, "gate_up_proj": 2, "down_proj": 1}
_SUBLAYER = {projection: sublayer for sublayer, projection in PROJECTIONS}
#: A step of at most BATCHED_MAX_TOKENS tokens (decodes, short chunks) with more runs than BATCHED_RUNS, or using
#: at least half the slots, computes every slot at once: a pair of matmuls per run costs more in calls than
#: the masked columns cost in FLOPs. A longer step (a prompt chunk) computes per run, where masking would
#: multiply the FLOPs by the number of slots.
BATCHED_RUNS = 4
BATCHED_MAX_TOKENS = 256
_TENSOR = re.compile(r"^(?:base_model\.model\.)?(?:model\.)?layers\.(\d+)\.(self_attn|mlp)\.(\w+)"
                     r"\.lora_([AB])(?:\.default)?\.weight$")


def shard_shapes(cfg: ModelConfig, projection: str) -> list[tuple[int, int, int]]:
    """(row offset, rows, in_features) of each shard of a fused projection."""
    q, kv, inter, hidden = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size, \
        cfg.hidden_size
    return {
        "qkv_proj": [(0, q, hidden), (q, kv, hidden), (q + kv, kv, hidden)],
        "o_proj": [(0, hidden, q)],
        "gate_up_proj": [(0, inter, hidden), (inter, inter, hidden)],
        "down_proj": [(0, hidden, inter)],
    }[projection]


def adapter_digest(path: str | Path) -> str:
    """BLAKE2b of the adapter's config and weights (16 hex digits): what tells two adapters apart."""
    root = Path(path)
    digest = hashlib.blake2b(digest_size=8)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        digest.update(name.encode() + b"\0")
        with open(root / name, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


@dataclass
class LoRAAdapter:
    """A validated adapter, its weights in our fused layout: for (layer, projection), the adapted shards
    as (shard index, A [r, in], scaled B [rows, r])."""

    name: str
    path: str
    digest: str
    rank: int  # the largest rank of any of its modules
    targets: tuple[str, ...]  # PEFT module names it adapts (q_proj, v_proj, ...)
    weights: dict[tuple[int, str], list[tuple[int, torch.Tensor, torch.Tensor]]] = field(repr=False)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes + b.nbytes for shards in self.weights.values() for _, a, b in shards)


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches a module name ending in it."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def read_adapter_config(root: Path) -> dict[str, Any]:
    """adapter_config.json, with the LoRA variants we do not run refused by name."""
    if not root.is_dir():
        raise ValueError(f"LoRA adapter {root} is not a directory")
    if not (root / CONFIG_FILE).is_file():
        raise ValueError(f"LoRA adapter {root} has no {CONFIG_FILE} (PEFT's save_pretrained writes one)")
    if not (root / WEIGHTS_FILE).is_file():
        pickles = [name for name in PICKLE_WEIGHTS if (root / name).is_file()]
        why = (f"; it holds {pickles[0]}, a pickle, which kvflow never loads (unpickling runs code): save it "
               "with safe_serialization=True") if pickles else ""
        raise ValueError(f"LoRA adapter {root} has no {WEIGHTS_FILE}{why}")
    try:
        config = json.loads((root / CONFIG_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"LoRA adapter {root}: {CONFIG_FILE} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise ValueError(f"LoRA adapter {root}: {CONFIG_FILE} is not a JSON object")
    unsupported = []
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        unsupported.append(f"peft_type {config.get('peft_type')!r} (only LORA)")
    if config.get("use_dora"):
        unsupported.append("DoRA (use_dora)")
    if config.get("bias", "none") != "none":
        unsupported.append(f"trained biases (bias={config.get('bias')!r})")
    if config.get("modules_to_save"):
        unsupported.append(f"fully trained modules (modules_to_save={config.get('modules_to_save')})")
    if config.get("fan_in_fan_out"):
        unsupported.append("fan_in_fan_out weights")
    targets = config.get("target_modules")
    if isinstance(targets, list):
        odd = sorted(set(targets) - set(LORA_TARGETS))
        if odd:
            unsupported.append(f"target modules {odd}")
    if unsupported:
        raise ValueError(f"LoRA adapter {root} uses what kvflow does not serve: {'; '.join(unsupported)}. "
                         f"Supported: plain LoRA on {', '.join(LORA_TARGETS)}")
    if not isinstance(config.get("r"), int) or config["r"] < 1 or not isinstance(config.get("lora_alpha"),
                                                                               int | float):
        raise ValueError(f"LoRA adapter {root}: {CONFIG_FILE} needs an integer r >= 1 and a number lora_alpha")
    return config


def read_adapter(path: str | Path, cfg: ModelConfig, max_rank: int, name: str = "",
                 dtype: torch.dtype | None = None) -> LoRAAdapter:
    """Read and check an adapter against the base model `cfg`; ValueError says what does not match."""
    from safetensors import SafetensorError, safe_open

    root = Path(path)
    config = read_adapter_config(root)
    dtype = dtype or cfg.dtype
    rsl = bool(config.get("use_rslora"))
    ranks, alphas = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    try:
        with safe_open(str(root / WEIGHTS_FILE), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                match = _TENSOR.match(key)
                if match is None:
                    raise ValueError(f"LoRA adapter {root}: tensor {key!r} is not a LoRA A/B of a layer projection "
                                     f"(supported targets: {', '.join(LORA_TARGETS)})")
                layer, sublayer, module, which = int(match[1]), match[2], match[3], match[4]
                if module not in LORA_TARGETS:
                    raise ValueError(f"LoRA adapter {root}: {key!r} adapts {module}, which kvflow does not serve "
                                     f"(supported targets: {', '.join(LORA_TARGETS)})")
                if sublayer != _SUBLAYER[LORA_TARGETS[module][0]]:
                    raise ValueError(f"LoRA adapter {root}: {key!r} puts {module} under {sublayer}; the base model "
                                     f"has it under {_SUBLAYER[LORA_TARGETS[module][0]]}")
                if layer >= cfg.num_layers:
                    raise ValueError(f"LoRA adapter {root} adapts layer {layer}; the base model has "
                                     f"{cfg.num_layers} layers: it was trained for another base model")
                pairs.setdefault((layer, module), {})[which] = f.get_tensor(key)
    except (SafetensorError, OSError) as e:
        raise ValueError(f"LoRA adapter {root}: cannot read {WEIGHTS_FILE}: {e}") from None
    if not pairs:
        raise ValueError(f"LoRA adapter {root}: {WEIGHTS_FILE} holds no LoRA weights")
    weights: dict[tuple[int, str], list[tuple[int, torch.Tensor, torch.Tensor]]] = {}
    top_rank = 0
    for (layer, module), ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise ValueError(f"LoRA adapter {root}: layer {layer} {module} has lora_{''.join(ab)} without its pair")
        a, b = ab["A"], ab["B"]
        projection, shard = LORA_TARGETS[module]
        _, rows, in_features = shard_shapes(cfg, projection)[shard]
        rank = a.shape[0]
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != in_features or b.shape != (rows, rank):
            raise ValueError(f"LoRA adapter {root}: layer {layer} {module} has A {tuple(a.shape)} and B "
                             f"{tuple(b.shape)}; the base model's {module} needs A [r, {in_features}] and "
                             f"B [{rows}, r]: the adapter was trained for another base model")
        if rank > max_rank:
            raise ValueError(f"LoRA adapter {root}: layer {layer} {module} has rank {rank}, above max_lora_rank "
                             f"{max_rank} (--max-lora-rank)")
        module_name = f"model.layers.{layer}.{_SUBLAYER[projection]}.{module}"
        expected = _pattern_value(ranks, module_name, config["r"])
        if rank != expected:
            raise ValueError(f"LoRA adapter {root}: layer {layer} {module} has rank {rank}, its config says "
                             f"{expected}")
        alpha = float(_pattern_value(alphas, module_name, config["lora_alpha"]))
        scale = alpha / math.sqrt(rank) if rsl else alpha / rank
        b_scaled = (b.double() * scale).to(dtype)
        weights.setdefault((layer, projection), []).append((shard, a.to(dtype).contiguous(), b_scaled.contiguous()))
        top_rank = max(top_rank, rank)
    targets = tuple(sorted({module for _, module in pairs}, key=list(LORA_TARGETS).index))
    return LoRAAdapter(name or root.name, str(root), adapter_digest(root), top_rank, targets, weights)


class SlotAdapter:
    """A projection's adapters in every slot: A [S, W, in] and B [S, W, out] (W = shards·R; B as the
    right-hand factor, so a slot's output columns are contiguous); `add` applies the step's runs (set on
    the owning `LoRASlots`) to a base output in place.

    Every way of computing a step reads B in place: per run, slot s's B is the [W, out] matrix B[s]; all
    slots at once (`onehot`), B is one [S·W, out] matrix; the C++ kernel (csrc/cpu_lora.h) and the Triton
    expand read a slot's rows of output columns contiguously. The second way costs one pair of matmuls
    whatever the number of runs, each row computed against every slot's A and the columns of other slots
    zeroed (exact zeros), so the modules choose it when a step uses many slots or many runs
    (`LoRASlots.set_runs`)."""

    def __init__(self, owner: LoRASlots, a: torch.Tensor, b: torch.Tensor) -> None:
        self.owner, self.a, self.b = owner, a, b

    def add(self, x: torch.Tensor, out: torch.Tensor) -> None:
        owner = self.owner
        if owner.tiles is not None:  # CUDA: one segmented shrink and one expand for every run (model/triton/lora.py)
            owner.kernels.lora_add(x.reshape(-1, x.shape[-1]), out.view(-1, out.shape[-1]), self.a, self.b,
                                   owner.tiles)
            return
        if owner.onehot is not None:
            slots, width = self.a.shape[0], self.a.shape[1]
            t = torch.mm(x, self.a.view(slots * width, -1).t()).view(-1, slots, width)
            t.mul_(owner.onehot.unsqueeze(2))
            out.addmm_(t.view(-1, slots * width), self.b.view(slots * width, -1))
            return
        for slot, start, end in owner.runs:
            out[start:end].addmm_(torch.mm(x[start:end], self.a[slot].t()), self.b[slot])


class LoRASlots:
    """`num_slots` adapters resident at once, attached to every projection of `model` (`Linear.adapter`).

    `load(slot, adapter)` writes an adapter into a slot in place (the C++ forward holds the same
    tensors); `set_runs` names, for the next forward, which runs of flat tokens use which slot (tokens
    outside every run use the base alone)."""

    def __init__(self, model: nn.Module, num_slots: int, max_rank: int) -> None:
        cfg: ModelConfig = model.config
        self.config, self.num_slots, self.max_rank = cfg, num_slots, max_rank
        self.runs: list[tuple[int, int, int]] = []
        self.tiles: torch.Tensor | None = None  # the runs as the Triton kernels' tiles (CUDA only)
        self.onehot: torch.Tensor | None = None  # [T, S]: each row's slot, where a step runs every slot at once
        self.projections: list[dict[str, SlotAdapter]] = []
        dtype = model.norm.weight.dtype
        device = model.norm.weight.device
        self.kernels = _triton_kernels() if device.type == "cuda" else None
        for layer in model.layers:
            per_layer = {}
            for sublayer, projection in PROJECTIONS:
                linear: Linear = getattr(getattr(layer, sublayer), projection)
                width = _SHARDS[projection] * max_rank
                a = torch.zeros(num_slots, width, linear.in_features, dtype=dtype, device=device)
                b = torch.zeros(num_slots, width, linear.out_features, dtype=dtype, device=device)
                linear.adapter = per_layer[projection] = SlotAdapter(self, a, b)
            self.projections.append(per_layer)

    @property
    def nbytes(self) -> int:
        return sum(p.a.nbytes + p.b.nbytes for layer in self.projections for p in layer.values())

    def load(self, slot: int, adapter: LoRAAdapter) -> None:
        """Write `adapter` into `slot` (every projection; shards it does not adapt stay zero)."""
        if adapter.rank > self.max_rank:
            raise ValueError(f"adapter {adapter.name} has rank {adapter.rank} > max_lora_rank {self.max_rank}")
        self.clear(slot)
        r = self.max_rank
        for (layer, projection), shards in adapter.weights.items():
            target = self.projections[layer][projection]
            for shard, a, b in shards:
                offset, rows, _ = shard_shapes(self.config, projection)[shard]
                rank = a.shape[0]
                target.a[slot, shard * r: shard * r + rank].copy_(a)
                target.b[slot, shard * r: shard * r + rank, offset: offset + rows].copy_(b.t())

    def clear(self, slot: int) -> None:
        for layer in self.projections:
            for p in layer.values():
                p.a[slot].zero_()
                p.b[slot].zero_()

    def set_runs(self, runs: list[tuple[int, int, int]], num_tokens: int) -> torch.Tensor | None:
        """(slot, first token, end token) of each run of the next forward's `num_tokens` flat tokens that uses a
        slot. Returns the step's one-hot [T, S] row-to-slot matrix where it runs every slot at once (a short
        step with many slots or runs: BATCHED_RUNS, BATCHED_MAX_TOKENS), else None (a pair of matmuls per run)."""
        self.runs = runs
        self.onehot = None
        device = self.projections[0]["qkv_proj"].a.device
        if self.kernels is not None:
            self.tiles = self.kernels.run_tiles(runs, device) if runs else None
            return None
        slots = {slot for slot, _, _ in runs}
        if num_tokens <= BATCHED_MAX_TOKENS and (len(runs) > BATCHED_RUNS or 2 * len(slots) >= self.num_slots > 1):
            onehot = torch.zeros(num_tokens, self.num_slots, dtype=self.projections[0]["qkv_proj"].a.dtype,
                                 device=device)
            for slot, start, end in runs:
                onehot[start:end, slot] = 1
            self.onehot = onehot
        return self.onehot

    def cpp_tensors(self) -> list[list[torch.Tensor]]:
        """Per layer [A [S, W, K], B [S, W, N]] of qkv, o, gate_up and down: the C++ forward's LoRA slots (the
        same storage)."""
        return [[t for _, projection in PROJECTIONS for t in (layer[projection].a, layer[projection].b)]
                for layer in self.projections]


@functools.cache
def _triton_kernels() -> ModuleType | None:
    """lora_triton, or None (said once) where Triton cannot be imported: the torch products run instead."""
    try:
        from kvflow.model.triton import lora as lora_triton
    except ImportError as e:
        logger.warning("LoRA runs torch matmuls on CUDA: Triton is not importable (%s); pip install 'kvflow[gpu]'", e)
        return None
    return lora_triton
