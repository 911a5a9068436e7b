"""Perplexity through our engine equals transformers' on the same windows; the unigram baseline is a plain count."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kvflow.eval.data import unigram_counts
from kvflow.eval.perplexity import (
    engine_score_fn,
    evaluate_perplexity,
    make_windows,
    scored_tokens,
    unigram_logprobs,
)
from kvflow.train.corpus import Document


def hf_score_fn(model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()

    def score(prompts):
        out = []
        with torch.no_grad():
            for prompt in prompts:
                ids = torch.tensor([prompt])
                logprobs = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
                out.append(logprobs[:-1].gather(1, ids[0, 1:, None])[:, 0].tolist())
        return out

    return score


def test_engine_perplexity_equals_transformers(smoke_model, smoke_llm, smoke_tokenizer, heldout_stream):
    windows = make_windows(heldout_stream, context=128, max_tokens=700, bos=smoke_tokenizer.bos_token_id)
    assert len(windows) == 6 and len(windows[-1]) == 1 + 700 - 5 * 127  # last window is partial
    ours = evaluate_perplexity(engine_score_fn(smoke_llm), windows, smoke_tokenizer)
    ref = evaluate_perplexity(hf_score_fn(smoke_model), windows, smoke_tokenizer)
    assert ours["num_tokens"] == ref["num_tokens"] == 700
    assert ours["perplexity"] == pytest.approx(ref["perplexity"], rel=1e-3)
    assert ours["bits_per_byte"] == pytest.approx(ref["bits_per_byte"], rel=1e-3)
    # the same when prompts are chunked over several steps
    from kvflow import LLM

    chunked = LLM(model=str(smoke_model), dtype="float32", num_blocks=128, max_num_batched_tokens=48)
    again = evaluate_perplexity(engine_score_fn(chunked), windows, smoke_tokenizer)
    assert again["perplexity"] == pytest.approx(ref["perplexity"], rel=1e-3)
    # per token, too (not only on average)
    a = np.concatenate([np.asarray(x) for x in engine_score_fn(smoke_llm)(windows[:2])])
    b = np.concatenate([np.asarray(x) for x in hf_score_fn(smoke_model)(windows[:2])])
    np.testing.assert_allclose(a, b, atol=2e-3)


def test_windows_cover_the_stream_prefix():
    stream = np.arange(10, 40, dtype=np.int32)
    windows = make_windows(stream, context=8, max_tokens=20, bos=1)
    assert all(w[0] == 1 and len(w) <= 8 for w in windows)
    assert scored_tokens(windows).tolist() == list(range(10, 30))
    no_bos = make_windows(stream, context=8, max_tokens=12, bos=None)
    assert sum(len(w) - 1 for w in no_bos) == 12 and no_bos[0] == list(range(10, 18))
    with pytest.raises(ValueError):
        make_windows(stream, context=1, max_tokens=5, bos=1)


def test_unigram_baseline_equals_naive_count():
    train = [5, 1, 1, 2, 3, 3, 3, 0]
    counts = np.bincount(train)
    heldout = np.array([1, 3, 4, 6])  # 4 and 6 were never seen in training
    vocab = 8
    naive = [math.log((train.count(t) + 1) / (len(train) + vocab)) for t in heldout.tolist()]
    np.testing.assert_allclose(unigram_logprobs(counts, heldout, vocab), naive)

    windows = [[99, 1, 3], [99, 4, 6]]  # BOS 99 is not scored

    def uniform(prompts):
        return [[math.log(1 / vocab)] * (len(p) - 1) for p in prompts]

    result = evaluate_perplexity(uniform, windows, None, counts, vocab_size=vocab)
    assert result["perplexity"] == pytest.approx(vocab)
    assert result["unigram"]["perplexity"] == pytest.approx(math.exp(-sum(naive) / len(naive)))
    assert result["unigram"]["train_tokens"] == len(train)
    assert result["perplexity_ratio_to_unigram"] == pytest.approx(vocab / result["unigram"]["perplexity"])
    assert result["unigram"]["vocab_size"] == vocab
    # without a size, the vocabulary is the smallest that covers the counts and the scored ids (here 0..6)
    small = evaluate_perplexity(uniform, windows, None, counts)["unigram"]
    assert small["vocab_size"] == 7
    expected = [math.log((train.count(t) + 1) / (len(train) + 7)) for t in heldout.tolist()]
    assert small["perplexity"] == pytest.approx(math.exp(-sum(expected) / len(expected)))


def test_unigram_counts_are_the_token_stream_histogram(smoke_tokenizer):
    docs = [Document("a", "def f(x):\n    return x + 1\n"), Document("b", "The pass key is 12345.")]
    saved = smoke_tokenizer.model_max_length
    smoke_tokenizer.model_max_length = 777
    try:
        counts = unigram_counts(smoke_tokenizer, docs, chunk_docs=1)
        assert smoke_tokenizer.model_max_length == 777  # restored after tokenizing whole files
    finally:
        smoke_tokenizer.model_max_length = saved
    naive: dict[int, int] = {}
    for doc in docs:
        for t in smoke_tokenizer(doc.text, add_special_tokens=False)["input_ids"] + [smoke_tokenizer.eos_token_id]:
            naive[t] = naive.get(t, 0) + 1
    assert {i: int(c) for i, c in enumerate(counts) if c} == naive


def test_unigram_counts_cache(smoke_tokenizer, tmp_path):
    docs = [Document("a", "import os\n")]
    first = unigram_counts(smoke_tokenizer, docs, tmp_path, cache_key="k")
    assert len(list(tmp_path.glob("unigram-*.npy"))) == 1
    np.testing.assert_array_equal(unigram_counts(smoke_tokenizer, [], tmp_path, cache_key="k"), first)
