"""AsyncEngine: the server's view of the engine, one async stream of outputs per request.

Intake (tokenise, validate, fan out) and output (detokenise, stop strings) run here, on the
event loop, with the same code the offline `LLMEngine` uses; only token ids cross to the core
process (`CoreClient`). It also owns admission control (a bounded queue: beyond it requests are
refused instead of piling up), the request metrics, and failing every open stream when the
core dies.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from kvflow.config import EngineConfig
from kvflow.core.request import RequestStatus
from kvflow.engine.core_client import CoreClient, EngineDeadError
from kvflow.engine.input_processor import CoreRequestSpec, InputProcessor
from kvflow.engine.messages import StepOutputs
from kvflow.engine.model_registry import ModelRegistry
from kvflow.engine.output_processor import OutputKind, OutputProcessor
from kvflow.lora_request import AdapterRef
from kvflow.outputs import RequestOutput
from kvflow.sampling_params import SamplingParams
from kvflow.server.metrics import ServerMetrics

logger = logging.getLogger(__name__)


class OverloadedError(RuntimeError):
    """The waiting queue is full; the client should retry later."""


@dataclass
class _Timing:
    arrival: float
    num_prompt_tokens: int
    first_token: float | None = None
    last_token: float | None = None
    num_generated: int = 0
    queued_seen: bool = False
    scheduled: float | None = None  # the core's clock: first scheduled (of its first sequence)


class RequestStream:
    """Outputs of one request, in order; `get()` raises the error that ended it, if any."""

    def __init__(self, request_id: str, num_seqs: int) -> None:
        self.request_id = request_id
        self.num_seqs = num_seqs
        self._items: deque[RequestOutput] = deque()
        self._error: BaseException | None = None
        self._ready = asyncio.Event()
        self.finished = False

    def put(self, output: RequestOutput) -> None:
        self._items.append(output)
        self._ready.set()

    def fail(self, error: BaseException) -> None:
        self._error = error
        self._ready.set()

    async def get(self) -> RequestOutput:
        while not self._items:
            if self._error is not None:
                raise self._error
            self._ready.clear()
            await self._ready.wait()
        return self._items.popleft()


class AsyncEngine:
    def __init__(self, config: EngineConfig, tokenizer: Any | None, metrics: ServerMetrics,
                 max_waiting_requests: int) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.metrics = metrics
        if max_waiting_requests < 1:
            raise ValueError(f"--max-waiting-requests must be >= 1 (every request waits before its first step), "
                             f"got {max_waiting_requests}")
        self.max_waiting_requests = max_waiting_requests
        self.registry = ModelRegistry(config)  # adapters are checked here, before the core ever starts
        self.core = CoreClient(config, self._on_outputs, self._on_death)
        self.inputs: InputProcessor | None = None
        self.outputs = OutputProcessor(tokenizer)
        self._streams: dict[str, RequestStream] = {}
        self._timing: dict[str, _Timing] = {}
        self._waiting_seqs = 0  # see num_waiting_seqs

    async def start(self) -> None:
        try:
            await self.core.start()
        except BaseException:
            await self.core.shutdown()  # reap the process, remove the sockets
            raise
        self.inputs = InputProcessor(self.config, self.tokenizer, self.core.num_blocks, self.core.kv_layer_groups)

    async def shutdown(self) -> None:
        for request_id in list(self._streams):
            self.abort(request_id)
        await self.core.shutdown()

    def health(self) -> dict[str, Any] | None:
        """Per-instance states, for deployments of several engine processes (None: just one)."""
        return None

    def describe(self) -> str:
        return f"engine core pid {self.core.pid}, {self.core.num_blocks} KV blocks"

    @property
    def dead_reason(self) -> str | None:
        return self.core.dead_reason

    @property
    def num_in_flight(self) -> int:
        return len(self._streams)

    @property
    def num_waiting_seqs(self) -> int:
        """Sequences of requests admitted here that the core has not started yet (none of their
        sequences scheduled): what `--max-waiting-requests` bounds. Running ones are bounded by the
        engine (max_num_seqs, KV memory); counting those too made the flag useless wherever memory,
        not max_num_seqs, limits the batch. A started request's siblings and preempted sequences that
        wait again in the core are not counted: the flag bounds admission, not the core's queue."""
        return self._waiting_seqs

    def check_admission(self, num_seqs: int) -> None:
        """Raise OverloadedError when `num_seqs` more sequences would exceed the waiting bound (a 503
        with Retry-After: load that passes). Checked for a whole request before any of it is admitted."""
        waiting = self._waiting_seqs
        if waiting + num_seqs > self.max_waiting_requests:
            self.metrics.rejected("overloaded")
            raise OverloadedError(
                f"the server is overloaded: {waiting} sequences are waiting to start, "
                f"at most {self.max_waiting_requests} (--max-waiting-requests)"
            )

    def never_admitted(self, num_seqs: int) -> str | None:
        """Why a request of `num_seqs` sequences could never be admitted (even on an idle server),
        or None: a 400 for the client, not a 503 it would retry forever."""
        if num_seqs > self.max_waiting_requests:
            return (f"this request has {num_seqs} sequences (prompts x n), more than the "
                    f"{self.max_waiting_requests} that may wait to start at once (--max-waiting-requests): "
                    "it could never be admitted; send fewer prompts or a smaller n")
        return None

    # ---------------------------------------------------------------- intake
    def add_request(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                    params: SamplingParams, cache_salt: str | None = None,
                    lora: AdapterRef | None = None) -> RequestStream:
        """Validate, admit and send one request; raises ValueError / OverloadedError / EngineDeadError."""
        if self.dead_reason is not None or self.inputs is None:
            raise EngineDeadError(self.dead_reason or "the engine is not running")
        self.inputs.validate(prompt_token_ids, params)
        never = self.never_admitted(params.n)
        if never is not None:
            raise ValueError(never)
        self.check_admission(params.n)
        arrival = time.monotonic()
        variant = lora if lora is not None and lora.kind == "variant" else None  # the `model` field names either
        specs = self.inputs.make_specs(prompt_token_ids, params, arrival, cache_salt=cache_salt,
                                       lora=None if variant is not None else lora, variant=variant)
        self.outputs.add_request(request_id, prompt, prompt_token_ids, params,
                                 [s.request_id for s in specs], arrival, OutputKind.DELTA)
        stream = RequestStream(request_id, params.n)
        self._streams[request_id] = stream
        self._timing[request_id] = _Timing(arrival, len(prompt_token_ids))
        self._waiting_seqs += params.n
        try:
            self._send_specs(specs)
        except EngineDeadError:
            self._forget(request_id)
            self.outputs.abort_request(request_id)
            raise
        return stream

    async def iterate(self, stream: RequestStream) -> AsyncIterator[RequestOutput]:
        """Yield delta outputs until the request finishes; abort it if the consumer goes away."""
        try:
            while True:
                output = await stream.get()
                yield output
                if output.finished:
                    return
        finally:
            if stream.request_id in self._streams:
                self.abort(stream.request_id)

    def abort(self, request_id: str) -> None:
        """Abort a request (client gone): the core frees its KV blocks at once."""
        _, running = self.outputs.abort_request(request_id)
        self._forget(request_id, "abort")
        self._finish_core([(core_id, RequestStatus.FINISHED_ABORTED.value, None) for core_id in running])

    # The engine behind this front: one core process here; a router over instances in
    # kvflow/disagg/router.py, which overrides these.
    def _send_specs(self, specs: list[CoreRequestSpec]) -> None:
        self.core.add(specs)

    def _finish_core(self, items: list[tuple[str, str, str | None]]) -> None:
        try:
            self.core.finish(items)
        except EngineDeadError:
            pass

    def _forget(self, request_id: str, finish_reason: str | None = None) -> None:
        stream = self._streams.pop(request_id, None)
        timing = self._timing.pop(request_id, None)
        if stream is None:
            return
        if timing is not None and not timing.queued_seen:
            self._waiting_seqs -= stream.num_seqs
        if finish_reason is not None and timing is not None:
            self.metrics.finished(finish_reason)
            self.metrics.e2e.observe(time.monotonic() - timing.arrival)
            self.metrics.request_generation_tokens.observe(timing.num_generated)
            # vLLM's phases: prefill (first scheduled to first token), decode (first to last token),
            # inference (first scheduled to last token); only for a request that got a token.
            first, last, scheduled = timing.first_token, timing.last_token, timing.scheduled
            if first is not None and last is not None:
                self.metrics.decode_time.observe(last - first)
                if scheduled is not None:
                    self.metrics.prefill_time.observe(max(0.0, first - scheduled))
                    self.metrics.inference_time.observe(max(0.0, last - scheduled))

    # ---------------------------------------------------------------- output
    def _on_outputs(self, message: StepOutputs) -> None:
        self.metrics.update_core(message.stats)
        self.metrics.cache_config(self.config.cache, message.stats.engine.num_blocks)
        self.metrics.steps(message.step_tokens)
        self._process_outputs(message)

    def _process_outputs(self, message: StepOutputs) -> None:
        now = time.monotonic()
        for core_id, scheduled in message.scheduled_times.items():
            request_id = self.outputs.request_id_of(core_id) or ""
            timing = self._timing.get(request_id)
            if timing is not None and not timing.queued_seen:
                timing.queued_seen = True
                self._waiting_seqs -= self._streams[request_id].num_seqs  # started: no longer waiting
                timing.scheduled = scheduled
                self.metrics.queue_time.observe(max(0.0, scheduled - timing.arrival))
        processed = self.outputs.process(message.outputs)
        self._finish_core([(core_id, RequestStatus.FINISHED_STOPPED.value, stop)
                           for core_id, stop in processed.stopped])
        for output in processed.request_outputs:
            self._record(output, now)
            stream = self._streams.get(output.request_id)
            if stream is None:
                continue
            stream.put(output)
            if output.finished:
                reasons = [c.finish_reason for c in output.outputs if c.finish_reason]
                self._forget(output.request_id, reasons[0] if reasons else "stop")

    def _record(self, output: RequestOutput, now: float) -> None:
        timing = self._timing.get(output.request_id)
        new_tokens = sum(len(c.token_ids) for c in output.outputs)
        if timing is None:
            return
        if not new_tokens:
            if output.finished and timing.first_token is None:  # prompt-only (max_tokens 0): scored, nothing made
                self.metrics.prompt_tokens.inc(timing.num_prompt_tokens)
                self.metrics.request_prompt_tokens.observe(timing.num_prompt_tokens)
            return
        if timing.first_token is None:
            timing.first_token = now
            self.metrics.ttft.observe(now - timing.arrival)
            self.metrics.prompt_tokens.inc(timing.num_prompt_tokens)
            self.metrics.request_prompt_tokens.observe(timing.num_prompt_tokens)
        elif timing.last_token is not None:
            self.metrics.itl.observe(now - timing.last_token)
            self.metrics.tpot.observe(now - timing.last_token)
        timing.last_token = now
        timing.num_generated += new_tokens
        self.metrics.generation_tokens.inc(new_tokens)

    def _on_death(self, reason: str) -> None:
        self.metrics.engine_healthy.set(0)
        error = EngineDeadError(reason)
        for request_id, stream in list(self._streams.items()):
            stream.fail(error)
            self.outputs.abort_request(request_id)
            self._forget(request_id)
