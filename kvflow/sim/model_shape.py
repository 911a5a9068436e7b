"""Shape of a decoder-only transformer: what a roofline needs, read from a config alone.

The planner sizes deployments of models it never loads (OPT-175B on a cluster it cannot reach),
so parameter bytes, KV bytes per token and FLOPs per token come from the config's numbers, not
from weights. Biases, OPT's learned position embeddings and norm biases are left out (under
0.1 % of any model here); norm weights are counted as in Llama.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

_DTYPE_BYTES = {"float32": 4, "fp32": 4, "float": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2,
                "half": 2, "float8": 1, "fp8": 1, "int8": 1}


def dtype_bytes(dtype: str) -> int:
    """Bytes per element of a dtype name as config.json spells it ("bfloat16", "float32", ...)."""
    key = dtype.lower().removeprefix("torch.")
    if key not in _DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; known: {', '.join(sorted(_DTYPE_BYTES))}")
    return _DTYPE_BYTES[key]


@dataclass(frozen=True)
class ModelShape:
    """Sizes of a decoder-only transformer (Llama-style gated MLP or OPT-style 4×hidden MLP)."""

    name: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    gated_mlp: bool = True  # gate/up/down (Llama, Mistral, Qwen) rather than fc1/fc2 (OPT)
    tied_embeddings: bool = False  # lm_head shares the input embedding matrix
    param_bytes: int = 2  # bytes per weight element
    kv_bytes: int = 2  # bytes per KV-cache element

    def __post_init__(self) -> None:
        for field in ("num_layers", "hidden_size", "intermediate_size", "num_heads", "num_kv_heads",
                      "head_dim", "vocab_size", "param_bytes", "kv_bytes"):
            if int(getattr(self, field)) <= 0:
                raise ValueError(f"{field} must be positive, got {getattr(self, field)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")

    @property
    def attention_params_per_layer(self) -> int:
        """q and o projections (all heads) plus k and v (the KV heads)."""
        h, d = self.hidden_size, self.head_dim
        return 2 * h * self.num_heads * d + 2 * h * self.num_kv_heads * d

    @property
    def mlp_params_per_layer(self) -> int:
        return (3 if self.gated_mlp else 2) * self.hidden_size * self.intermediate_size

    @property
    def linear_params_per_layer(self) -> int:
        """Weights that multiply every token in a layer (what sets the FLOPs per token)."""
        return self.attention_params_per_layer + self.mlp_params_per_layer

    @property
    def params_per_layer(self) -> int:
        return self.linear_params_per_layer + 2 * self.hidden_size  # two norms

    @property
    def embedding_params(self) -> int:
        """One vocab × hidden matrix (input embedding; the lm_head is another unless tied)."""
        return self.vocab_size * self.hidden_size

    @property
    def num_params(self) -> int:
        embeddings = self.embedding_params * (1 if self.tied_embeddings else 2)
        return self.num_layers * self.params_per_layer + embeddings + self.hidden_size  # + final norm

    @property
    def weight_bytes(self) -> int:
        return self.num_params * self.param_bytes

    @property
    def kv_bytes_per_token_per_layer(self) -> int:
        return 2 * self.num_kv_heads * self.head_dim * self.kv_bytes  # keys and values

    @property
    def kv_bytes_per_token(self) -> int:
        """KV-cache bytes one token occupies across all layers."""
        return self.num_layers * self.kv_bytes_per_token_per_layer

    @property
    def activation_bytes_per_token(self) -> int:
        """One hidden-state row: what an all-reduce or a pipeline send moves per token."""
        return self.hidden_size * self.param_bytes

    @property
    def linear_flops_per_token(self) -> int:
        """2 FLOPs per weight per token over every layer's projections and MLP (lm_head apart)."""
        return 2 * self.num_layers * self.linear_params_per_layer

    @property
    def logits_flops(self) -> int:
        """lm_head FLOPs for one sampled position (engines compute logits only where they sample)."""
        return 2 * self.vocab_size * self.hidden_size

    def attention_flops_per_layer(self, new: int, cached: int) -> float:
        """QKᵀ and PV of `new` causal queries over `cached + new` keys in one layer.

        Each query sees the cached tokens plus the new ones up to itself: l·p + l²/2 pairs, each
        2 FLOPs per head dimension in each of the two products, so 2·heads·d·(l² + 2·l·p): the
        same `l² + 2·l·p` feature the latency model fits.
        """
        return 2.0 * self.num_heads * self.head_dim * (new * new + 2.0 * new * cached)

    def attention_flops(self, new: int, cached: int) -> float:
        """`attention_flops_per_layer` over all layers."""
        return self.num_layers * self.attention_flops_per_layer(new, cached)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> ModelShape:
        return cls(**doc)

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any], name: str = "", dtype: str | None = None,
                       kv_dtype: str | None = None) -> ModelShape:
        """From a config.json dict: Llama/Mistral/Qwen2/Qwen3 keys, or OPT's (`ffn_dim`, non-gated).

        `dtype` overrides the config's `torch_dtype`/`dtype` (absent: bf16, how GPUs serve);
        `kv_dtype` defaults to the weights' dtype.
        """
        is_opt = cfg.get("model_type") == "opt"
        hidden = int(cfg["hidden_size"])
        heads = int(cfg["num_attention_heads"])
        weights = dtype or cfg.get("dtype") or cfg.get("torch_dtype") or "bfloat16"
        return cls(
            name=name or str(cfg.get("_name_or_path") or cfg.get("model_type") or "model"),
            num_layers=int(cfg["num_hidden_layers"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["ffn_dim"] if is_opt else cfg["intermediate_size"]),
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            vocab_size=int(cfg["vocab_size"]),
            gated_mlp=not is_opt,
            tied_embeddings=bool(cfg.get("tie_word_embeddings", is_opt)),
            param_bytes=dtype_bytes(str(weights)),
            kv_bytes=dtype_bytes(str(kv_dtype or weights)),
        )

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str], dtype: str | None = None) -> ModelShape:
        """From a Hugging Face model directory's config.json (no weights are read)."""
        file = Path(path) / "config.json"
        if not file.is_file():
            raise ValueError(f"model directory {path} has no config.json")
        return cls.from_hf_config(json.loads(file.read_text()), name=Path(path).name, dtype=dtype)

    @classmethod
    def known(cls, name: str) -> ModelShape:
        """A built-in shape by name (case-insensitive), for planning without the weights."""
        for key, shape in KNOWN_SHAPES.items():
            if key.lower() == name.lower():
                return shape
        raise ValueError(f"unknown model {name!r}; built-in shapes: {', '.join(KNOWN_SHAPES)}")


