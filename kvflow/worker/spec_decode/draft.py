"""Draft-model proposals (`--speculative-method draft --speculative-model DIR`): a small model with
the target's vocabulary (the shipped `tiny-draft` was distilled from `tiny` for this) decodes K tokens
ahead of each request, sampling each from its own distribution q processed exactly as the target's
p will be (penalties, temperature, top-k/p, min-p), and hands q to the rejection sampler with them.

**Its KV cache** is its own tensors, paged in parallel with the target's: block b of the draft's
cache holds the draft's KV of the same tokens as block b of the target's. So a request's block table
serves both models, and allocation, sharing, preemption and roll-back are the target's (the blocks
are counted in the memory budget: `kv_spec` tells the runner their size). The draft's KV is valid
for a request's first `Request.spec_draft_computed` tokens; each proposal pass first runs the draft
over the tokens after those (the whole prompt the first time, then the tokens the last verification
kept), then K - 1 single-token steps. KV the draft wrote for its own proposals is recomputed next
pass: the pass that follows a verification sees which of them were kept.

**Plain greedy requests** (their proposal is the argmax, no q needed) run the whole pass in one C++
call where the C++ forward runs the draft (`CpuForward.draft_greedy`, csrc/cpu_draft.h): per step,
Python's metadata, forward call, LM head and argmax cost ~4x the draft's own arithmetic. The others
(sampled, penalised) take the per-step path, which makes the same steps.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from kvflow.attention.backend import get_backend
from kvflow.attention.kv_spec import KVCacheSpec
from kvflow.config import EngineConfig, ModelConfig
from kvflow.model.cpu_kernels import CPU_FORWARD_MAX_CHUNK, CpuForward, CpuForwardUnsupported
from kvflow.model.linear import DenseLinear, PrepackedLinear, prepack_available
from kvflow.model.loader import load_model
from kvflow.worker.rejection_sampler import plain_greedy, position_rows, processed_probs
from kvflow.worker.sampler import exponential_race
from kvflow.worker.spec_decode import Proposals
from kvflow.worker.step import SequenceView
from kvflow.worker.step_inputs import paged_step_inputs


def draft_model_config(config: EngineConfig) -> ModelConfig:
    """The draft's config, checked against the target's: same vocabulary, a context as long."""
    path = config.speculative.speculative_model
    assert path is not None
    target = config.model
    draft = ModelConfig.from_pretrained(path, dtype=target.dtype)
    if draft.vocab_size != target.vocab_size or not _same_tokenizer(Path(path), Path(target.path)):
        raise ValueError(f"speculative_model {path} does not share the target's vocabulary ({draft.vocab_size} "
                         f"vs {target.vocab_size} tokens, or another tokenizer): a draft must propose the "
                         "target's token ids")
    if draft.max_model_len < target.max_model_len:
        raise ValueError(f"speculative_model {path} reads {draft.max_model_len} positions, fewer than the engine's "
                         f"max_model_len {target.max_model_len}: lower --max-model-len")
    return ModelConfig.from_pretrained(path, dtype=target.dtype, max_model_len=target.max_model_len)


def _same_tokenizer(draft: Path, target: Path) -> bool:
    """Both directories' tokenizer.json define the same model (vocabulary and merges), when both have one."""
    a, b = draft / "tokenizer.json", target / "tokenizer.json"
    if not (a.is_file() and b.is_file()):
        return True
    return json.loads(a.read_text())["model"] == json.loads(b.read_text())["model"]


def draft_kv_spec(config: EngineConfig, draft: ModelConfig) -> KVCacheSpec:
    """The draft's KV cache: dense, its own dtype and shape, the target's block size."""
    return KVCacheSpec.dense(draft.num_layers, draft.num_kv_heads, draft.head_dim, config.cache.block_size,
                             draft.dtype)


