"""BlockLLM's block zoo: fine-tuned variants of the base model served by one engine, sharing the layers
they did not change.

A variant is a full model directory with the base's architecture and shapes (`kvflow train --finetune
--method top-layers` makes them). At load, each of its decoder layers (and its final norm) is hashed
(BLAKE2b over the layer's tensors as loaded) and compared with the base's: a layer with the same digest
is not kept (the base's serves it), a different one is kept as the variant's own block. Memory per
variant is therefore what it changed, not a whole model (`VariantInfo.unique_bytes`).

Per-block batching: a step's tokens come grouped in runs by variant (the runner's order). For each
weighted module of a layer (the norms and projections; attention itself has no weights and always runs
once over every token), the base module computes the rows of every request whose variant shares that
layer, in one call, and each variant's own block computes its own rows (`RowRoutes`). A layer no
variant in the step changed runs exactly as without a zoo: once, for everyone.

The embedding and the LM head must equal the base's (the step's logits are computed together); a
variant that changed them is refused. KV is shared where it is the base's: a layer's KV depends on that
layer and every one below it, so a variant whose first own layer is k computes the base's KV in layers
0..k-1. `kv_layer_groups` splits the cache into groups of g = gcd(L, every variant's k) layers; the groups
below k/g are indexed without the variant in their salt (kvflow/core/kv_cache_manager.py), so the base and
its variants hold one copy of a common prefix's KV there; the groups above are salted by variant (name
and digest), so a variant never reads KV computed by another model.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from kvflow.config import ModelConfig
from kvflow.model.layers import RMSNorm
from kvflow.model.linear import Linear, LinearMethod

#: What must agree between a variant's config and the base's for its layers to drop into the base.
_SHAPE_FIELDS = ("architecture", "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                 "num_kv_heads", "head_dim", "rms_norm_eps", "tie_word_embeddings", "rope", "qkv_bias", "o_bias",
                 "mlp_bias", "qk_norm", "sliding_windows", "quantization")


def module_digest(module: nn.Module) -> str:
    """BLAKE2b of a module's parameters and buffers by name (persistent state only), 16 hex digits."""
    digest = hashlib.blake2b(digest_size=8)
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().contiguous().cpu()
        digest.update(name.encode() + str(t.dtype).encode() + str(tuple(t.shape)).encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


@dataclass
class VariantInfo:
    name: str
    path: str
    digest: str  # of its files (variant_digest): the variant's identity (salts its KV)
    own_layers: tuple[int, ...]  # decoder layers it changed (kept as its own blocks)
    own_final_norm: bool
    unique_bytes: int  # weights this variant adds to the engine
    full_bytes: int  # what it would take loaded alone (every layer, embedding, head)


class RowRoutes:
    """On a base module: which variants replace it with their own block, and for which rows this step."""

    def __init__(self, zoo: BlockZoo) -> None:
        self.zoo = zoo
        self.alternatives: dict[str, nn.Module] = {}  # variant key -> its block's module

    def active(self) -> list[tuple[nn.Module, list[tuple[int, int]]]]:
        runs = self.zoo.step_runs
        return [(module, runs[key]) for key, module in self.alternatives.items() if key in runs]

    def apply(self, x: torch.Tensor, active: list[tuple[nn.Module, list[tuple[int, int]]]],
              base: Callable[[torch.Tensor], torch.Tensor], alternative: Callable[[nn.Module, torch.Tensor],
                                                                                 torch.Tensor]) -> torch.Tensor:
        """The rows of the active variants through their blocks, every other row through `base` (one call per
        run of rows, in row order)."""
        pieces: list[tuple[int, int, nn.Module | None]] = sorted(
            (start, end, module) for module, runs in active for start, end in runs)
        spans: list[tuple[int, int, nn.Module | None]] = []
        at = 0
        for start, end, module in pieces:
            if start > at:
                spans.append((at, start, None))
            spans.append((start, end, module))
            at = end
        if at < x.shape[0]:
            spans.append((at, x.shape[0], None))
        outs = [base(x[s:e]) if m is None else alternative(m, x[s:e]) for s, e, m in spans]
        return torch.cat(outs, dim=0)


@dataclass
class BlockZoo:
    """The variants of one base model and this step's rows of each (`set_runs`)."""

    model: nn.Module
    variants: dict[str, VariantInfo] = field(default_factory=dict)
    step_runs: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    # The variants' own blocks: (key, layer index) -> decoder layer, key -> final norm.
    layers: dict[tuple[str, int], nn.Module] = field(default_factory=dict)
    final_norms: dict[str, nn.Module] = field(default_factory=dict)
    _keys: dict[str, str] = field(default_factory=dict)  # variant name -> key

    @classmethod
    def load(cls, model: nn.Module, variants: dict[str, str], device: torch.device,
             loader: Callable[[ModelConfig, torch.device], nn.Module]) -> BlockZoo:
        """Load each variant with `loader` (the engine's load_model), keep the layers it changed, drop the rest."""
        zoo = cls(model)
        base_cfg: ModelConfig = model.config
        base_layers = [module_digest(layer) for layer in model.layers]
        base_norm = module_digest(model.norm)
        base_embed = module_digest(model.embed_tokens)
        full_bytes = _bytes(model)
        for name, path in variants.items():
            cfg = ModelConfig.from_pretrained(path, dtype=base_cfg.dtype, max_model_len=base_cfg.max_model_len)
            different = [f for f in _SHAPE_FIELDS if getattr(cfg, f) != getattr(base_cfg, f)]
            if different:
                raise ValueError(f"variant {name!r} at {path} is not a fine-tune of the base model: its "
                                 f"{', '.join(different)} differ")
            variant = loader(cfg, device)
            if module_digest(variant.embed_tokens) != base_embed or (
                    not cfg.tie_word_embeddings and module_digest(variant.lm_head) != module_digest(model.lm_head)):
                raise ValueError(f"variant {name!r} at {path} changed the embedding or the LM head; the zoo shares "
                                 "them with the base (serve it as its own model instead)")
            digests = [module_digest(layer) for layer in variant.layers]
            own = tuple(i for i, (d, b) in enumerate(zip(digests, base_layers)) if d != b)
            norm_digest = module_digest(variant.norm)
            identity = variant_digest(path)
            key = f"{name}@{identity}"
            unique = 0
            for i in own:
                zoo._adopt(model.layers[i], variant.layers[i], key)
                zoo.layers[(key, i)] = variant.layers[i]
                unique += _bytes(variant.layers[i])
            own_norm = norm_digest != base_norm
            if own_norm:
                zoo._adopt(model.norm, variant.norm, key)
                zoo.final_norms[key] = variant.norm
                unique += _bytes(variant.norm)
            zoo.variants[name] = VariantInfo(name, str(path), identity, own, own_norm, unique, full_bytes)
            zoo._keys[name] = key
            del variant  # its shared layers go with it: only the adopted blocks stay referenced
        return zoo

    def _adopt(self, base: nn.Module, block: nn.Module, key: str) -> None:
        """Route `key`'s rows of every weighted module of `base` to the matching module of `block`."""
        own = dict(block.named_modules())
        for name, module in base.named_modules():
            if isinstance(module, Linear | RMSNorm):
                if module.routes is None:
                    module.routes = RowRoutes(self)
                module.routes.alternatives[key] = own[name]

    def key(self, name: str) -> str:
        return self._keys[name]

    def index(self, key: str) -> int:
        """A variant's number (its order of registration), as the C++ forward names variants."""
        return list(self._keys.values()).index(key)

    def use_linear_method(self, method: LinearMethod) -> None:
        """The variants' own projections take the base's method (prepacked weights, say), as the base's did."""
        for block in self.layers.values():
            for module in block.modules():
                if isinstance(module, Linear):
                    module.use(method)

    def set_runs(self, runs: dict[str, list[tuple[int, int]]]) -> None:
        """Variant key -> (start, end) runs of the next forward's flat tokens (the base's rows are the rest)."""
        self.step_runs = runs

    def kv_layer_groups(self) -> tuple[int, dict[str, int]]:
        """How to split the KV cache so each variant shares the KV of the layers below its first own one: the
        number of layer groups (1: no variant shares any), and variant key -> the leading groups it shares."""
        num_layers = len(self.model.layers)
        first_own = {self._keys[name]: min(info.own_layers, default=num_layers) for name, info in self.variants.items()}
        size = math.gcd(num_layers, *first_own.values())
        return num_layers // size, {key: k // size for key, k in first_own.items() if k // size}

    @property
    def unique_bytes(self) -> int:
        return sum(v.unique_bytes for v in self.variants.values())


def variant_digest(path: str | Path) -> str:
    """BLAKE2b of a variant directory's config.json and weight files (16 hex digits): its identity, computed
    alike by the API front (which salts KV with it) and the runner (which keys its blocks by it)."""
    root = Path(path)
    if not (root / "config.json").is_file():
        raise ValueError(f"variant {path} is not a model directory (no config.json)")
    files = [root / "config.json", *sorted(root.glob("*.safetensors"))]
    if len(files) == 1:
        raise ValueError(f"variant {path} has no *.safetensors weights")
    digest = hashlib.blake2b(digest_size=8)
    for file in files:
        digest.update(file.name.encode() + b"\0")
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())
