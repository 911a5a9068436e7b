"""Disaggregated sampling equals colocated sampling, token for token: seeded random sampling (the
decode instance continues the generator the prefill instance drew the first token from), n > 1
groups (each sibling's first token sampled on the prefill side with its own seed; on the decode
side siblings share their leader's loaded blocks), and prompt logprobs carried with the KV."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvflow.config import KVTransferConfig
from kvflow.engine.core import EngineCore, EngineCoreOutput
from kvflow.engine.input_processor import CoreRequestSpec, InputProcessor, build_core_requests
from kvflow.sampling_params import SamplingParams
from kvflow.worker.sampler import Sampler, SamplingBatch, advance_generator
from kvflow.worker.step import TokenLogprobs
from tests.kv_transfer.engine_pairs import assert_all_blocks_free, drive, make_core, prompts, submit_group

ATOL = 1e-5  # logprobs: the same fp32 computation, batched differently


@dataclass
class Sequence:
    tokens: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprobs | None] = field(default_factory=list)


def gather(outputs: list[EngineCoreOutput]) -> dict[str, Sequence]:
    seqs: dict[str, Sequence] = {}
    for out in outputs:
        seq = seqs.setdefault(out.request_id, Sequence())
        seq.tokens += out.new_token_ids
        seq.logprobs += out.new_logprobs
        seq.prompt_logprobs += out.new_prompt_logprobs
    return seqs


def fan_out(core: EngineCore, batch: list[list[int]], params: list[SamplingParams]) -> list[list[CoreRequestSpec]]:
    """The server's intake: one spec group per prompt (n > 1 siblings, seeds seed + index)."""
    inputs = InputProcessor(core.config, None, core.kv.num_blocks)
    return [inputs.make_specs(ids, p) for ids, p in zip(batch, params)]


def run_colocated(core: EngineCore, groups: list[list[CoreRequestSpec]]) -> dict[str, Sequence]:
    for group in groups:
        for request in build_core_requests(group):
            core.add_request(request)
    outputs: list[EngineCoreOutput] = []
    while core.has_unfinished_requests():
        outputs += core.step()
    return gather(outputs)


def run_disaggregated(prefill: EngineCore, decode: EngineCore, groups: list[list[CoreRequestSpec]],
                      ) -> dict[str, Sequence]:
    """Each group goes to the pair as the router sends it; then no load fell back, no block leaked."""
    for group in groups:
        submit_group(prefill, decode, group)
    outputs: list[EngineCoreOutput] = []
    drive(prefill, decode, outputs=outputs)
    assert decode.scheduler.num_kv_load_failures == 0
    assert_all_blocks_free(prefill, decode)
    return gather(outputs)


def assert_same(got: dict[str, Sequence], expected: dict[str, Sequence]) -> None:
    assert got.keys() == expected.keys()
    for rid, want in expected.items():
        assert got[rid].tokens == want.tokens, rid
        assert_logprobs_close(got[rid].logprobs, want.logprobs)
        assert_logprobs_close(got[rid].prompt_logprobs, want.prompt_logprobs)


def assert_logprobs_close(got: list[TokenLogprobs | None], expected: list[TokenLogprobs | None]) -> None:
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        if e is None or g is None:
            assert g is e
            continue
        assert (g.token_id, g.top_ids) == (e.token_id, e.top_ids)
        torch.testing.assert_close([g.logprob, *g.top_logprobs], [e.logprob, *e.top_logprobs], rtol=0, atol=ATOL)


def test_advance_generator_skips_exactly_one_sampled_token(llama_dir):
    """The skip makes the sampler's draw over the model's logits width (vocab_size)."""
    core = make_core(llama_dir)
    logits = core.runner.model.compute_logits(torch.randn(1, core.config.model.hidden_size))
    assert logits.shape[-1] == core.config.model.vocab_size
    params = SamplingParams(temperature=0.7, top_p=0.9, seed=11)
    sampled, skipped = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
    Sampler()(logits, SamplingBatch.from_params([params], [sampled]))
    advance_generator(params, skipped, 1, core.config.model.vocab_size)
    assert torch.equal(sampled.get_state(), skipped.get_state())


