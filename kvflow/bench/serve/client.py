"""One streamed request to an OpenAI-compatible server, timed on the client.

Every request streams (``stream: true``) so the client sees each token's arrival:

* TTFT: from sending the request to the first chunk carrying text;
* ITL: gaps between successive chunks carrying text (a chunk may hold several tokens when the
  server's detokenizer holds back an incomplete character; the gap then spans them);
* E2E: from sending to the end of the stream;
* output tokens: ``usage.completion_tokens`` of the final chunk (``stream_options.include_usage``)
  when the server gives it, else the number of text chunks;
* TPOT = (E2E - TTFT) / (output tokens - 1): the mean decode time per token after the first.

``ignore_eos`` (a vLLM / kvflow extension) makes outputs exactly ``max_tokens`` long, so servers
are compared on the same amount of work; ``runner`` drops it if the server rejects it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import aiohttp

from kvflow.bench.serve.datasets import SampleRequest
from kvflow.bench.serve.sse import SSEDecoder

Api = Literal["completions", "chat"]


@dataclass(frozen=True)
class Target:
    """Where and how to send requests: full URL, API flavour, model, auth and body extras."""

    url: str
    api: Api
    model: str
    api_key: str | None = None
    ignore_eos: bool = True
    temperature: float | None = 0.0
    extra_body: dict[str, Any] = field(default_factory=dict)

    def headers(self) -> dict[str, str]:
        """Request headers (bearer auth when an API key is set)."""
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers


@dataclass
class RequestResult:
    """What one request measured. Times are seconds; offsets are from the start of the run."""

    prompt_len: int
    output_len: int  # requested (max_tokens)
    success: bool = False
    error: str = ""
    prompt_tokens: int | None = None  # server's count (usage), with its special tokens
    output_tokens: int = 0
    ttft_s: float = 0.0
    e2e_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)
    arrival_s: float = 0.0  # scheduled send time
    start_s: float = 0.0  # actual send time (later than arrival when the concurrency cap waits)
    session: int | None = None  # multi-turn: the chat session (0-based), None elsewhere
    turn: int | None = None  # multi-turn: the turn within its session (1-based), None elsewhere
    # The generated text (completions: ``text``; chat: ``content``), which the next turn of a
    # chat session resends; kept out of the JSON record, which holds timings, not text.
    generated_text: str = field(default="", repr=False)

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first; None with fewer than two tokens."""
        if not self.success or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready record (with the derived TPOT)."""
        return {
            "prompt_len": self.prompt_len, "output_len": self.output_len,
            "success": self.success, "error": self.error,
            "prompt_tokens": self.prompt_tokens, "output_tokens": self.output_tokens,
            "ttft_s": self.ttft_s, "tpot_s": self.tpot_s, "e2e_s": self.e2e_s,
            "itl_s": self.itl_s, "arrival_s": self.arrival_s, "start_s": self.start_s,
            "session": self.session, "turn": self.turn,
        }


def build_payload(target: Target, req: SampleRequest, ignore_eos: bool | None = None) -> dict[str, Any]:
    """The JSON body of a streamed completions or chat request for ``req``."""
    body: dict[str, Any] = {"model": target.model, "stream": True, "stream_options": {"include_usage": True}}
    if target.api == "chat":
        turns = req.messages or (("user", req.prompt),)
        body["messages"] = [{"role": role, "content": content} for role, content in turns]
        body["max_completion_tokens"] = req.output_len
    else:
        body["prompt"] = req.prompt
        body["max_tokens"] = req.output_len
    if target.temperature is not None:
        body["temperature"] = target.temperature
    if target.ignore_eos if ignore_eos is None else ignore_eos:
        body["ignore_eos"] = True
    body.update(target.extra_body)
    return body


def _choice_text(choice: dict[str, Any], api: Api) -> str:
    """The text a streamed choice carries (``text`` for completions, ``delta.content`` for chat).

    Reasoning text counts too: it is output the server had to generate, so it ends the TTFT.
    """
    if api == "chat":
        delta = choice.get("delta") or {}
        return (delta.get("content") or "") + (delta.get("reasoning_content") or "")
    return choice.get("text") or ""


def _choice_content(choice: dict[str, Any], api: Api) -> str:
    """The answer text of a streamed choice, without reasoning: what a chat history keeps."""
    if api == "chat":
        return (choice.get("delta") or {}).get("content") or ""
    return choice.get("text") or ""


async def send_request(
    session: aiohttp.ClientSession, target: Target, req: SampleRequest, ignore_eos: bool | None = None
) -> RequestResult:
    """Send ``req`` streamed and time it; failures come back as ``success=False`` with ``error``."""
    result = RequestResult(prompt_len=req.prompt_len, output_len=req.output_len)
    payload = build_payload(target, req, ignore_eos)
    decoder = SSEDecoder()
    chunks = 0
    pieces: list[str] = []
    first_choice: float | None = None
    done = False
    start = last = time.perf_counter()
    try:
        async with session.post(target.url, json=payload, headers=target.headers()) as resp:
            if resp.status != 200:
                body = await resp.text()
                result.error = f"HTTP {resp.status}: {body[:500]}"
                return result
            async for data in resp.content.iter_any():
                now = time.perf_counter()
                for event in decoder.feed(data):
                    if event.strip() == "[DONE]":
                        done = True
                        continue
                    obj = json.loads(event)
                    if obj.get("error"):
                        result.error = f"stream error: {json.dumps(obj['error'])[:500]}"
                        return result
                    usage = obj.get("usage")
                    if usage:
                        result.prompt_tokens = usage.get("prompt_tokens")
                        if usage.get("completion_tokens") is not None:
                            result.output_tokens = int(usage["completion_tokens"])
                    choices = obj.get("choices") or []
                    if choices and first_choice is None:
                        first_choice = now
                    pieces.extend(_choice_content(c, target.api) for c in choices)
                    if any(_choice_text(c, target.api) for c in choices):
                        if chunks == 0:
                            result.ttft_s = now - start
                        else:
                            result.itl_s.append(now - last)
                        last = now
                        chunks += 1
            end = time.perf_counter()
            for event in decoder.flush():
                done = done or event.strip() == "[DONE]"
    except (aiohttp.ClientError, TimeoutError, json.JSONDecodeError, UnicodeDecodeError) as e:
        result.error = f"{type(e).__name__}: {e}"
        return result
    result.e2e_s = end - start
    if not done:
        result.error = "stream ended before 'data: [DONE]'"
        return result
    if first_choice is None:
        result.error = "stream carried no choices"
        return result
    if chunks == 0:  # only empty-text chunks (e.g. an immediate EOS): first choice = first token
        result.ttft_s = first_choice - start
    if result.output_tokens == 0:
        result.output_tokens = max(chunks, 1)
    result.generated_text = "".join(pieces)
    result.success = True
    return result


async def list_models(session: aiohttp.ClientSession, base_url: str, api_key: str | None) -> list[dict[str, Any]]:
    """``GET /v1/models``: the served models (``id``, and ``root`` = model path on vLLM/kvflow)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with session.get(base_url.rstrip("/") + "/v1/models", headers=headers) as resp:
        if resp.status != 200:
            raise RuntimeError(f"GET /v1/models: HTTP {resp.status}: {(await resp.text())[:300]}")
        return list((await resp.json()).get("data") or [])
