"""POST /v1/completions: prompts (text, token ids, or batches of either) -> text, streamed or not."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

from kvflow.engine.input_processor import check_cache_salt, check_utf8
from kvflow.outputs import PositionLogprobs, RequestOutput
from kvflow.server import serving
from kvflow.server.errors import APIError
from kvflow.server.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    PromptTokensDetails,
    UsageInfo,
)
from kvflow.server.serving import ServerContext


def _prompts(ctx: ServerContext, req: CompletionRequest) -> list[tuple[str | None, list[int]]]:
    """Normalise the four prompt forms to (text, token ids) pairs, validated and tokenised."""
    raw = req.prompt
    if isinstance(raw, str) or (raw and isinstance(raw[0], int)):
        items: list[Any] = [raw]
    else:
        items = list(raw)
    if not items:
        raise APIError(400, "prompt must not be empty", param="prompt")
    inputs = ctx.engine.inputs
    assert inputs is not None
    prompts = []
    for item in items:
        if isinstance(item, str):
            check_utf8(item, "prompt")
        text, ids = inputs.tokenize_prompt(item)
        serving.check_room(ctx, len(ids), req.max_tokens if "max_tokens" in req.model_fields_set else None)
        prompts.append((text, ids))
    return prompts


def start(ctx: ServerContext, req: CompletionRequest) -> tuple[str, list, list]:
    """Validate and admit; every error here is an HTTP status, raised before any response starts."""
    ctx.check_model(req.model)
    if req.suffix:
        raise APIError(400, "suffix is not supported", param="suffix")
    if req.best_of is not None and req.best_of != req.n:
        raise APIError(400, "best_of must equal n (beam search and best-of sampling are not supported)",
                       param="best_of")
    prompts = _prompts(ctx, req)
    echo_logprobs = req.logprobs if req.echo and req.logprobs is not None else None
    params = serving.sampling_params(ctx, req, req.max_tokens, req.logprobs, echo_logprobs)
    request_id = f"cmpl-{uuid.uuid4().hex}"
    salt = check_cache_salt(req.cache_salt) if req.cache_salt is not None else None
    return request_id, prompts, serving.start_requests(ctx, request_id, prompts, params, salt)


async def full_response(ctx: ServerContext, req: CompletionRequest, request_id: str,
                        streams: list) -> CompletionResponse:
    outputs = await serving.collect(ctx, streams)
    choices, completion_tokens, prompt_tokens, cached_tokens = [], 0, 0, 0
    for p, out in enumerate(outputs):
        prompt_tokens += len(out.prompt_token_ids)
        cached_tokens += out.num_cached_tokens
        for c in out.outputs:
            completion_tokens += len(c.token_ids)
            text, logprobs = c.text, None
            if req.logprobs is not None:
                logprobs = _logprobs(ctx, c.token_ids, c.logprobs or [], req.logprobs)
            if req.echo:
                prompt_text = _prompt_text(ctx, out)
                if req.logprobs is not None:
                    logprobs = _merge_logprobs(_prompt_logprobs(ctx, out, req.logprobs), logprobs, len(prompt_text))
                text = prompt_text + text
            choices.append(CompletionChoice(index=p * req.n + c.index, text=text, logprobs=logprobs,
                                            finish_reason=c.finish_reason, stop_reason=c.stop_reason))
    return CompletionResponse(id=request_id, created=ctx.created, model=ctx.served_model_name, choices=choices,
                              usage=UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                                              total_tokens=prompt_tokens + completion_tokens,
                                              prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens)))


async def stream_chunks(ctx: ServerContext, req: CompletionRequest, request_id: str,
                        streams: list) -> AsyncIterator[CompletionResponse]:
    offsets: dict[int, int] = {}  # choice index -> characters sent (text_offset of streamed logprobs)
    echoed: set[int] = set()
    prompt_lps: dict[int, list[PositionLogprobs | None]] = {}
    usage = UsageInfo()
    seen_prompts: set[int] = set()
    cached: dict[int, int] = {}
    async for p, out in serving.merge(ctx, streams):
        if p not in seen_prompts:
            seen_prompts.add(p)
            usage.prompt_tokens += len(out.prompt_token_ids)
        cached[p] = max(cached.get(p, 0), out.num_cached_tokens)
        if out.prompt_logprobs:
            prompt_lps.setdefault(p, []).extend(out.prompt_logprobs)
        choices = []
        for c in out.outputs:
            index = p * req.n + c.index
            usage.completion_tokens += len(c.token_ids)
            text, logprobs = c.text, None
            if req.logprobs is not None:
                logprobs = _logprobs(ctx, c.token_ids, c.logprobs or [], req.logprobs, offsets.get(index, 0))
            if req.echo and index not in echoed:
                echoed.add(index)
                prompt_text = _prompt_text(ctx, out)
                if req.logprobs is not None:
                    lp = _prompt_logprobs(ctx, out, req.logprobs, prompt_lps.get(p, []))
                    logprobs = _merge_logprobs(lp, logprobs, len(prompt_text))
                text = prompt_text + text
            offsets[index] = offsets.get(index, 0) + len(text)
            choices.append(CompletionChoice(index=index, text=text, logprobs=logprobs,
                                            finish_reason=c.finish_reason, stop_reason=c.stop_reason))
        if choices:
            yield CompletionResponse(id=request_id, created=ctx.created, model=ctx.served_model_name,
                                     choices=choices)
    if req.stream_options is not None and req.stream_options.include_usage:
        usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
        usage.prompt_tokens_details = PromptTokensDetails(cached_tokens=sum(cached.values()))
        yield CompletionResponse(id=request_id, created=ctx.created, model=ctx.served_model_name, choices=[],
                                 usage=usage)


def _prompt_text(ctx: ServerContext, out: RequestOutput) -> str:
    if out.prompt is not None:
        return out.prompt
    return ctx.tokenizer.decode(out.prompt_token_ids) if ctx.tokenizer is not None else ""


def _prompt_logprobs(ctx: ServerContext, out: RequestOutput, k: int,
                     positions: list[PositionLogprobs | None] | None = None) -> CompletionLogprobs:
    positions = out.prompt_logprobs if positions is None else positions
    return _logprobs(ctx, out.prompt_token_ids, positions or [], k)


def _logprobs(ctx: ServerContext, token_ids: list[int], positions: list[PositionLogprobs | None], k: int,
              offset: int = 0) -> CompletionLogprobs:
    """The legacy completions shape: parallel lists of tokens, logprobs, top-k dicts, text offsets."""
    result = CompletionLogprobs()
    for i, tid in enumerate(token_ids):
        position = positions[i] if i < len(positions) else None
        text = serving.token_text(ctx, tid, position)
        result.tokens.append(text)
        result.text_offset.append(offset)
        offset += len(text)
        if position is None or tid not in position:
            result.token_logprobs.append(None)
            result.top_logprobs.append(None)
            continue
        result.token_logprobs.append(serving.clamp(position[tid].logprob))
        top: dict[str, float] = {}
        for _, lp, t in serving.top_entries(position, k) + [(tid, serving.clamp(position[tid].logprob), text)]:
            top.setdefault(t, lp)  # tokens that decode alike share a key: keep the likelier
        result.top_logprobs.append(top)
    return result


def _merge_logprobs(prompt: CompletionLogprobs, output: CompletionLogprobs | None,
                    prompt_chars: int) -> CompletionLogprobs:
    if output is None:
        return prompt
    return CompletionLogprobs(
        text_offset=prompt.text_offset + [o + prompt_chars for o in output.text_offset],
        token_logprobs=prompt.token_logprobs + output.token_logprobs,
        tokens=prompt.tokens + output.tokens,
        top_logprobs=prompt.top_logprobs + output.top_logprobs,
    )
