"""Core outputs (token ids) -> `RequestOutput`s (text), shared by `LLMEngine` and the server.

Per sequence it keeps an incremental detokenizer, which is also where stop strings are found:
a hit finishes the sequence here and is handed back to the caller, who tells the core (in
process or over ZMQ) to free its blocks. `n > 1` siblings are gathered into one output.

Two output kinds: CUMULATIVE (everything so far; the offline API) and DELTA (only what is new
since the last output, with stop-string prefixes withheld; the server streams these).
"""

from __future__ import annotations

import enum
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from kvflow.core.request import RequestStatus
from kvflow.engine.core import EngineCoreOutput
from kvflow.engine.detokenizer import IncrementalDetokenizer
from kvflow.outputs import CompletionOutput, Logprob, PositionLogprobs, RequestOutput
from kvflow.sampling_params import SamplingParams
from kvflow.worker.step import TokenLogprobs


class OutputKind(enum.Enum):
    CUMULATIVE = "cumulative"
    DELTA = "delta"


@dataclass
class _Sequence:
    index: int
    core_id: str
    detokenizer: IncrementalDetokenizer | None
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[PositionLogprobs] | None = None
    cumulative_logprob: float = 0.0
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    # DELTA bookkeeping: how much of token_ids / logprobs was already handed out.
    num_sent_tokens: int = 0
    finish_sent: bool = False


@dataclass
class _RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    sequences: list[_Sequence]
    arrival_time: float
    kind: OutputKind
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    num_sent_prompt_logprobs: int = 0
    num_cached_tokens: int = 0
    first_token_time: float | None = None

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.sequences)


@dataclass
class ProcessedOutputs:
    """One batch of core outputs, digested."""

    request_outputs: list[RequestOutput] = field(default_factory=list)
    # (core request id, stop string): sequences a stop string finished; the core must free them.
    stopped: list[tuple[str, str]] = field(default_factory=list)


