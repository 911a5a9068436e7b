"""OutputProcessor in DELTA mode (what the server streams) agrees with CUMULATIVE mode (offline)."""

from __future__ import annotations

import pytest

from kvflow.engine.core import EngineCoreOutput
from kvflow.engine.output_processor import OutputKind, OutputProcessor
from kvflow.sampling_params import SamplingParams
from tests.tokenizer_utils import make_tokenizer

TEXT = "Hello world! Le café est très bon à Paris. 你好，世界！ 🚀 The end."


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


def run(tokenizer, kind: OutputKind, params: SamplingParams, ids: list[int], n: int = 2):
    """Feed each sequence one token per step (sequence 1 lags one step); return outputs and stops.

    Tokens keep coming after a stop string, as they do from a core in another process that ran
    the next step before the finish order reached it."""
    proc = OutputProcessor(tokenizer)
    prompt = tokenizer.encode("prompt:")
    proc.add_request("r", "prompt:", prompt, params, [f"c{i}" for i in range(n)], 0.0, kind)
    outputs, stopped = [], []
    for step in range(len(ids) + n):
        core = []
        for i in range(n):
            pos = step - i
            if 0 <= pos < len(ids) and proc.request_id_of(f"c{i}") is not None:
                last = pos == len(ids) - 1
                core.append(EngineCoreOutput(f"c{i}", [ids[pos]], finish_reason="length" if last else None))
        processed = proc.process(core)
        outputs += processed.request_outputs
        stopped += processed.stopped
    assert not proc.has_unfinished_requests()
    return outputs, stopped


@pytest.mark.parametrize("stop", [[], ["est"], ["世界", "zzz"], ["end."]])
def test_deltas_concatenate_to_the_cumulative_output(tokenizer, stop):
    ids = tokenizer.encode(TEXT)
    params = SamplingParams(n=2, stop=stop)
    cumulative, stops_c = run(tokenizer, OutputKind.CUMULATIVE, params, ids)
    deltas, stops_d = run(tokenizer, OutputKind.DELTA, params, ids)
    final = {c.index: c for c in cumulative[-1].outputs}
    for index in (0, 1):
        streamed = [c for out in deltas for c in out.outputs if c.index == index]
        assert "".join(c.text for c in streamed) == final[index].text
        assert [t for c in streamed for t in c.token_ids] == final[index].token_ids
        assert [c.finish_reason for c in streamed][-1] == final[index].finish_reason
        assert sum(c.finish_reason is not None for c in streamed) == 1  # the finish is reported once
        if stop:
            assert not any(s in final[index].text for s in stop)
            assert (final[index].finish_reason, final[index].stop_reason) == ("stop", stop[0])
    assert stops_c == stops_d
    assert all(s in stop for _, s in stops_d)


def test_abort_in_delta_mode_returns_the_rest_and_the_running_ids(tokenizer):
    proc = OutputProcessor(tokenizer)
    ids = tokenizer.encode(TEXT)
    proc.add_request("r", None, [5, 6], SamplingParams(n=2), ["a", "b"], 0.0, OutputKind.DELTA)
    proc.process([EngineCoreOutput("a", ids[:3]), EngineCoreOutput("b", ids[:1], finish_reason="length")])
    output, running = proc.abort_request("r")
    assert running == ["a"] and output.finished
    assert [c.finish_reason for c in output.outputs if c.index == 0] == ["abort"]
    assert proc.abort_request("r") == (None, [])
