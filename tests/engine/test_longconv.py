"""A long-conv model served by the engine: greedy outputs equal its reference forward token for token (fp32)
in every engine regime, beside an attention model served by another engine instance."""

from __future__ import annotations

import random

import pytest
import torch

from kvflow import LLM, SamplingParams
from kvflow.worker.sampler import Sampler
from tests.model.longconv.longconv_utils import load_reference, make_longconv_model, reference_greedy

MAX_TOKENS = 10
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)


@pytest.fixture(scope="module")
def longconv_dir(tmp_path_factory):
    return make_longconv_model(tmp_path_factory.mktemp("longconv") / "m")


@pytest.fixture(scope="module")
def references(longconv_dir):
    model = load_reference(longconv_dir)
    cache: dict[tuple[int, ...], list[int]] = {}

    def get(prompt: list[int]) -> list[int]:
        if tuple(prompt) not in cache:
            cache[tuple(prompt)] = reference_greedy(model, prompt, MAX_TOKENS)
        return cache[tuple(prompt)]

    get.model = model  # type: ignore[attr-defined]
    return get


def prompts(seed: int, count: int = 6, shared_prefix: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    prefix = [rng.randrange(3, 500) for _ in range(shared_prefix)]
    return [prefix + [rng.randrange(3, 500) for _ in range(n)] for n in [1, 3, 17, 33, 8, 60, 25, 4][:count]]


def engine(path, **kwargs) -> LLM:
    return LLM(model=str(path), dtype="float32", block_size=4, **{"num_blocks": 256, **kwargs})


def assert_matches(llm: LLM, batch: list[list[int]], references, params=GREEDY):
    outputs = llm.generate(batch, params, use_tqdm=False)
    for prompt, out in zip(batch, outputs):
        for completion in out.outputs:
            assert completion.token_ids == references(prompt), f"prompt of {len(prompt)} tokens diverged"
    kv = llm.engine.core.kv
    assert kv.num_free_blocks == kv.num_blocks, "blocks leaked"
    assert llm.engine.core.runner.cpu_forward is None  # the C++ forward declines: no attention to run
    return outputs


def test_mixed_batch(longconv_dir, references):
    assert_matches(engine(longconv_dir), prompts(1), references)


def test_chunked_prefill_forced_small(longconv_dir, references):
    assert_matches(engine(longconv_dir, max_num_batched_tokens=7), prompts(2), references)


def test_prefix_cache_hits(longconv_dir, references):
    llm = engine(longconv_dir)
    batch = prompts(3, count=4, shared_prefix=21)
    assert_matches(llm, batch[:1], references)  # fills the cache
    outputs = assert_matches(llm, batch, references)
    assert all(o.num_cached_tokens >= 20 for o in outputs)


def test_preemption_forced_by_tiny_kv_budget(longconv_dir, references):
    llm = engine(longconv_dir, num_blocks=24, enable_prefix_caching=False)
    assert_matches(llm, prompts(4), references)
    assert llm.engine.core.scheduler.num_preemptions > 0


def test_n_greater_than_one(longconv_dir, references):
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, n=3)
    outputs = assert_matches(engine(longconv_dir, enable_prefix_caching=False), prompts(5, count=3)[1:],
                             references, params)
    assert [len(o.outputs) for o in outputs] == [3, 3]


def test_logits_equal_the_reference(longconv_dir, references, monkeypatch):
    """Every row the sampler sees equals the reference forward's next-token logits for that context."""
    seen: list[tuple[list[int], torch.Tensor]] = []
    original = Sampler.__call__

    def spy(self, logits, batch):
        for row in range(logits.shape[0]):
            seen.append((batch.prompt_token_ids[row] + batch.output_token_ids[row], logits[row].clone()))
        return original(self, logits, batch)

    monkeypatch.setattr(Sampler, "__call__", spy)
    # logprobs=0: the sampler runs (plain greedy requests without logprobs take the runner's argmax directly)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=0)
    assert_matches(engine(longconv_dir, max_num_batched_tokens=16), prompts(6, count=4), references, params)
    model = references.model
    assert len(seen) == 4 * MAX_TOKENS
    with torch.no_grad():
        for context, logits in seen:
            expected = model.compute_logits(model.full_forward(torch.tensor([context]))[0, -1])
            torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)


def test_beside_an_attention_model(longconv_dir, llama_dir, references):
    """Two engines, a long-conv model and a Llama, run interleaved in one process: each equals its reference."""
    from tests.model_utils import hf_greedy, load_hf

    conv, attn = engine(longconv_dir), engine(llama_dir)
    hf = load_hf(llama_dir)
    batch = prompts(7, count=4)
    for _ in range(2):
        assert_matches(conv, batch, references)
        for prompt, out in zip(batch, attn.generate(batch, GREEDY, use_tqdm=False)):
            assert out.outputs[0].token_ids == hf_greedy(hf, prompt, MAX_TOKENS)


def test_bfloat16_runs(longconv_dir):
    """bf16 weights with a bf16 history: it runs and is close to fp32 (not token-exact: bf16 rounds differently)."""
    llm = LLM(model=str(longconv_dir), dtype="bfloat16", block_size=4, num_blocks=256)
    out = llm.generate([prompts(8)[3]], GREEDY, use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == MAX_TOKENS


def test_ngram_speculation_keeps_greedy_outputs(longconv_dir, references):
    """A verification step writes history for every proposal; rejected ones are overwritten before any read.
    (This random model's greedy outputs fall into cycles, which prompt lookup then proposes.)"""
    batch = prompts(9, count=4)
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    llm = engine(longconv_dir, speculative_method="ngram", num_speculative_tokens=4)
    outputs = llm.generate(batch, params, use_tqdm=False)
    for prompt, out in zip(batch, outputs):
        assert out.outputs[0].token_ids == reference_greedy(references.model, prompt, 40)
    stats = llm.engine.core.stats()
    assert stats.spec_num_drafts > 0 and 0 < stats.spec_num_accepted_tokens < stats.spec_num_draft_tokens
