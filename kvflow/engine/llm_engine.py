"""LLMEngine: text in, text out, around the token-level EngineCore.

It validates a request completely before any work (so a bad request changes nothing), fans
`n > 1` out into sibling sequences that share the prompt's KV blocks, and turns token ids into
text with an incremental detokenizer per sequence, which is also where stop strings are found.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

from kvflow.config import EngineConfig
from kvflow.detokenizer import IncrementalDetokenizer
from kvflow.engine.core import EngineCore, EngineCoreOutput, EngineStats
from kvflow.engine.request import Request, RequestStatus, TokenLogprobs
from kvflow.model.loader import eos_token_ids, load_generation_config, load_tokenizer
from kvflow.outputs import CompletionOutput, Logprob, PositionLogprobs, RequestOutput
from kvflow.sampling import SamplingParams

# Generation-config keys that become default sampling parameters (as vLLM does).
_GENERATION_DEFAULTS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")


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


@dataclass
class _RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    sequences: list[_Sequence]
    arrival_time: float
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    num_cached_tokens: int = 0
    first_token_time: float | None = None

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.sequences)


class LLMEngine:
    def __init__(self, config: EngineConfig, tokenizer: Any | None = None, load_tokenizer_: bool = True) -> None:
        self.config = config
        self.tokenizer = tokenizer if tokenizer is not None or not load_tokenizer_ else load_tokenizer(config.model.path)
        self.generation_config = load_generation_config(config.model.path)
        self.eos_token_ids = eos_token_ids(config.model, self.generation_config, self.tokenizer)
        self.core = EngineCore(config)
        self._states: dict[str, _RequestState] = {}
        self._core_to_seq: dict[str, tuple[_RequestState, _Sequence]] = {}
        self._ids = itertools.count()

    @classmethod
    def from_pretrained(cls, model: str, **kwargs: Any) -> "LLMEngine":
        return cls(EngineConfig.create(model, **kwargs))

    # ------------------------------------------------------------ validation
    def default_sampling_params(self) -> SamplingParams:
        """SamplingParams with the model's generation_config.json defaults applied."""
        values = {k: self.generation_config[k] for k in _GENERATION_DEFAULTS if k in self.generation_config}
        if self.generation_config.get("do_sample") is False:
            values["temperature"] = 0.0
        return SamplingParams(**values)

    def to_sampling_params(self, params: SamplingParams | Mapping[str, Any] | None) -> SamplingParams:
        if params is None:
            return self.default_sampling_params()
        if isinstance(params, SamplingParams):
            return params
        if isinstance(params, Mapping):
            return SamplingParams(**params)
        raise ValueError(f"sampling params must be SamplingParams or a dict, got {type(params).__name__}")

    def tokenize_prompt(self, prompt: str | list[int] | Mapping[str, Any]) -> tuple[str | None, list[int]]:
        """Accept text, a list of token ids, or {"prompt": ...} / {"prompt_token_ids": [...]}."""
        if isinstance(prompt, Mapping):
            unknown = set(prompt) - {"prompt", "prompt_token_ids"}
            if unknown:
                raise ValueError(f"unknown prompt keys {sorted(unknown)}; allowed: prompt, prompt_token_ids")
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), self._check_ids(prompt["prompt_token_ids"])
            prompt = prompt.get("prompt", "")
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt must not be empty")
            if self.tokenizer is None:
                raise ValueError(
                    f"the model at {self.config.model.path} has no tokenizer: pass prompts as token ids"
                )
            return prompt, self._check_ids(self.tokenizer.encode(prompt))
        return None, self._check_ids(prompt)

    def _check_ids(self, ids: Any) -> list[int]:
        if not isinstance(ids, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise ValueError("prompt_token_ids must be a list of integers")
        if not ids:
            raise ValueError("prompt must not be empty")
        vocab = self.config.model.vocab_size
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"prompt_token_ids contains {bad}, outside the vocabulary [0, {vocab})")
        return list(ids)

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        max_len = self.config.model.max_model_len
        n = len(prompt_token_ids)
        if n >= max_len:
            raise ValueError(
                f"prompt has {n} tokens but the model's context (max_model_len) is {max_len}: "
                f"the prompt must be at most {max_len - 1} tokens to leave room for output"
            )
        block_size = self.config.cache.block_size
        capacity = self.core.kv.num_blocks * block_size
        if n + 1 > capacity:
            raise ValueError(f"prompt has {n} tokens but the KV cache holds only {capacity}; raise kv_cache_memory")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; this model has none (use stop_token_ids)")
        if params.n > self.config.scheduler.max_num_seqs:
            raise ValueError(f"n must be <= max_num_seqs ({self.config.scheduler.max_num_seqs}), got {params.n}")

    # -------------------------------------------------------------- requests
    def add_request(
        self,
        request_id: str,
        prompt: str | list[int] | Mapping[str, Any],
        params: SamplingParams | Mapping[str, Any] | None = None,
        arrival_time: float | None = None,
        priority: int = 0,
    ) -> None:
        """Validate everything first; only then does the request touch the engine."""
        params = self.to_sampling_params(params)
        text, ids = self.tokenize_prompt(prompt)
        self.validate(ids, params)
        if request_id in self._states:
            raise ValueError(f"request_id {request_id!r} is already in use")
        arrival = time.monotonic() if arrival_time is None else arrival_time
        state = _RequestState(request_id, text, ids, params, [], arrival)
        if params.prompt_logprobs is not None:
            state.prompt_logprobs = []
        leader: Request | None = None
        for index in range(params.n):
            core_id = f"{next(self._ids)}"
            seed = None if params.seed is None else params.seed + index
            request = Request(
                core_id, ids, params, self.eos_token_ids, arrival,
                self.config.model.max_model_len, leader=leader, seed=seed, priority=priority,
            )
            leader = leader or request
            detok = None
            if self.tokenizer is not None:
                detok = IncrementalDetokenizer(
                    self.tokenizer, ids, skip_special_tokens=params.skip_special_tokens,
                    stop=params.stop, include_stop_str_in_output=params.include_stop_str_in_output,
                )
            seq = _Sequence(index, core_id, detok, logprobs=[] if params.logprobs is not None else None)
            state.sequences.append(seq)
            self._core_to_seq[core_id] = (state, seq)
            self.core.add_request(request)
        self._states[request_id] = state

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Abort a request wherever it is; its KV blocks are freed at once."""
        state = self._states.pop(request_id, None)
        if state is None:
            return None
        for seq in state.sequences:
            self._core_to_seq.pop(seq.core_id, None)
            if seq.finish_reason is None:
                self.core.abort_request(seq.core_id)
                seq.finish_reason = RequestStatus.FINISHED_ABORTED.finish_reason
        return self._make_output(state)

    def has_unfinished_requests(self) -> bool:
        return bool(self._states)

    @property
    def num_unfinished_requests(self) -> int:
        return len(self._states)

    def stats(self) -> EngineStats:
        return self.core.stats()

    # ------------------------------------------------------------------ step
    def step(self) -> list[RequestOutput]:
        """Run one engine step; returns an output for every request that progressed."""
        touched: dict[str, _RequestState] = {}
        for out in self.core.step():
            entry = self._core_to_seq.get(out.request_id)
            if entry is None:
                continue
            state, seq = entry
            self._apply(state, seq, out)
            touched[state.request_id] = state
        results = []
        for state in touched.values():
            if state.finished:
                del self._states[state.request_id]
                for seq in state.sequences:
                    self._core_to_seq.pop(seq.core_id, None)
            results.append(self._make_output(state))
        return results

    def _apply(self, state: _RequestState, seq: _Sequence, out: EngineCoreOutput) -> None:
        if out.new_prompt_logprobs and state.prompt_logprobs is not None and seq.index == 0:
            state.prompt_logprobs.extend(self._position_logprobs(lp) for lp in out.new_prompt_logprobs)
        state.num_cached_tokens = max(state.num_cached_tokens, out.num_cached_tokens)
        if out.new_token_ids and state.first_token_time is None:
            state.first_token_time = time.monotonic()
        seq.token_ids.extend(out.new_token_ids)
        for lp in out.new_logprobs:
            seq.cumulative_logprob += lp.logprob
            if seq.logprobs is not None:
                seq.logprobs.append(self._position_logprobs(lp))
        finish, stop_reason = out.finish_reason, out.stop_reason
        if seq.detokenizer is not None and out.new_token_ids:
            stop = seq.detokenizer.update(out.new_token_ids)
            if stop is not None and finish is None:
                self.core.abort_request(seq.core_id, RequestStatus.FINISHED_STOPPED, stop)
                finish, stop_reason = RequestStatus.FINISHED_STOPPED.finish_reason, stop
        if finish is not None:
            seq.finish_reason, seq.stop_reason = finish, stop_reason
            if seq.detokenizer is not None:
                seq.detokenizer.finalize()

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

    def _make_output(self, state: _RequestState) -> RequestOutput:
        completions = [
            CompletionOutput(
                index=seq.index,
                text=seq.detokenizer.output_text if seq.detokenizer is not None else "",
                token_ids=list(seq.token_ids),
                cumulative_logprob=seq.cumulative_logprob if seq.logprobs is not None else None,
                logprobs=seq.logprobs,
                finish_reason=seq.finish_reason,
                stop_reason=seq.stop_reason,
            )
            for seq in state.sequences
        ]
        metrics = {"arrival_time": state.arrival_time}
        if state.first_token_time is not None:
            metrics["first_token_time"] = state.first_token_time
        return RequestOutput(
            request_id=state.request_id,
            prompt=state.prompt,
            prompt_token_ids=state.prompt_token_ids,
            outputs=completions,
            finished=state.finished,
            prompt_logprobs=state.prompt_logprobs,
            num_cached_tokens=state.num_cached_tokens,
            metrics=metrics,
        )
