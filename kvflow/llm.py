"""The offline API: `LLM(model=...).generate(prompts, params)` and `.chat(messages)`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from tqdm.auto import tqdm

from kvflow.config import EngineConfig
from kvflow.engine.llm_engine import LLMEngine
from kvflow.lora_request import LoRARequest
from kvflow.outputs import RequestOutput
from kvflow.sampling_params import SamplingParams

Prompt = str | list[int] | Mapping[str, Any]
Params = SamplingParams | Mapping[str, Any]
Message = Mapping[str, Any]
Lora = LoRARequest | str


class LLM:
    """Runs batches of prompts to completion with continuous batching over a paged KV cache.

    `model` is a Hugging Face model directory or a llama-architecture `.gguf` file; `tokenizer=DIR`
    (or a `.gguf` file) replaces the model's own tokenizer.

    Engine keyword arguments: `max_num_seqs`, `max_num_batched_tokens`, `enable_chunked_prefill`,
    `block_size`, `kv_cache_memory` (GiB), `num_blocks`, `enable_prefix_caching`, `policy`, and
    `enable_lora`, `lora_modules` ({name: dir}), `max_loras`, `max_lora_rank`, `max_cpu_loras`: LoRA
    adapters per request (`generate(..., lora_request=...)`); `variant` ({name: dir}): BlockLLM's block zoo
    of fine-tuned variants (`generate(..., variant=...)`); and
    `batch_policy`: offline, a batch of at least `prefix_tree_min_batch` (32) prompts is grouped by
    shared prefix (BatchLLM, "auto", the default here); "fcfs" runs it in order, "prefix-tree" groups
    every batch.
    """

    def __init__(
        self,
        model: str,
        dtype: str = "auto",
        max_model_len: int | None = None,
        seed: int = 0,
        device: str = "cpu",
        **engine_kwargs: Any,
    ) -> None:
        engine_kwargs.setdefault("batch_policy", "auto")
        config = EngineConfig.create(
            model, dtype=dtype, max_model_len=max_model_len, device=device, seed=seed, **engine_kwargs
        )
        self.engine = LLMEngine(config)
        self._counter = 0

    def get_tokenizer(self) -> Any:
        return self.engine.tokenizer

    def close(self) -> None:
        """Release what outlives a call: the KV offload tiers' I/O threads (their staged blocks are written
        first). Offline runs need not call it; a process that ends closes the engine too."""
        self.engine.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def reset_prefix_cache(self) -> int:
        """Drop the prefix cache's blocks that no request holds, as vLLM's `LLM.reset_prefix_cache`
        does (KV offload tiers keep theirs); returns how many blocks were dropped."""
        return self.engine.reset_prefix_cache()

    def default_sampling_params(self) -> SamplingParams:
        return self.engine.default_sampling_params()

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: Params | Sequence[Params] | None = None,
        use_tqdm: bool = True,
        lora_request: Lora | Sequence[Lora] | None = None,
        variant: str | Sequence[str | None] | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt; outputs come back in input order.

        `lora_request` (an engine with `enable_lora=True`): the LoRA adapter of every prompt, or one per
        prompt, each a `LoRARequest(name, id, path)` or the name of a loaded adapter (None: the base).
        `variant` (an engine with `variant={name: dir}`): the block zoo's variant of every prompt, or one
        per prompt (None: the base).

        A prompt is text, a list of token ids, or {"prompt": ...} / {"prompt_token_ids": [...]}, which
        may add {"cache_salt": "..."}: KV is then shared only with prompts of the same salt. A single
        list of ints is one prompt. Every prompt and parameter set is validated before any work starts.
        """
        prompt_list = _as_prompt_list(prompts)
        if isinstance(sampling_params, Sequence) and not isinstance(sampling_params, (str, Mapping)):
            if len(sampling_params) != len(prompt_list):
                raise ValueError(
                    f"got {len(sampling_params)} sampling params for {len(prompt_list)} prompts"
                )
            params_list = [self.engine.to_sampling_params(p) for p in sampling_params]
        else:
            params_list = [self.engine.to_sampling_params(sampling_params)] * len(prompt_list)

        loras = _per_prompt(lora_request, len(prompt_list), "lora requests")
        variants = _per_prompt(variant, len(prompt_list), "variants")

        tokenized = [self.engine.tokenize_prompt(p) for p in prompt_list]
        salts = [self.engine.inputs.cache_salt_of(p) for p in prompt_list]
        for (_, ids), params in zip(tokenized, params_list):
            self.engine.validate(ids, params)
        for lora in dict.fromkeys(loras):  # each adapter checked (and loaded) before any request starts
            self.engine.registry.resolve(lora)
        for name in dict.fromkeys(variants):
            self.engine.registry.variant(name)

        request_ids = []
        for (text, ids), params, salt, lora, name in zip(tokenized, params_list, salts, loras, variants):
            request_id = f"offline-{self._counter}"
            self._counter += 1
            prompt: dict[str, Any] = {"prompt_token_ids": ids}
            if text is not None:
                prompt["prompt"] = text
            if salt is not None:
                prompt["cache_salt"] = salt
            self.engine.add_request(request_id, prompt, params, lora_request=lora, variant=name)
            request_ids.append(request_id)
        return self._run(request_ids, use_tqdm)

    def chat(
        self,
        messages: Sequence[Message] | Sequence[Sequence[Message]],
        sampling_params: Params | Sequence[Params] | None = None,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
        chat_template: str | None = None,
    ) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation or a list of them, then generate."""
        tokenizer = self.engine.tokenizer
        if tokenizer is None:
            raise ValueError("chat needs a tokenizer with a chat template; this model has none")
        if not messages:
            raise ValueError("messages must not be empty")
        conversations = [messages] if isinstance(messages[0], Mapping) else list(messages)
        prompts = []
        for conversation in conversations:
            if not conversation:
                raise ValueError("messages must not be empty")
            ids = tokenizer.apply_chat_template(
                list(conversation), add_generation_prompt=add_generation_prompt, tokenize=True,
                chat_template=chat_template,
            )
            if isinstance(ids, Mapping):  # transformers 5 returns a BatchEncoding
                ids = ids["input_ids"]
            text = tokenizer.decode(ids)
            prompts.append({"prompt": text, "prompt_token_ids": list(ids)})
        return self.generate(prompts, sampling_params, use_tqdm)

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        pending = set(request_ids)
        results: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(request_ids), desc="Generating", unit="req", disable=not use_tqdm)
        try:
            while pending:
                outputs = self.engine.step()
                if not outputs and not self.engine.has_unfinished_requests():
                    raise RuntimeError(f"engine stopped with {len(pending)} requests unfinished")
                for output in outputs:
                    if output.finished and output.request_id in pending:
                        results[output.request_id] = output
                        pending.discard(output.request_id)
                        bar.update(1)
        except BaseException:
            for request_id in pending:
                self.engine.abort_request(request_id)
            raise
        finally:
            bar.close()
        return [results[r] for r in request_ids]


def _as_prompt_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, (str, Mapping)):
        return [prompts]
    if isinstance(prompts, Sequence) and prompts and all(isinstance(t, int) for t in prompts):
        return [list(prompts)]  # one prompt given as token ids
    if not isinstance(prompts, Sequence) or not prompts:
        raise ValueError("prompts must be a non-empty string, list of token ids, or list of prompts")
    return list(prompts)


def _per_prompt(value: Any, n: int, what: str) -> list[Any]:
    """One value for every prompt, or a list with one per prompt."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != n:
            raise ValueError(f"got {len(value)} {what} for {n} prompts")
        return list(value)
    return [value] * n