def test_seeded_random_sampling_equals_colocated(llama_dir):
    batch = prompts([3, 9, 17, 40, 64], seed=5)
    seeds = [0, 1, 7, 2**40, 123456789]
    params = [SamplingParams(max_tokens=8, temperature=0.8, top_p=0.9, top_k=50 if i % 2 else 0, seed=seed,
                             logprobs=2, ignore_eos=True) for i, seed in enumerate(seeds)]
    colocated = make_core(llama_dir)
    groups = fan_out(colocated, batch, params)
    expected = run_colocated(colocated, groups)
    prefill = make_core(llama_dir, KVTransferConfig(role="prefill"))
    decode = make_core(llama_dir, KVTransferConfig(role="decode", mode="layerwise"), block_size=8)
    assert_same(run_disaggregated(prefill, decode, groups), expected)
    prefill.close()
    decode.close()


def test_n_group_with_seed_equals_colocated(llama_dir):
    batch = prompts([30, 9, 4], seed=8)
    params = SamplingParams(n=3, seed=42, temperature=1.0, top_p=0.95, max_tokens=8, logprobs=2, ignore_eos=True)
    colocated = make_core(llama_dir)
    groups = fan_out(colocated, batch, [params] * len(batch))
    expected = run_colocated(colocated, groups)
    # Different block sizes: the decode side shares whole blocks of 4, so its siblings pull from
    # the middle of the prefill side's blocks of 8.
    prefill = make_core(llama_dir, KVTransferConfig(role="prefill", transport="shm"), block_size=8)
    decode = make_core(llama_dir, KVTransferConfig(role="decode", transport="shm"))
    assert_same(run_disaggregated(prefill, decode, groups), expected)
    leader, *siblings = [spec.request_id for spec in groups[0]]
    assert len({tuple(expected[rid].tokens) for rid in (leader, *siblings)}) == 3  # a seed each
    # Siblings share the leader's loaded prompt blocks (28 of 30 tokens) and pull only the rest.
    payload = {load.request_id: load.payload_bytes for load in decode.drain_events().loads}
    assert all(payload[s] == payload[leader] * 2 // 30 for s in siblings), payload
    prefill.close()
    decode.close()


def test_prompt_logprobs_equal_colocated(llama_dir):
    batch = prompts([1, 5, 17, 70], seed=9)
    params = SamplingParams(max_tokens=4, temperature=0.0, prompt_logprobs=2, logprobs=1, ignore_eos=True)
    colocated = make_core(llama_dir)
    groups = fan_out(colocated, batch, [params] * len(batch))
    expected = run_colocated(colocated, groups)
    assert [len(expected[g[0].request_id].prompt_logprobs) for g in groups][1:] == [5, 17, 70]
    # A small step budget: the long prompt's logprobs come from three prefill steps.
    prefill = make_core(llama_dir, KVTransferConfig(role="prefill"), max_num_batched_tokens=32)
    decode = make_core(llama_dir, KVTransferConfig(role="decode"))
    assert_same(run_disaggregated(prefill, decode, groups), expected)
    prefill.close()
    decode.close()


def test_n_group_on_a_kivi_cache_equals_colocated(llama64_dir):
    """KIVI: siblings share only their leader's wholly quantised blocks (below Q), so each pulls the
    rest (for the 200-token prompt with R = 32: no codes at all, only the ring rows [160, 200)) into
    its own ring slot, and all equal colocated KIVI sampling."""
    batch = prompts([200, 70], seed=8)
    params = SamplingParams(n=3, seed=42, temperature=1.0, top_p=0.95, max_tokens=24, ignore_eos=True)
    engine = dict(kv_cache_dtype="kivi4", kv_residual_tokens=32, block_size=32, max_model_len=256,
                  max_num_batched_tokens=2048)
    colocated = make_core(llama64_dir, **engine)
    groups = fan_out(colocated, batch, [params] * len(batch))
    expected = run_colocated(colocated, groups)
    prefill = make_core(llama64_dir, KVTransferConfig(role="prefill", transport="shm"), **engine)
    decode = make_core(llama64_dir, KVTransferConfig(role="decode", mode="layerwise"), **engine)
    assert_same(run_disaggregated(prefill, decode, groups), expected)
    leader, *siblings = [spec.request_id for spec in groups[0]]
    payload = {load.request_id: load.payload_bytes for load in decode.drain_events().loads}
    cfg = decode.config.model
    ring_rows = 2 * cfg.num_layers * cfg.num_kv_heads * 40 * cfg.head_dim * 4  # [160, 200) in fp32
    assert all(payload[s] == ring_rows for s in siblings) and payload[leader] > ring_rows, payload
    prefill.close()
    decode.close()
