"""Request intake shared by the offline engine and the server: tokenise, validate, fan out.

Everything here runs before a request touches the engine core, so a bad request is refused
with a clear `ValueError` and changes nothing. The output is a list of `CoreRequestSpec`s, plain
msgspec structs that the core turns into `Request`s, in the same process (`LLMEngine`) or in the
engine-core process behind ZMQ (`core_client.py`): both paths build requests the same way.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Mapping
from typing import Any

import msgspec

from kvflow.config import EngineConfig, resolve_kv_policy
from kvflow.core.request import Request
from kvflow.kv_transfer.wire import KVTransferParams
from kvflow.lora_request import AdapterRef
from kvflow.model.loader import eos_token_ids, load_generation_config
from kvflow.sampling_params import SamplingParams

# Generation-config keys that become default sampling parameters (as vLLM does).
_GENERATION_DEFAULTS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")
_SEED_MAX = 2**64 - 1  # torch.Generator.manual_seed's upper bound


class CoreRequestSpec(msgspec.Struct):
    """One sequence for the engine core; `n > 1` siblings name their leader by id."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    eos_token_ids: tuple[int, ...]
    arrival_time: float
    max_model_len: int
    leader_id: str | None = None
    seed: int | None = None
    priority: int = 0
    kv_transfer: KVTransferParams | None = None
    cache_salt: str | None = None
    lora: AdapterRef | None = None
    variant: AdapterRef | None = None


def build_core_requests(specs: list[CoreRequestSpec]) -> list[Request]:
    """Specs -> `Request`s; a fan-out group arrives in one list, leader first."""
    built: dict[str, Request] = {}
    for spec in specs:
        leader = built.get(spec.leader_id) if spec.leader_id is not None else None
        built[spec.request_id] = Request(
            spec.request_id, spec.prompt_token_ids, spec.params, spec.eos_token_ids,
            spec.arrival_time, spec.max_model_len, leader=leader, seed=spec.seed, priority=spec.priority,
            kv_transfer=spec.kv_transfer, cache_salt=spec.cache_salt, lora=spec.lora,
            variant=spec.variant,
        )
    return list(built.values())


