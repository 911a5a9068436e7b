"""/v1/completions with `echo`: text offsets that follow the echoed text, `max_tokens: 0` (the
prompt's logprobs alone, as lm-eval's loglikelihood asks), and each response's own `created`.

Served on the shipped `tiny` model: its tokenizer adds a BOS to string prompts (which the echo,
the prompt as sent, does not show) and splits accented and CJK characters over byte tokens.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from kvflow import LLM, SamplingParams
from kvflow.assets import default_model_path
from tests.model_utils import load_hf
from tests.server.server_utils import ServerProcess

COMPLETIONS = "/v1/completions"
BOS = "<|bos|>"
SPECIAL = (BOS, "<|eos|>", "<|pad|>", "<|im_start|>", "<|im_end|>")  # the tiny model's special tokens
PROMPTS = ["def add(a, b):", "Le café est très 你好 ok"]


@pytest.fixture(scope="module")
def tiny() -> Path:
    return default_model_path()


@pytest.fixture(scope="module")
def tiny_server(tiny: Path, tmp_path_factory: pytest.TempPathFactory):
    proc = ServerProcess(tiny, tmp_path_factory.mktemp("tiny_server") / "serve.log")
    try:
        yield proc.wait_ready()
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def http(tiny_server):
    with httpx.Client(base_url=tiny_server.url, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def tiny_offline(tiny: Path) -> LLM:
    return LLM(model=str(tiny), dtype="float32", block_size=4, num_blocks=512, max_model_len=128)


def post(http: httpx.Client, **body: Any) -> dict[str, Any]:
    r = http.post(COMPLETIONS, json=body)
    assert r.status_code == 200, r.text
    return r.json()


def stream(http: httpx.Client, **body: Any) -> list[dict[str, Any]]:
    r = http.post(COMPLETIONS, json={**body, "stream": True})
    assert r.status_code == 200, r.text
    chunks = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    assert chunks and all("error" not in c for c in chunks), r.text
    return chunks


def joined(chunks: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """A streamed response's choices put back together: index -> text, logprob lists, finish_reason."""
    choices: dict[int, dict[str, Any]] = {}
    for chunk in chunks:
        for c in chunk["choices"]:
            acc = choices.setdefault(c["index"], {"text": "", "logprobs": None, "finish_reason": None})
            acc["text"] += c["text"]
            acc["finish_reason"] = c["finish_reason"] or acc["finish_reason"]
            if c["logprobs"] is not None:
                lp = acc["logprobs"] = acc["logprobs"] or {k: [] for k in c["logprobs"]}
                for key, values in c["logprobs"].items():
                    lp[key].extend(values)
    return choices


def assert_offsets_follow_text(text: str, lp: dict[str, list]) -> None:
    """Offsets never go back nor past the text, and a token whose own text is part of the text is found
    there: all but a character split over byte tokens (U+FFFD alone) and special tokens the text does not
    show (the BOS of a string prompt, an EOS in an output that skips special tokens)."""
    offsets = lp["text_offset"]
    assert len(offsets) == len(lp["tokens"]) == len(lp["token_logprobs"])
    assert offsets == sorted(offsets), offsets
    assert all(0 <= o <= len(text) for o in offsets), offsets
    for token, offset in zip(lp["tokens"], offsets):
        if "\ufffd" in token or (token in SPECIAL and not text.startswith(token, offset)):
            continue
        assert text[offset:offset + len(token)] == token, (token, offset, text)


def offline_prompt_logprobs(tiny_offline: LLM, prompt: str | list[int], k: int) -> tuple[list[int], list]:
    out = tiny_offline.generate([prompt], SamplingParams(max_tokens=0, prompt_logprobs=k), use_tqdm=False)[0]
    return out.prompt_token_ids, out.prompt_logprobs