def _opt(name: str, layers: int, hidden: int, heads: int) -> ModelShape:
    # OPT: MHA, fc1/fc2 of 4×hidden, GPT-2 vocabulary padded to 50272, lm_head tied to the embedding.
    return ModelShape(name, layers, hidden, 4 * hidden, heads, heads, hidden // heads, 50272, gated_mlp=False,
                      tied_embeddings=True)


# Public config.json values (facebook/opt-*, meta-llama/*, mistralai/Mistral-7B-v0.1, Qwen/Qwen2.5-7B).
KNOWN_SHAPES: dict[str, ModelShape] = {
    s.name: s
    for s in (
        _opt("OPT-13B", 40, 5120, 40),
        _opt("OPT-66B", 64, 9216, 72),
        _opt("OPT-175B", 96, 12288, 96),
        ModelShape("Llama-2-7B", 32, 4096, 11008, 32, 32, 128, 32000),
        ModelShape("Llama-2-13B", 40, 5120, 13824, 40, 40, 128, 32000),
        ModelShape("Llama-2-70B", 80, 8192, 28672, 64, 8, 128, 32000),
        ModelShape("Llama-3-8B", 32, 4096, 14336, 32, 8, 128, 128256),
        ModelShape("Llama-3-70B", 80, 8192, 28672, 64, 8, 128, 128256),
        ModelShape("Mistral-7B", 32, 4096, 14336, 32, 8, 128, 32000),
        ModelShape("Qwen2.5-7B", 28, 3584, 18944, 28, 4, 128, 152064),
    )
}
