"""ModelRunner: one scheduler step -> flat tensors -> forward over the paged cache -> samples.

The step's chunks are reordered so single-token chunks (decodes) come first, which lets the
attention backend treat them as one batched decode. Logits are computed only where they are
needed: the last token of each chunk that samples (every verified position of a chunk that
carries speculative proposals), and prompt positions whose logprobs were asked for.
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from kvflow.attention.backend import AttentionMetadata, get_backend
from kvflow.attention.kivi import KiviStep, rotate_rings
from kvflow.attention.kv_policy_ops import allocate_key_bounds, update_key_bounds
from kvflow.attention.kv_quant import kv_scales_set
from kvflow.attention.kv_spec import KVCacheSpec
from kvflow.attention.policy_step import PolicyStep, QuestRows, SnapJob, SpeContextReads
from kvflow.config import EngineConfig
from kvflow.model.block_zoo import BlockZoo
from kvflow.model.cpu_kernels import (
    CPU_FORWARD_MAX_CHUNK,
    CpuForward,
    CpuForwardUnsupported,
    cpu_kernels_available,
    decode_gemv_available,
)
from kvflow.model.linear import DenseLinear, LinearMethod, PrepackedLinear, linear_layers, prepack_available
from kvflow.model.loader import load_model, release_freed_heap
from kvflow.model.quant.linear_methods import use_activations
from kvflow.worker.kv_budget import num_kv_blocks
from kvflow.worker.kv_layer_groups import allocate_grouped, group_metadata, group_step_tables, layer_groups_blocker
from kvflow.worker.kv_residency import ReleasableCache, SpillTier, residency_blocker
from kvflow.worker.lora_manager import LoRAManager
from kvflow.worker.rejection_sampler import RejectionSampler, VerificationBatch, plain_greedy, verify_plain_greedy
from kvflow.worker.retrieval_keys import (
    ElasticLoader,
    RetrievalKeyCache,
    engine_retrieval_head,
    plan_specontext,
)
from kvflow.worker.sampler import Sampler, SamplingBatch
from kvflow.worker.spec_decode import draft_kv_bytes_per_block, make_proposer
from kvflow.worker.step import RunnerOutput, ScheduledChunk, SequenceView, StepHooks, TokenLogprobs
from kvflow.worker.step_inputs import paged_step_inputs

logger = logging.getLogger(__name__)


class ModelRunner:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.model_config = config.model
        self.device = torch.device(config.device)
        self.block_size = config.cache.block_size
        self.model = load_model(config.model, self.device)
        # BlockLLM's block zoo: the variants' own layers, hashed against the base's before any method repacks them.
        self.zoo = BlockZoo.load(self.model, config.zoo.variants, self.device, load_model) if config.zoo.variant \
            else None
        runner = config.runner
        use_cpu_kernels = (runner.cpu_kernels and runner.attention_backend != "triton"
                           and cpu_kernels_available(self.device, config.model.dtype))
        method = self._linear_method(use_cpu_kernels)
        self.model.use_linear_method(method)
        if self.zoo is not None:
            self.zoo.use_linear_method(method)
        # Multi-LoRA: adapter slots on every projection, filled per step by the manager.
        self.lora = LoRAManager(config, self.model) if config.lora.enable_lora else None
        mode = runner.quant_activations
        if not use_activations(linear_layers(self.model), mode) and mode != "exact":
            logger.info("quant_activations=%s changes nothing here: no layer holds q8_0, q4_0 or q4_k weights",
                        mode)
        self.backend = get_backend(self.device, runner.attention_backend)
        model = config.model
        self.kv_spec = KVCacheSpec.for_format(config.cache.kv_cache_dtype, model.num_layers, model.num_kv_heads,
                                              model.head_dim, self.block_size, model.dtype, config.cache.kv_scale,
                                              residual_tokens=config.cache.kv_residual_tokens,
                                              residual_slots=config.scheduler.max_num_seqs)
        if not self.backend.supports(self.kv_spec):
            raise ValueError(f"kv_cache_dtype={self.kv_spec.kv_dtype}: the {self.backend.name} attention backend "
                             f"cannot read a {self.kv_spec.wire_format} KV cache in the {self.kv_spec.layout} layout")
        if config.cache.kv_policy == "quest":  # Quest's per-block key bounds live beside the cache
            self.kv_spec = dataclasses.replace(self.kv_spec, key_bounds_dtype=model.dtype)
        draft_bytes = draft_kv_bytes_per_block(config)  # a draft model's KV shares the budget
        # SpeContext: the retrieval head's keys are paged beside the cache and share the budget too.
        self.retrieval_head = engine_retrieval_head(config, self.device, self.model.embed_tokens.weight)
        retrieval_bytes = 0 if self.retrieval_head is None else (
            self.retrieval_head.config.key_cache_bytes_per_token * self.block_size)
        self.num_blocks = num_kv_blocks(config, self.kv_spec, draft_bytes + retrieval_bytes)
        # A block zoo whose variants share their leading layers with the base: the cache in layer groups, whose
        # pages are the pool's entries (kv_layer_groups.py).
        self.kv_layer_groups, self.kv_shared_groups = 1, {}
        if self.zoo is not None and config.zoo.zoo_share_kv:
            groups, shared = self.zoo.kv_layer_groups()
            blocker = layer_groups_blocker(config, self.kv_spec) if groups > 1 else None
            if blocker is not None:  # one group: only variants that changed no layer (just the final norm) share
                logger.info("the block zoo's variants keep KV of their own in the layers they share with the "
                            "base: %s", blocker)
                groups, shared = 1, {key: 1 for key, n in shared.items() if n == groups}
            self.kv_layer_groups, self.kv_shared_groups = groups, shared
        # --kv-resident-memory: a pool whose pages cost memory once written and can go back to the OS, and
        # the offload tier SpeContext's older KV moves to (kv_residency.py).
        self.kv_residency: ReleasableCache | None = None
        if self.kv_layer_groups > 1 and config.cache.kv_resident_memory is not None:
            raise ValueError("kv_resident_memory releases a block's pages layer by layer: it cannot run on a cache "
                             "in layer groups (a block zoo sharing KV; give --no-zoo-share-kv)")
        if self.kv_layer_groups > 1:
            self.num_blocks *= self.kv_layer_groups  # pages: the same bytes
            self.kv_caches = allocate_grouped(self.kv_spec, self.kv_layer_groups, self.num_blocks, self.device)
        elif config.cache.kv_resident_memory is not None:
            blocker = residency_blocker(self.device, self.kv_spec)
            if blocker is not None:
                raise ValueError(blocker)
            self.kv_residency = ReleasableCache(self.kv_spec, self.num_blocks)
            self.kv_caches = self.kv_residency.caches
        else:
            self.kv_caches = self.kv_spec.allocate(self.num_blocks, self.device)
        self.retrieval_keys: RetrievalKeyCache | None = None
        self.loader: ElasticLoader | None = None
        if self.retrieval_head is not None:
            self.retrieval_keys = RetrievalKeyCache(self.retrieval_head, self.num_blocks, self.block_size, self.device)
            tier = None if self.kv_residency is None else SpillTier(self.kv_residency, config.cache.kv_spill_dir)
            self.loader = ElasticLoader(self.device, tier=tier)
        self.key_bounds: list[torch.Tensor] | None = None
        if self.kv_spec.key_bounds_dtype is not None:
            self.key_bounds = allocate_key_bounds(model.num_layers, self.num_blocks, model.num_kv_heads,
                                                  model.head_dim, model.dtype, self.device)
        spec, blocks = self.kv_spec, self.num_blocks // self.kv_layer_groups
        logger.info("KV cache: %s, %d blocks of %d tokens = %d tokens, %.3f GiB (%d bytes per token)%s", spec.kv_dtype,
                    blocks, spec.block_size, blocks * spec.block_size,
                    (blocks * spec.bytes_per_block + spec.fixed_bytes) / 2**30, spec.bytes_per_token,
                    f", in {self.kv_layer_groups} layer groups of {self.num_blocks} pages"
                    if self.kv_layer_groups > 1 else "")
        self.step_hooks: StepHooks | None = None  # a KV connector's worker side, if it needs one
        self.cpu_forward: CpuForward | None = None
        if use_cpu_kernels:
            try:
                self.cpu_forward = CpuForward(self.model, self.kv_spec, self.kv_caches,
                                              None if self.lora is None else self.lora.slots, self.zoo)
            except CpuForwardUnsupported as exc:
                logger.info("%s; running the PyTorch modules", exc)
        # Shared-prefix groups are found only where this runner's attention reads them (the C++
        # forward's paged path, the Triton backend), and never for KIVI caches.
        self._shared_prefix = (runner.shared_prefix_attention and not self.kv_spec.kivi_bits
                               and self.kv_layer_groups == 1  # (it groups decodes by one table's blocks)
                               and (self.cpu_forward is not None or self.backend.name == "triton"))
        self._sliding_window = max((w for w in model.sliding_windows if w), default=None)
        self.sampler = Sampler()
        # Speculative decoding: who proposes each step's tokens, and what keeps or rejects them.
        self.proposer = make_proposer(config, self.num_blocks, self.device, use_cpu_kernels)
        self.num_speculative_tokens = config.speculative.num_speculative_tokens
        self.rejection_sampler = RejectionSampler()
        # fp8 without a given scale: the PyTorch backend calibrates on the first step that stores KV,
        # and the C++ forward (which only reads scales) waits for it.
        self._kv_scales_set = kv_scales_set(self.kv_spec, self.kv_caches)
        release_freed_heap()  # what loading, quantising and repacking the weights freed

    def close(self) -> None:
        """Stop the runner's helper threads (SpeContext's loader)."""
        if self.loader is not None:
            self.loader.close()

    def _linear_method(self, use_cpu_kernels: bool) -> LinearMethod:
        """The method of the layers loaded dense (quantised ones keep their format's method, chosen at
        load): bf16 on a CPU with oneDNN, prepacked weights (bit-identical, faster), with the decode
        GEMV's copies where the C++ forward will use them (not where a quantised layer keeps that
        forward from running); else the weights as loaded."""
        runner = self.config.runner
        if runner.prepack_weights and prepack_available(self.device, self.model_config.dtype):
            forward_runs = all(layer.method.cpu_kernel_weights(layer) is not None
                               for layer in linear_layers(self.model) if not isinstance(layer.method, DenseLinear))
            return PrepackedLinear(decode_copy=use_cpu_kernels and forward_runs and runner.decode_gemv
                                   and decode_gemv_available())
        return DenseLinear()

    # ---------------------------------------------------------------- execute
    @torch.inference_mode()
    def execute(self, scheduled: list[ScheduledChunk]) -> RunnerOutput:
        # Stable: decodes first; with variants or LoRA, grouped by model (one run of tokens per model's decodes).
        chunks = sorted(scheduled, key=(lambda c: c.num_tokens != 1) if self.lora is None and self.zoo is None
                        else _model_order)
        lora_runs = None if self.lora is None else self.lora.prepare(chunks)
        zoo_runs = None
        if self.zoo is not None:
            zoo_runs = variant_runs(chunks)
            self.zoo.set_runs(zoo_runs)
        input_ids, positions, kv_positions, meta = self._prepare_inputs(chunks)
        block_tables, slot_mapping = meta.block_tables, meta.slot_mapping  # what the C++ forward reads
        if self.kv_layer_groups > 1:
            assert meta.token_seq_index is not None
            block_tables, slot_mapping = group_step_tables(chunks, self.kv_layer_groups, kv_positions,
                                                           meta.token_seq_index, self.block_size, self.num_blocks)
            meta.block_tables, meta.slot_mapping = block_tables[0], slot_mapping[0]  # meta states group 0
        windows = None
        if self.retrieval_keys is not None:  # every computed token's retrieval key, before anyone scores
            windows = self.retrieval_keys.chunk_windows(chunks)
            self.retrieval_keys.store(windows, positions, meta.slot_mapping)
        specontext: dict = {}
        policy = self._policy_step(chunks, meta, positions, windows, specontext)
        loads = policy.specontext.loads if policy is not None and policy.specontext is not None else None
        hooks, hook = self.step_hooks, None
        if hooks is not None and hooks.begin_step(chunks):
            hook = hooks.layer_done
        try:
            if self.cpu_forward is not None and meta.max_query_len <= CPU_FORWARD_MAX_CHUNK and self._scales_ready():
                before = after = None
                if policy is not None:  # its work runs around each layer's attention, with the layer's queries
                    scale = self.model_config.head_dim**-0.5
                    caches = self.kv_caches

                    def after(layer: int, q: torch.Tensor) -> None:
                        policy.after_attention(layer, q, caches[layer], meta, None, scale)

                if policy is not None and (policy.quest is not None or policy.specontext is not None):
                    # (only Quest and SpeContext read other tables)

                    def before(layer: int, q: torch.Tensor) -> list[torch.Tensor]:
                        return policy.cpu_reads(layer, q, meta, kv_positions, scale)

                kivi = {} if meta.kivi is None else {"kivi": meta.kivi, "query_start": meta.query_start_loc}
                hidden = self.cpu_forward(input_ids, positions, meta.token_seq_index, slot_mapping,
                                          block_tables, hook, kv_positions, before, after, **kivi,
                                          shared_prefix=meta.shared_prefix, lora_runs=lora_runs,
                                          zoo_runs=zoo_runs)
            else:
                self.backend.prepare(meta)
                if self.kv_layer_groups > 1:
                    group_metadata(meta, block_tables, slot_mapping, self.backend,
                                   self.model_config.num_layers // self.kv_layer_groups)
                if policy is not None and policy.block_mass is not None:
                    meta.extra["block_mass"] = policy.block_mass
                hidden = self.model(input_ids, positions, self.kv_caches, meta, self.backend, hook)
        finally:
            if hooks is not None:
                hooks.end_step()
            if loads is not None:
                loads.wait_all()  # nothing may still write a buffer once the step is over
        if self.key_bounds is not None:
            fold = self.cpu_forward.fold_key_bounds if self.cpu_forward is not None else None
            update_key_bounds(self.key_bounds, self.kv_caches, meta.slot_mapping, self.block_size, fold)
        out = self._sample(chunks, hidden, meta)
        out.kv_specontext = specontext
        if policy is not None and policy.block_mass is not None:
            for row in policy.h2o_rows:
                nb = -(-meta.seq_lens_list[row] // self.block_size)
                out.kv_block_mass[chunks[row].request.request_id] = policy.block_mass[row, :nb].tolist()
        return out

    def _policy_step(self, chunks: list[ScheduledChunk], meta: AttentionMetadata, positions: torch.Tensor,
                     windows: torch.Tensor | None, specontext: dict) -> PolicyStep | None:
        """The KV-policy work of this step's chunks for the attention layers, if any (SpeContext's
        selections are made and their loads started here, ahead of the forward; what each request's
        policy keeps goes into `specontext`)."""
        ops = [(i, c.kv_op) for i, c in enumerate(chunks) if c.kv_op is not None]
        if not ops:
            return None
        step = PolicyStep(key_bounds=self.key_bounds)
        if self.cpu_forward is not None:
            step.select_fn, step.mass_fn = self.cpu_forward.quest_select, self.cpu_forward.block_mass
        quest = QuestRows([], [], [], [])
        specontext_rows: list[int] = []
        for i, op in ops:
            if op.name == "quest":
                if self.key_bounds is None:
                    raise ValueError("kv_policy quest needs the engine started with --kv-policy quest")
                quest.rows.append(i)
                quest.read_blocks.append(op.read_blocks)
                quest.sink_blocks.append(op.sink_blocks)
                quest.window_blocks.append(op.window_blocks)
            elif op.name == "h2o":
                step.h2o_rows.append(i)
            elif op.name == "specontext":
                if self.retrieval_keys is None:
                    raise ValueError("kv_policy specontext needs the engine started with a retrieval head "
                                     "(--kv-policy specontext or --retrieval-model)")
                specontext_rows.append(i)
            elif op.name == "snapkv":
                window = min(op.window, chunks[i].num_tokens)
                dest = torch.tensor(op.dest_block_ids, dtype=torch.long, device=self.device)
                step.snaps.append(SnapJob(i, op.budget, window, dest))
        if quest.rows:
            step.quest = quest
        if specontext_rows:
            assert self.retrieval_keys is not None and self.loader is not None and windows is not None
            moves, tables, lens, results = plan_specontext(
                self.retrieval_keys, chunks, specontext_rows, windows, positions, meta.query_start_loc.tolist(),
                meta.block_tables, self.block_size, self.kv_spec.bytes_per_token // self.kv_spec.num_kv_heads)
            step.specontext = SpeContextReads(specontext_rows, tables, lens, self.loader.start(self.kv_caches, moves))
            specontext.update(results)
        if step.h2o_rows:
            step.block_mass = torch.zeros(meta.num_decodes, meta.block_tables.shape[1], dtype=torch.float32,
                                          device=self.device)
        meta.policy = step
        return step

    def _scales_ready(self) -> bool:
        if not self._kv_scales_set:
            self._kv_scales_set = kv_scales_set(self.kv_spec, self.kv_caches)
        return self._kv_scales_set

    def _prepare_inputs(
        self, chunks: list[ScheduledChunk],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata]:
        """Flat token ids, their positions (for the rotary embedding), their cache indices (positions
        less what the request's KV policy dropped before them) and the attention metadata, whose
        sequence lengths count what each sequence's cache holds."""
        bs = self.block_size
        token_ids: list[int] = []
        seq_lens: list[int] = []
        query_lens: list[int] = []
        shifts: list[int] = []
        for c in chunks:
            known = c.num_tokens - len(c.spec_token_ids)
            token_ids.extend(c.request.all_token_ids[c.start : c.start + known])
            token_ids.extend(c.spec_token_ids)
            seq_lens.append(c.start + c.num_tokens - c.kv_shift)
            query_lens.append(c.num_tokens)
            shifts.append(c.kv_shift)
        positions, kv_positions, meta, tables = paged_step_inputs(
            seq_lens, query_lens, [c.request.block_ids for c in chunks], bs, self.device, shifts,
            shared_prefix=self._shared_prefix, sliding_window=self._sliding_window,
            query_heads_per_kv=self.model_config.num_heads // self.model_config.num_kv_heads)
        if self.kv_spec.kivi_bits:
            # In cache indices, as the blocks hold them (evictions and SnapKV's compaction shift positions).
            starts = [c.start - c.kv_shift for c in chunks]
            for c in chunks:
                if c.kv_ring_shift:
                    rotate_rings(self.kv_caches, c.kv_residual_slot, c.kv_ring_shift)
            meta.kivi = KiviStep.build(self.kv_spec.kivi_bits, self.kv_spec.residual_tokens, bs,
                                       [c.kv_residual_slot for c in chunks], starts, seq_lens,
                                       [c.kv_prefix_floor for c in chunks], meta.query_start_loc.tolist(), tables,
                                       self.device)
        input_ids = torch.tensor(token_ids, dtype=torch.long, device=self.device)
        return input_ids, positions, kv_positions, meta

    def _sample(self, chunks: list[ScheduledChunk], hidden: torch.Tensor, meta: AttentionMetadata) -> RunnerOutput:
        out = RunnerOutput()
        starts = meta.query_start_loc.tolist()
        sample_rows: list[int] = []
        sample_reqs: list[SequenceView] = []
        prompt_rows: list[int] = []
        prompt_targets: list[tuple[SequenceView, int]] = []  # (request, position of the predicted token)
        verify: list[tuple[int, ScheduledChunk]] = []
        for i, c in enumerate(chunks):
            request = c.request
            if c.samples and c.spec_token_ids:
                verify.append((i, c))
            elif c.samples:
                sample_rows.append(starts[i + 1] - 1)
                sample_reqs.append(request)
            if request.params.prompt_logprobs is not None:
                # Entries exist for prompt tokens [0, done); token 0 has none (None), so after a
                # preemption the recomputed prefix is not scored twice.
                done = max(len(request.prompt_logprobs), 1)
                first = max(c.start, done - 1)
                last = min(c.start + c.num_tokens, request.num_prompt_tokens - 1)
                for pos in range(first, last):
                    prompt_rows.append(starts[i] + pos - c.start)
                    prompt_targets.append((request, pos + 1))

        if sample_reqs and all(r.params.logprobs is None and plain_greedy(r.params, len(r.output_token_ids))
                               for r in sample_reqs):
            # Only argmaxes decide (no draws, penalties or blocked ids): the sampler's greedy path, without
            # building its per-row tensors (a tenth of a 135m q4_0 decode step at one core).
            best = self._greedy_tokens(hidden[sample_rows])
            for request, token in zip(sample_reqs, best):
                out.sampled[request.request_id] = [token]
        elif sample_reqs:
            logits = self._logits(hidden[sample_rows])
            batch = SamplingBatch.from_params(
                [r.params for r in sample_reqs],
                generators=[r.generator for r in sample_reqs],
                output_token_ids=[r.output_token_ids for r in sample_reqs],
                prompt_token_ids=[r.prompt_token_ids for r in sample_reqs],
                blocked_token_ids=[r.blocked_token_ids() for r in sample_reqs],
            )
            result = self.sampler(logits, batch)
            token_ids = result.token_ids.tolist()
            logprobs = result.logprobs.tolist() if result.logprobs is not None else None
            top_ids = result.top_token_ids.tolist() if result.top_token_ids is not None else None
            top_lps = result.top_logprobs.tolist() if result.top_logprobs is not None else None
            for row, request in enumerate(sample_reqs):
                out.sampled[request.request_id] = [token_ids[row]]
                k = request.params.logprobs
                if k is not None:
                    out.logprobs[request.request_id] = [TokenLogprobs(
                        token_ids[row], logprobs[row],
                        top_ids[row][:k] if k else [], top_lps[row][:k] if k else [],
                    )]

        if prompt_rows:
            logprobs = torch.log_softmax(self.model.compute_logits(hidden[prompt_rows]), dim=-1)
            targets = torch.tensor([r.all_token_ids[p] for r, p in prompt_targets], device=logprobs.device)
            chosen = logprobs.gather(1, targets[:, None])[:, 0].tolist()
            k_max = max(r.params.prompt_logprobs for r, _ in prompt_targets)
            top = torch.topk(logprobs, k_max, dim=-1) if k_max else None
            for row, (request, pos) in enumerate(prompt_targets):
                k = request.params.prompt_logprobs
                entry = TokenLogprobs(
                    request.all_token_ids[pos], chosen[row],
                    top.indices[row, :k].tolist() if k else [], top.values[row, :k].tolist() if k else [],
                )
                out.prompt_logprobs.setdefault(request.request_id, []).append(entry)
        if verify:
            self._verify(verify, starts, hidden, out)
        if self.proposer is not None:
            self._propose(chunks, out)
        return out

    def _logits(self, rows: torch.Tensor) -> torch.Tensor:
        return self.cpu_forward.logits(rows) if self.cpu_forward is not None else self.model.compute_logits(rows)

    def _greedy_tokens(self, rows: torch.Tensor) -> list[int]:
        """The argmax of each row's logits (the C++ forward's takes it without an fp32 copy of the logits)."""
        if self.cpu_forward is not None:
            return self.cpu_forward.greedy_tokens(rows)
        return self.model.compute_logits(rows).argmax(dim=-1).tolist()

    def _verify(self, verify: list[tuple[int, ScheduledChunk]], starts: list[int], hidden: torch.Tensor,
                out: RunnerOutput) -> None:
        """Chunks carrying K proposals: score their last K + 1 positions at once, keep what rejection
        sampling accepts and one more token (the correction, or the bonus after K accepted)."""
        rows: list[int] = []
        for i, c in verify:
            rows.extend(range(starts[i + 1] - 1 - len(c.spec_token_ids), starts[i + 1]))
        requests = [c.request for _, c in verify]
        if all(r.params.logprobs is None and plain_greedy(r.params, len(r.output_token_ids)) for r in requests):
            # Only argmaxes decide (no q, no draws, no penalties): the greedy path of the sampler, direct.
            tokens = verify_plain_greedy(self._logits(hidden[rows]), [c.spec_token_ids for _, c in verify])
            for request, emitted in zip(requests, tokens):
                out.sampled[request.request_id] = emitted
            return
        batch = VerificationBatch.build(
            [r.params for r in requests], [r.generator for r in requests], [r.output_token_ids for r in requests],
            [r.prompt_token_ids for r in requests], [c.spec_token_ids for _, c in verify],
            [r.eos_token_ids for r in requests])
        draft_probs = self._draft_probs([c for _, c in verify])
        result = self.rejection_sampler(self._logits(hidden[rows]), batch, draft_probs)
        for n, request in enumerate(requests):
            out.sampled[request.request_id] = result.token_ids[n]
            if result.logprobs[n] is not None:
                out.logprobs[request.request_id] = result.logprobs[n]

    @staticmethod
    def _draft_probs(chunks: list[ScheduledChunk]) -> torch.Tensor | None:
        """The q rows of a verification (None: every proposal is a point mass, as prompt lookup's and a
        draft's greedy ones are; where only some are, theirs become one-hot rows)."""
        probs = [c.spec_draft_probs for c in chunks]
        some = next((p for p in probs if p is not None), None)
        if some is None:
            return None
        rows = [p if p is not None else torch.nn.functional.one_hot(
                    torch.tensor(c.spec_token_ids, device=some.device), some.shape[-1]).to(some.dtype)
                for p, c in zip(probs, chunks)]
        return torch.cat(rows)

    def _propose(self, chunks: list[ScheduledChunk], out: RunnerOutput) -> None:
        """Proposals for the next step of each request the scheduler asked them for."""
        asking = [c for c in chunks if c.propose and c.request.request_id in out.sampled]
        if not asking:
            return
        assert self.proposer is not None
        counts = [min(c.propose, self.num_speculative_tokens) for c in asking]
        requests = [c.request for c in asking]
        proposals = self.proposer.propose(requests, [out.sampled[r.request_id] for r in requests], counts)
        for n, request in enumerate(requests):
            rid = request.request_id
            if proposals.draft_computed is not None:
                out.spec_draft_computed[rid] = proposals.draft_computed[n]
            if proposals.token_ids[n]:
                out.spec_token_ids[rid] = proposals.token_ids[n]
                if proposals.draft_probs is not None and proposals.draft_probs[n] is not None:
                    out.spec_draft_probs[rid] = proposals.draft_probs[n]


def _model_order(chunk: ScheduledChunk) -> tuple[bool, str, str]:
    """Decodes first (as always), then by variant and adapter, so each model's decodes are one run of rows."""
    request = chunk.request
    return (chunk.num_tokens != 1, "" if request.variant is None else request.variant.key,
            "" if request.lora is None else request.lora.key)


def variant_runs(chunks: list[ScheduledChunk]) -> dict[str, list[tuple[int, int]]]:
    """Variant key -> (start, end) runs of the step's flat tokens (chunks in execution order)."""
    runs: dict[str, list[tuple[int, int]]] = {}
    start = 0
    for chunk in chunks:
        end = start + chunk.num_tokens
        ref = chunk.request.variant
        if ref is not None:
            own = runs.setdefault(ref.key, [])
            if own and own[-1][1] == start:
                own[-1] = (own[-1][0], end)
            else:
                own.append((start, end))
        start = end
    return runs
