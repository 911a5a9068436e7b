"""Llama-family decoder over the paged KV cache: Llama, Mistral, Qwen2 and Qwen3.

The four differ only in switches carried by `ModelConfig`: q/k/v bias (Qwen2), per-head q/k
RMSNorm (Qwen3), sliding-window layers (Mistral, Qwen2), tied embeddings and RoPE scaling.
q/k/v and gate/up projections are fused at load time. All tokens of a step arrive flat
([num_tokens, hidden]); attention goes through the backend, over caches the KV-cache spec lays out.
Every projection and the LM head is a `Linear` whose method (dense, prepacked, ...) is chosen at load.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn as nn

from kvflow.attention.backend import AttentionBackend, AttentionMetadata
from kvflow.config import ModelConfig
from kvflow.model.layers import GatedMLP, RMSNorm, RotaryEmbedding
from kvflow.model.linear import Linear, LinearMethod, linear_layers


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
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
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
        """Give every projection and the LM head this method; returns how many layers took it. (The
        embedding lookup keeps a tied head's plain matrix: a method only replaces the head's view of it.)"""
        layers = linear_layers(self)
        for layer in layers:
            layer.use(method)
        return len(layers)

    # ---------------------------------------------------------------- weights
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy Hugging Face tensors in, fusing q/k/v and gate/up; every parameter must be set."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        cfg = self.config
        q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        fused = {
            "q_proj": ("qkv_proj", 0, q),
            "k_proj": ("qkv_proj", q, kv),
            "v_proj": ("qkv_proj", q + kv, kv),
            "gate_proj": ("gate_up_proj", 0, cfg.intermediate_size),
            "up_proj": ("gate_up_proj", cfg.intermediate_size, cfg.intermediate_size),
        }
        for hf_name, tensor in weights:
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
            dest = param.data if shard is None else param.data.narrow(0, shard[0], shard[1])
            if dest.shape != tensor.shape:
                raise ValueError(
                    f"checkpoint tensor {hf_name!r} has shape {tuple(tensor.shape)}, expected {tuple(dest.shape)}"
                )
            dest.copy_(tensor)
            loaded.add(target)
            if shard is not None:
                loaded.add(f"{target}:{shard[0]}")
        expected_shards = {
            f"{n}:{off}"
            for n in params
            for key, (fname, off, _) in fused.items()
            if n.split(".")[-2] == fname
        }
        missing = sorted((set(params) - loaded) | (expected_shards - loaded))
        if missing:
            raise ValueError(f"checkpoint at {cfg.path} is missing weights: {', '.join(missing[:8])}")
