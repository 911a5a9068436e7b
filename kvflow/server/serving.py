"""What both generation endpoints need: request -> SamplingParams, fan-in of several prompts'
streams, folding deltas into a final output, disconnect watching, SSE framing, logprob text.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError

from kvflow.lora_request import AdapterRef
from kvflow.outputs import CompletionOutput, PositionLogprobs, RequestOutput
from kvflow.sampling_params import SamplingParams
from kvflow.server.async_engine import AsyncEngine, OverloadedError, RequestStream
from kvflow.server.errors import APIError, error_body, to_api_error
from kvflow.server.protocol import SamplingFields

T = TypeVar("T")
_MIN_LOGPROB = -9999.0  # JSON has no -inf


class Preprocessor:
    """Request work that can take long — tokenising, chat templates, detokenising — on a bounded pool
    of threads, off the event loop: a 7 MB prompt took 8 s to tokenise, and on the loop it stalled
    /health and every stream for that long (the tokenizers release the GIL; Python code between
    their calls gives the loop its turn every switch interval). At most `max_pending` jobs run or
    wait; more are refused with 503 + Retry-After (load that passes), like the engine's queue."""

    def __init__(self, workers: int = 2, max_pending: int = 256,
                 on_reject: Callable[[], None] | None = None) -> None:
        self.workers, self.max_pending, self.on_reject = workers, max_pending, on_reject
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kvflow-preprocess")
        self._pending = 0

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        if self._pending >= self.max_pending:
            if self.on_reject is not None:
                self.on_reject()
            raise OverloadedError(f"the server is overloaded: {self._pending} requests are being tokenised, "
                                  f"at most {self.max_pending}")
        self._pending += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, functools.partial(fn, *args))
        finally:
            self._pending -= 1

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


@dataclass
class ServerContext:
    """What the routes share: the engine, the model's identity, the pool for slow request work."""

    engine: AsyncEngine
    tokenizer: Any
    served_model_name: str
    max_model_len: int
    created: int = field(default_factory=lambda: int(time.time()))
    preprocess: Preprocessor = field(default_factory=Preprocessor)

    def __post_init__(self) -> None:
        if self.preprocess.on_reject is None:  # its 503s count as the engine queue's do
            self.preprocess.on_reject = lambda: self.engine.metrics.rejected("overloaded")

    def check_model(self, model: str | None) -> AdapterRef | None:
        """The request's `model`: the base (None, or the served name), or a LoRA adapter's or model variant's
        name (its ref); anything else is a 404 in OpenAI's format."""
        if model is None or model == self.served_model_name:
            return None
        ref = self.engine.registry.get(model)
        if ref is None:
            names = [self.served_model_name, *(r.name for r in self.engine.registry.refs())]
            raise APIError(404, f"The model `{model}` does not exist; this server serves "
                           f"{', '.join(f'`{n}`' for n in names)}", param="model", code="model_not_found")
        return ref

    def model_name(self, model: str | None) -> str:
        """The `model` a response names: the adapter or variant asked for, else the served model."""
        return model if model is not None and self.engine.registry.get(model) is not None else self.served_model_name


def sampling_params(ctx: ServerContext, req: SamplingFields, max_tokens: int | None, logprobs: int | None,
                    prompt_logprobs: int | None = None) -> SamplingParams:
    """OpenAI fields over the model's generation-config defaults; range errors become 400s."""
    if req.logit_bias:
        raise APIError(400, "logit_bias is not supported", param="logit_bias")
    values: dict[str, Any] = dict(ctx.engine.inputs.generation_defaults()) if ctx.engine.inputs else {}
    for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty"):
        value = getattr(req, name)
        if value is not None:
            values[name] = value
    values.update(
        n=req.n, seed=req.seed, presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
        stop=req.stop, stop_token_ids=req.stop_token_ids, max_tokens=max_tokens, min_tokens=req.min_tokens,
        ignore_eos=req.ignore_eos, include_stop_str_in_output=req.include_stop_str_in_output,
        skip_special_tokens=req.skip_special_tokens, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
        kv_policy=req.kv_policy, kv_budget=req.kv_budget, speculative=req.speculative,
    )
    try:
        return SamplingParams(**values)
    except ValidationError as exc:  # one clean message, naming the field
        first = exc.errors()[0]
        message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
        raise APIError(400, message, param=str(first["loc"][0]) if first.get("loc") else None,
                       code="invalid_value") from None


