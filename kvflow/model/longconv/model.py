"""A long-convolution language model: attention replaced by a learned causal convolution per channel.

Each layer is

    x = x + LongConv(RMSNorm(x))        u, g = in_proj(x);  y = conv(u, k) + D ⊙ u;  out_proj(y ⊙ silu(g))
    x = x + GatedMLP(RMSNorm(x))

with k [H, kernel_length] learned directly and smoothed/squashed (conv.effective_kernel; computed once
after loading). There are no positions: the kernel's taps are the positional information.

The model runs two ways:
* `full_forward(input_ids [B, T])`: the plain PyTorch reference, whole sequences convolved by FFT
  (or by the butterfly or direct method); training uses it, and tests compare the engine with it.
* `forward(input_ids, positions, kv_caches, meta, backend)`: the engine's call, the same as
  `LlamaForCausalLM`'s, so the runner needs no fork. Tokens arrive flat; each layer writes its conv
  inputs u into the step's slots of the paged cache (conv_history.py says where), then each decode
  computes y_t = Σ_j k_j·u_{t-j} directly over its history (vectorised over the batch: a decode reads
  its history once, like attention reads its KV), and each prefill chunk convolves its history and
  its own tokens together by FFT and keeps the chunk's outputs (exact for prefix hits, chunked prefill
  and recomputation after preemption alike). `backend` is not used: nothing here attends.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from kvflow.attention.backend import AttentionBackend, AttentionMetadata
from kvflow.attention.conv_history import history_slots, read_history, write_history
from kvflow.config import ModelConfig
from kvflow.model.layers import GatedMLP, RMSNorm, token_embedding
from kvflow.model.linear import DenseLinear, Linear, LinearMethod, linear_layers
from kvflow.model.longconv.conv import causal_conv, effective_kernel

#: Elements of history a batch of decodes gathers at once (bounds the step's working memory).
DECODE_GATHER_ELEMENTS = 1 << 24
#: Lags a decode sums at a time: the gathered history and its products stay in the CPU's cache (at 8k
#: tokens of the 135m shape, one pass over the whole history took 16x the time of 2k instead of 4x).
DECODE_LAG_CHUNK = 512


def _wide(t: torch.Tensor) -> torch.Tensor:
    """The convolution's working precision: fp32, or fp64 for an fp64 model (the tests' reference)."""
    return t if t.dtype == torch.float64 else t.float()


class LongConv(nn.Module):
    """The sequence mixer: in-projection to the conv input u and the gate g, the long convolution of u
    with a skip D·u, the SiLU gate, the out-projection. Its per-token state is u (the history)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        assert cfg.longconv is not None
        h = cfg.hidden_size
        self.hidden_size = h
        self.in_proj = Linear(h, 2 * h)
        self.kernel = nn.Parameter(torch.empty(h, cfg.longconv.kernel_length))
        self.D = nn.Parameter(torch.empty(h))
        self.out_proj = Linear(h, h)
        self.squash_lambda = cfg.longconv.squash_lambda
        self.smooth_width = cfg.longconv.smooth_width
        self.taps_by_lag: torch.Tensor | None = None  # the effective kernel [K, H] in fp32 once loaded

    def freeze_kernel(self) -> None:
        """Inference: compute the effective kernel once (it does not depend on the input), stored by lag
        ([K, H], contiguous) so a decode reads its first `width` rows in one stream."""
        with torch.no_grad():
            taps = effective_kernel(_wide(self.kernel), self.squash_lambda, self.smooth_width)
            self.taps_by_lag = taps.T.contiguous()

    def kernel_taps(self) -> torch.Tensor:
        """The effective kernel [H, K] (a view of the frozen one after loading)."""
        if self.taps_by_lag is not None:
            return self.taps_by_lag.T
        return effective_kernel(_wide(self.kernel), self.squash_lambda, self.smooth_width)

    def _gate(self, x: torch.Tensor, u: torch.Tensor, g: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        y = y + _wide(self.D) * _wide(u)
        return self.out_proj((y * F.silu(_wide(g))).to(x.dtype))

    def forward_full(self, x: torch.Tensor, method: str = "fft") -> torch.Tensor:
        """x [B, T, H] -> [B, T, H], every sequence from its first token."""
        u, g = self.in_proj(x).chunk(2, dim=-1)
        y = causal_conv(_wide(u).transpose(1, 2), self.kernel_taps(), method).transpose(1, 2)
        return self._gate(x, u, g, y)

    def forward(self, x: torch.Tensor, kv_cache: torch.Tensor, plan: HistoryPlan, method: str) -> torch.Tensor:
        """x [T, H] flat (decodes first) -> [T, H]; stores the step's conv inputs in the cache first."""
        u, g = self.in_proj(x).chunk(2, dim=-1)
        write_history(kv_cache, plan.slot_mapping, u)
        taps = self.kernel_taps()
        y = torch.empty(u.shape, dtype=taps.dtype, device=u.device)
        if plan.decodes:
            by_lag = taps.T[:plan.decode_width]  # [width, H]: tap j, the weight of the input j tokens back
            for b0, b1, slots, valid in plan.decodes:  # y_t = Σ_j k_j ⊙ u_{t-j}, a batch of decodes at once
                acc = torch.zeros(b1 - b0, self.hidden_size, dtype=taps.dtype, device=u.device)
                for w0 in range(0, plan.decode_width, DECODE_LAG_CHUNK):  # lags in cache-sized pieces
                    w1 = min(plan.decode_width, w0 + DECODE_LAG_CHUNK)
                    terms = read_history(kv_cache, slots[:, w0:w1], self.hidden_size) * by_lag[w0:w1]
                    if valid is not None:
                        terms = terms * valid[:, w0:w1]
                    acc += terms.sum(1)
                y[b0:b1] = acc
        for lo, hi, slots in plan.prefills:
            history = read_history(kv_cache, slots, self.hidden_size).to(taps.dtype)  # [seq_len, H], chunk included
            y[lo:hi] = causal_conv(history.T, taps, method).T[slots.shape[0] - (hi - lo):]
        return self._gate(x, u, g, y)


@dataclass
class HistoryPlan:
    """Which cache slots each sequence's history occupies this step: the same for every layer, so the model
    computes it once per step. Decodes read their last min(length, kernel_length) inputs, newest first
    ([b, width] slots, `valid` masking positions before a sequence's start, None where every one is
    long enough), in groups bounded by DECODE_GATHER_ELEMENTS; a prefill chunk reads its whole sequence
    so far, its own tokens included."""

    slot_mapping: torch.Tensor
    decode_width: int = 0
    decodes: list[tuple[int, int, torch.Tensor, torch.Tensor | None]] = field(default_factory=list)
    prefills: list[tuple[int, int, torch.Tensor]] = field(default_factory=list)

    @classmethod
    def build(cls, meta: AttentionMetadata, kernel_length: int, hidden: int) -> HistoryPlan:
        plan = cls(meta.slot_mapping)
        nd, device = meta.num_decodes, meta.slot_mapping.device
        if nd:
            width = min(max(meta.seq_lens_list[:nd]), kernel_length)
            lag = torch.arange(width, device=device)
            step = max(1, DECODE_GATHER_ELEMENTS // (width * hidden))
            plan.decode_width = width
            for b0 in range(0, nd, step):
                b1 = min(nd, b0 + step)
                pos = meta.seq_lens[b0:b1, None] - 1 - lag[None, :]  # [b, width]: the position lag j reads
                slots = history_slots(meta.block_tables[b0:b1], pos.clamp(min=0), meta.block_size)
                valid = None if min(meta.seq_lens_list[b0:b1]) >= width else (pos >= 0)[..., None]
                plan.decodes.append((b0, b1, slots, valid))
        if meta.num_prefills:
            starts = meta.query_start_loc.tolist()
            for i in range(nd, meta.num_seqs):
                positions = torch.arange(meta.seq_lens_list[i], device=device)
                plan.prefills.append((starts[i], starts[i + 1],
                                      history_slots(meta.block_tables[i], positions, meta.block_size)))
        return plan


class LongConvLayer(nn.Module):
    """Pre-norm residual block: the long-conv mixer, then Llama's gated MLP."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.conv_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.conv = LongConv(cfg)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias)

    def forward_full(self, x: torch.Tensor, method: str) -> torch.Tensor:
        x = x + self.conv.forward_full(self.conv_norm(x), method)
        return x + self.mlp(self.mlp_norm(x))

    def forward(self, x: torch.Tensor, kv_cache: torch.Tensor, plan: HistoryPlan, method: str) -> torch.Tensor:
        x = x + self.conv(self.conv_norm(x), kv_cache, plan, method)
        return x + self.mlp(self.mlp_norm(x))


class LongConvForCausalLM(nn.Module):
    """`forward` gives hidden states over the paged cache, `full_forward` without one (the reference),
    `compute_logits` the fp32 logits. `conv_method` picks how prefill convolves (conv.CONV_METHODS)."""

    #: The C++ CPU forward runs attention decoders only (cpu_kernels.CpuForward checks this).
    runs_cpu_forward = False

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.longconv is None:
            raise ValueError(f"{cfg.architecture} is not a long-conv model")
        self.config = cfg
        self.conv_method = "fft"
        self.embed_tokens = token_embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LongConvLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head: Linear | None = None if cfg.tie_word_embeddings else Linear(cfg.hidden_size, cfg.vocab_size)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                meta: AttentionMetadata, backend: AttentionBackend | None = None,
                layer_hook: Callable[[int], None] | None = None) -> torch.Tensor:
        """The engine's step (see the module docstring); `layer_hook(l)` runs once layer l has stored its history."""
        x = self.embed_tokens(input_ids)
        plan = HistoryPlan.build(meta, self.config.longconv.kernel_length, self.config.hidden_size)
        for i, (layer, cache) in enumerate(zip(self.layers, kv_caches)):
            x = layer(x, cache, plan, self.conv_method)
            if layer_hook is not None:
                layer_hook(i)
        return self.norm(x)

    def full_forward(self, input_ids: torch.Tensor, method: str | None = None) -> torch.Tensor:
        """Hidden states [B, T, H] of whole sequences [B, T]: the plain PyTorch reference."""
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer.forward_full(x, method or self.conv_method)
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.lm_head is None:  # training: no tied Linear yet
            return F.linear(hidden, self.embed_tokens.weight).float()
        return self.lm_head(hidden).float()

    # ---------------------------------------------------------------- loading
    def finish_loading(self) -> None:
        """After `load_weights`: the tied head over the embedding, and each layer's effective kernel."""
        if self.lm_head is None:
            self.lm_head = Linear.sharing(self.embed_tokens.weight)
        for layer in self.layers:
            layer.conv.freeze_kernel()

    def use_linear_method(self, method: LinearMethod) -> int:
        layers = [layer for layer in linear_layers(self) if isinstance(layer.method, DenseLinear)]
        for layer in layers:
            layer.use(method)
        return len(layers)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], quantize: object | None = None) -> None:
        """Copy a checkpoint's tensors (our own names, `checkpoint.save_longconv`); every parameter must be set.
        Linear weights left on meta by the loader get their memory here."""
        if quantize is not None:
            raise ValueError("long-conv models load dense weights only (no --quantization yet)")
        params = dict(self.named_parameters())
        device = self.norm.weight.device
        loaded: set[str] = set()
        for hf_name, value in weights:
            name = hf_name.removeprefix("model.")
            if name == "lm_head.weight" and self.lm_head is None:
                continue
            param = params.get(name)
            if param is None or not isinstance(value, torch.Tensor):
                raise ValueError(f"checkpoint tensor {hf_name!r} has no place in {self.config.architecture}")
            if tuple(value.shape) != tuple(param.shape):
                raise ValueError(f"checkpoint tensor {hf_name!r} has shape {tuple(value.shape)}, "
                                 f"expected {tuple(param.shape)}")
            if param.is_meta:
                owner, attr = name.rsplit(".", 1)
                param = nn.Parameter(torch.empty(param.shape, dtype=param.dtype, device=device), requires_grad=False)
                setattr(self.get_submodule(owner), attr, param)
                params[name] = param
            param.data.copy_(value)
            loaded.add(name)
        missing = sorted(set(params) - loaded)
        if missing:
            raise ValueError(f"checkpoint at {self.config.path} is missing weights: {', '.join(missing[:8])}")


def init_weights(model: LongConvForCausalLM, seed: int, std: float = 0.02) -> None:
    """Training's starting point: small normal matrices (residual outputs scaled by depth, as GPT-2 does),
    unit norms and skips, and kernels whose taps decay with distance (std ∝ 1/sqrt(1 + j/32)), so a fresh
    layer mixes mostly recent tokens while even the farthest taps (std 0.02/sqrt(65) at 2048 for the
    default std) start mostly above a squash threshold of 1e-3 and so receive gradients."""
    gen = torch.Generator().manual_seed(seed)
    depth_scale = 1 / math.sqrt(2 * len(model.layers))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".D"):
                p.fill_(1.0)
            elif name.endswith("conv.kernel"):
                taps = torch.arange(p.shape[1], dtype=torch.float32)
                scale = std / torch.sqrt(1 + taps / 32)
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
            elif name.endswith("out_proj.weight") or name.endswith("down_proj.weight"):
                p.copy_(torch.randn(p.shape, generator=gen) * std * depth_scale)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
