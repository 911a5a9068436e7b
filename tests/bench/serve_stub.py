"""A minimal OpenAI-compatible streaming server for testing ``kvflow bench serve``.

It streams deterministic text chunks with delays the test chooses (per request, from the prompt's
word count and ``max_tokens``), so measured TTFT / ITL / TPOT can be checked against known values;
it counts concurrent streams, and records every request body.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, Self

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

#: ``(prompt_words, max_tokens) -> seconds``
DelayFn = Callable[[int, int], float]


class StubServer:
    """Run with ``with StubServer(...) as stub: stub.base_url ...`` (uvicorn in a thread)."""

    def __init__(
        self,
        ttft: DelayFn = lambda words, max_tokens: 0.05,
        itl: DelayFn = lambda words, max_tokens: 0.01,
        fail: Callable[[int, int], bool] = lambda words, max_tokens: False,
        reject_ignore_eos: bool = False,
        model_root: str | None = None,
    ) -> None:
        self.ttft, self.itl, self.fail = ttft, itl, fail
        self.reject_ignore_eos = reject_ignore_eos
        self.model_root = model_root
        self.active = 0
        self.max_active = 0
        self.bodies: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self.app = self._make_app()

    def _make_app(self) -> FastAPI:
        app = FastAPI()

        @app.get("/v1/models")
        async def models() -> dict[str, Any]:
            return {"object": "list", "data": [{"id": "stub-model", "object": "model", "root": self.model_root}]}

        @app.post("/v1/completions")
        async def completions(request: Request) -> Any:
            return await self._handle(await request.json(), chat=False)

        @app.post("/v1/chat/completions")
        async def chat(request: Request) -> Any:
            return await self._handle(await request.json(), chat=True)

        return app

    async def _handle(self, body: dict[str, Any], chat: bool) -> Any:
        with self._lock:
            self.bodies.append(body)
        if self.reject_ignore_eos and "ignore_eos" in body:
            return JSONResponse(status_code=400, content={"error": {
                "message": "Unrecognized request argument supplied: ignore_eos",
                "type": "invalid_request_error", "param": "ignore_eos", "code": None}})
        prompt = body["messages"][-1]["content"] if chat else body["prompt"]
        words = len(prompt.split())
        max_tokens = int(body.get("max_completion_tokens") or body.get("max_tokens") or 16)
        if self.fail(words, max_tokens):
            return JSONResponse(status_code=500, content={"error": {"message": "stub failure", "type": "server_error"}})
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        return StreamingResponse(
            self._stream(words, max_tokens, chat, include_usage), media_type="text/event-stream"
        )

    async def _stream(self, words: int, max_tokens: int, chat: bool, include_usage: bool):
        with self._lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            obj = "chat.completion.chunk" if chat else "text_completion"
            if chat:  # role-only first chunk, as OpenAI sends: must not count as a token
                yield _event({"object": obj, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
            await asyncio.sleep(self.ttft(words, max_tokens))
            for i in range(max_tokens):
                if i:
                    await asyncio.sleep(self.itl(words, max_tokens))
                text = f" w{i}"
                choice = {"index": 0, "delta": {"content": text}} if chat else {"index": 0, "text": text}
                choice["finish_reason"] = "length" if i == max_tokens - 1 else None
                yield _event({"object": obj, "choices": [choice]})
            if include_usage:
                yield _event({"object": obj, "choices": [], "usage": {
                    "prompt_tokens": words, "completion_tokens": max_tokens, "total_tokens": words + max_tokens}})
            yield b"data: [DONE]\n\n"
        finally:
            with self._lock:
                self.active -= 1

    def __enter__(self) -> Self:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.base_url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self._server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", lifespan="off"))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 20
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("stub server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)


def _event(obj: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(obj)}\n\n".encode()