#: The first probe of `check_text_length` reads this many characters per token of context (English
#: text averages about 4); each further probe doubles it.
_PROBE_CHARS_PER_TOKEN = 4


def check_text_length(ctx: ServerContext, text: str, what: str = "prompt") -> None:
    """Refuse a text that cannot fit the context before tokenising all of it: tokenise growing
    prefixes (cut at a space), and stop as soon as one holds more tokens than the context. The work
    is then bounded by the context, not by the text (up to the 8 MiB body limit); a text that fits
    costs at most about twice one full tokenisation."""
    limit, tokenizer = ctx.max_model_len, ctx.tokenizer
    probe = (limit + 1) * _PROBE_CHARS_PER_TOKEN
    while tokenizer is not None and probe < len(text):
        cut = text.rfind(" ", probe - 256, probe)  # a word boundary: the prefix tokenises as in the whole
        prefix = text[:cut if cut > 0 else probe]
        count = len(tokenizer.encode(prefix, add_special_tokens=False))
        if count > limit:
            raise _too_long(ctx, what, f"more than {count} tokens (that many in its first {len(prefix)} of "
                                       f"{len(text)} characters)")
        probe *= 2


def _too_long(ctx: ServerContext, what: str, size: str) -> APIError:
    """The 400 for a prompt (or a chat's conversation) that does not fit the context."""
    return APIError(400, f"This model's maximum context length is {ctx.max_model_len} tokens. However, the {what} "
                    f"has {size}. Please reduce the {what}.", param="messages" if what == "conversation" else "prompt",
                    code="context_length_exceeded")


def check_room(ctx: ServerContext, num_prompt_tokens: int, max_tokens: int | None, what: str = "prompt") -> None:
    """Like OpenAI: asking for more tokens than the context leaves is an error, not a silent cap. A prompt
    that fills the context is refused here too, with the same code as one found too long from a prefix
    (`check_text_length`), whatever its length."""
    if num_prompt_tokens > ctx.max_model_len - (0 if max_tokens == 0 else 1):  # max_tokens 0: prompt scoring
        raise _too_long(ctx, what, f"{num_prompt_tokens} tokens, leaving no room for the completion")
    if max_tokens is not None and num_prompt_tokens + max_tokens > ctx.max_model_len:
        raise APIError(
            400, f"This model's maximum context length is {ctx.max_model_len} tokens. However, you requested "
            f"{num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in the prompt, {max_tokens} for the "
            "completion). Please reduce the prompt or max_tokens.", param="max_tokens", code="context_length_exceeded")


def start_requests(ctx: ServerContext, base_id: str, prompts: list[tuple[str | None, list[int]]],
                   params: SamplingParams, cache_salt: str | None = None,
                   lora: AdapterRef | None = None) -> list[RequestStream]:
    """Admit every prompt or none: a refusal half way aborts the ones already admitted. A request
    the server could never admit (more sequences than may wait at once) is a 400, not a 503 that
    clients would retry forever."""
    never = ctx.engine.never_admitted(len(prompts) * params.n)
    if never is not None:
        raise APIError(400, never, param="prompt" if len(prompts) > 1 else "n", code="request_too_large")
    ctx.engine.check_admission(len(prompts) * params.n)  # all or none: no batch admitted half, then aborted
    streams: list[RequestStream] = []
    try:
        for i, (text, ids) in enumerate(prompts):
            request_id = base_id if len(prompts) == 1 else f"{base_id}-{i}"
            streams.append(ctx.engine.add_request(request_id, text, ids, params, cache_salt, lora))
    except BaseException:
        for stream in streams:
            ctx.engine.abort(stream.request_id)
        raise
    return streams


