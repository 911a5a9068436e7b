"""The FastAPI application: routes, API-key and body-size guards, engine lifespan.

Routes stay thin: validate and admit synchronously (so every refusal is a proper HTTP status),
then either stream SSE chunks or await the whole answer while watching for a client hang-up.
"""

from __future__ import annotations

import functools
import hmac
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kvflow.engine.input_processor import check_utf8
from kvflow.server import serving_chat, serving_completions
from kvflow.server.async_engine import RequestStream
from kvflow.server.errors import (
    APIError,
    error_body,
    error_response,
    install_error_handlers,
)
from kvflow.server.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    LoadLoRAAdapterRequest,
    ModelCard,
    ModelList,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    TokenizeResponse,
    UnloadLoRAAdapterRequest,
    VersionResponse,
)
from kvflow.server.serving import ServerContext, sse, until_disconnect
from kvflow.version import __version__

logger = logging.getLogger(__name__)

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 503)
}


def build_app(ctx: ServerContext, api_key: str | None = None, max_body_bytes: int = 8 << 20,
              allow_runtime_lora: bool = False) -> FastAPI:
    """`allow_runtime_lora`: add /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's routes); they
    change what every client is served, so they exist only behind an API key."""
    if allow_runtime_lora and not api_key:
        raise ValueError("--allow-runtime-lora needs --api-key: loading adapters changes what every client is served")
    if allow_runtime_lora and not ctx.engine.registry.enabled:
        raise ValueError("--allow-runtime-lora needs --enable-lora")
    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await ctx.engine.start()
        logger.info("engine ready (%s); serving %s", ctx.engine.describe(), ctx.served_model_name)
        try:
            yield
        finally:
            ctx.preprocess.shutdown()
            await ctx.engine.shutdown()
            logger.info("engine core stopped")

    app = FastAPI(title="kvflow", version=__version__, lifespan=lifespan, responses=_ERRORS)
    install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_body_bytes)
    if api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=api_key)

    @app.post("/v1/completions", response_model=None, responses=_stream_doc(CompletionResponse))
    async def completions(body: CompletionRequest, request: Request) -> Any:
        request_id, _, streams = await serving_completions.start(ctx, body)
        if body.stream:
            chunks = serving_completions.stream_chunks(ctx, body, request_id, streams)
            return EngineStreamingResponse(ctx, streams, sse(chunks))
        try:
            response = await until_disconnect(
                request, serving_completions.full_response(ctx, body, request_id, streams))
        finally:
            abort_all(ctx, streams)
        return Response(response.model_dump_json(), media_type="application/json")

    @app.post("/v1/chat/completions", response_model=None, responses=_stream_doc(ChatCompletionResponse))
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        request_id, streams = await serving_chat.start(ctx, body)
        if body.stream:
            chunks = serving_chat.stream_chunks(ctx, body, request_id, streams)
            return EngineStreamingResponse(ctx, streams, sse(chunks))
        try:
            response = await until_disconnect(request, serving_chat.full_response(ctx, body, request_id, streams))
        finally:
            abort_all(ctx, streams)
        return Response(response.model_dump_json(), media_type="application/json")

    @app.get("/v1/models")
    async def models() -> ModelList:
        # `root` names the model as clients know it, never the server's disk path; adapters name their parent.
        base = ctx.served_model_name
        cards = [ModelCard(id=base, created=ctx.created, root=base, max_model_len=ctx.max_model_len)]
        cards += [ModelCard(id=ref.name, created=ctx.created, root=ref.name, parent=base,
                            max_model_len=ctx.max_model_len) for ref in ctx.engine.registry.refs()]
        return ModelList(data=cards)

    if allow_runtime_lora:
        @app.post("/v1/load_lora_adapter")
        async def load_lora_adapter(body: LoadLoRAAdapterRequest) -> Response:
            if body.lora_name == ctx.served_model_name:
                raise APIError(400, f"`{body.lora_name}` is the base model's name", param="lora_name")
            try:
                ref = await ctx.preprocess.run(ctx.engine.registry.add, body.lora_name, body.lora_path)
            except ValueError as e:
                raise APIError(400, str(e), param="lora_path", code="invalid_adapter") from None
            logger.info("loaded LoRA adapter %s (digest %s)", ref.name, ref.digest)
            return Response(f"Success: LoRA adapter '{ref.name}' added successfully.", media_type="text/plain")

        @app.post("/v1/unload_lora_adapter")
        async def unload_lora_adapter(body: UnloadLoRAAdapterRequest) -> Response:
            try:
                ref = ctx.engine.registry.remove(body.lora_name)
            except LookupError as e:
                raise APIError(404, str(e).strip("'\""), param="lora_name", code="model_not_found") from None
            logger.info("unloaded LoRA adapter %s", ref.name)
            return Response(f"Success: LoRA adapter '{ref.name}' removed successfully.", media_type="text/plain")

    @app.get("/health", responses={503: {"model": ErrorResponse}})
    async def health() -> Response:
        reason = ctx.engine.dead_reason
        if reason is not None:
            return error_response(503, reason, code="engine_dead")
        instances = ctx.engine.health()
        if instances is None:
            return Response(status_code=200)
        return JSONResponse({"status": "ok", "instances": instances})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(ctx.engine.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/version")
    async def version() -> VersionResponse:
        return VersionResponse(version=__version__)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeCompletionRequest | TokenizeChatRequest) -> TokenizeResponse:
        ctx.check_model(body.model)
        if isinstance(body, TokenizeChatRequest):
            tokens = (await ctx.preprocess.run(serving_chat.render_chat, ctx, body.messages,
                                               body.add_generation_prompt, False))[1]
        else:
            if ctx.tokenizer is None:
                raise APIError(400, "this model has no tokenizer")
            check_utf8(body.prompt, "prompt")
            tokens = await ctx.preprocess.run(
                functools.partial(ctx.tokenizer.encode, body.prompt, add_special_tokens=body.add_special_tokens))
        return TokenizeResponse(count=len(tokens), max_model_len=ctx.max_model_len, tokens=tokens)

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> DetokenizeResponse:
        ctx.check_model(body.model)
        if ctx.tokenizer is None:
            raise APIError(400, "this model has no tokenizer")
        vocab = ctx.engine.config.model.vocab_size
        bad = next((t for t in body.tokens if not 0 <= t < vocab), None)
        if bad is not None:
            raise APIError(400, f"token id {bad} is outside the vocabulary [0, {vocab})", param="tokens")
        return DetokenizeResponse(prompt=await ctx.preprocess.run(ctx.tokenizer.decode, body.tokens))

    return app


