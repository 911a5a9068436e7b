"""Greedy outputs and logits equal Hugging Face transformers (fp32), in every engine regime."""

from __future__ import annotations

import random

import pytest
import torch

from kvflow import LLM, SamplingParams
from kvflow.worker.sampler import Sampler
from tests.model_utils import ARCHITECTURES, hf_greedy, load_hf

MAX_TOKENS = 10
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)


def mixed_prompts(seed: int, count: int = 6, shared_prefix: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    prefix = [rng.randrange(3, 500) for _ in range(shared_prefix)]
    lengths = [1, 3, 17, 33, 8, 60, 25, 4][:count]
    return [prefix + [rng.randrange(3, 500) for _ in range(n)] for n in lengths]


@pytest.fixture(params=[True, False], ids=["cpu_kernels", "torch_modules"])
def cpu_kernels(request) -> bool:
    """Every parity test runs twice: on the C++ CPU forward and on the PyTorch modules."""
    return request.param


@pytest.fixture(scope="module")
def references(tiny_models):
    """HF greedy continuations, memoised per (arch, prompt)."""
    cache: dict[tuple[str, tuple[int, ...]], list[int]] = {}
    models = {}

    def get(arch: str, prompt: list[int]) -> list[int]:
        key = (arch, tuple(prompt))
        if key not in cache:
            if arch not in models:
                models[arch] = load_hf(tiny_models[arch])
            cache[key] = hf_greedy(models[arch], prompt, MAX_TOKENS)
        return cache[key]

    get.models = models  # type: ignore[attr-defined]
    return get


def assert_matches_hf(llm: LLM, arch: str, prompts, references, params=GREEDY):
    outputs = llm.generate(prompts, params, use_tqdm=False)
    assert [o.prompt_token_ids for o in outputs] == prompts  # input order kept
    for prompt, out in zip(prompts, outputs):
        expected = references(arch, prompt)
        for completion in out.outputs:
            assert completion.token_ids == expected, f"{arch}: prompt of {len(prompt)} tokens diverged"
            assert completion.finish_reason == "length"
    kv = llm.engine.core.kv
    assert kv.num_free_blocks == kv.num_blocks, "blocks leaked"
    if llm.engine.core.config.runner.cpu_kernels:
        assert llm.engine.core.runner.cpu_forward is not None, "the C++ CPU forward did not build"
    return outputs


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_mixed_batch(arch, tiny_models, references, cpu_kernels):
    llm = LLM(model=str(tiny_models[arch]), dtype="float32", cpu_kernels=cpu_kernels, block_size=4, num_blocks=256)
    assert_matches_hf(llm, arch, mixed_prompts(1), references)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_chunked_prefill_forced_small(arch, tiny_models, references, cpu_kernels):
    llm = LLM(model=str(tiny_models[arch]), dtype="float32", cpu_kernels=cpu_kernels, block_size=4, num_blocks=256,
              max_num_batched_tokens=7)
    assert_matches_hf(llm, arch, mixed_prompts(2), references)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_prefix_cache_hits(arch, tiny_models, references, cpu_kernels):
    llm = LLM(model=str(tiny_models[arch]), dtype="float32", cpu_kernels=cpu_kernels, block_size=4, num_blocks=256)
    prompts = mixed_prompts(3, count=4, shared_prefix=21)
    assert_matches_hf(llm, arch, prompts[:1], references)  # fills the cache
    outputs = assert_matches_hf(llm, arch, prompts, references)
    assert all(o.num_cached_tokens >= 20 for o in outputs)
    assert llm.engine.core.kv.stats.hit_rate > 0.3


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_preemption_forced_by_tiny_kv_budget(arch, tiny_models, references, cpu_kernels):
    # 24 blocks of 4 tokens: the prompts alone need more, so sequences must be preempted and recomputed.
    llm = LLM(model=str(tiny_models[arch]), dtype="float32", cpu_kernels=cpu_kernels, block_size=4, num_blocks=24,
              enable_prefix_caching=False)
    assert_matches_hf(llm, arch, mixed_prompts(4), references)
    assert llm.engine.core.scheduler.num_preemptions > 0


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_n_greater_than_one_shares_prompt_blocks(arch, tiny_models, references, cpu_kernels):
    llm = LLM(model=str(tiny_models[arch]), dtype="float32", cpu_kernels=cpu_kernels, block_size=4, num_blocks=256,
              enable_prefix_caching=False)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, n=3)
    prompts = mixed_prompts(5, count=3)[1:]  # 3 and 17 tokens
    outputs = assert_matches_hf(llm, arch, prompts, references, params)
    assert [len(o.outputs) for o in outputs] == [3, 3]
    # Siblings took the leader's full prompt blocks instead of recomputing them.
    assert outputs[1].num_cached_tokens == 16


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_logits_allclose(arch, tiny_models, references, cpu_kernels, monkeypatch):
    """Every row the sampler sees equals HF's next-token logits for that row's context."""
    seen: list[tuple[list[int], torch.Tensor]] = []
    original = Sampler.__call__

    def spy(self, logits, batch):
        for row in range(logits.shape[0]):
            seen.append((batch.prompt_token_ids[row] + batch.output_token_ids[row], logits[row].clone()))
        return original(self, logits, batch)

    monkeypatch.setattr(Sampler, "__call__", spy)
    llm = LLM(model=str(tiny_models[arch]), dtype="float32", cpu_kernels=cpu_kernels, block_size=4, num_blocks=256,
              max_num_batched_tokens=16)
    # logprobs=0: the sampler runs (plain greedy requests without logprobs take the runner's argmax directly)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=0)
    assert_matches_hf(llm, arch, mixed_prompts(6, count=4), references, params)
    hf = references.models.get(arch) or load_hf(tiny_models[arch])
    assert len(seen) == 4 * MAX_TOKENS
    with torch.no_grad():
        for context, logits in seen:
            expected = hf(torch.tensor([context])).logits[0, -1]
            torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
