"""The draft proposer's fused greedy pass (one C++ call, kvflow/csrc/cpu_draft.h) against its per-step
path (a forward, the LM head and an argmax per step, in Python): the same proposals and the same draft
KV written, for sequences with different feeds (a whole prompt, a few kept tokens, one token), counts
and block tables, and again on a second pass that reads the KV the first one wrote."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from kvflow.assets import default_model_path
from kvflow.config import EngineConfig
from kvflow.model.cpu_kernels import cpu_kernels_available
from kvflow.sampling_params import SamplingParams
from kvflow.worker.spec_decode.draft import DraftProposer

pytestmark = pytest.mark.skipif(not cpu_kernels_available(torch.device("cpu"), torch.float32),
                                reason="needs the C++ CPU forward")
DRAFT = str(default_model_path().parent / "tiny-draft")
NUM_BLOCKS = 32


@pytest.fixture(scope="module")
def proposer() -> DraftProposer:
    config = EngineConfig.create(default_model_path(), dtype="float32", speculative_method="draft",
                                 speculative_model=DRAFT, num_speculative_tokens=6, num_blocks=NUM_BLOCKS)
    draft = DraftProposer(config, NUM_BLOCKS, torch.device("cpu"), use_cpu_kernels=True)
    assert draft.fused_greedy
    return draft


def _request(tokens: list[int], blocks: list[int], computed: int, **params) -> SimpleNamespace:
    return SimpleNamespace(all_token_ids=tokens, prompt_token_ids=tokens[:-3], output_token_ids=tokens[-3:],
                           block_ids=blocks, params=SamplingParams(temperature=0.0, **params), spec_generator=None,
                           spec_draft_computed=computed, eos_token_ids=(2,))


def _run(proposer: DraftProposer, fused: bool, requests, new_tokens, counts, start: list[torch.Tensor]):
    """Proposals and the draft's KV after one pass from the cache `start`."""
    for cache, init in zip(proposer.kv_caches, start):
        cache.copy_(init)
    proposer.fused_greedy = fused
    try:
        proposals = proposer.propose(requests, new_tokens, counts)
    finally:
        proposer.fused_greedy = True
    return proposals, [c.clone() for c in proposer.kv_caches]


def _requests(greedy_only: bool) -> list[SimpleNamespace]:
    g = torch.Generator().manual_seed(0)
    tokens = lambda n: torch.randint(3, 4000, (n,), generator=g).tolist()  # noqa: E731
    requests = [
        _request(tokens(37), [3, 7, 1], 0),  # the whole prompt first
        _request(tokens(20), [10, 11], 17),  # the tokens the last verification kept
        _request(tokens(50), [20, 21, 22, 23], 49),  # the newest token only
    ]
    if not greedy_only:  # a penalty changes the argmax: this one takes the per-step path either way
        requests.append(_request(tokens(30), [12, 13, 14], 25, repetition_penalty=1.3))
    return requests


@pytest.mark.parametrize("greedy_only", [True, False], ids=["greedy", "mixed"])
def test_the_fused_pass_equals_the_per_step_path(proposer, greedy_only):
    requests = _requests(greedy_only)
    new_tokens = [[5], [], [], [9]][: len(requests)]
    counts = [5, 2, 6, 3][: len(requests)]
    start = [torch.randn_like(c) for c in proposer.kv_caches]  # KV "from earlier passes", read by both
    fused, fused_kv = _run(proposer, True, requests, new_tokens, counts, start)
    stepped, stepped_kv = _run(proposer, False, requests, new_tokens, counts, start)
    assert fused.token_ids == stepped.token_ids
    assert [len(t) for t in fused.token_ids] == counts
    assert fused.draft_computed == stepped.draft_computed == [len(r.all_token_ids) + len(n) - 1
                                                              for r, n in zip(requests, new_tokens)]
    # Greedy only: the same steps over the same rows, bit for bit. Mixed: the penalised request's first
    # step shares a prompt-sized GEMM with the others only on the per-step path (GEMM rounding depends
    # on its rows), so KV agrees to rounding; its fused steps of a few rows are bit for bit again.
    exact = {"rtol": 0, "atol": 0} if greedy_only else {}
    for a, b in zip(fused_kv, stepped_kv):
        torch.testing.assert_close(a, b, **exact)
    assert any(not torch.equal(a, s) for a, s in zip(fused_kv, start))  # KV was written
    # Greedy rows carry no q; the penalised one carries one q row per proposal.
    assert all(p is None for p in fused.draft_probs[:3])
    if not greedy_only:
        assert fused.draft_probs[3].shape == (3, 4096)
        torch.testing.assert_close(fused.draft_probs[3], stepped.draft_probs[3])

    # The next pass reads what this one wrote: two proposals kept, then a correction.
    for r, new, props in zip(requests, new_tokens, fused.token_ids):
        r.all_token_ids = r.all_token_ids + new + props[:2]
        r.spec_draft_computed = len(r.all_token_ids) - 3
    nxt = [[7]] * len(requests)
    fused2, fused2_kv = _run(proposer, True, requests, nxt, [2] * len(requests), fused_kv)
    stepped2, stepped2_kv = _run(proposer, False, requests, nxt, [2] * len(requests), fused_kv)
    assert fused2.token_ids == stepped2.token_ids
    for a, b in zip(fused2_kv, stepped2_kv):
        torch.testing.assert_close(a, b, **exact)


def test_a_request_past_its_context_proposes_nothing(proposer):
    request = _request(list(range(3, 40)), [0, 1, 2], 0)
    proposer.max_model_len, limit = 39, proposer.max_model_len
    try:
        proposals = proposer.propose([request], [[5]], [4])  # 38 tokens: room for one more
    finally:
        proposer.max_model_len = limit
    assert [len(t) for t in proposals.token_ids] == [1]