# ------------------------------------------------------------------ text_offset (echo + logprobs)
@pytest.mark.parametrize("prompt", [*PROMPTS, "token ids"])
def test_echo_offsets_follow_the_echoed_text(http, tiny_offline, prompt):
    """The BOS of a string prompt sits at 0 with no width (its token text stays "<|bos|>"); a token-id
    prompt's echo is its decode, BOS included. Prompt and completion logprobs equal the offline engine's."""
    tokenizer = tiny_offline.get_tokenizer()
    if prompt == "token ids":
        prompt = tokenizer.encode(PROMPTS[1])
    want = tiny_offline.generate([prompt], SamplingParams(temperature=0, max_tokens=8, logprobs=2, prompt_logprobs=2,
                                                          ignore_eos=True), use_tqdm=False)[0]
    echo = prompt if isinstance(prompt, str) else tokenizer.decode(prompt)
    got = post(http, prompt=prompt, max_tokens=8, temperature=0, logprobs=2, echo=True, ignore_eos=True)
    (choice,) = got["choices"]
    lp = choice["logprobs"]
    assert choice["text"] == echo + want.outputs[0].text
    assert_offsets_follow_text(choice["text"], lp)
    num_prompt = len(want.prompt_token_ids)
    assert want.prompt_token_ids[0] == tokenizer.bos_token_id
    assert lp["tokens"][0] == BOS and lp["text_offset"][0] == 0 and lp["token_logprobs"][0] is None
    assert lp["text_offset"][1] == (0 if isinstance(prompt, str) else len(BOS))
    assert lp["text_offset"][num_prompt] == len(echo)  # the completion starts right after the echo
    ids = want.prompt_token_ids + want.outputs[0].token_ids
    positions = want.prompt_logprobs + want.outputs[0].logprobs
    assert lp["token_logprobs"][1:] == pytest.approx([pos[t].logprob for t, pos in zip(ids[1:], positions[1:])],
                                                     abs=1e-4)


