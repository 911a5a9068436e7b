"""The prefix-tree batch policy end to end on the shipped model: the same greedy tokens as running each
request alone (fp32), outputs in input order, every block back, R_saving reported."""

from __future__ import annotations

import random

import pytest

from kvflow import LLM, SamplingParams
from kvflow.assets import default_model_path

CODE = '''import os
import sys


def read_config(path):
    """Read a key = value file into a dict."""
    result = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            key, _, value = line.partition("=")
            result[key.strip()] = value.strip()
    return result
'''
TAILS = ["\n\ndef write_config(path, values):\n", "\n\ndef main():\n", "\n\nclass Config:\n",
         "\n\ndef parse_args(argv):\n", "\n\ndef merge(a, b):\n", "\n\nif __name__ == '__main__':\n"]


@pytest.fixture(scope="module")
def model() -> str:
    return str(default_model_path())


@pytest.fixture(scope="module")
def batch(model) -> list[list[int]]:
    """Nested, identical and disjoint prompts, shuffled: a long shared file head with different tails, a
    shorter head of it (nested), exact duplicates, and prompts sharing nothing."""
    llm = LLM(model=model, dtype="float32", num_blocks=8)
    tok = llm.get_tokenizer()
    head = tok(CODE, add_special_tokens=False)["input_ids"]
    prompts = [head + tok(t, add_special_tokens=False)["input_ids"] for t in TAILS]  # share ~100 tokens
    prompts += [head[:40] + tok(t, add_special_tokens=False)["input_ids"] for t in TAILS[:3]]  # nested
    prompts += [prompts[0], prompts[0]]  # identical
    prompts += [tok(f"x = {i} * {i + 1}\nprint(x)\n", add_special_tokens=False)["input_ids"] for i in range(3)]
    random.Random(0).shuffle(prompts)
    return prompts


def test_prefix_tree_gives_each_requests_own_tokens_in_input_order(model, batch):
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    alone = LLM(model=model, dtype="float32", batch_policy="fcfs", enable_prefix_caching=False)
    expected = [alone.generate([p], params, use_tqdm=False)[0].outputs[0].token_ids for p in batch]
    del alone
    llm = LLM(model=model, dtype="float32", batch_policy="prefix-tree", block_size=16, max_num_batched_tokens=64)
    outs = llm.generate(batch, params, use_tqdm=False)
    assert [o.prompt_token_ids for o in outs] == batch
    assert [o.outputs[0].token_ids for o in outs] == expected
    stats = llm.engine.stats()
    assert stats.prefix_tree_batches == 1 and stats.prefix_tree_groups >= 2
    assert 0.5 < stats.prefix_tree_saving_ratio <= stats.prefix_tree_optimal_saving_ratio <= 1.0
    assert stats.num_free_blocks == stats.num_blocks and stats.num_running == stats.num_waiting == 0
    assert 0 < stats.peak_used_blocks <= stats.num_blocks
    assert stats.prefix_cache_hit_rate > 0.4  # the members took their group's prefix from the cache


def test_auto_groups_only_batches_of_its_size_and_refuses_without_the_cache(model, batch):
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    llm = LLM(model=model, dtype="float32", prefix_tree_min_batch=len(batch) + 1)  # "auto" by default
    llm.generate(batch, params, use_tqdm=False)
    assert llm.engine.stats().prefix_tree_batches == 0
    llm.generate(batch + batch[:1], params, use_tqdm=False)
    assert llm.engine.stats().prefix_tree_batches == 1
    with pytest.raises(ValueError, match="enable_prefix_caching"):
        LLM(model=model, dtype="float32", batch_policy="prefix-tree", enable_prefix_caching=False)
    with pytest.raises(ValueError, match="cannot combine with policy lpm"):
        LLM(model=model, dtype="float32", batch_policy="prefix-tree", policy="lpm")