class OutputProcessor:
    def __init__(self, tokenizer: Any | None) -> None:
        self.tokenizer = tokenizer
        self._states: dict[str, _RequestState] = {}
        self._core_to_seq: dict[str, tuple[_RequestState, _Sequence]] = {}

    def add_request(
        self, request_id: str, prompt: str | None, prompt_token_ids: list[int], params: SamplingParams,
        core_ids: list[str], arrival_time: float, kind: OutputKind = OutputKind.CUMULATIVE,
    ) -> None:
        if request_id in self._states:
            raise ValueError(f"request_id {request_id!r} is already in use")
        state = _RequestState(request_id, prompt, prompt_token_ids, params, [], arrival_time, kind)
        if params.prompt_logprobs is not None:
            state.prompt_logprobs = []
        for index, core_id in enumerate(core_ids):
            detok = None
            if self.tokenizer is not None:
                detok = IncrementalDetokenizer(
                    self.tokenizer, prompt_token_ids, skip_special_tokens=params.skip_special_tokens,
                    stop=params.stop, include_stop_str_in_output=params.include_stop_str_in_output,
                )
            seq = _Sequence(index, core_id, detok, logprobs=[] if params.logprobs is not None else None)
            state.sequences.append(seq)
            self._core_to_seq[core_id] = (state, seq)
        self._states[request_id] = state

    def abort_request(self, request_id: str) -> tuple[RequestOutput | None, list[str]]:
        """Forget a request; returns its final output and the core ids still running (to abort)."""
        state = self._states.pop(request_id, None)
        if state is None:
            return None, []
        running = []
        for seq in state.sequences:
            self._core_to_seq.pop(seq.core_id, None)
            if seq.finish_reason is None:
                running.append(seq.core_id)
                seq.finish_reason = RequestStatus.FINISHED_ABORTED.finish_reason
        return self._make_output(state, state.sequences), running

    def has_unfinished_requests(self) -> bool:
        return bool(self._states)

    @property
    def num_unfinished_requests(self) -> int:
        return len(self._states)

    def request_id_of(self, core_id: str) -> str | None:
        entry = self._core_to_seq.get(core_id)
        return None if entry is None else entry[0].request_id

    def process(self, core_outputs: Iterable[EngineCoreOutput]) -> ProcessedOutputs:
        """Apply one step's core outputs; returns an output for every request that progressed."""
        result = ProcessedOutputs()
        touched: dict[str, tuple[_RequestState, list[_Sequence]]] = {}
        for out in core_outputs:
            entry = self._core_to_seq.get(out.request_id)
            if entry is None or entry[1].finish_reason is not None:
                # Aborted, or stopped by a stop string while the core (in another process) was
                # already running the next step: what it sent since is not part of the output.
                continue
            state, seq = entry
            stop = self._apply(state, seq, out)
            if stop is not None:
                result.stopped.append((seq.core_id, stop))
            seqs = touched.setdefault(state.request_id, (state, []))[1]
            if not any(s is seq for s in seqs):
                seqs.append(seq)
        for state, seqs in touched.values():
            if state.finished:
                del self._states[state.request_id]
                for seq in state.sequences:
                    self._core_to_seq.pop(seq.core_id, None)
            result.request_outputs.append(self._make_output(state, seqs))
        return result

    def _apply(self, state: _RequestState, seq: _Sequence, out: EngineCoreOutput) -> str | None:
        """Fold one core output into its sequence; returns a stop string that finished it."""
        if out.new_prompt_logprobs and state.prompt_logprobs is not None and seq.index == 0:
            state.prompt_logprobs.extend(self._position_logprobs(lp) for lp in out.new_prompt_logprobs)
        state.num_cached_tokens = max(state.num_cached_tokens, out.num_cached_tokens)
        new_ids, new_lps = out.new_token_ids, out.new_logprobs
        if new_ids and state.first_token_time is None:
            state.first_token_time = time.monotonic()
        finish, stop_reason, hit = out.finish_reason, out.stop_reason, None
        if seq.detokenizer is not None and new_ids:
            before = len(seq.detokenizer.output_token_ids)
            stop = seq.detokenizer.update(new_ids)
            if stop is not None:  # wins over a length / EOS finish in the same step
                hit = stop if finish is None else None  # the core only needs telling if still running
                finish, stop_reason = RequestStatus.FINISHED_STOPPED.finish_reason, stop
                # A step that produced several tokens ends at the one that completed the stop string.
                consumed = len(seq.detokenizer.output_token_ids) - before
                new_ids, new_lps = new_ids[:consumed], new_lps[:consumed]
        seq.token_ids.extend(new_ids)
        for lp in new_lps:
            seq.cumulative_logprob += lp.logprob
            if seq.logprobs is not None:
                seq.logprobs.append(self._position_logprobs(lp))
        if finish is not None:
            seq.finish_reason, seq.stop_reason = finish, stop_reason
            if seq.detokenizer is not None:
                seq.detokenizer.finalize()
        return hit

    def _position_logprobs(self, lp: TokenLogprobs | None) -> PositionLogprobs | None:
        if lp is None:
            return None
        entries: PositionLogprobs = {}
        for rank, (tid, value) in enumerate(zip(lp.top_ids, lp.top_logprobs), start=1):
            entries[tid] = Logprob(value, rank, self._decode_one(tid))
        if lp.token_id not in entries:
            entries[lp.token_id] = Logprob(lp.logprob, None, self._decode_one(lp.token_id))
        return entries

    def _decode_one(self, token_id: int) -> str | None:
        return None if self.tokenizer is None else self.tokenizer.decode([token_id])

    def _make_output(self, state: _RequestState, touched: list[_Sequence]) -> RequestOutput:
        delta = state.kind is OutputKind.DELTA
        completions = [self._delta(seq) if delta else self._cumulative(seq)
                       for seq in (touched if delta else state.sequences)]
        prompt_logprobs = state.prompt_logprobs
        if delta and prompt_logprobs is not None:
            prompt_logprobs = prompt_logprobs[state.num_sent_prompt_logprobs:]
            state.num_sent_prompt_logprobs += len(prompt_logprobs)
        metrics = {"arrival_time": state.arrival_time}
        if state.first_token_time is not None:
            metrics["first_token_time"] = state.first_token_time
        if state.finished:
            metrics["finished_time"] = time.monotonic()  # (monotonic, like arrival_time)
        return RequestOutput(
            request_id=state.request_id,
            prompt=state.prompt,
            prompt_token_ids=state.prompt_token_ids,
            outputs=[c for c in completions if c is not None],
            finished=state.finished,
            prompt_logprobs=prompt_logprobs,
            num_cached_tokens=state.num_cached_tokens,
            metrics=metrics,
        )

    @staticmethod
    def _cumulative(seq: _Sequence) -> CompletionOutput:
        return CompletionOutput(
            index=seq.index,
            text=seq.detokenizer.output_text if seq.detokenizer is not None else "",
            token_ids=list(seq.token_ids),
            cumulative_logprob=seq.cumulative_logprob if seq.logprobs is not None else None,
            logprobs=seq.logprobs,
            finish_reason=seq.finish_reason,
            stop_reason=seq.stop_reason,
        )

    @staticmethod
    def _delta(seq: _Sequence) -> CompletionOutput | None:
        """What is new since the last output of this sequence; None when nothing is."""
        finished = seq.finish_reason is not None
        text = seq.detokenizer.get_delta(finished) if seq.detokenizer is not None else ""
        start, seq.num_sent_tokens = seq.num_sent_tokens, len(seq.token_ids)
        newly_finished = finished and not seq.finish_sent
        seq.finish_sent = finished
        if not text and start == len(seq.token_ids) and not newly_finished:
            return None
        return CompletionOutput(
            index=seq.index,
            text=text,
            token_ids=seq.token_ids[start:],
            cumulative_logprob=seq.cumulative_logprob if seq.logprobs is not None else None,
            logprobs=None if seq.logprobs is None else seq.logprobs[start:],
            finish_reason=seq.finish_reason,
            stop_reason=seq.stop_reason,
        )