class InputProcessor:
    """Turns prompts and sampling parameters into validated core request specs."""

    def __init__(self, config: EngineConfig, tokenizer: Any | None, num_kv_blocks: int,
                 kv_layer_groups: int = 1) -> None:
        """`num_kv_blocks`: blocks of tokens the engine's KV cache holds; `kv_layer_groups` > 1: the cache is
        split into layer groups (a block zoo sharing its variants' KV), which KV policies cannot read yet."""
        self.config = config
        self.tokenizer = tokenizer
        self.num_kv_blocks = num_kv_blocks
        self.kv_layer_groups = kv_layer_groups
        self.generation_config = load_generation_config(config.model.path)
        self.eos_token_ids = eos_token_ids(config.model, self.generation_config, tokenizer)
        self._ids = itertools.count()

    # ------------------------------------------------------------ parameters
    def default_sampling_params(self) -> SamplingParams:
        """SamplingParams with the model's generation_config.json defaults applied."""
        return SamplingParams(**self.generation_defaults())

    def generation_defaults(self) -> dict[str, Any]:
        """The generation_config.json values that override SamplingParams' own defaults."""
        values = {k: self.generation_config[k] for k in _GENERATION_DEFAULTS if k in self.generation_config}
        if self.generation_config.get("do_sample") is False:
            values["temperature"] = 0.0
        return values

    def to_sampling_params(self, params: SamplingParams | Mapping[str, Any] | None) -> SamplingParams:
        if params is None:
            return self.default_sampling_params()
        if isinstance(params, SamplingParams):
            return params
        if isinstance(params, Mapping):
            return SamplingParams(**params)
        raise ValueError(f"sampling params must be SamplingParams or a dict, got {type(params).__name__}")

    # --------------------------------------------------------------- prompts
    def tokenize_prompt(self, prompt: str | list[int] | Mapping[str, Any]) -> tuple[str | None, list[int]]:
        """Accept text, a list of token ids, or {"prompt": ...} / {"prompt_token_ids": [...]} (either
        with an optional "cache_salt", see `cache_salt_of`)."""
        if isinstance(prompt, Mapping):
            unknown = set(prompt) - {"prompt", "prompt_token_ids", "cache_salt"}
            if unknown:
                raise ValueError(f"unknown prompt keys {sorted(unknown)}; allowed: prompt, prompt_token_ids, "
                                 "cache_salt")
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
            check_utf8(prompt, "prompt")
            return prompt, self._check_ids(self.tokenizer.encode(prompt))
        return None, self._check_ids(prompt)

    @staticmethod
    def cache_salt_of(prompt: str | list[int] | Mapping[str, Any]) -> str | None:
        """A prompt's {"cache_salt": "..."}: its KV blocks are shared only with prompts of the same salt
        (tenants that must not learn from each other's cache hits)."""
        if not isinstance(prompt, Mapping) or prompt.get("cache_salt") is None:
            return None
        return check_cache_salt(prompt["cache_salt"])

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
        # A prompt-only request (max_tokens 0: prompt logprobs) needs no room for output: it computes
        # its prompt but the last token, so a whole context of prompt is scored.
        limit = max_len if params.prompt_only else max_len - 1
        if n > limit:
            raise ValueError(
                f"prompt has {n} tokens but the model's context (max_model_len) is {max_len}: "
                f"the prompt must be at most {limit} tokens"
                + ("" if params.prompt_only else " to leave room for output")
            )
        capacity = self.num_kv_blocks * self.config.cache.block_size
        if n + 1 > capacity:
            raise ValueError(f"prompt has {n} tokens but the KV cache holds only {capacity}; raise kv_cache_memory")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; this model has none (use stop_token_ids)")
        if params.n > self.config.scheduler.max_num_seqs:
            raise ValueError(f"n must be <= max_num_seqs ({self.config.scheduler.max_num_seqs}), got {params.n}")
        if params.seed is not None and params.seed + params.n - 1 > _SEED_MAX:
            raise ValueError(f"seed + n - 1 must be <= {_SEED_MAX} (choice i is seeded with seed + i)")
        if params.kv_policy is not None or params.kv_budget is not None:
            settings = resolve_kv_policy(self.config.cache, params.kv_policy, params.kv_budget)
            reason = self.config.kv_policy_allowed()
            if self.kv_layer_groups > 1:
                reason = ("this engine shares its variants' KV in layer groups, which KV policies do not read yet "
                          "(start it with --no-zoo-share-kv)")
            if settings is not None and reason is not None:
                raise ValueError(f"kv_policy={settings.policy}: {reason}")

    # --------------------------------------------------------------- fan-out
    def make_specs(
        self, prompt_token_ids: list[int], params: SamplingParams, arrival_time: float | None = None,
        priority: int = 0, cache_salt: str | None = None, lora: AdapterRef | None = None,
        variant: AdapterRef | None = None,
    ) -> list[CoreRequestSpec]:
        """One spec per sequence: `n > 1` siblings share the leader's prompt blocks; seeds are seed + index."""
        arrival = time.monotonic() if arrival_time is None else arrival_time
        specs: list[CoreRequestSpec] = []
        for index in range(params.n):
            specs.append(CoreRequestSpec(
                request_id=f"{next(self._ids)}",
                prompt_token_ids=prompt_token_ids,
                params=params,
                eos_token_ids=tuple(self.eos_token_ids),
                arrival_time=arrival,
                max_model_len=self.config.model.max_model_len,
                leader_id=specs[0].request_id if specs else None,
                seed=None if params.seed is None else params.seed + index,
                priority=priority,
                cache_salt=cache_salt,
                lora=lora,
                variant=variant,
            ))
        return specs


def check_cache_salt(salt: Any) -> str:
    if not isinstance(salt, str) or not salt:
        raise ValueError("cache_salt must be a non-empty string")
    check_utf8(salt, "cache_salt")
    return salt


def check_utf8(text: str, what: str) -> None:
    """Refuse text that cannot be encoded (lone surrogates from JSON escapes like "\\ud800")."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{what} is not valid UTF-8: {exc.reason} at position {exc.start}") from None
