"""`kvflow train --preset smoke-retrieval`: a retrieval head distilled from the smoke model's
attention — a loadable directory whose layout matches the teacher's KV heads, a report whose
captured mass never beats the oracle's, a head the engine serves with — and the loss against a
naive KL computed with loops."""

from __future__ import annotations

import math

import pytest
import torch

from kvflow import LLM, SamplingParams
from kvflow.model.retrieval_head import RetrievalHead, RetrievalHeadConfig, load_retrieval_head
from kvflow.train.retrieval import RETRIEVAL_PRESETS, candidate_mask, distillation_loss, run_retrieval_training


def test_smoke_retrieval_training_writes_a_head_the_engine_serves_with(smoke_run, tmp_path):
    out, _ = smoke_run
    teacher = out / "smoke"
    report = run_retrieval_training(RETRIEVAL_PRESETS["smoke-retrieval"], teacher, tmp_path, show_progress=False)
    head = load_retrieval_head(tmp_path / "smoke-retrieval", torch.zeros(384, 64))
    llm = LLM(model=str(teacher), dtype="float32", block_size=4, num_blocks=128, kv_policy="specontext", kv_budget=12,
              retrieval_model=str(tmp_path / "smoke-retrieval"))
    config = llm.engine.config.model
    assert (head.config.num_kv_heads, head.config.vocab_size) == (config.num_kv_heads, config.vocab_size)
    assert report["parameters"] == head.num_parameters()
    assert math.isfinite(report["final_loss"])
    for k, oracle in report["heldout_captured_mass"]["oracle"].items():
        assert 0 <= report["heldout_captured_mass"]["head"][k] <= oracle + 1e-6 <= 1 + 1e-6
    out_tokens = llm.generate([list(range(5, 60))], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
    assert len(out_tokens[0].outputs[0].token_ids) == 8


class _Teacher(torch.nn.Module):
    """Stands in for the teacher: fixed attention probabilities."""

    def __init__(self, attentions: torch.Tensor, kv_heads: int) -> None:
        super().__init__()
        self.attentions = attentions  # [L, B, H, T, T]
        self.config = type("C", (), {"num_key_value_heads": kv_heads})()

    def forward(self, input_ids, output_attentions):
        return type("O", (), {"attentions": tuple(self.attentions)})()


def test_the_loss_is_the_mass_weighted_kl_to_the_targets_candidate_attention():
    gen = torch.Generator().manual_seed(0)
    t, layers, heads, kvh, sinks, recent = 12, 2, 4, 2, 1, 3
    att = torch.softmax(torch.randn(layers, 1, heads, t, t, generator=gen)
                        .masked_fill(torch.ones(t, t).triu(1).bool(), float("-inf")), -1)
    head = RetrievalHead(RetrievalHeadConfig(vocab_size=50, hidden_size=6, num_kv_heads=kvh, embed_dim=4, window=2,
                                             head_dim=8))
    head.attach_embedding(torch.randn(50, 6, generator=gen))
    ids = torch.randint(0, 50, (1, t), generator=gen)
    got = distillation_loss(head, _Teacher(att, kvh), ids, sinks, recent).item()

    cand = candidate_mask(t, sinks, recent)
    with torch.no_grad():
        from kvflow.model.retrieval_head import token_windows

        w = token_windows(ids, 2)
        pos = torch.arange(t)[None]
        q, k = head.queries(w, pos)[0].double(), head.keys(w, pos)[0].double()  # [T, KVH, G, D], [T, KVH, D]
    num = den = 0.0
    for h in range(kvh):
        for i in range(t):
            js = [j for j in range(t) if cand[i, j]]
            if not js:
                continue
            target = {j: float(att[:, 0, 2 * h : 2 * h + 2, i, j].mean()) for j in js}
            mass = sum(target.values())
            student = {j: 0.0 for j in js}
            for g in range(2):
                logits = {j: float(q[i, h, g] @ k[j, h]) * head.scale for j in js}
                z = sum(math.exp(v) for v in logits.values())
                for j in js:
                    student[j] += math.exp(logits[j]) / z / 2
            kl = sum(target[j] / mass * math.log((target[j] / mass) / student[j]) for j in js if target[j] > 0)
            num, den = num + mass * kl, den + mass
    assert got == pytest.approx(num / den, rel=1e-4)
