"""AWQ (activation-aware weight quantisation, Lin et al. 2023) for any weight format.

Why it works: a few input channels of each linear layer carry much larger activations than the
rest, and the rounding error of their weights costs the most. Scaling those weight columns up by
s (and the activations down by 1/s) before rounding gives them a finer grid. The division is folded
into whatever produces the activation (an RMSNorm's weight, or the rows of the preceding linear),
so the unquantised model computes exactly what it did before and nothing is added at run time.

The search is the paper's: s = mean|x|^α per input channel (normalised), α on a grid in [0, 1],
keeping the α whose quantised layers best reproduce the unquantised outputs on calibration
activations. α = 0 is plain round-to-nearest, so the chosen scales are never worse than RTN on the
calibration set. The method is format-agnostic: it only needs the format's quantise-then-dequantise
(`fake_quant`). Activations come from Hugging Face transformers' own implementation of the model
(an independent forward, and it runs every architecture we load), in fp32.

Groups of a Llama-family layer (input channels scaled -> where 1/s is folded):
  q, k, v   <- input_layernorm.weight
  o         <- v_proj's rows (only where v and o have matching widths: no grouped-query heads)
  gate, up  <- post_attention_layernorm.weight
  down      <- up_proj's rows
Not done (stated): the paper's weight-clipping search, and scaling the LM head.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

FakeQuant = Callable[[torch.Tensor], torch.Tensor]  # [N, K] float -> the same weight quantised, dequantised


@dataclass(frozen=True)
class ScaleGroup:
    """Linears sharing one input, and the tensor whose last-dim entries (or rows) produce that input."""

    producer: str  # HF name of a norm weight [K] or a linear weight [K, *] whose rows make the input
    linears: tuple[str, ...]  # HF names of weights [N, K] whose columns are scaled
    activation: str  # key of the recorded input activations


@dataclass
class AwqResult:
    state_dict: dict[str, torch.Tensor]  # the checkpoint with the scales folded in (fp32)
    alphas: dict[str, float]  # chosen α per group (keyed by the group's first linear)
    loss_ratio: dict[str, float]  # calibration loss with AWQ scales / with plain RTN (<= 1)


def layer_groups(prefix: str, state: dict[str, torch.Tensor]) -> list[ScaleGroup]:
    """The scale groups of one decoder layer named `prefix` (e.g. "model.layers.3")."""
    att, mlp = f"{prefix}.self_attn", f"{prefix}.mlp"
    groups = [ScaleGroup(f"{prefix}.input_layernorm.weight",
                         (f"{att}.q_proj.weight", f"{att}.k_proj.weight", f"{att}.v_proj.weight"), f"{att}.q_proj")]
    if state[f"{att}.v_proj.weight"].shape[0] == state[f"{att}.o_proj.weight"].shape[1]:
        groups.append(ScaleGroup(f"{att}.v_proj.weight", (f"{att}.o_proj.weight",), f"{att}.o_proj"))
    groups.append(ScaleGroup(f"{prefix}.post_attention_layernorm.weight",
                             (f"{mlp}.gate_proj.weight", f"{mlp}.up_proj.weight"), f"{mlp}.gate_proj"))
    groups.append(ScaleGroup(f"{mlp}.up_proj.weight", (f"{mlp}.down_proj.weight",), f"{mlp}.down_proj"))
    return groups


class ActivationRecorder:
    """Forward pre-hooks on chosen linear modules: mean |x| per input channel over every token, and a
    fixed subset of rows (the first `max_rows` tokens seen) to score candidate scales on."""

    def __init__(self, model: torch.nn.Module, names: Iterable[str], max_rows: int) -> None:
        self.max_rows = max_rows
        self.abs_sum: dict[str, torch.Tensor] = {}
        self.count: dict[str, int] = {}
        self.rows: dict[str, list[torch.Tensor]] = {}
        modules = dict(model.named_modules())
        self._handles = [modules[name].register_forward_pre_hook(self._hook(name)) for name in names]

    def _hook(self, name: str) -> Callable:
        def record(_module: torch.nn.Module, args: tuple) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            self.abs_sum[name] = self.abs_sum.get(name, 0) + x.abs().sum(0)
            self.count[name] = self.count.get(name, 0) + x.shape[0]
            kept = sum(r.shape[0] for r in self.rows.setdefault(name, []))
            if kept < self.max_rows:
                self.rows[name].append(x[: self.max_rows - kept].clone())

        return record

    def mean_abs(self, name: str) -> torch.Tensor:
        return self.abs_sum[name] / self.count[name]

    def sample(self, name: str) -> torch.Tensor:
        return torch.cat(self.rows[name])

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


def search_scale(x: torch.Tensor, mean_abs: torch.Tensor, weights: list[torch.Tensor], fake_quant: FakeQuant,
                 grid: int = 20) -> tuple[torch.Tensor, float, float]:
    """The scales s [K] minimising Σ ||x Wᵀ - x (Q(W s) / s)ᵀ||² over the group; returns (s, α, loss/RTN loss)."""
    reference = [x @ w.T for w in weights]
    best: tuple[float, float, torch.Tensor] | None = None
    rtn_loss = 0.0
    for step in range(grid + 1):
        alpha = step / grid
        s = mean_abs.clamp(min=1e-4).pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        loss = 0.0
        for w, ref in zip(weights, reference):
            quantised = fake_quant(w * s) / s
            loss += float((x @ quantised.T - ref).pow(2).sum())
        if step == 0:
            rtn_loss = loss
        if best is None or loss < best[0]:
            best = (loss, alpha, s)
    assert best is not None
    ratio = best[0] / rtn_loss if rtn_loss > 0 else 1.0
    return best[2], best[1], ratio


def fold(state: dict[str, torch.Tensor], group: ScaleGroup, s: torch.Tensor) -> None:
    """Scale the group's weight columns by s and divide the producer by s: the fp function is unchanged."""
    producer = state[group.producer]
    if producer.dim() == 1:
        state[group.producer] = producer / s
    else:  # a linear whose output rows are the activation's channels (and its bias, if any)
        state[group.producer] = producer / s[:, None]
        bias = group.producer.removesuffix(".weight") + ".bias"
        if bias in state:
            state[bias] = state[bias] / s
    for name in group.linears:
        state[name] = state[name] * s


