"""Steps that produce several tokens per request (the seam speculative decoding plugs into): through
the scheduler's update, the core's outputs, detokenisation, stop strings and streaming deltas, the
result equals producing the same tokens one per step."""

from __future__ import annotations

import pytest

from kvflow.assets import default_model_path
from kvflow.config import EngineConfig
from kvflow.engine.core import EngineCoreOutput
from kvflow.engine.llm_engine import LLMEngine
from kvflow.engine.output_processor import OutputKind, OutputProcessor
from kvflow.sampling_params import SamplingParams
from kvflow.worker.step import RunnerOutput, ScheduledChunk, TokenLogprobs

PROMPTS = ["def add(a, b):", "import os\nimport sys\n\n\nclass ", "for i in range(10):"]


@pytest.fixture(scope="module")
def engine() -> LLMEngine:
    return LLMEngine(EngineConfig.create(str(default_model_path()), dtype="float32", num_blocks=256))


@pytest.fixture(scope="module")
def continuations(engine: LLMEngine) -> dict[str, list[int]]:
    """Each prompt's greedy continuation, computed by the model one token per step."""
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(f"ref{i}", prompt, params)
    outputs = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                outputs[out.prompt] = out.prompt_token_ids + out.outputs[0].token_ids
    return outputs


def scripted_runner(sequences: dict[str, list[int]], per_step: int):
    """A runner that replays each request's known continuation, `per_step` tokens at a time (the
    model is not run: these tests are about what happens to the tokens after it)."""

    def execute(chunks: list[ScheduledChunk]) -> RunnerOutput:
        out = RunnerOutput()
        for chunk in chunks:
            if not chunk.samples:
                continue
            request = chunk.request
            full = sequences[tuple(request.prompt_token_ids)]
            end = chunk.start + chunk.num_tokens
            tokens = full[end:end + per_step]
            out.sampled[request.request_id] = tokens
            if request.params.logprobs is not None:
                # A logprob that depends on the position alone, however the tokens are grouped.
                out.logprobs[request.request_id] = [TokenLogprobs(t, -0.01 * (end + i), [t], [-0.01 * (end + i)])
                                                    for i, t in enumerate(tokens)]
        return out

    return execute


def generate(engine: LLMEngine, continuations: dict[str, list[int]], per_step: int, params: SamplingParams,
             monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, list[int], str | None, str | int | None, list]]:
    by_prompt_ids = {tuple(engine.tokenize_prompt(p)[1]): continuations[p] for p in PROMPTS}
    monkeypatch.setattr(engine.core.runner, "execute", scripted_runner(by_prompt_ids, per_step))
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(f"k{per_step}-{i}", prompt, params)
    results = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                c = out.outputs[0]
                results[out.request_id] = (c.text, c.token_ids, c.finish_reason, c.stop_reason,
                                           [sorted(lp.items()) for lp in c.logprobs or []])
    monkeypatch.undo()
    assert engine.core.kv.num_free_blocks == engine.core.kv.num_blocks
    return [results[f"k{per_step}-{i}"] for i in range(len(PROMPTS))]


def test_the_scripted_runner_replays_the_models_own_tokens(engine, continuations, monkeypatch):
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    one = generate(engine, continuations, 1, params, monkeypatch)
    prompt_ids = [engine.tokenize_prompt(p)[1] for p in PROMPTS]
    assert [tokens for _, tokens, _, _, _ in one] == [continuations[p][len(ids):] for p, ids in
                                                      zip(PROMPTS, prompt_ids)]


@pytest.mark.parametrize("per_step", [2, 3, 7])
def test_several_tokens_per_step_equal_one_token_per_step(engine, continuations, monkeypatch, per_step):
    params = SamplingParams(temperature=0.0, max_tokens=23, ignore_eos=True, logprobs=1)
    assert generate(engine, continuations, per_step, params, monkeypatch) == generate(
        engine, continuations, 1, params, monkeypatch)


@pytest.mark.parametrize("per_step", [2, 5])
def test_a_stop_string_inside_a_step_ends_the_output_there(engine, continuations, monkeypatch, per_step):
    one = generate(engine, continuations, 1, SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True),
                   monkeypatch)
    # Stop strings from the middle of each output, so they land inside some multi-token step.
    stops = list({text[len(text) // 2:len(text) // 2 + 3] for text, *_ in one if len(text) > 8})
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, stop=stops, logprobs=0)
    reference = generate(engine, continuations, 1, params, monkeypatch)
    assert any(finish == "stop" for _, _, finish, _, _ in reference)
    assert generate(engine, continuations, per_step, params, monkeypatch) == reference


def test_stop_token_inside_a_step(engine, continuations, monkeypatch):
    prompt_ids = engine.tokenize_prompt(PROMPTS[0])[1]
    stop_id = continuations[PROMPTS[0]][len(prompt_ids) + 4]  # the 5th output token of the first prompt
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, stop_token_ids=[stop_id])
    reference = generate(engine, continuations, 1, params, monkeypatch)
    assert reference[0][2] == "stop" and reference[0][3] == stop_id and len(reference[0][1]) <= 5
    assert generate(engine, continuations, 4, params, monkeypatch) == reference


def test_streamed_deltas_of_multi_token_steps_add_up(engine):
    """The server's DELTA outputs: a stop string inside a 4-token step withholds and cuts as one
    token at a time would."""
    tokenizer = engine.tokenizer
    prompt = tokenizer.encode("x = ")
    tokens = tokenizer.encode(" 1 + 2 + 3 + 4 + 5 + 6")
    stop = "+ 4"
    texts = {}
    for per_step in (1, 4):
        processor = OutputProcessor(tokenizer)
        params = SamplingParams(max_tokens=40, stop=[stop])
        processor.add_request("r", None, prompt, params, ["c"], 0.0, OutputKind.DELTA)
        deltas, ids, stopped = [], [], []
        for i in range(0, len(tokens), per_step):
            processed = processor.process([EngineCoreOutput("c", tokens[i:i + per_step])])
            stopped += processed.stopped
            for out in processed.request_outputs:
                deltas += [c.text for c in out.outputs]
                ids += [t for c in out.outputs for t in c.token_ids]
            if not processor.has_unfinished_requests():
                break
        texts[per_step] = ("".join(deltas), ids, stopped)
    assert texts[4] == texts[1]
    assert texts[1][2] == [("c", stop)] and stop not in texts[1][0] and texts[1][0].endswith("3 ")
