"""max_tokens=0 with prompt_logprobs: the engine scores the prompt and finishes, sampling nothing.

This is what `echo` with `max_tokens: 0` on /v1/completions runs (lm-eval's loglikelihood). The
request computes its prompt but the last token (whose logits predict nothing asked for), is
never sampled from, and gives every KV block back.
"""

from __future__ import annotations

import pytest
import torch

from kvflow import LLM, SamplingParams
from kvflow.worker.step import ScheduledChunk
from tests.model_utils import load_hf

PROMPT = [9, 8, 7, 6, 5, 4, 3, 21, 34, 55, 89, 144, 233, 377]


@pytest.fixture(scope="module")
def llm(llama_dir):
    # A step budget of 8 tokens: PROMPT's prefill takes two chunks.
    return LLM(model=str(llama_dir), dtype="float32", block_size=4, num_blocks=64, max_num_batched_tokens=8)


@pytest.fixture
def chunks(llm, monkeypatch) -> list[ScheduledChunk]:
    """Every chunk the runner is given during the test."""
    seen: list[ScheduledChunk] = []
    runner = llm.engine.core.runner
    execute = runner.execute

    def recording(scheduled):
        seen.extend(scheduled)
        return execute(scheduled)

    monkeypatch.setattr(runner, "execute", recording)
    return seen


def assert_idle(llm: LLM) -> None:
    kv = llm.engine.core.kv
    assert kv.num_free_blocks == kv.num_blocks
    assert not llm.engine.has_unfinished_requests() and not llm.engine.core.has_unfinished_requests()


def hf_prompt_logprobs(llama_dir, prompt: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(load_hf(llama_dir)(torch.tensor([prompt])).logits[0].float(), -1)


def test_prompt_logprobs_only_match_hf_and_sample_nothing(llm, llama_dir, chunks):
    out = llm.generate([PROMPT], SamplingParams(max_tokens=0, prompt_logprobs=3), use_tqdm=False)[0]
    (completion,) = out.outputs
    assert (completion.token_ids, completion.text, completion.finish_reason) == ([], "", "length")
    assert out.finished
    ref = hf_prompt_logprobs(llama_dir, PROMPT)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(PROMPT)
    for pos in range(1, len(PROMPT)):
        entry = out.prompt_logprobs[pos]
        assert entry[PROMPT[pos]].logprob == pytest.approx(ref[pos - 1, PROMPT[pos]].item(), abs=1e-4)
        assert [t for t, lp in entry.items() if lp.rank is not None] == torch.topk(ref[pos - 1], 3).indices.tolist()
    # Two chunks (the step budget is 8), the last prompt token never computed, no chunk sampled.
    assert [(c.start, c.num_tokens) for c in chunks] == [(0, 8), (8, len(PROMPT) - 9)]
    assert not any(c.samples for c in chunks)
    assert_idle(llm)


def test_same_prompt_logprobs_as_a_generating_request(llm):
    generating = llm.generate([PROMPT], SamplingParams(max_tokens=2, prompt_logprobs=2, temperature=0),
                              use_tqdm=False)[0]
    scoring = llm.generate([PROMPT], SamplingParams(max_tokens=0, prompt_logprobs=2), use_tqdm=False)[0]
    assert len(generating.outputs[0].token_ids) == 2
    assert scoring.prompt_logprobs == generating.prompt_logprobs
    assert_idle(llm)


def test_one_token_prompt_finishes_without_a_step(llm, chunks):
    steps = llm.engine.core.num_steps
    out = llm.generate([[42]], SamplingParams(max_tokens=0, prompt_logprobs=1), use_tqdm=False)[0]
    assert out.prompt_logprobs == [None]
    assert [(c.token_ids, c.finish_reason) for c in out.outputs] == [([], "length")]
    assert chunks == [] and llm.engine.core.num_steps == steps
    assert_idle(llm)


def test_n_siblings_compute_nothing(llm, chunks):
    out = llm.generate([PROMPT], SamplingParams(max_tokens=0, prompt_logprobs=0, n=3), use_tqdm=False)[0]
    assert [(c.index, c.token_ids, c.text, c.finish_reason) for c in out.outputs] == [
        (i, [], "", "length") for i in range(3)]
    assert len(out.prompt_logprobs) == len(PROMPT)
    assert sum(c.num_tokens for c in chunks) == len(PROMPT) - 1  # the leader's prompt, once
    assert_idle(llm)


def test_batched_with_generating_requests(llm):
    """A prompt-only request in the same steps changes nothing for the others."""
    greedy = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    alone = llm.generate([PROMPT[:5], PROMPT[3:]], greedy, use_tqdm=False)
    scoring = SamplingParams(max_tokens=0, prompt_logprobs=1)
    mixed = llm.generate([PROMPT[:5], PROMPT, PROMPT[3:], [7, 7, 7]], [greedy, scoring, greedy, scoring],
                         use_tqdm=False)
    assert [o.outputs[0].token_ids for o in (mixed[0], mixed[2])] == [o.outputs[0].token_ids for o in alone]
    assert [len(o.prompt_logprobs) for o in (mixed[1], mixed[3])] == [len(PROMPT), 3]
    assert all(o.outputs[0].token_ids == [] for o in (mixed[1], mixed[3]))
    assert_idle(llm)


def test_survives_preemption(llama_dir):
    llm = LLM(model=str(llama_dir), dtype="float32", block_size=4, num_blocks=14, enable_prefix_caching=False)
    prompts = [[3 + (i * 7 + j) % 300 for j in range(20)] for i in range(4)]
    params = [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True) if i % 2 else
              SamplingParams(max_tokens=0, prompt_logprobs=0) for i in range(4)]
    want = [llm.generate([p], SamplingParams(max_tokens=0, prompt_logprobs=0), use_tqdm=False)[0].prompt_logprobs
            for p in prompts[::2]]
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert llm.engine.core.scheduler.num_preemptions > 0
    assert [o.prompt_logprobs for o in outs[::2]] == want
    assert [len(o.outputs[0].token_ids) for o in outs] == [0, 12, 0, 12]
    assert_idle(llm)


def test_max_tokens_zero_needs_prompt_logprobs(llm):
    with pytest.raises(ValueError, match="max_tokens must be .*0 only with prompt_logprobs"):
        llm.generate([PROMPT], {"max_tokens": 0}, use_tqdm=False)
    assert_idle(llm)


def test_a_whole_context_of_prompt_can_be_scored(llama_dir):
    """A prompt-only request needs no room for output: a prompt of exactly max_model_len tokens is
    scored (HF's logprobs), while a generating request of that length is refused."""
    llm = LLM(model=str(llama_dir), dtype="float32", block_size=4, num_blocks=64, max_model_len=32)
    prompt = [(7 * i) % 200 + 3 for i in range(32)]
    out = llm.generate([{"prompt_token_ids": prompt}], SamplingParams(max_tokens=0, prompt_logprobs=0),
                       use_tqdm=False)[0]
    ref = hf_prompt_logprobs(llama_dir, prompt)
    got = [out.prompt_logprobs[i][prompt[i]].logprob for i in range(1, len(prompt))]
    assert got == pytest.approx([ref[i - 1, prompt[i]].item() for i in range(1, len(prompt))], abs=1e-4)
    assert out.outputs[0].token_ids == []
    with pytest.raises(ValueError, match="at most 31 tokens"):
        llm.generate([{"prompt_token_ids": prompt}], SamplingParams(max_tokens=1), use_tqdm=False)
    assert_idle(llm)