def _stream_doc(model: type) -> dict[int | str, dict[str, Any]]:
    return {200: {"model": model, "description": "The answer; with `stream: true`, server-sent events of "
                  "chunks (`data: {...}`) ending with `data: [DONE]`.",
                  "content": {"text/event-stream": {}}}}


def abort_all(ctx: ServerContext, streams: list[RequestStream]) -> None:
    """Abort whatever is still running (idempotent): the last word on every request path."""
    for stream in streams:
        ctx.engine.abort(stream.request_id)


class EngineStreamingResponse(StreamingResponse):
    """SSE that aborts its requests however the response ends, even before the body started."""

    def __init__(self, ctx: ServerContext, streams: list[RequestStream], content: AsyncIterator[str]) -> None:
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self._ctx, self._streams = ctx, streams

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            abort_all(self._ctx, self._streams)


#: Routes outside /v1/ that need the API key too: they run the tokenizer on a client's text (unguarded,
#: a stranger could keep the server's tokenisation pool busy). /health, /metrics, /version stay open.
GUARDED_PATHS = frozenset({"/tokenize", "/detokenize"})


class ApiKeyMiddleware:
    """Every /v1/* route and /tokenize, /detokenize need `Authorization: Bearer <key>` (constant-time
    comparison)."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] == "http" and (path.startswith("/v1/") or path.rstrip("/") in GUARDED_PATHS) \
                and scope["method"] != "OPTIONS":
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                response = JSONResponse(error_body(401, "invalid or missing API key (Authorization: Bearer ...)",
                                                   code="invalid_api_key"), status_code=401,
                                        headers={"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """Refuse bodies over the limit with 413 before parsing them (by Content-Length, or by counting),
    and bodies that are not UTF-8 with a 400 that says so."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await self._too_large(scope, receive, send)
            return
        # Read the whole body (it is bounded), then replay it: no parser sees more than the limit.
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # client went away before sending the body
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.max_bytes:
                await self._too_large(scope, receive, send)
                return
        body, replayed = b"".join(chunks), False
        try:
            body.decode("utf-8")  # JSON on the wire is UTF-8 (RFC 8259); say so, not "parse error"
        except UnicodeDecodeError as exc:
            response = JSONResponse(error_body(400, f"request body is not valid UTF-8 (byte {exc.start})",
                                               code="invalid_encoding"), status_code=400)
            await response(scope, receive, send)
            return

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = JSONResponse(error_body(413, f"request body is larger than {self.max_bytes} bytes",
                                           code="request_too_large"), status_code=413)
        await response(scope, receive, send)
