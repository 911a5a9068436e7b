"""Speculative decoding on a disaggregated decode instance: the prompt's KV comes from a prefill
instance (which never speculates: it computes one token), then the decode instance verifies n-gram
proposals. Greedy outputs equal a colocated engine's without speculation, speculation really ran on
the decode side, and neither instance leaks a block."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from kvflow.assets import default_model_path
from kvflow.config import KVTransferConfig
from tests.kv_transfer.engine_pairs import assert_all_blocks_free, drive, greedy, make_core, run_colocated, submit

# Text that repeats itself (and one that does not), so prompt lookup proposes often on the shipped model.
TEXTS = [
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n\n"
    "def fibonacci(n):",
    "The quick brown fox jumps over the lazy dog. The quick brown fox",
    "import os\nimport sys\n\nfor i in range(10):\n    print(i)\nfor i in range(10):",
    "Once upon a time",
]


@pytest.fixture(scope="module")
def batch() -> list[list[int]]:
    tokenizer = AutoTokenizer.from_pretrained(str(default_model_path()))
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in TEXTS]


@pytest.mark.parametrize("mode", ["whole", "layerwise"])
@pytest.mark.parametrize("k", [2, 5])
def test_speculative_decode_instance_equals_colocated(batch, mode, k):
    model, params = default_model_path(), greedy(40)
    expected = run_colocated(make_core(model), batch, params)
    prefill = make_core(model, KVTransferConfig(role="prefill", mode=mode))
    decode = make_core(model, KVTransferConfig(role="decode", mode=mode), block_size=8,
                       speculative_method="ngram", num_speculative_tokens=k, speculative_token_budget=64)
    for i, ids in enumerate(batch):
        submit(prefill, decode, f"r{i}", ids, params)
    assert drive(prefill, decode) == expected
    assert decode.scheduler.num_kv_load_failures == 0
    stats = decode.stats()
    assert stats.spec_num_drafts > 0 and stats.spec_num_accepted_tokens > 0, stats
    assert len(stats.spec_accepted_per_position) == k
    assert prefill.stats().spec_num_drafts == 0  # the prefill instance has no speculation configured
    assert_all_blocks_free(prefill, decode)
    prefill.close()
    decode.close()


def test_both_instances_configured_for_speculation(batch):
    """The same flags on both instances (one command line for a whole deployment): the prefill side
    computes the prompt and one token only, so only the decode side verifies proposals."""
    model, params = default_model_path(), greedy(24)
    expected = run_colocated(make_core(model), batch, params)
    spec = dict(speculative_method="ngram", num_speculative_tokens=4)
    prefill = make_core(model, KVTransferConfig(role="prefill"), **spec)
    decode = make_core(model, KVTransferConfig(role="decode"), **spec)
    for i, ids in enumerate(batch):
        submit(prefill, decode, f"r{i}", ids, params)
    assert drive(prefill, decode) == expected
    assert prefill.stats().spec_num_drafts == 0 and decode.stats().spec_num_accepted_tokens > 0
    assert_all_blocks_free(prefill, decode)
    prefill.close()
    decode.close()


def test_draft_model_on_the_decode_instance(batch):
    """A decode instance speculating with the shipped draft: the draft computes its own KV of each
    pulled prompt (none came over the wire) on its first proposal, and greedy tokens stay the same."""
    model, params = default_model_path(), greedy(32)
    expected = run_colocated(make_core(model), batch, params)
    prefill = make_core(model, KVTransferConfig(role="prefill"))
    decode = make_core(model, KVTransferConfig(role="decode"), speculative_method="draft",
                       speculative_model=str(model.parent / "tiny-draft"), num_speculative_tokens=4)
    for i, ids in enumerate(batch):
        submit(prefill, decode, f"r{i}", ids, params)
    assert drive(prefill, decode) == expected
    assert decode.scheduler.num_kv_load_failures == 0 and decode.stats().spec_num_accepted_tokens > 0
    assert_all_blocks_free(prefill, decode)
    prefill.close()
    decode.close()