def test_streamed_echo_offsets_equal_the_plain_response(http):
    """Several prompts, n = 2, seeded sampling: every streamed choice has the plain response's text and
    logprobs, offsets included."""
    body = {"prompt": PROMPTS, "n": 2, "max_tokens": 10, "seed": 3, "logprobs": 1, "echo": True, "ignore_eos": True}
    plain = {c["index"]: c for c in post(http, **body)["choices"]}
    streamed = joined(stream(http, **body))
    assert sorted(plain) == sorted(streamed) == [0, 1, 2, 3]
    for index, choice in plain.items():
        assert choice["text"].startswith(PROMPTS[index // 2])
        assert_offsets_follow_text(choice["text"], choice["logprobs"])
        assert streamed[index]["text"] == choice["text"]
        assert streamed[index]["logprobs"]["text_offset"] == choice["logprobs"]["text_offset"]
        assert streamed[index]["logprobs"]["tokens"] == choice["logprobs"]["tokens"]
        assert streamed[index]["logprobs"]["token_logprobs"] == pytest.approx(choice["logprobs"]["token_logprobs"],
                                                                              abs=1e-4)  # batched differently


def test_completion_offsets_follow_the_text_without_echo(http):
    """Byte tokens of one character count once: the offsets are positions in the text (streamed too)."""
    body = {"prompt": "# é è à ç ù é è à ç ù é", "max_tokens": 24, "seed": 1, "temperature": 1.5, "top_p": 1.0,
            "logprobs": 0, "ignore_eos": True}
    (choice,) = post(http, **body)["choices"]
    assert sum("\ufffd" in t for t in choice["logprobs"]["tokens"]) >= 2  # (this seed samples byte tokens)
    assert_offsets_follow_text(choice["text"], choice["logprobs"])
    assert choice["logprobs"]["text_offset"][0] == 0
    streamed = joined(stream(http, **body))[0]
    assert streamed["text"] == choice["text"]
    assert streamed["logprobs"]["text_offset"] == choice["logprobs"]["text_offset"]


# ------------------------------------------------------------------ echo with max_tokens 0
def test_echo_max_tokens_zero_returns_the_scored_prompt(http, tiny, tiny_offline):
    """lm-eval's loglikelihood request: the prompt, its logprobs (HF's), nothing generated."""
    prompt = PROMPTS[0]
    got = post(http, prompt=prompt, max_tokens=0, echo=True, logprobs=3, temperature=0)
    (choice,) = got["choices"]
    assert choice["text"] == prompt and choice["finish_reason"] == "length"
    ids, want = offline_prompt_logprobs(tiny_offline, prompt, 3)
    assert got["usage"]["prompt_tokens"] == len(ids) and got["usage"]["completion_tokens"] == 0
    assert got["usage"]["total_tokens"] == len(ids)
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(ids) and lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert_offsets_follow_text(prompt, lp)
    with torch.no_grad():
        ref = torch.log_softmax(load_hf(tiny)(torch.tensor([ids])).logits[0].float(), -1)
    assert lp["token_logprobs"][1:] == pytest.approx([ref[i - 1, ids[i]].item() for i in range(1, len(ids))], abs=1e-4)
    assert lp["token_logprobs"][1:] == pytest.approx([want[i][ids[i]].logprob for i in range(1, len(ids))], abs=1e-4)
    assert all(len(top) >= 3 for top in lp["top_logprobs"][1:])  # top 3 (plus the token, when not among them)


def test_echo_max_tokens_zero_streamed_batched_and_without_logprobs(http, tiny_offline):
    body = {"prompt": PROMPTS, "n": 2, "max_tokens": 0, "echo": True, "logprobs": 0,
            "stream_options": {"include_usage": True}}
    chunks = stream(http, **body)
    choices = joined(chunks)
    assert sorted(choices) == [0, 1, 2, 3]
    usage = chunks[-1]["usage"]
    assert chunks[-1]["choices"] == [] and usage["completion_tokens"] == 0
    num_ids = [len(offline_prompt_logprobs(tiny_offline, p, 0)[0]) for p in PROMPTS]
    assert usage["prompt_tokens"] == sum(num_ids)
    for index, choice in choices.items():
        prompt = PROMPTS[index // 2]
        ids, want = offline_prompt_logprobs(tiny_offline, prompt, 0)
        assert choice["text"] == prompt and choice["finish_reason"] == "length"
        assert_offsets_follow_text(prompt, choice["logprobs"])
        assert choice["logprobs"]["token_logprobs"][1:] == pytest.approx(
            [want[i][ids[i]].logprob for i in range(1, len(ids))], abs=1e-4)
    before = _prompt_tokens_total(http)
    plain = post(http, prompt=PROMPTS[1], max_tokens=0, echo=True)
    assert [(c["text"], c["logprobs"], c["finish_reason"]) for c in plain["choices"]] == [(PROMPTS[1], None, "length")]
    assert plain["usage"]["completion_tokens"] == 0
    # A prompt-only request's prompt is counted in /metrics though it makes no token.
    assert _prompt_tokens_total(http) == before + plain["usage"]["prompt_tokens"]


def _prompt_tokens_total(http) -> float:
    lines = [line for line in http.get("/metrics").text.splitlines() if line.startswith("kvflow:prompt_tokens_total")]
    return float(lines[0].split()[-1])


@pytest.mark.parametrize("stream_it", [False, True])
def test_max_tokens_zero_without_echo_is_refused(http, stream_it):
    r = http.post(COMPLETIONS, json={"prompt": "hi", "max_tokens": 0, "stream": stream_it})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert (error["param"], error["code"], error["type"]) == ("max_tokens", "invalid_value", "invalid_request_error")
    assert "echo" in error["message"]
    r = http.post(COMPLETIONS, json={"prompt": "hi", "max_tokens": -1, "echo": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"


# ------------------------------------------------------------------ created
def test_created_is_each_requests_own(http):
    """`created` is when the request came (not when the server started), one value for a whole stream."""
    time.sleep(1.1)  # the server started at least a second before this request
    chat = "/v1/chat/completions"
    messages = [{"role": "user", "content": "hi"}]
    for path, body in ((COMPLETIONS, {"prompt": "hi"}), (chat, {"messages": messages})):
        body = {**body, "max_tokens": 3}
        before = int(time.time())
        r = http.post(path, json=body)
        assert r.status_code == 200, r.text
        assert before <= r.json()["created"] <= int(time.time())
        before = int(time.time())
        r = http.post(path, json={**body, "stream": True, "stream_options": {"include_usage": True}})
        created = {json.loads(line[6:])["created"] for line in r.text.splitlines() if line.startswith("data: {")}
        assert len(created) == 1 and before <= created.pop() <= int(time.time())
