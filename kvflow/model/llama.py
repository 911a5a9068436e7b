"""Llama-family decoder over the paged KV cache: Llama, Mistral, Qwen2 and Qwen3.

The four differ only in switches carried by `ModelConfig`: q/k/v bias (Qwen2), per-head q/k
RMSNorm (Qwen3), sliding-window layers (Mistral, Qwen2), tied embeddings and RoPE scaling.
q/k/v and gate/up projections are fused at load time. All tokens of a step arrive flat
([num_tokens, hidden]); attention goes through the backend, over caches the KV-cache spec lays out.
Every projection and the LM head is a `Linear` whose method (dense, prepacked, quantised) is chosen at load.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn as nn

from kvflow.attention.backend import AttentionBackend, AttentionMetadata
from kvflow.config import ModelConfig
from kvflow.model.layers import GatedMLP, RMSNorm, RotaryEmbedding, token_embedding
from kvflow.model.linear import DenseLinear, Linear, LinearMethod, linear_layers
from kvflow.model.quant.formats import concat_rows, dequantize
from kvflow.model.quant.linear_methods import QuantizedLinear
from kvflow.model.quant.weights import QuantizedWeight

# (layer name, dense weight) -> that weight quantised, or None to keep it dense (`--quantization`).
LoadQuantizer = Callable[[str, torch.Tensor], "QuantizedWeight | None"]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.qkv_bias)
        self.o_proj = Linear(self.q_size, cfg.hidden_size, bias=cfg.o_bias)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.rotary = rotary
        self.scale = self.head_dim**-0.5
        self.sliding_window = cfg.sliding_windows[layer_idx] if cfg.sliding_windows else None
        self.layer_idx = layer_idx

    def forward(
        self,
        positions: torch.Tensor,
        x: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        backend: AttentionBackend,
    ) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary(positions, q, k)
        if meta.layer_groups is not None:  # a cache split into layer groups: this layer's group's tables
            meta = meta.layer_groups[self.layer_idx // meta.layers_per_group]
        policy = meta.policy  # KV-policy work (Quest reads, H2O mass, SnapKV selection): policy_step.py
        if policy is not None:
            meta = policy.layer_metadata(self.layer_idx, q, kv_cache, meta, backend, self.scale)
        out = backend.forward(q, k, v, kv_cache, meta, self.scale, self.sliding_window)
        if policy is not None:
            policy.after_attention(self.layer_idx, q, kv_cache, meta, backend, self.scale)
        return self.o_proj(out.reshape(t, self.q_size))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx, rotary)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias)

    def forward(self, positions, x, kv_cache, meta, backend) -> torch.Tensor:
        x = x + self.self_attn(positions, self.input_layernorm(x), kv_cache, meta, backend)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaForCausalLM(nn.Module):
    """Decoder-only transformer; `forward` gives hidden states, `compute_logits` the fp32 logits."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        # One rotary table shared by all layers (not a parameter: never loaded, never saved).
        rotary = RotaryEmbedding(cfg.head_dim, cfg.max_model_len, cfg.rope)
        self.embed_tokens = token_embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, rotary) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        # A tied head is made after loading, over the embedding's matrix (`finish_loading`).
        self.lm_head: Linear | None = None if cfg.tie_word_embeddings else Linear(cfg.hidden_size, cfg.vocab_size)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        meta: AttentionMetadata,
        backend: AttentionBackend,
        layer_hook: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        """`layer_hook(l)`, if given, runs once layer l has written its KV (layer-wise KV transfer)."""
        x = self.embed_tokens(input_ids)
        for i, (layer, kv_cache) in enumerate(zip(self.layers, kv_caches)):
            x = layer(positions, x, kv_cache, meta, backend)
            if layer_hook is not None:
                layer_hook(i)
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        assert self.lm_head is not None, "finish_loading() makes the tied LM head"
        return self.lm_head(hidden).float()

    def finish_loading(self) -> None:
        """After `load_weights`: a tied LM head is a `Linear` over the embedding's own matrix."""
        if self.lm_head is None:
            self.lm_head = Linear.sharing(self.embed_tokens.weight)

    def use_linear_method(self, method: LinearMethod) -> int:
        """Give every projection and the LM head that holds its weight as loaded (dense) this method;
        returns how many layers took it. Layers loaded quantised keep their format's method. (The
        embedding lookup keeps a tied head's plain matrix: a method only replaces the head's view of it.)"""
        layers = [layer for layer in linear_layers(self) if isinstance(layer.method, DenseLinear)]
        for layer in layers:
            layer.use(method)
        return len(layers)

    # ---------------------------------------------------------------- weights
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor | QuantizedWeight]],
                     quantize: LoadQuantizer | None = None) -> None:
        """Copy Hugging Face tensors in, fusing q/k/v and gate/up; every parameter must be set.

        A `QuantizedWeight` (a quantised checkpoint, a GGUF file) goes to the `Linear` that owns its
        name, which then runs it through the format's `QuantizedLinear`; shards of a fused layer are
        concatenated along N (every format quantises rows independently). A fused layer whose shards
        come in different formats, or partly dense, is dequantised and stays dense. `quantize(layer,
        tensor)` (`--quantization`) turns each dense linear weight into a QuantizedWeight as it arrives
        (None: that layer stays dense). A linear weight is allocated only when a dense tensor arrives for
        it (the loader leaves them on meta), so a quantised layer never holds a dense copy."""
        params = dict(self.named_parameters())
        linears = {f"{name}.weight": m for name, m in self.named_modules() if isinstance(m, Linear)}
        device = self.norm.weight.device
        loaded: set[str] = set()
        pending: dict[str, dict[int, QuantizedWeight]] = {}  # linear weight -> its quantised shards by row offset
        cfg = self.config
        q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        fused = {
            "q_proj": ("qkv_proj", 0, q),
            "k_proj": ("qkv_proj", q, kv),
            "v_proj": ("qkv_proj", q + kv, kv),
            "gate_proj": ("gate_up_proj", 0, cfg.intermediate_size),
            "up_proj": ("gate_up_proj", cfg.intermediate_size, cfg.intermediate_size),
        }
        for hf_name, value in weights:
            name = hf_name.removeprefix("model.")
            if "rotary_emb" in name:
                continue
            if name == "lm_head.weight" and self.lm_head is None:
                continue  # tied checkpoints sometimes carry a copy of the embedding
            parts = name.split(".")
            target = name
            shard: tuple[int, int] | None = None
            for i, part in enumerate(parts):
                if part in fused:
                    fused_name, offset, size = fused[part]
                    target = ".".join(parts[:i] + [fused_name] + parts[i + 1 :])
                    shard = (offset, size)
                    break
            param = params.get(target)
            if param is None:
                raise ValueError(f"checkpoint tensor {hf_name!r} has no place in {cfg.architecture}")
            rows = param.shape[0] if shard is None else shard[1]
            expected = (rows, *param.shape[1:])
            if quantize is not None and target in linears and isinstance(value, torch.Tensor):
                quantized = quantize(target.removesuffix(".weight"), value)
                value = value if quantized is None else quantized
            if tuple(value.shape) != expected:
                raise ValueError(
                    f"checkpoint tensor {hf_name!r} has shape {tuple(value.shape)}, expected {expected}"
                )
            if isinstance(value, QuantizedWeight):
                if target not in linears:
                    raise ValueError(f"checkpoint tensor {hf_name!r} is quantised ({value.format}) but "
                                     f"{target} is not a linear layer's weight")
                pending.setdefault(target, {})[0 if shard is None else shard[0]] = value
            else:
                param = self._materialise(target, param, device, params)
                dest = param.data if shard is None else param.data.narrow(0, shard[0], shard[1])
                dest.copy_(value)
            loaded.add(target)
            if shard is not None:
                loaded.add(f"{target}:{shard[0]}")
        for target, shards in pending.items():
            self._install_quantized(target, linears[target], shards, params, device)
        expected_shards = {
            f"{n}:{off}"
            for n in params
            for key, (fname, off, _) in fused.items()
            if n.split(".")[-2] == fname
        }
        missing = sorted((set(params) - loaded) | (expected_shards - loaded))
        if missing:
            raise ValueError(f"checkpoint at {cfg.path} is missing weights: {', '.join(missing[:8])}")

    def _materialise(self, target: str, param: nn.Parameter, device: torch.device,
                     params: dict[str, nn.Parameter]) -> nn.Parameter:
        """A linear weight still on meta gets its memory when the first dense tensor arrives for it."""
        if not param.is_meta:
            return param
        owner, attr = target.rsplit(".", 1)
        fresh = nn.Parameter(torch.empty(param.shape, dtype=param.dtype, device=device), requires_grad=False)
        setattr(self.get_submodule(owner), attr, fresh)
        params[target] = fresh
        return fresh

    def _install_quantized(self, target: str, layer: Linear, shards: dict[int, QuantizedWeight],
                           params: dict[str, nn.Parameter], device: torch.device) -> None:
        """The layer runs its quantised shards, concatenated; or, where some shard was dense or the
        formats differ, holds them all dequantised."""
        ordered = [shards[offset] for offset in sorted(shards)]
        param = params[target]
        same = len({(s.format, s.in_features, tuple(sorted(s.params.items()))) for s in ordered}) == 1
        if param.is_meta and same:
            weight = concat_rows(ordered)
            weight = QuantizedWeight(weight.format, weight.shape, {k: t.to(device) for k, t in weight.data.items()},
                                     weight.params)
            qcfg = self.config.quantization
            layer.use(QuantizedLinear(weight, None if qcfg is None else qcfg.activation_bits_for(weight.format)))
            return
        param = self._materialise(target, param, device, params)
        for offset, shard in shards.items():
            param.data.narrow(0, offset, shard.out_features).copy_(dequantize(shard))