async def merge(ctx: ServerContext, streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Outputs of several requests as they come, tagged with the prompt index."""
    iterators = [ctx.engine.iterate(s) for s in streams]
    if len(iterators) == 1:
        async for output in iterators[0]:
            yield 0, output
        return
    queue: asyncio.Queue[tuple[int, RequestOutput | None, BaseException | None]] = asyncio.Queue()

    async def pump(i: int, it: AsyncIterator[RequestOutput]) -> None:
        try:
            async for output in it:
                queue.put_nowait((i, output, None))
            queue.put_nowait((i, None, None))
        except Exception as exc:
            queue.put_nowait((i, None, exc))

    tasks = [asyncio.create_task(pump(i, it)) for i, it in enumerate(iterators)]
    try:
        remaining = len(tasks)
        while remaining:
            i, output, error = await queue.get()
            if error is not None:
                raise error
            if output is None:
                remaining -= 1
            else:
                yield i, output
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class Accumulator:
    """Folds one request's delta outputs into the cumulative output a plain response needs."""

    def __init__(self) -> None:
        self.output: RequestOutput | None = None
        self.by_index: dict[int, CompletionOutput] = {}

    def add(self, delta: RequestOutput) -> None:
        if self.output is None:
            self.output = RequestOutput(delta.request_id, delta.prompt, delta.prompt_token_ids, [],
                                        prompt_logprobs=[] if delta.prompt_logprobs is not None else None)
        out = self.output
        if delta.prompt_logprobs and out.prompt_logprobs is not None:
            out.prompt_logprobs.extend(delta.prompt_logprobs)
        out.finished, out.num_cached_tokens = delta.finished, delta.num_cached_tokens
        for c in delta.outputs:
            acc = self.by_index.setdefault(c.index, CompletionOutput(
                c.index, "", [], logprobs=[] if c.logprobs is not None else None))
            acc.text += c.text
            acc.token_ids.extend(c.token_ids)
            if c.logprobs is not None and acc.logprobs is not None:
                acc.logprobs.extend(c.logprobs)
            acc.cumulative_logprob, acc.finish_reason, acc.stop_reason = (
                c.cumulative_logprob, c.finish_reason, c.stop_reason)

    def result(self) -> RequestOutput:
        assert self.output is not None
        self.output.outputs = [self.by_index[i] for i in sorted(self.by_index)]
        return self.output


async def collect(ctx: ServerContext, streams: list[RequestStream]) -> list[RequestOutput]:
    accumulators = [Accumulator() for _ in streams]
    async for i, delta in merge(ctx, streams):
        accumulators[i].add(delta)
    return [a.result() for a in accumulators]


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Run `work` unless the client hangs up first; then cancel it (which aborts its requests)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    if task.cancelled():
        raise APIError(499, "client disconnected")
    return task.result()


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def sse(chunks: AsyncIterator[BaseModel | dict[str, Any]]) -> AsyncIterator[str]:
    """Server-sent events; an error after the 200 went out is sent as an error event."""
    try:
        async for chunk in chunks:
            data = json.dumps(chunk) if isinstance(chunk, dict) else chunk.model_dump_json()
            yield f"data: {data}\n\n"
    except Exception as exc:
        err = to_api_error(exc)
        yield f"data: {json.dumps(error_body(err.status, err.message, err.param, err.code))}\n\n"
    yield "data: [DONE]\n\n"


def clamp(logprob: float) -> float:
    return max(logprob, _MIN_LOGPROB)


def token_text(ctx: ServerContext, token_id: int, position: PositionLogprobs | None) -> str:
    entry = position.get(token_id) if position else None
    if entry is not None and entry.decoded_token is not None:
        return entry.decoded_token
    return ctx.tokenizer.decode([token_id]) if ctx.tokenizer is not None else f"token_id:{token_id}"


def top_entries(position: PositionLogprobs, k: int) -> list[tuple[int, float, str]]:
    """The k best-ranked (token id, logprob, text) of one position."""
    ranked = sorted((lp.rank, tid, lp) for tid, lp in position.items() if lp.rank is not None and lp.rank <= k)
    return [(tid, clamp(lp.logprob), lp.decoded_token or "") for _, tid, lp in ranked]