def awq(model_dir: str | Path, calibration: torch.Tensor, fake_quant: FakeQuant, grid: int = 20,
        max_rows: int = 2048, progress: Callable[[Iterable], Iterable] = lambda it: it) -> AwqResult:
    """Run `calibration` (token ids [sequences, length]) through the checkpoint in transformers, then
    choose and fold each group's scales. `progress` wraps the loop over layers (e.g. tqdm)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), torch_dtype=torch.float32)
    model.eval()
    state = {name: t.detach().clone().float() for name, t in model.state_dict().items()}
    prefixes = [f"model.layers.{i}" for i in range(model.config.num_hidden_layers)]
    groups = [g for p in prefixes for g in layer_groups(p, state)]
    recorder = ActivationRecorder(model, {g.activation for g in groups}, max_rows)
    try:
        with torch.no_grad():
            for row in calibration:
                model(row[None].long())
    finally:
        recorder.close()
    del model
    alphas: dict[str, float] = {}
    ratios: dict[str, float] = {}
    for prefix in progress(prefixes):
        for group in (g for g in groups if g.producer.startswith(prefix + ".")):
            with torch.no_grad():
                s, alpha, ratio = search_scale(recorder.sample(group.activation), recorder.mean_abs(group.activation),
                                               [state[n] for n in group.linears], fake_quant, grid)
            fold(state, group, s)
            alphas[group.linears[0]], ratios[group.linears[0]] = alpha, ratio
    return AwqResult(state, alphas, ratios)
