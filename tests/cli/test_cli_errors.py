"""The `kvflow` command's errors: one line naming the flag or file, the command's own usage, defaults in --help."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from kvflow.cli import main
from kvflow.cli.engine_args import sampling_params
from kvflow.sampling_params import SamplingParams


def _error_lines(capsys: pytest.CaptureFixture[str]) -> list[str]:
    return capsys.readouterr().err.strip().splitlines()


def test_a_bad_sampling_flag_is_one_line_naming_the_flag(capsys):
    """Checked before the model loads (no --model needed to get there), without pydantic's dump and URL."""
    assert main(["generate", "--prompt", "x", "--temperature", "-1", "--top-p", "2"]) == 2
    [line] = _error_lines(capsys)
    assert line == ("kvflow: error: --temperature: must be a finite number >= 0 (0 means greedy), got -1.0; "
                    "--top-p: must be in (0, 1], got 2.0")


def test_chat_checks_its_sampling_flags_first(capsys):
    assert main(["chat", "--message", "hi", "--n", "0"]) == 2
    assert _error_lines(capsys) == ["kvflow: error: --n: must be an integer >= 1, got 0"]


class _FakeLLM:
    def __init__(self, **defaults: object) -> None:
        self.defaults = defaults

    def default_sampling_params(self) -> SamplingParams:
        return SamplingParams.model_construct(**{**SamplingParams().model_dump(), **self.defaults})


def _sampling_args(**given: object) -> argparse.Namespace:
    values = dict(max_tokens=64, temperature=None, top_p=None, top_k=None, min_p=None, repetition_penalty=None,
                  n=1, stop=None, sample_seed=None, ignore_eos=False)
    return argparse.Namespace(**{**values, **given})


def test_the_sample_seed_flag_is_named_as_the_user_typed_it():
    with pytest.raises(ValueError) as info:
        sampling_params(_FakeLLM(), _sampling_args(sample_seed=2**64))
    assert str(info.value).startswith("--sample-seed: must be None or an integer in ")
    assert "pydantic" not in str(info.value) and "\n" not in str(info.value)


def test_a_bad_value_from_the_model_defaults_names_its_source():
    with pytest.raises(ValueError, match=r"^the model's default sampling parameters \(generation_config.json\): "
                                         r"top_k must be"):
        sampling_params(_FakeLLM(top_k=-5), _sampling_args())


def test_a_malformed_config_json_names_the_file_and_line(tmp_path: Path, capsys):
    (tmp_path / "config.json").write_text('{\n  "architectures": ["LlamaForCausalLM"],\n}\n')
    assert main(["generate", "--prompt", "x", "--model", str(tmp_path)]) == 2
    assert _error_lines(capsys) == [f"kvflow: error: {tmp_path / 'config.json'}: line 3 column 1: invalid JSON: "
                                    "Expecting property name enclosed in double quotes"]


def test_a_malformed_generation_config_names_the_file(tmp_path: Path):
    from kvflow.model.loader import load_generation_config

    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": 0.7})[:-1])
    with pytest.raises(ValueError, match=r"generation_config.json: line 1 column 20: invalid JSON"):
        load_generation_config(tmp_path)


@pytest.mark.parametrize("command", ["serve", "generate"])
def test_an_unknown_flag_shows_the_commands_usage(command: str, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--bogus", "1"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"usage: kvflow {command} ")
    assert err.strip().splitlines()[-1] == f"kvflow {command}: error: unrecognized arguments: --bogus 1"


def test_serve_help_shows_defaults_but_not_the_api_key(monkeypatch, capsys):
    monkeypatch.setenv("KVFLOW_API_KEY", "sekrit-key")
    with pytest.raises(SystemExit) as info:
        main(["serve", "--help"])
    assert info.value.code == 0
    text = " ".join(capsys.readouterr().out.split("options:", 1)[1].split())  # past the usage; unwrapped
    for flag, default in [("--host HOST", "127.0.0.1"), ("--port PORT", "8000"),
                          ("--max-waiting-requests MAX_WAITING_REQUESTS", "1024"),
                          ("--max-request-bytes MAX_REQUEST_BYTES", "8388608"),
                          ("--shutdown-timeout SHUTDOWN_TIMEOUT", "30.0"), ("--log-level", "info"),
                          ("--access-log, --no-access-log", "True")]:
        after = text.split(flag, 1)[1]
        assert f"(default: {default})" in after.split(" --", 1)[0], (flag, after[:200])
    assert "sekrit-key" not in text and "(default: $KVFLOW_API_KEY)" in text
    assert "(default: None)" not in text and "(default: False)" not in text
