"""The retrieval scorers, driven by fake generators whose right and wrong answers are known."""

from __future__ import annotations

import re

import pytest

from kvflow.eval.retrieval import run_multikey, run_passkey
from kvflow.train.synthetic import RetrievalTasks


@pytest.fixture(scope="module")
def tasks(smoke_tokenizer, heldout_stream):
    return RetrievalTasks(smoke_tokenizer, filler=heldout_stream)


class FakeGenerator:
    """Answers from the prompt text by a rule, and records what it was asked."""

    def __init__(self, tokenizer, rule):
        self.tokenizer = tokenizer
        self.rule = rule
        self.calls: list[tuple[list[list[int]], list[int]]] = []

    def __call__(self, prompts, max_tokens):
        self.calls.append((prompts, max_tokens))
        return [self.rule(i, p, self.tokenizer.decode(p)) for i, p in enumerate(prompts)]


def passkey_rule(_index, prompt, text):
    """Right for short prompts, or when the needle sits in the first half of the text."""
    match = re.search(r"The pass key is (\d+)", text)
    key = match.group(1)
    if len(prompt) <= 128 or match.start() / len(text) < 0.5:
        return f" {key}. The"
    return " 1" + key  # digits, but the wrong ones


def test_passkey_grid(tasks, smoke_tokenizer):
    gen = FakeGenerator(smoke_tokenizer, passkey_rule)
    depths, lengths = (0.0, 0.25, 0.75, 1.0), (128, 256)
    result = run_passkey(tasks, gen, lengths, depths, trials=3, max_model_len=512, seed=7)
    assert len(gen.calls) == 1  # the whole grid in one batched call
    prompts, max_tokens = gen.calls[0]
    assert len(prompts) == len(depths) * len(lengths) * 3 == result["num_prompts"]
    assert sorted({len(p) for p in prompts}) == [128, 256]
    answer_len = len(tasks.passkey_answer_ids("12345"))
    assert set(max_tokens) == {answer_len + 2}
    assert result["accuracy"] == [[1.0, 1.0], [1.0, 1.0], [1.0, 0.0], [1.0, 0.0]]  # rows depth, columns length
    assert result["mean_accuracy"] == pytest.approx(6 / 8) and result["min_accuracy"] == 0.0
    assert result["depths"] == list(depths) and result["lengths"] == list(lengths)
    assert all(r["correct"] == (r["length"] == 128 or r["depth"] < 0.5) for r in result["samples"])

    # the same seed gives the same prompts, whatever else is in the grid
    again = FakeGenerator(smoke_tokenizer, passkey_rule)
    run_passkey(tasks, again, (256,), (0.75,), trials=3, max_model_len=512, seed=7)
    assert again.calls[0][0] == prompts[-6:-3]


def test_passkey_cells_average_trials_and_clip_lengths(tasks, smoke_tokenizer):
    gen = FakeGenerator(smoke_tokenizer, lambda i, p, text: passkey_rule(i, p, text) if i % 2 == 0 else " nothing")
    result = run_passkey(tasks, gen, (96, 300, 16), (0.5,), trials=2, max_model_len=200)
    reserve = len(tasks.passkey_answer_ids("99999")) + 4
    assert result["effective_lengths"] == [96, 200 - reserve, 16]
    assert result["accuracy"][0][2] is None and result["skipped"] == [
        {"depth": 0.5, "length": 16, "reason": result["skipped"][0]["reason"]}]  # too short for the needle
    prompts, max_tokens = gen.calls[0]
    assert all(len(p) + m <= 200 for p, m in zip(prompts, max_tokens))
    assert result["accuracy"][0][0] == 0.5  # one trial right, one wrong


def multikey_rule(max_pairs):
    def rule(_index, _prompt, text):
        assigned = dict(re.findall(r'kv\["([a-z]+)"\] = (\d+)', text))
        asked = re.findall(r'assert kv\["([a-z]+)"\] ==', text)[-1]
        return f" {assigned[asked]}\n" if len(assigned) <= max_pairs else " 0000\n"

    return rule


def test_multikey_grid(tasks, smoke_tokenizer):
    gen = FakeGenerator(smoke_tokenizer, multikey_rule(max_pairs=2))
    result = run_multikey(tasks, gen, (256, 400), (1, 2, 4, 40), trials=2, queries=3, max_model_len=512)
    assert len(gen.calls) == 1
    assert result["accuracy"][:3] == [[1.0, 1.0], [1.0, 1.0], [0.0, 0.0]]  # rows pairs, columns length
    # 40 assignments do not fit in 256 tokens: that cell is skipped, not scored as wrong
    assert result["accuracy"][3][0] is None and result["skipped"][0]["pairs"] == 40
    per_cell = {}
    for r in result["samples"]:
        per_cell[(r["pairs"], r["length"])] = per_cell.get((r["pairs"], r["length"]), 0) + 1
    assert per_cell[(1, 256)] == 2 and per_cell[(4, 400)] == 2 * 3  # min(queries, pairs) queries per context
