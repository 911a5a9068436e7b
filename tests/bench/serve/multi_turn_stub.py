"""Test helpers for the ``multi-turn`` dataset: a stub server that keeps a request timeline.

``RecordingStub`` is ``serve_stub.StubServer`` plus, per request, the time its body arrived and
the time its last chunk (``data: [DONE]``) was handed to the transport. A client cannot send a
session's next turn before it has read that chunk, so ``received(k+1) > last_chunk(k)`` checks
on the server's own clock that turns are sent one after another.

It also listens on a socket created with ``IPPROTO_TCP``: asyncio turns Nagle's algorithm off
(``TCP_NODELAY``) only for sockets whose ``proto`` says TCP, and ``StubServer``'s socket has
proto 0. With Nagle on, every request after the first on a keep-alive connection (each later
turn) waited ~40 ms for the client's delayed ACK and got its chunks in one burst.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Self

import uvicorn
from fastapi.responses import StreamingResponse

from tests.bench.serve_stub import StubServer


@dataclass
class Received:
    """One request as the stub saw it."""

    body: dict[str, Any]
    received: float  # perf_counter when the body was parsed
    last_chunk: float | None = None  # perf_counter just before the final chunk was yielded

    @property
    def prompt(self) -> str:
        """The completions prompt (chat: the messages' contents joined, for matching only)."""
        if "prompt" in self.body:
            return self.body["prompt"]
        return "".join(m["content"] for m in self.body["messages"])


class RecordingStub(StubServer):
    """``StubServer`` that records when each request arrived and when its stream ended."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.timeline: list[Received] = []

    async def _handle(self, body: dict[str, Any], chat: bool) -> Any:
        entry = Received(body=body, received=time.perf_counter())
        with self._lock:
            self.timeline.append(entry)
        response = await super()._handle(body, chat)
        if isinstance(response, StreamingResponse):
            response.body_iterator = _stamped(response.body_iterator, entry)
        return response

    def __enter__(self) -> Self:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
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


async def _stamped(chunks: AsyncIterator[Any], entry: Received) -> AsyncIterator[Any]:
    """Pass ``chunks`` through, stamping ``entry.last_chunk`` before each (the last stamp stays)."""
    async for chunk in chunks:
        entry.last_chunk = time.perf_counter()
        yield chunk


def generated(max_tokens: int) -> str:
    """The text ``StubServer`` streams for ``max_tokens`` tokens."""
    return "".join(f" w{i}" for i in range(max_tokens))
