"""Prompt lookup against a naive reference: the longest suffix (max_n down to min_n) found at its
latest earlier occurrence, and the tokens that followed it."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest

from kvflow.worker.spec_decode.ngram import NgramProposer


def naive(tokens: list[int], k: int, min_n: int, max_n: int) -> list[int]:
    for n in range(max_n, min_n - 1, -1):
        if n >= len(tokens):
            continue
        suffix = tokens[-n:]
        for start in range(len(tokens) - n - 1, -1, -1):
            if tokens[start:start + n] == suffix:
                return tokens[start + n:start + n + k]
    return []


def test_examples():
    p = NgramProposer(1, 3)
    assert p.propose_one([1, 2, 3, 4, 5, 1, 2, 3], 3) == [4, 5, 1]
    assert p.propose_one([1, 2, 3, 4, 5, 9, 2, 3], 3) == [4, 5, 9]  # only the 2-gram occurred
    assert p.propose_one([9, 1, 5, 1, 7, 1], 2) == [7, 1]  # the latest occurrence of [1]
    assert p.propose_one([1, 2, 3], 3) == [] and p.propose_one([5], 3) == []
    assert p.propose_one([7, 7, 7, 7], 2) == [7]  # what followed, up to the end
    assert NgramProposer(2, 3).propose_one([4, 1, 2, 4], 3) == []  # a 1-gram match is below min_n


@pytest.mark.parametrize("seed", range(20))
def test_matches_the_naive_reference(seed):
    rng = random.Random(seed)
    min_n = rng.randint(1, 3)
    max_n = rng.randint(min_n, 5)
    proposer = NgramProposer(min_n, max_n)
    for _ in range(50):
        tokens = [rng.randrange(4) for _ in range(rng.randint(1, 40))]
        k = rng.randint(1, 6)
        assert proposer.propose_one(tokens, k) == naive(tokens, k, min_n, max_n)
    requests = [SimpleNamespace(all_token_ids=[1, 2]), SimpleNamespace(all_token_ids=[3])]
    proposals = proposer.propose(requests, [[1], []], [2, 2])  # this step's new tokens count too
    assert proposals.token_ids == [naive([1, 2, 1], 2, min_n, max_n), []] and proposals.draft_probs is None


def test_bad_windows_are_refused():
    with pytest.raises(ValueError):
        NgramProposer(0, 2)
    with pytest.raises(ValueError):
        NgramProposer(3, 2)
