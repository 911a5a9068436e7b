"""POST /v1/chat/completions: messages -> the model's chat template -> an assistant reply."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

from kvflow.engine.input_processor import check_cache_salt, check_utf8
from kvflow.outputs import PositionLogprobs
from kvflow.server import serving
from kvflow.server.errors import APIError
from kvflow.server.protocol import (
    ChatChoiceLogprobs,
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprob,
    ChatLogprobEntry,
    ChatMessage,
    ChatMessageOut,
    ChatStreamChoice,
    DeltaMessage,
    PromptTokensDetails,
    UsageInfo,
)
from kvflow.server.serving import ServerContext


def render_chat(ctx: ServerContext, messages: list[ChatMessage], add_generation_prompt: bool,
                check_length: bool = True) -> tuple[str, list[int]]:
    """Apply the tokenizer's chat template, then tokenise the text without adding special tokens
    (the template writes them), exactly as `apply_chat_template(tokenize=True)` does offline.
    Slow for big conversations: callers run it on the preprocessing pool. `check_length`: refuse a
    conversation past the context before tokenising all of it (not for /tokenize, which counts)."""
    tokenizer = ctx.tokenizer
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise APIError(400, "this model has no chat template; use /v1/completions", param="messages")
    conversation = []
    for message in messages:
        content = message.content
        if isinstance(content, list):
            content = "\n".join(part.text for part in content)
        conversation.append({**message.model_dump(exclude_none=True), "content": content or ""})
    try:
        text = tokenizer.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt,
                                             tokenize=False)
    except Exception as exc:  # jinja errors: the template refused these messages
        raise APIError(400, f"the chat template failed on these messages: {exc}", param="messages") from None
    check_utf8(text, "messages")
    if check_length:
        serving.check_text_length(ctx, text, "conversation")
    ids = tokenizer.encode(text, add_special_tokens=False)
    if not ids:
        raise APIError(400, "the rendered conversation is empty", param="messages")
    return text, ids


async def start(ctx: ServerContext, req: ChatCompletionRequest) -> tuple[str, list]:
    """Validate and admit (templating and tokenising on the preprocessing pool)."""
    lora = ctx.check_model(req.model)
    if req.tools:
        raise APIError(400, "tools are not supported", param="tools")
    if req.response_format and req.response_format.get("type", "text") != "text":
        raise APIError(400, "only response_format {\"type\": \"text\"} is supported", param="response_format")
    if req.top_logprobs and not req.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    text, ids = await ctx.preprocess.run(render_chat, ctx, req.messages, req.add_generation_prompt)
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    serving.check_room(ctx, len(ids), max_tokens, "conversation")
    params = serving.sampling_params(ctx, req, max_tokens, (req.top_logprobs or 0) if req.logprobs else None)
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    salt = check_cache_salt(req.cache_salt) if req.cache_salt is not None else None
    return request_id, serving.start_requests(ctx, request_id, [(text, ids)], params, salt, lora)


async def full_response(ctx: ServerContext, req: ChatCompletionRequest, request_id: str,
                        streams: list) -> ChatCompletionResponse:
    created = int(time.time())  # this request's, as OpenAI's `created` (taken as the request starts)
    (out,) = await serving.collect(ctx, streams)
    choices = []
    for c in out.outputs:
        logprobs = _logprobs(ctx, c.token_ids, c.logprobs or [], req.top_logprobs or 0) if req.logprobs else None
        choices.append(ChatCompletionChoice(index=c.index, message=ChatMessageOut(content=c.text),
                                            logprobs=logprobs, finish_reason=c.finish_reason,
                                            stop_reason=c.stop_reason))
    completion_tokens = sum(len(c.token_ids) for c in out.outputs)
    prompt_tokens = len(out.prompt_token_ids)
    details = PromptTokensDetails(cached_tokens=out.num_cached_tokens)
    return ChatCompletionResponse(id=request_id, created=created, model=ctx.model_name(req.model), choices=choices,
                                  usage=UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                                                  total_tokens=prompt_tokens + completion_tokens,
                                                  prompt_tokens_details=details))


async def stream_chunks(ctx: ServerContext, req: ChatCompletionRequest, request_id: str,
                        streams: list) -> AsyncIterator[ChatCompletionChunk]:
    created = int(time.time())  # one value for every chunk of this response, as OpenAI and vLLM send

    def chunk(choices: list[ChatStreamChoice], usage: UsageInfo | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=request_id, created=created, model=ctx.model_name(req.model),
                                   choices=choices, usage=usage)

    # OpenAI opens every choice with a role-only delta.
    yield chunk([ChatStreamChoice(index=i, delta=DeltaMessage(role="assistant", content="")) for i in range(req.n)])
    usage = UsageInfo()
    async for _, out in serving.merge(ctx, streams):
        usage.prompt_tokens = len(out.prompt_token_ids)
        usage.prompt_tokens_details = PromptTokensDetails(cached_tokens=out.num_cached_tokens)
        choices = []
        for c in out.outputs:
            usage.completion_tokens += len(c.token_ids)
            logprobs = _logprobs(ctx, c.token_ids, c.logprobs or [], req.top_logprobs or 0) if req.logprobs else None
            choices.append(ChatStreamChoice(index=c.index, delta=DeltaMessage(content=c.text), logprobs=logprobs,
                                            finish_reason=c.finish_reason, stop_reason=c.stop_reason))
        if choices:
            yield chunk(choices)
    if req.stream_options is not None and req.stream_options.include_usage:
        usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
        yield chunk([], usage)


def _logprobs(ctx: ServerContext, token_ids: list[int], positions: list[PositionLogprobs],
              k: int) -> ChatChoiceLogprobs:
    content = []
    for tid, position in zip(token_ids, positions):
        text = serving.token_text(ctx, tid, position)
        top = [ChatLogprob(token=t, logprob=lp, bytes=list(t.encode("utf-8")))
               for _, lp, t in serving.top_entries(position, k)]
        content.append(ChatLogprobEntry(token=text, logprob=serving.clamp(position[tid].logprob),
                                        bytes=list(text.encode("utf-8")), top_logprobs=top))
    return ChatChoiceLogprobs(content=content)

