"""LLMEngine: text in, text out, around the token-level EngineCore, all in one process.

It validates a request completely before any work (so a bad request changes nothing), fans
`n > 1` out into sibling sequences that share the prompt's KV blocks, and turns token ids into
text with an incremental detokenizer per sequence, which is also where stop strings are found.
The intake (`input_processor.py`) and the output side (`output_processor.py`) are shared with
the server, which runs the same core in its own process (`core_client.py`).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from kvflow.config import EngineConfig
from kvflow.core.request import RequestStatus
from kvflow.engine.core import EngineCore, EngineStats
from kvflow.engine.input_processor import InputProcessor, build_core_requests
from kvflow.engine.model_registry import ModelRegistry
from kvflow.engine.output_processor import OutputProcessor
from kvflow.kv_transfer.base import make_connector
from kvflow.lora_request import LoRARequest
from kvflow.model.loader import load_tokenizer
from kvflow.outputs import RequestOutput
from kvflow.sampling_params import SamplingParams

#: How long a step that had nothing to compute while KV loads were in flight waits before the next.
_LOAD_POLL_S = 0.001


class LLMEngine:
    def __init__(self, config: EngineConfig, tokenizer: Any | None = None, load_tokenizer_: bool = True) -> None:
        self.config = config
        if tokenizer is None and load_tokenizer_:
            tokenizer = load_tokenizer(config.model.tokenizer_path)
        self.tokenizer = tokenizer
        self.core = EngineCore(config, make_connector(config))
        self.inputs = InputProcessor(config, self.tokenizer, self.core.kv.num_token_blocks, self.core.kv.layer_groups)
        self.registry = ModelRegistry(config)
        self.outputs = OutputProcessor(self.tokenizer)

    @classmethod
    def from_pretrained(cls, model: str, **kwargs: Any) -> LLMEngine:
        return cls(EngineConfig.create(model, **kwargs))

    # ------------------------------------------------------------ validation
    @property
    def generation_config(self) -> dict[str, Any]:
        return self.inputs.generation_config

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self.inputs.eos_token_ids

    @eos_token_ids.setter
    def eos_token_ids(self, value: tuple[int, ...]) -> None:
        self.inputs.eos_token_ids = value

    def default_sampling_params(self) -> SamplingParams:
        """SamplingParams with the model's generation_config.json defaults applied."""
        return self.inputs.default_sampling_params()

    def to_sampling_params(self, params: SamplingParams | Mapping[str, Any] | None) -> SamplingParams:
        return self.inputs.to_sampling_params(params)

    def tokenize_prompt(self, prompt: str | list[int] | Mapping[str, Any]) -> tuple[str | None, list[int]]:
        """Accept text, a list of token ids, or {"prompt": ...} / {"prompt_token_ids": [...]}."""
        return self.inputs.tokenize_prompt(prompt)

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self.inputs.validate(prompt_token_ids, params)

    # -------------------------------------------------------------- requests
    def add_request(
        self,
        request_id: str,
        prompt: str | list[int] | Mapping[str, Any],
        params: SamplingParams | Mapping[str, Any] | None = None,
        arrival_time: float | None = None,
        priority: int = 0,
        lora_request: LoRARequest | str | None = None,
        variant: str | None = None,
    ) -> None:
        """Validate everything first; only then does the request touch the engine. `lora_request`: the
        LoRA adapter to run it with (a `LoRARequest`, or the name of a loaded adapter); `variant`: the block
        zoo's variant (`variant=` engine argument) to run it with instead of the base."""
        params = self.to_sampling_params(params)
        text, ids = self.tokenize_prompt(prompt)
        salt = self.inputs.cache_salt_of(prompt)
        self.validate(ids, params)
        lora = self.registry.resolve(lora_request)
        model = self.registry.variant(variant)
        if lora is not None and model is not None:
            raise ValueError("a request runs a LoRA adapter or a model variant, not both")
        arrival = time.monotonic() if arrival_time is None else arrival_time
        specs = self.inputs.make_specs(ids, params, arrival, priority, salt, lora, model)
        self.outputs.add_request(request_id, text, ids, params, [s.request_id for s in specs], arrival)
        for request in build_core_requests(specs):
            self.core.add_request(request)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Abort a request wherever it is; its KV blocks are freed at once."""
        output, running = self.outputs.abort_request(request_id)
        for core_id in running:
            self.core.abort_request(core_id)
        return output

    def close(self) -> None:
        """Stop the engine's KV connector (offload tiers: write what is staged, stop the I/O threads)."""
        self.core.close()

    def reset_prefix_cache(self) -> int:
        """Drop the working pool's cached prefixes that no request holds (offload tiers keep theirs)."""
        return self.core.kv.reset_prefix_cache()

    def has_unfinished_requests(self) -> bool:
        return self.outputs.has_unfinished_requests()

    @property
    def num_unfinished_requests(self) -> int:
        return self.outputs.num_unfinished_requests

    def stats(self) -> EngineStats:
        return self.core.stats()

    # ------------------------------------------------------------------ step
    def step(self) -> list[RequestOutput]:
        """Run one engine step; returns an output for every request that progressed."""
        steps = self.core.num_steps
        outputs = self.core.step()
        if not outputs and self.core.num_steps == steps and self.core.transfers_pending:
            time.sleep(_LOAD_POLL_S)  # only KV loads in flight: let them run rather than spin
        processed = self.outputs.process(outputs)
        for core_id, stop in processed.stopped:
            self.core.abort_request(core_id, RequestStatus.FINISHED_STOPPED, stop)
        return processed.request_outputs
