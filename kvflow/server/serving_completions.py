"""POST /v1/completions: prompts (text, token ids, or batches of either) -> text, streamed or not."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from kvflow.engine.detokenizer import IncrementalDetokenizer
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
            serving.check_text_length(ctx, item)
        text, ids = inputs.tokenize_prompt(item)
        serving.check_room(ctx, len(ids), req.max_tokens if "max_tokens" in req.model_fields_set else None)
        prompts.append((text, ids))
    return prompts


async def start(ctx: ServerContext, req: CompletionRequest) -> tuple[str, list, list]:
    """Validate and admit; every error here is an HTTP status, raised before any response starts.
    Tokenising runs on the preprocessing pool, off the event loop."""
    lora = ctx.check_model(req.model)
    if req.suffix:
        raise APIError(400, "suffix is not supported", param="suffix")
    if req.best_of is not None and req.best_of != req.n:
        raise APIError(400, "best_of must equal n (beam search and best-of sampling are not supported)",
                       param="best_of")
    prompts = await ctx.preprocess.run(_prompts, ctx, req)
    params = serving.sampling_params(ctx, req, req.max_tokens, req.logprobs, _echo_logprobs(req))
    request_id = f"cmpl-{uuid.uuid4().hex}"
    salt = check_cache_salt(req.cache_salt) if req.cache_salt is not None else None
    return request_id, prompts, serving.start_requests(ctx, request_id, prompts, params, salt, lora)


async def full_response(ctx: ServerContext, req: CompletionRequest, request_id: str,
                        streams: list) -> CompletionResponse:
    created = int(time.time())  # this request's, as OpenAI's `created` (taken as the request starts)
    outputs = await serving.collect(ctx, streams)
    choices, completion_tokens, prompt_tokens, cached_tokens = [], 0, 0, 0
    for p, out in enumerate(outputs):
        prompt_tokens += len(out.prompt_token_ids)
        cached_tokens += out.num_cached_tokens
        prompt_text = _prompt_text(ctx, out) if req.echo else ""
        prompt_lps = None
        if req.echo and req.logprobs is not None:
            prompt_lps = _logprobs(ctx, out.prompt_token_ids, out.prompt_logprobs or [], req.logprobs)
            prompt_lps.text_offset = _prompt_offsets(ctx, prompt_text, out.prompt_token_ids, prompt_lps.tokens)
        for c in out.outputs:
            completion_tokens += len(c.token_ids)
            logprobs = None
            if req.logprobs is not None:
                logprobs = _logprobs(ctx, c.token_ids, c.logprobs or [], req.logprobs)
                tracker = _TokenOffsets(ctx, out.prompt_token_ids, req.skip_special_tokens, len(prompt_text))
                logprobs.text_offset = tracker.take(c.token_ids, logprobs.tokens, end=len(prompt_text) + len(c.text))
                if prompt_lps is not None:
                    logprobs = _merge_logprobs(prompt_lps, logprobs)
            choices.append(CompletionChoice(index=p * req.n + c.index, text=prompt_text + c.text, logprobs=logprobs,
                                            finish_reason=c.finish_reason, stop_reason=c.stop_reason))
    return CompletionResponse(id=request_id, created=created, model=ctx.model_name(req.model), choices=choices,
                              usage=UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                                              total_tokens=prompt_tokens + completion_tokens,
                                              prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens)))


async def stream_chunks(ctx: ServerContext, req: CompletionRequest, request_id: str,
                        streams: list) -> AsyncIterator[CompletionResponse]:
    created = int(time.time())  # one value for every chunk of this response, as OpenAI and vLLM send
    sent: dict[int, int] = {}  # choice index -> characters of its text sent so far
    token_offsets: dict[int, _TokenOffsets] = {}  # choice index -> where its next token starts
    echoed: set[int] = set()
    prompt_lps: dict[int, list[PositionLogprobs | None]] = {}
    prompt_offsets: dict[int, list[int]] = {}
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
            echo = req.echo and index not in echoed  # a choice's first chunk opens with the prompt
            if echo:
                echoed.add(index)
            prompt_text = _prompt_text(ctx, out) if echo else ""
            text, logprobs = prompt_text + c.text, None
            if req.logprobs is not None:
                if index not in token_offsets:
                    token_offsets[index] = _TokenOffsets(ctx, out.prompt_token_ids, req.skip_special_tokens,
                                                         len(prompt_text))
                # A finished choice's text is complete: a token cut off by a stop string sits at its end.
                end = sent.get(index, 0) + len(text) if c.finish_reason is not None else None
                logprobs = _logprobs(ctx, c.token_ids, c.logprobs or [], req.logprobs)
                logprobs.text_offset = token_offsets[index].take(c.token_ids, logprobs.tokens, end=end)
                if echo:
                    prompt = _logprobs(ctx, out.prompt_token_ids, prompt_lps.get(p, []), req.logprobs)
                    if p not in prompt_offsets:  # the same for each of the prompt's n choices
                        prompt_offsets[p] = _prompt_offsets(ctx, prompt_text, out.prompt_token_ids, prompt.tokens)
                    prompt.text_offset = prompt_offsets[p]
                    logprobs = _merge_logprobs(prompt, logprobs)
            sent[index] = sent.get(index, 0) + len(text)
            choices.append(CompletionChoice(index=index, text=text, logprobs=logprobs,
                                            finish_reason=c.finish_reason, stop_reason=c.stop_reason))
        if choices:
            yield CompletionResponse(id=request_id, created=created, model=ctx.model_name(req.model), choices=choices)
    if req.stream_options is not None and req.stream_options.include_usage:
        usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
        usage.prompt_tokens_details = PromptTokensDetails(cached_tokens=sum(cached.values()))
        yield CompletionResponse(id=request_id, created=created, model=ctx.model_name(req.model), choices=[],
                                 usage=usage)


def _echo_logprobs(req: CompletionRequest) -> int | None:
    """The prompt logprobs to ask the engine for: `logprobs` when echoing. `echo` with `max_tokens: 0`
    asks for the prompt alone, and the engine runs such a request only to score its prompt (a
    request without `logprobs` gets them computed, and not returned)."""
    if not req.echo:
        return None
    if req.logprobs is not None:
        return req.logprobs
    return 0 if req.max_tokens == 0 else None


def _prompt_text(ctx: ServerContext, out: RequestOutput) -> str:
    if out.prompt is not None:
        return out.prompt
    return ctx.tokenizer.decode(out.prompt_token_ids) if ctx.tokenizer is not None else ""


def _own_start(piece: str, own: str) -> int:
    """Where a token's own text starts in the text its decode added (`piece`): a piece can open with
    the text of tokens held back before it (bytes that made no character, shown as U+FFFD) or with a
    space the decoder puts before a word. 0 when the token's own text is not in it (a special token
    left out, one byte of a character, whose own text is U+FFFD)."""
    if own and "\ufffd" not in own and len(piece) > len(own) and piece.endswith(own):
        return len(piece) - len(own)
    return 0


def _prompt_offsets(ctx: ServerContext, text: str, token_ids: list[int], own_texts: list[str]) -> list[int]:
    """Where each prompt token starts in the echoed prompt `text` (non-decreasing, at most len(text)).

    The tokens are decoded again one by one, in context and with their special tokens (a token-id
    prompt's echo is its decode, which shows them), and the text each adds is matched at the running
    position. A token whose text the echo does not hold takes no room: it sits where it would be,
    and its `tokens` entry stays its own text (the BOS a tokenizer adds to a string prompt: offset 0,
    "<|bos|>" or "<s>", as vLLM reports it). The bytes of a character split over several tokens
    (each one's own text is U+FFFD) all start where the character does. Exact whenever the echo is
    the prompt's decode, special tokens aside (byte-level BPE); where a decoder changes the text (a
    SentencePiece leading space) it follows token by token."""
    if ctx.tokenizer is None:
        return [0] * len(token_ids)
    special = set(getattr(ctx.tokenizer, "all_special_ids", ()))
    detok = IncrementalDetokenizer(ctx.tokenizer, [], skip_special_tokens=False)
    offsets, cursor = [], 0
    for tid, own in zip(token_ids, own_texts):
        detok.update([tid])
        piece = detok.get_delta(False)  # "" while a character is incomplete
        if not piece or text.startswith(piece, cursor):
            offsets.append(cursor + _own_start(piece, own))
            cursor += len(piece)
            continue
        offsets.append(cursor)
        if tid in special:
            pass  # not in the echo (a BOS added by the tokenizer)
        elif (stripped := piece.lstrip()) and text.startswith(stripped, cursor):
            cursor += len(stripped)  # the decode added a leading space the prompt does not have
        else:
            cursor = min(len(text), cursor + len(piece))  # the texts differ here: keep step
    return offsets


class _TokenOffsets:
    """Where each completion token of one choice starts in the choice's text: the tokens are decoded
    again as the engine's detokenizer did (seeded with the prompt's tail, the same special-token rule),
    so the offsets follow the text, not the tokens' own texts (a character split over several byte
    tokens is one character of text, where all of them start; a skipped special token takes no room)."""

    def __init__(self, ctx: ServerContext, prompt_token_ids: list[int], skip_special_tokens: bool,
                 start: int) -> None:
        self._detok = (IncrementalDetokenizer(ctx.tokenizer, prompt_token_ids, skip_special_tokens=skip_special_tokens)
                       if ctx.tokenizer is not None else None)
        self._position = start

    def take(self, token_ids: list[int], own_texts: list[str], end: int | None = None) -> list[int]:
        """The next tokens' offsets; `end`: the text's end once it is complete (tokens past a stop string,
        which the text leaves out, sit there)."""
        offsets = []
        for tid, own in zip(token_ids, own_texts):
            piece = ""
            if self._detok is not None:
                self._detok.update([tid])
                piece = self._detok.get_delta(False)
            offset = self._position + _own_start(piece, own)
            offsets.append(offset if end is None else min(offset, end))
            self._position += len(piece)
        return offsets


def _logprobs(ctx: ServerContext, token_ids: list[int], positions: list[PositionLogprobs | None],
              k: int) -> CompletionLogprobs:
    """The legacy completions shape: parallel lists of tokens, logprobs, top-k dicts, and text offsets,
    which the caller sets (`_prompt_offsets`, `_TokenOffsets`: each token's position in the choice's text)."""
    result = CompletionLogprobs()
    for i, tid in enumerate(token_ids):
        position = positions[i] if i < len(positions) else None
        text = serving.token_text(ctx, tid, position)
        result.tokens.append(text)
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


def _merge_logprobs(prompt: CompletionLogprobs, output: CompletionLogprobs | None) -> CompletionLogprobs:
    if output is None:
        return prompt
    return CompletionLogprobs(
        text_offset=prompt.text_offset + output.text_offset,
        token_logprobs=prompt.token_logprobs + output.token_logprobs,
        tokens=prompt.tokens + output.tokens,
        top_logprobs=prompt.top_logprobs + output.top_logprobs,
    )
