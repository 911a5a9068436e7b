"""EngineCore: the synchronous step loop over token ids (schedule -> execute -> update).

It knows nothing of text: tokenisation, detokenisation and stop strings live in `LLMEngine` and
the server, so the core can run in its own process and never stall on them. It is given its KV
connector (kvflow/kv_transfer/), if any, and reports what happened besides its outputs through
`drain_events`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from kvflow.config import EngineConfig, resolve_kv_policy
from kvflow.core.kv_cache_manager import KVCacheManager
from kvflow.core.kv_policy import make_kv_policy
from kvflow.core.kv_residency import KVResidency
from kvflow.core.policies import PrefixTreeStats
from kvflow.core.request import Request, RequestStatus
from kvflow.core.scheduler import Scheduler, SchedulerEvents, SchedulerOutput
from kvflow.kv_transfer.base import KVConnector
from kvflow.kv_transfer.offload.connector import OffloadStats
from kvflow.worker.lora_manager import AdapterLoadError
from kvflow.worker.model_runner import ModelRunner
from kvflow.worker.sampler import advance_generator
from kvflow.worker.step import RunnerOutput, TokenLogprobs

logger = logging.getLogger(__name__)


@dataclass
class EngineCoreOutput:
    """What changed for one request in one step."""

    request_id: str
    new_token_ids: list[int] = field(default_factory=list)
    new_logprobs: list[TokenLogprobs] = field(default_factory=list)
    new_prompt_logprobs: list[TokenLogprobs | None] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float
    prefix_cache_hit_rate: float
    num_preemptions: int
    num_free_blocks: int
    num_blocks: int
    # Disaggregated serving: requests whose KV load failed, so the prompt was computed locally.
    num_kv_load_failures: int = 0
    # Speculative decoding, cumulative (core/scheduler.py's SpecDecodeStats).
    spec_num_drafts: int = 0
    spec_num_draft_tokens: int = 0
    spec_num_accepted_tokens: int = 0
    spec_accepted_per_position: list[int] = field(default_factory=list)
    # The most KV blocks held at once (requests and pinned prefixes) since the engine started (a
    # disaggregated router reports the sum of its instances' peaks).
    peak_used_blocks: int = 0
    # BatchLLM's prefix-tree plans (batch_policy prefix-tree/auto), cumulative: batches planned, groups
    # sharing a prefix, R_saving and the multi-level tree's optimum (kvflow/core/policies.py).
    prefix_tree_batches: int = 0
    prefix_tree_groups: int = 0
    prefix_tree_saving_ratio: float = 0.0
    prefix_tree_optimal_saving_ratio: float = 0.0
    # KV offload tiers (kvflow/kv_transfer/offload/): lookups, loads, writes, and each tier's counters.
    kv_offload: OffloadStats | None = None
    # SpeContext (--kv-policy specontext), cumulative: sparse decodes, (KV head, token) pairs moved into
    # buffers and already there, the bytes moved, retrieval keys found stale and recomputed.
    specontext_steps: int = 0
    specontext_moved_tokens: int = 0
    specontext_kept_tokens: int = 0
    specontext_moved_bytes: int = 0
    specontext_recomputed_keys: int = 0
    # --kv-resident-memory (kvflow/core/kv_residency.py): the memory model's count of the KV blocks' memory
    # now, and the KV moved to the offload tier so far (bytes; cumulative).
    kv_resident_bytes: int = 0
    specontext_offloaded_bytes: int = 0
    # Multi-LoRA: adapter slots, the adapters of running and waiting requests (names), and cumulative
    # loads into slots and from disk (kvflow/worker/lora_manager.py).
    lora_max: int = 0
    lora_running: list[str] = field(default_factory=list)
    lora_waiting: list[str] = field(default_factory=list)
    lora_slot_loads: int = 0
    lora_disk_loads: int = 0


class EngineCore:
    def __init__(self, config: EngineConfig, connector: KVConnector | None = None) -> None:
        """`connector`: moves KV in and out besides the model (kvflow/kv_transfer/base.py); the
        engine registers its caches with it and calls it from the scheduler and the runner."""
        self.config = config
        torch.manual_seed(config.seed)
        self.runner = ModelRunner(config)
        spec = self.runner.kv_spec
        resident = config.cache.kv_resident_memory
        self.kv = KVCacheManager(self.runner.num_blocks, config.cache.block_size, config.cache.enable_prefix_caching,
                                 kv_format=spec.wire_format, residual_slots=spec.residual_slots,
                                 residual_tokens=spec.residual_tokens, layer_groups=self.runner.kv_layer_groups,
                                 shared_groups=self.runner.kv_shared_groups, reuse_first=resident is not None)
        # SpeContext's adaptive memory: what stays in memory, each step (kvflow/core/kv_residency.py).
        pages = self.runner.kv_residency
        self.residency = None if pages is None or resident is None else KVResidency(
            self.kv, spec.num_layers, pages.layer_block_bytes, int(resident * 2**30), pages.release_per_layer_block,
            pages.touched_bytes)
        self.connector = connector
        if connector is not None and config.cache.kv_policy != "none":
            raise ValueError(f"kv_policy={config.cache.kv_policy}: KV policies do not support KV connectors")
        if connector is not None:
            if not spec.transferable:
                raise ValueError(f"kv_cache_dtype {spec.kv_dtype} with calibrated scales cannot be exchanged "
                                 "between instances or kept in an offload tier (each run calibrates its own): "
                                 "give --kv-scale")
            connector.register_kv_caches(self.runner.kv_spec, self.runner.kv_caches)
            self.runner.step_hooks = connector
        spec = config.speculative
        lookahead = spec.num_speculative_tokens if spec.speculative_method == "draft" else 0
        self.scheduler = Scheduler(config.scheduler, self.kv, config.model.max_model_len, connector,
                                   speculative=spec.enabled, lookahead=lookahead,
                                   spec_token_budget=spec.speculative_token_budget,
                                   max_loras=config.lora.max_loras if config.lora.enable_lora else 0,
                                   residency=self.residency)
        self.num_steps = 0
        self.last_step_tokens = 0  # tokens the last step computed (prompt chunks, decodes, proposals verified)
        # Keep what each step computed for the step log of `kvflow serve --step-log` (which
        # `kvflow profile --serve` fits latency models to).
        self.record_shapes = config.step_log is not None
        self.last_shape: tuple[list[tuple[int, int]], list[int]] = ([], [])

    def add_request(self, request: Request) -> None:
        params = request.params
        settings = resolve_kv_policy(self.config.cache, params.kv_policy, params.kv_budget)
        request.kv_policy = make_kv_policy(settings, self.config.cache.block_size)
        if request.kv_policy is not None and self.kv.layer_groups > 1:
            raise ValueError(f"kv_policy={settings.policy}: this engine shares its variants' KV in layer groups, "
                             "which KV policies do not read yet (start it with --no-zoo-share-kv)")
        self.scheduler.add_request(request)

    def abort_request(self, request_id: str, status: RequestStatus = RequestStatus.FINISHED_ABORTED,
                      stop_reason: int | str | None = None) -> bool:
        request = self.scheduler.finish_request(request_id, status)
        if request is None and self.connector is not None:
            self.connector.forget(request_id)  # finished here, its blocks still held: free them now
        if request is not None and stop_reason is not None:
            request.stop_reason = stop_reason
        return request is not None

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.num_unfinished > 0

    @property
    def transfers_pending(self) -> bool:
        """KV moving in or out: the loop should keep calling `step` (cheap when nothing runs)."""
        return self.connector is not None and self.connector.busy

    def step(self) -> list[EngineCoreOutput]:
        sched = self.scheduler.schedule()
        outputs = self._loaded_outputs(sched.loaded) + self._uncomputed_outputs(sched.finished)
        if sched.is_empty:
            return outputs
        if self.record_shapes:
            self.last_shape = self._step_shape(sched)
        self._give_back_memory()
        try:
            result = self.runner.execute(sched.chunks)
        except AdapterLoadError as e:  # nothing ran: other requests run next step, these end here
            return outputs + self._adapter_failures(sched, e)
        new_prompt_logprobs = self._record_prompt_logprobs(sched, result)
        kept = self.scheduler.update(sched, result)
        self._give_back_memory()  # (what this step finished)
        self.num_steps += 1
        self.last_step_tokens = sched.num_tokens
        now = time.monotonic()

        for chunk in sched.chunks:
            request = chunk.request
            assert isinstance(request, Request)
            rid = request.request_id
            num_new = kept.get(rid, 0)
            prompt_lps = new_prompt_logprobs.get(rid)
            if not num_new and prompt_lps is None and not request.finished:
                continue
            out = EngineCoreOutput(rid, num_cached_tokens=request.num_cached_tokens)
            if prompt_lps is not None:
                out.new_prompt_logprobs = prompt_lps
            if num_new:
                if request.first_token_time is None:
                    request.first_token_time = now
                out.new_token_ids = result.sampled[rid][:num_new]
                if rid in result.logprobs:
                    out.new_logprobs = result.logprobs[rid][:num_new]
            if request.finished:
                out.finish_reason = request.status.finish_reason
                out.stop_reason = request.stop_reason
            outputs.append(out)
        return outputs

    def _adapter_failures(self, sched: SchedulerOutput, error: AdapterLoadError) -> list[EngineCoreOutput]:
        """Finish (aborted) the requests whose LoRA adapter could not be loaded: its files changed or went
        away since it was registered. No other request is touched; none ran with other weights."""
        outputs = []
        for chunk in sched.chunks:
            request = chunk.request
            if request.lora is None or request.lora.key not in error.keys or request.finished:
                continue
            logger.error("request %s: %s", request.request_id, error.keys[request.lora.key])
            self.scheduler.finish_request(request.request_id, RequestStatus.FINISHED_ABORTED)
            outputs.append(EngineCoreOutput(request.request_id, finish_reason=RequestStatus.FINISHED_ABORTED.value,
                                            stop_reason=f"LoRA adapter {request.lora.name!r} could not be loaded"))
        return outputs

    @staticmethod
    def _step_shape(sched: SchedulerOutput) -> tuple[list[tuple[int, int]], list[int]]:
        """(prompt chunks as (new tokens, tokens before them), decode context lengths) of a step."""
        chunks, contexts = [], []
        for chunk in sched.chunks:
            if chunk.num_tokens == 1 and chunk.start >= chunk.request.num_prompt_tokens:
                contexts.append(chunk.start + 1)
            else:
                chunks.append((chunk.num_tokens, chunk.start))
        return chunks, contexts

    def _record_prompt_logprobs(self, sched: SchedulerOutput,
                                result: RunnerOutput) -> dict[str, list[TokenLogprobs | None]]:
        """Keep this step's prompt logprobs on the requests before `update` finishes them, so a connector
        sees them with the request (a prefill instance ships them with the KV); returns each request's
        new prompt entries (token 0's is None)."""
        new_prompt: dict[str, list[TokenLogprobs | None]] = {}
        for chunk in sched.chunks:
            request = chunk.request
            prompt_lps = result.prompt_logprobs.get(request.request_id)
            if prompt_lps is not None:
                entries: list[TokenLogprobs | None] = [] if request.prompt_logprobs else [None]
                entries.extend(prompt_lps)
                request.prompt_logprobs.extend(entries)
                new_prompt[request.request_id] = entries
        return new_prompt

    def _loaded_outputs(self, loaded: list[Request]) -> list[EngineCoreOutput]:
        """Decode instance: take over each request whose KV just arrived and emit what the prefill
        instance computed with it (first token, its logprobs, the prompt's logprobs)."""
        outputs = []
        now = time.monotonic()
        for request in loaded:
            if request.generator is not None:
                # Its first token was sampled on the prefill instance: skip that draw here. The
                # draw spans the logits, vocab_size wide: the model builds its LM head with vocab_size rows.
                advance_generator(request.params, request.generator, request.num_output_tokens,
                                  self.config.model.vocab_size, self.runner.device)
            request.first_token_time = now
            out = EngineCoreOutput(request.request_id, [request.all_token_ids[-1]], request.output_logprobs[:1],
                                   list(request.prompt_logprobs), num_cached_tokens=request.num_cached_tokens)
            if request.finished:
                out.finish_reason = request.status.finish_reason
                out.stop_reason = request.stop_reason
            outputs.append(out)
        return outputs

    @staticmethod
    def _uncomputed_outputs(finished: list[Request]) -> list[EngineCoreOutput]:
        """Prompt-only requests the scheduler finished on admission, with nothing to compute: a one-token
        prompt's logprobs are just token 0's None; an n > 1 sibling reports none (its leader does)."""
        outputs = []
        for request in finished:
            out = EngineCoreOutput(request.request_id, finish_reason=request.status.finish_reason,
                                   stop_reason=request.stop_reason)
            if request.params.prompt_logprobs is not None and request.leader is None and not request.prompt_logprobs:
                request.prompt_logprobs.append(None)
                out.new_prompt_logprobs = [None]
            outputs.append(out)
        return outputs

    def _give_back_memory(self) -> None:
        """--kv-resident-memory: the pages of blocks the memory model let go (freed, evicted) go back."""
        if self.residency is not None:
            released = self.residency.take_released()
            if released:
                assert self.runner.kv_residency is not None
                self.runner.kv_residency.release_blocks(released)

    def drain_events(self) -> SchedulerEvents:
        """What happened besides the step outputs since the last call: blocks released outside a
        step, KV loads finished, outgoing KV transfers acknowledged."""
        return self.scheduler.drain_events()

    def stats(self) -> EngineStats:
        spec, sc = self.scheduler.spec_stats, self.scheduler.specontext_stats
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            kv_cache_usage=self.kv.usage(),
            prefix_cache_hit_rate=self.kv.stats.hit_rate,
            num_preemptions=self.scheduler.num_preemptions,
            num_free_blocks=self.kv.num_free_blocks,
            num_blocks=self.kv.num_blocks,
            num_kv_load_failures=self.scheduler.num_kv_load_failures,
            spec_num_drafts=spec.num_drafts,
            spec_num_draft_tokens=spec.num_draft_tokens,
            spec_num_accepted_tokens=spec.num_accepted_tokens,
            spec_accepted_per_position=list(spec.accepted_per_position),
            peak_used_blocks=self.kv.peak_used_blocks,
            kv_offload=None if self.connector is None else self.connector.stats_snapshot(),
            specontext_steps=sc.steps, specontext_moved_tokens=sc.moved_tokens, specontext_kept_tokens=sc.kept_tokens,
            specontext_moved_bytes=sc.moved_bytes, specontext_recomputed_keys=sc.recomputed_keys,
            kv_resident_bytes=0 if self.residency is None else self.residency.resident_bytes,
            specontext_offloaded_bytes=0 if self.residency is None else self.residency.offloaded_bytes,
            **self._prefix_tree_stats(), **self._lora_stats(),
        )

    def _lora_stats(self) -> dict[str, Any]:
        lora = self.runner.lora
        if lora is None:
            return {}

        def names(requests) -> list[str]:
            return sorted({r.lora.name for r in requests if r.lora is not None})

        return {"lora_max": len(lora.slot_keys), "lora_running": names(self.scheduler.running),
                "lora_waiting": names(self.scheduler.waiting), "lora_slot_loads": lora.stats.slot_loads,
                "lora_disk_loads": lora.stats.disk_loads}

    def _prefix_tree_stats(self) -> dict[str, Any]:
        tree = getattr(self.scheduler.policy, "stats", None)
        if not isinstance(tree, PrefixTreeStats):
            return {}
        return {"prefix_tree_batches": tree.batches, "prefix_tree_groups": tree.groups,
                "prefix_tree_saving_ratio": tree.saving_ratio,
                "prefix_tree_optimal_saving_ratio": tree.optimal_saving_ratio}

    def close(self) -> None:
        if self.connector is not None:
            self.connector.close()
        self.runner.close()
