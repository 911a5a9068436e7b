"""Speculative decoding end to end on the shipped model, by n-gram prompt lookup and by the shipped
draft (`tiny-draft`): greedy outputs equal outputs without speculation token for token — mixed
batches, chunked prefill, preemption, prefix hits, logprobs, stop tokens, stop strings and
max_tokens inside an accepted run — seeded sampling is reproducible, requests can opt out, bad
settings are refused, the draft's KV shares the memory budget, and no KV block leaks."""

from __future__ import annotations

import pytest

from kvflow import LLM, SamplingParams
from kvflow.assets import default_model_path
from kvflow.config import EngineConfig
from kvflow.engine.llm_engine import LLMEngine
from kvflow.worker.kv_budget import num_kv_blocks

# Prompts that repeat themselves, so prompt lookup proposes often and is accepted often.
PROMPTS = [
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n\n"
    "def fibonacci(n):",
    "The quick brown fox jumps over the lazy dog. The quick brown fox",
    "Once upon a time",
    "import os\nimport sys\n\nfor i in range(10):\n    print(i)\nfor i in range(10):",
    "a b c d e f g a b c d",
]
GREEDY = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True)
DRAFT = str(default_model_path().parent / "tiny-draft")
METHODS = ["ngram", "draft"]


def _llm(method: str | None, **engine) -> LLM:
    args = dict(dtype="float32", num_blocks=512)
    args.update(engine)
    if method is not None:
        args["speculative_method"] = method
    if method == "draft":
        args.setdefault("speculative_model", DRAFT)
    return LLM(model=str(default_model_path()), **args)


def _generate(llm: LLM, prompts: list[str], params: SamplingParams) -> list[list[list[int]]]:
    outputs = llm.generate(prompts, params, use_tqdm=False)
    return [[c.token_ids for c in out.outputs] for out in outputs]


def _assert_no_leaks(llm: LLM) -> None:
    kv = llm.engine.core.kv
    assert kv.num_free_blocks == kv.num_blocks


@pytest.fixture(scope="module")
def reference() -> list[list[list[int]]]:
    """Greedy outputs without speculation."""
    return _generate(_llm(None), PROMPTS, GREEDY)


@pytest.mark.parametrize("cpu_kernels", [True, False], ids=["cpu_kernels", "torch_modules"])
@pytest.mark.parametrize("method, k", [("ngram", 1), ("ngram", 4), ("ngram", 7), ("draft", 1), ("draft", 5)])
def test_greedy_outputs_equal_no_speculation(reference, cpu_kernels, method, k):
    llm = _llm(method, num_speculative_tokens=k, cpu_kernels=cpu_kernels, speculative_token_budget=64)
    assert _generate(llm, PROMPTS, GREEDY) == reference
    stats = llm.engine.core.stats()
    # Proposals were made, verified and mostly kept: speculation really ran.
    assert stats.spec_num_drafts > 10 and stats.spec_num_accepted_tokens > stats.spec_num_draft_tokens / 3
    assert len(stats.spec_accepted_per_position) == k
    assert stats.spec_accepted_per_position[0] >= stats.spec_accepted_per_position[-1]
    assert sum(stats.spec_accepted_per_position) == stats.spec_num_accepted_tokens
    _assert_no_leaks(llm)


@pytest.mark.parametrize("method", METHODS)
def test_chunked_prefill_preemption_and_prefix_hits(reference, method):
    """A small step budget (prompts in chunks; verification trimmed to the budget), a cache small
    enough to preempt, and prompts sent twice (prefix hits): the same greedy tokens."""
    llm = _llm(method, num_blocks=30, block_size=4, max_num_batched_tokens=8, num_speculative_tokens=5)
    assert _generate(llm, PROMPTS + PROMPTS[:2], GREEDY) == reference + reference[:2]
    core = llm.engine.core
    assert core.scheduler.num_preemptions > 0 and core.kv.stats.hit_tokens > 0
    assert core.stats().spec_num_accepted_tokens > 0
    _assert_no_leaks(llm)