class DraftProposer:
    def __init__(self, config: EngineConfig, num_blocks: int, device: torch.device, use_cpu_kernels: bool) -> None:
        self.model_config = draft_model_config(config)
        self.device = device
        self.block_size = config.cache.block_size
        self.max_model_len = config.model.max_model_len
        self.model = load_model(self.model_config, device)
        prepack = config.runner.prepack_weights and prepack_available(device, self.model_config.dtype)
        self.model.use_linear_method(PrepackedLinear() if prepack else DenseLinear())
        self.kv_spec = draft_kv_spec(config, self.model_config)
        self.kv_caches = self.kv_spec.allocate(num_blocks, device)
        self.backend = get_backend(device, "torch")
        self.cpu_forward: CpuForward | None = None
        if use_cpu_kernels:
            try:
                self.cpu_forward = CpuForward(self.model, self.kv_spec, self.kv_caches)
            except CpuForwardUnsupported:
                pass
        # Plain greedy requests' passes run in one C++ call (`CpuForward.draft_greedy`) where it can run
        # the draft; the per-step path gives the same proposals and KV (tests switch this off to check).
        self.fused_greedy = self.cpu_forward is not None and self.cpu_forward.has_draft_greedy

    @torch.inference_mode()
    def propose(self, requests: Sequence[SequenceView], new_tokens: Sequence[list[int]],
                counts: Sequence[int]) -> Proposals:
        """Up to `counts[i]` proposals for request i, after its tokens and `new_tokens[i]` (this step's,
        not yet appended), each with its q row; fewer near the end of the context."""
        histories = [r.all_token_ids + new for r, new in zip(requests, new_tokens)]
        counts = [max(0, min(k, self.max_model_len - len(h))) for k, h in zip(counts, histories)]
        outputs = [r.output_token_ids + new for r, new in zip(requests, new_tokens)]
        tokens: list[list[int]] = [[] for _ in requests]
        probs: list[list[torch.Tensor]] = [[] for _ in requests]
        active = [i for i, n in enumerate(counts) if n > 0]
        # Each pass first runs the draft over the tokens whose draft KV is missing (at least the newest).
        begins = {i: min(requests[i].spec_draft_computed, len(histories[i]) - 1) for i in active}
        # Greedy requests with nothing that changes the argmax (penalties, blocked ids) propose the
        # argmax of the draft's logits and need no q (the rejection sampler ignores q for greedy rows):
        # their whole pass is one C++ call where the C++ forward runs the draft.
        fused: list[int] = []
        if self.fused_greedy:
            fused = [i for i in active if plain_greedy(requests[i].params, len(outputs[i]))
                     and len(histories[i]) - begins[i] <= CPU_FORWARD_MAX_CHUNK]
        if fused:
            assert self.cpu_forward is not None
            picked = self.cpu_forward.draft_greedy([histories[i][begins[i]:] for i in fused],
                                                   [begins[i] for i in fused], [counts[i] for i in fused],
                                                   [requests[i].block_ids for i in fused], self.block_size)
            for i, row in zip(fused, picked):
                tokens[i] = row
        taken = set(fused)
        self._stepwise(requests, [i for i in active if i not in taken], histories, outputs, counts, begins, tokens,
                       probs)
        # The draft's KV now holds each proposing request's history (the last token is fed again next
        # pass: one entry of slack); the others' is as it was.
        computed = [len(h) - 1 if n > 0 else min(r.spec_draft_computed, len(h) - 1)
                    for r, h, n in zip(requests, histories, counts)]
        return Proposals(tokens, [torch.stack(p) if p else None for p in probs], computed)

    def _stepwise(self, requests: Sequence[SequenceView], active: list[int], histories: list[list[int]],
                  outputs: list[list[int]], counts: list[int], begins: dict[int, int], tokens: list[list[int]],
                  probs: list[list[torch.Tensor]]) -> None:
        """Proposals one batched draft step at a time, each sampled from its processed q (kept for the
        rejection sampler); greedy rows take the argmax. Appends to `tokens[i]` and `probs[i]`."""
        plain = {i: plain_greedy(requests[i].params, len(outputs[i])) for i in active}
        feed = {i: histories[i][begins[i]:] for i in active}
        for j in range(max((counts[i] for i in active), default=0)):
            rows = [i for i in active if counts[i] > j]
            ends = [len(histories[i]) + j for i in rows]  # cache entries after this pass
            logits = self._forward([feed[i] for i in rows], ends, [requests[i].block_ids for i in rows])
            if all(plain[i] for i in rows):  # the argmax is the proposal; q is not needed (greedy rows)
                picked, q = logits.argmax(dim=-1), None
            else:
                batch = position_rows([requests[i].params for i in rows], [requests[i].spec_generator for i in rows],
                                      [outputs[i] for i in rows], [requests[i].prompt_token_ids for i in rows],
                                      [tokens[i] for i in rows], [requests[i].eos_token_ids for i in rows],
                                      [(n, j) for n in range(len(rows))])
                q = processed_probs(logits, batch)  # greedy rows: one-hot at the argmax
                picked = q.argmax(dim=-1)
                random = batch.random_rows.tolist()
                if random:  # greedy rows draw nothing, as in the samplers
                    picked[random] = exponential_race(q[random], [batch.generators[n] for n in random])
            for n, i in enumerate(rows):
                token = int(picked[n])
                tokens[i].append(token)
                if not plain[i]:
                    probs[i].append(q[n])
                feed[i] = [token]

    def _forward(self, feeds: list[list[int]], ends: list[int], tables: list[list[int]]) -> torch.Tensor:
        """The draft's logits after each sequence's `feeds` tokens, which end its first `ends` entries."""
        order = sorted(range(len(feeds)), key=lambda n: len(feeds[n]) != 1)  # decodes first
        query_lens = [len(feeds[n]) for n in order]
        positions, _, meta, _ = paged_step_inputs([ends[n] for n in order], query_lens, [tables[n] for n in order],
                                                  self.block_size, self.device)
        input_ids = torch.tensor([t for n in order for t in feeds[n]], dtype=torch.long, device=self.device)
        last = meta.query_start_loc[1:] - 1
        if self.cpu_forward is not None and meta.max_query_len <= CPU_FORWARD_MAX_CHUNK:
            hidden = self.cpu_forward(input_ids, positions, meta.token_seq_index, meta.slot_mapping,
                                      meta.block_tables)
            logits = self.cpu_forward.logits(hidden[last])
        else:
            self.backend.prepare(meta)
            hidden = self.model(input_ids, positions, self.kv_caches, meta, self.backend)
            logits = self.model.compute_logits(hidden[last])
        unsorted = torch.empty_like(logits)
        unsorted[torch.tensor(order, device=logits.device)] = logits
        return unsorted

