"""Retrieval samples have the exact length, the fact where asked, and an answer that matches it."""

from __future__ import annotations

import numpy as np
import pytest
from transformers import AutoTokenizer

from kvflow.train.synthetic import KV_ASSIGN, PASSKEY_NEEDLE, RetrievalTasks, parse_answer


@pytest.fixture(scope="module")
def tasks(smoke_run):
    out, _ = smoke_run
    tokenizer = AutoTokenizer.from_pretrained(out / "work" / "tokenizer")
    filler = np.arange(10, 300, dtype=np.int32)  # any token ids; distinct from the needle's
    return RetrievalTasks(tokenizer, np.tile(filler, 20))


@pytest.mark.parametrize("length", [128, 300, 512])
@pytest.mark.parametrize("depth", [0.0, 0.3, 1.0])
def test_passkey_length_depth_and_answer(tasks, length, depth):
    sample = tasks.passkey(length, depth, np.random.default_rng(1))
    assert len(sample.prompt_ids) == length
    assert sample.prompt_ids[0] == tasks.bos
    assert len(sample.answer) == 5 and sample.answer.isdigit()
    text = tasks.tokenizer.decode(sample.prompt_ids)
    needle = PASSKEY_NEEDLE.format(key=sample.answer)
    assert text.count(needle) == 1
    filler_len = length - 1 - len(tasks.encode(needle)) - len(tasks.encode("\nWhat is the pass key? The pass key is"))
    needle_ids = tasks.encode(needle)
    ids = sample.prompt_ids
    needle_at = next(i for i in range(len(ids)) if ids[i:i + len(needle_ids)] == needle_ids)
    assert abs((needle_at - 1) - depth * filler_len) <= 1
    assert parse_answer(tasks.tokenizer.decode(sample.answer_ids)) == sample.answer


def test_multikey_queries_share_context_and_ask_present_keys(tasks):
    samples = tasks.multikey(400, 6, np.random.default_rng(2), num_queries=3)
    assert len(samples) == 3
    assert all(len(s.prompt_ids) == 400 for s in samples)
    answers = {s.answer for s in samples}
    assert len(answers) == 3
    text = tasks.tokenizer.decode(samples[0].prompt_ids)
    for s in samples:
        query_key = tasks.tokenizer.decode(s.prompt_ids).rsplit('kv["', 1)[1].split('"')[0]
        assert KV_ASSIGN.format(key=query_key, value=s.answer) in text


def test_too_short_context_is_refused(tasks):
    with pytest.raises(ValueError, match="too short"):
        tasks.passkey(20, 0.5, np.random.default_rng(0))


@pytest.mark.parametrize("text, expected", [(" 71432.", "71432"), ("71432 is", "71432"), ("  12\n", "12"),
                                             (" the 123", ""), ("", ""), (" 9a9", "9")])
def test_parse_answer(text, expected):
    assert parse_answer(text) == expected