@pytest.mark.parametrize("method", METHODS)
def test_greedy_logprobs_equal_no_speculation(method):
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=3)
    runs = []
    for spec in (None, method):
        out = _llm(spec).generate(PROMPTS[:2], params, use_tqdm=False)
        runs.append([o.outputs[0] for o in out])
    for plain, spec in zip(*runs):
        assert plain.token_ids == spec.token_ids
        assert len(spec.logprobs) == len(plain.logprobs) == 24
        for a, b in zip(plain.logprobs, spec.logprobs):
            assert a.keys() == b.keys()  # the chosen token and the same top 3
            for token in a:
                assert abs(a[token].logprob - b[token].logprob) < 1e-4


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("max_tokens", [1, 2, 3, 5, 8])
def test_max_tokens_inside_an_accepted_run(reference, method, max_tokens):
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    llm = _llm(method, num_speculative_tokens=6)
    assert _generate(llm, PROMPTS, params) == [[r[0][:max_tokens]] for r in reference]
    _assert_no_leaks(llm)


@pytest.mark.parametrize("method", METHODS)
def test_stop_tokens_and_stop_strings_inside_an_accepted_run(reference, method):
    """A stop token (or string) that falls in the middle of an accepted run ends the output there:
    nothing after it is emitted, as without speculation."""
    plain, spec = _llm(None), _llm(method, num_speculative_tokens=6)
    # The fox prompt repeats itself, so its run of accepted tokens is long: stop on a token inside it.
    continuation = reference[1][0]
    stop_id = continuation[5]
    params = SamplingParams(temperature=0.0, max_tokens=48, stop_token_ids=[stop_id])
    want = _generate(plain, PROMPTS, params)
    assert want[1][0][-1] == stop_id and len(want[1][0]) <= 6
    assert _generate(spec, PROMPTS, params) == want
    text = plain.generate([PROMPTS[1]], GREEDY, use_tqdm=False)[0].outputs[0].text
    stop = text[len(text) // 3: len(text) // 3 + 4]
    params = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True, stop=[stop])
    want_text = [o.outputs[0].text for o in plain.generate(PROMPTS, params, use_tqdm=False)]
    got_text = [o.outputs[0].text for o in spec.generate(PROMPTS, params, use_tqdm=False)]
    assert got_text == want_text and stop not in got_text[1]
    _assert_no_leaks(spec)


@pytest.mark.parametrize("method", METHODS)
def test_seeded_sampling_is_reproducible_and_n_works(method):
    params = SamplingParams(temperature=0.9, top_p=0.95, top_k=40, max_tokens=32, seed=7, n=3, ignore_eos=True,
                            repetition_penalty=1.1)
    first_llm = _llm(method, speculative_token_budget=64)  # n = 3 x the prompts: past the default budget
    first = _generate(first_llm, PROMPTS, params)
    assert first_llm.engine.core.stats().spec_num_accepted_tokens > 0
    second = _generate(_llm(method, speculative_token_budget=64), PROMPTS, params)
    assert first == second
    assert all(len({tuple(c) for c in group}) > 1 for group in first)  # n = 3: a seed each


def test_a_request_can_opt_out():
    llm = _llm("ngram")
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, speculative=False)
    llm.generate(PROMPTS, params, use_tqdm=False)
    assert llm.engine.core.stats().spec_num_drafts == 0
    llm.generate(PROMPTS, params.model_copy(update={"speculative": True}), use_tqdm=False)
    assert llm.engine.core.stats().spec_num_drafts > 0


@pytest.mark.parametrize("method", METHODS)
def test_abort_mid_verification_frees_every_block(method):
    draft = {"speculative_model": DRAFT} if method == "draft" else {}
    engine = LLMEngine(EngineConfig.create(str(default_model_path()), dtype="float32", num_blocks=128,
                                           speculative_method=method, num_speculative_tokens=6, **draft))
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(f"r{i}", prompt, GREEDY)
    verifying = False
    for _ in range(40):
        engine.step()
        core = engine.core
        held = {r.request_id: len(r.block_ids) for r in core.scheduler.running}
        for request in core.scheduler.running:  # between steps: blocks for its computed tokens only
            assert held[request.request_id] == core.kv.blocks_needed(request.num_computed_tokens)
        verifying = verifying or any(r.spec_token_ids for r in core.scheduler.running)
        if verifying and core.stats().spec_num_drafts > 5:
            break
    assert verifying
    for i in range(len(PROMPTS)):
        engine.abort_request(f"r{i}")
    assert not engine.has_unfinished_requests()
    assert engine.core.kv.num_free_blocks == engine.core.kv.num_blocks


