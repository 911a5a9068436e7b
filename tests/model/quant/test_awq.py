"""AWQ: folding scales leaves the unquantised model's function unchanged, and the chosen scales beat
plain round-to-nearest on the calibration activations (α = 0 is RTN, so never worse)."""

from __future__ import annotations

import pytest
import torch

from kvflow.model.quant.awq import awq, fold, layer_groups

TINY = "kvflow/assets/tiny"


def _rtn4(w: torch.Tensor) -> torch.Tensor:
    """An independent 4-bit symmetric per-row-group (32) round-to-nearest quantise-dequantise."""
    g = w.reshape(w.shape[0], -1, 32)
    scale = g.abs().amax(-1, keepdim=True).clamp(min=1e-8) / 7
    return ((g / scale).round().clamp(-8, 7) * scale).reshape(w.shape)


@pytest.fixture(scope="module")
def hf_model():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(TINY, torch_dtype=torch.float32).eval()


def _logits(model, state: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    original = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        model.load_state_dict(state, strict=False)
        with torch.no_grad():
            return model(ids).logits
    finally:
        model.load_state_dict(original)


def test_folding_any_scales_keeps_the_fp_model_exact(hf_model) -> None:
    state = {k: v.clone().float() for k, v in hf_model.state_dict().items()}
    ids = torch.randint(0, hf_model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    before = _logits(hf_model, state, ids)
    gen = torch.Generator().manual_seed(1)
    groups = [g for i in range(hf_model.config.num_hidden_layers) for g in layer_groups(f"model.layers.{i}", state)]
    for group in groups:
        k = state[group.linears[0]].shape[1]
        fold(state, group, torch.rand(k, generator=gen) * 3 + 0.25)
    after = _logits(hf_model, state, ids)
    assert not torch.equal(state["model.layers.0.mlp.down_proj.weight"],
                           hf_model.state_dict()["model.layers.0.mlp.down_proj.weight"])
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


def test_awq_scales_beat_round_to_nearest_on_calibration(hf_model) -> None:
    calibration = torch.randint(0, hf_model.config.vocab_size, (4, 64), generator=torch.Generator().manual_seed(2))
    result = awq(TINY, calibration, _rtn4, grid=10, max_rows=256)
    assert result.loss_ratio and all(r <= 1.0 for r in result.loss_ratio.values())
    assert min(result.loss_ratio.values()) < 0.95  # somewhere the activation-aware scales help clearly
    assert any(a > 0 for a in result.alphas.values())
    # The whole model: quantising the folded checkpoint errs less than quantising the original.
    linear = [n for n in result.state_dict if n.endswith("_proj.weight")]
    original = {k: v.float() for k, v in hf_model.state_dict().items()}
    ids = calibration[:2]
    reference = _logits(hf_model, original, ids)
    rtn = _logits(hf_model, {**original, **{n: _rtn4(original[n]) for n in linear}}, ids)
    awq_q = _logits(hf_model, {**result.state_dict, **{n: _rtn4(result.state_dict[n]) for n in linear}}, ids)
    assert (awq_q - reference).pow(2).mean() < (rtn - reference).pow(2).mean()