@pytest.mark.parametrize("engine_args, message", [
    (dict(speculative_method="medusa"), "speculative_method must be one of draft, ngram"),
    (dict(speculative_method="draft"), "needs speculative_model"),
    (dict(speculative_method="ngram", speculative_model="x"), "speculative_model is for speculative_method draft"),
    (dict(speculative_method="ngram", num_speculative_tokens=0), r"num_speculative_tokens must be in \[1, 16\]"),
    (dict(speculative_method="ngram", prompt_lookup_min=3, prompt_lookup_max=2),
     "prompt_lookup_min <= prompt_lookup_max"),
    (dict(speculative_method="ngram", kv_cache_dtype="kivi4"), "does not support kv_cache_dtype kivi4"),
    (dict(speculative_method="ngram", kv_policy="streaming", kv_budget=64), "does not support kv_policy=streaming"),
])
def test_bad_settings_are_refused(engine_args, message):
    with pytest.raises(ValueError, match=message):
        EngineConfig.create(str(default_model_path()), **engine_args)


def test_a_draft_with_another_vocabulary_is_refused(llama_dir):
    with pytest.raises(ValueError, match="does not share the target's vocabulary"):
        _llm("draft", speculative_model=str(llama_dir))
    with pytest.raises(ValueError, match="does not share the target's vocabulary"):
        LLM(model=str(llama_dir), speculative_method="draft", speculative_model=DRAFT, num_blocks=16)


def test_the_drafts_kv_shares_the_memory_budget():
    """With a draft, each block also holds the draft's KV of its tokens: the same memory holds fewer
    blocks, exactly budget / (target + draft bytes per block)."""
    plain = _llm(None, num_blocks=None, kv_cache_memory=0.01, max_num_seqs=256)
    draft = _llm("draft", num_blocks=None, kv_cache_memory=0.01, max_num_seqs=256)
    target_spec = plain.engine.core.runner.kv_spec
    draft_spec = draft.engine.core.runner.proposer.kv_spec
    budget = int(0.01 * 2**30)
    assert plain.engine.core.kv.num_blocks == budget // target_spec.bytes_per_block
    assert draft.engine.core.kv.num_blocks == budget // (target_spec.bytes_per_block + draft_spec.bytes_per_block)
    blocks = num_kv_blocks(draft.engine.config, target_spec, draft_spec.bytes_per_block)
    assert blocks == draft.engine.core.kv.num_blocks
    caches = draft.engine.core.runner.proposer.kv_caches
    assert caches[0].shape[1] == draft.engine.core.kv.num_blocks  # paged in parallel: the same block ids


def test_the_adaptive_rule_turns_speculation_down_then_off(reference):
    """speculative_token_budget S: B requests verify at most S // B proposals each, and
    propose nothing past S requests; greedy outputs stay the same either way."""
    prompts = PROMPTS * 2  # 10 requests
    for budget, most in ((40, 4), (20, 2), (10, 1), (9, 0)):
        engine = LLMEngine(EngineConfig.create(str(default_model_path()), dtype="float32", num_blocks=512,
                                               speculative_method="ngram", num_speculative_tokens=4,
                                               speculative_token_budget=budget))
        for i, prompt in enumerate(prompts):
            engine.add_request(f"r{i}", prompt, GREEDY)
        core = engine.core
        core.step()  # the prompts, and the first proposals
        out = core.scheduler.schedule()  # ten decoding requests: this step's verifications
        lengths = [len(c.spec_token_ids) for c in out.chunks]
        assert len(lengths) == 10 and max(lengths) == most
        assert all(c.propose == most for c in out.chunks)  # the next step's proposals: what it may verify
        core.scheduler.update(out, core.runner.execute(out.chunks))
        outputs = {}
        while engine.has_unfinished_requests():
            for o in engine.step():
                if o.finished:
                    outputs[o.request_id] = o.outputs[0].token_ids
        for i, want in enumerate(reference * 2):  # (the two steps driven by hand are not in the outputs)
            got = outputs[f"r{i}"]
            assert len(got) >= 40 and got == want[0][len(want[0]) - len(got):]
        assert core.kv.num_free_blocks == core.kv.num_blocks


@pytest.mark.parametrize("method", METHODS)
def test_min_tokens_and_penalties_with_speculation(method):
    """EOS blocked under min_tokens and a repetition penalty apply at every verified position (and to
    the draft's proposals): greedy tokens equal those without speculation."""
    params = SamplingParams(temperature=0.0, max_tokens=32, min_tokens=12, repetition_penalty=1.3)
    want = _generate(_llm(None), PROMPTS, params)
    llm = _llm(method)
    assert _generate(llm, PROMPTS, params) == want
    assert llm.engine.core.stats().spec_num_accepted_tokens > 0
    _assert_no_leaks(llm)
