"""KV policies end to end (--kv-policy, SamplingParams.kv_policy): StreamingLLM equals Hugging Face
attending through the same sinks + window; every policy with a budget above the context changes
nothing; SnapKV leaves the prompt's exact blocks in the prefix cache; bad settings are refused
before any work and the engine keeps serving; no block leaks."""

from __future__ import annotations

import functools

import pytest
import torch

from kvflow import LLM, SamplingParams
from kvflow.config import EngineConfig
from kvflow.engine.llm_engine import LLMEngine
from tests.model.test_parity import cpu_kernels, mixed_prompts  # noqa: F401 - cpu_kernels is a fixture
from tests.model_utils import hf_greedy, load_hf_with_attention

BS = 4
MAX_TOKENS = 10
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)

# StreamingLLM settings the HF reference below applies (per request): sinks, window, prompt length.
_STREAMING: dict[str, int] = {}


def _streaming_visible(q_len: int, k_len: int) -> torch.Tensor:
    """[q, k] True where the engine's streaming policy lets query position p see key position k: the
    prompt is one chunk (causal, nothing evicted yet); before computing position p >= prompt, the
    engine has freed every full block past the sinks that ends at or before p - window."""
    sinks, window, prompt = _STREAMING["sink_blocks"], _STREAMING["window"], _STREAMING["prompt"]
    p = torch.arange(q_len)[:, None] + (k_len - q_len)
    k = torch.arange(k_len)[None, :]
    block = k // BS
    evicted = (p >= prompt) & (block >= sinks) & ((block + 1) * BS <= p - window)
    return (k <= p) & ~evicted


def _streaming_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    q_len, k_len = query.shape[2], key.shape[2]
    mask = _streaming_visible(q_len, k_len)
    group = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


@functools.cache
def _hf_streaming(path: str):
    return load_hf_with_attention(path, "kvflow_streaming", _streaming_attention)


@pytest.mark.parametrize("sinks,budget", [(4, 12), (0, 9), (6, 20)])
def test_streaming_greedy_matches_hf_attending_through_sinks_and_window(llama_dir, cpu_kernels, sinks,  # noqa: F811
                                                                         budget):
    """The C++ forward (which reads cache indices apart from rotary positions) and the PyTorch
    modules both generate exactly what HF does when each query sees only what the policy kept."""
    llm = LLM(model=str(llama_dir), dtype="float32", cpu_kernels=cpu_kernels, block_size=BS, num_blocks=128,
              max_num_batched_tokens=256, kv_policy="streaming", kv_budget=budget, kv_sink_tokens=sinks)
    model = _hf_streaming(str(llama_dir))
    for prompt in mixed_prompts(3, count=6)[2:]:
        _STREAMING.update(sink_blocks=-(-sinks // BS), window=budget - sinks, prompt=len(prompt))
        out = llm.generate([prompt], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
        assert out == hf_greedy(model, prompt, MAX_TOKENS), f"{len(prompt)}-token prompt"
    kv = llm.engine.core.kv
    assert kv.num_free_blocks == kv.num_blocks


def _engine(llama_dir, **kwargs) -> LLMEngine:
    config = EngineConfig.create(str(llama_dir), dtype="float32", block_size=BS, num_blocks=96, **kwargs)
    return LLMEngine(config)


@pytest.mark.parametrize("policy,kv_cache_dtype", [("quest", "auto"), ("h2o", "auto"), ("snapkv", "auto"),
                                                    ("quest", "int8"), ("snapkv", "int8")])
def test_the_cpp_forward_runs_policies_like_the_pytorch_modules(llama_dir, monkeypatch, policy, kv_cache_dtype):
    """The C++ forward runs each policy's per-layer work through its attention hooks: the same
    greedy tokens as the PyTorch modules, under a budget that binds."""
    monkeypatch.setattr("kvflow.attention.policy_step.QUEST_DENSE_LAYERS", 1)  # the test model has 2 layers
    prompts = mixed_prompts(12, count=6)[2:]
    outputs = {}
    for cpu in (True, False):
        llm = LLM(model=str(llama_dir), dtype="float32", cpu_kernels=cpu, block_size=BS, num_blocks=160,
                  max_num_batched_tokens=64, kv_policy=policy, kv_budget=16, kv_window=4,
                  kv_cache_dtype=kv_cache_dtype)
        assert (llm.engine.core.runner.cpu_forward is not None) == cpu
        outputs[cpu] = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
        assert llm.engine.core.kv.num_free_blocks == llm.engine.core.kv.num_blocks
    assert outputs[True] == outputs[False]


def test_streaming_frees_blocks_outside_sinks_and_window(llama_dir):
    """Mid-generation the request's table holds exactly its sink blocks and the blocks overlapping
    the newest `window` tokens, and the pool holds no other block of it."""
    engine = _engine(llama_dir, kv_policy="streaming", kv_budget=12, kv_sink_tokens=4, enable_prefix_caching=False)
    prompt = mixed_prompts(4, count=6)[5]  # 60 tokens
    engine.add_request("r", prompt, SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True))
    for _ in range(8):
        engine.step()
        (request,) = engine.core.scheduler.running
        computed = request.num_computed_tokens
        nb = -(-computed // BS)
        expected = [0] + [o for o in range(1, nb) if (o + 1) * BS > computed - 8 or o == nb - 1]
        assert request.kv_policy.origins(request) == expected
        assert request.kv_shift == (nb - len(expected)) * BS
        kv = engine.core.kv
        assert kv.num_blocks - kv.num_free_blocks == len(request.block_ids)
    engine.abort_request("r")
    assert engine.core.kv.num_free_blocks == engine.core.kv.num_blocks


@pytest.mark.parametrize("policy", ["streaming", "h2o", "snapkv", "quest"])
def test_a_budget_above_the_context_changes_nothing(llama_dir, policy):
    """Mixed batches, chunked prefill: with room for everything no policy drops or skips KV."""
    prompts = mixed_prompts(5, count=6)
    plain = LLM(model=str(llama_dir), dtype="float32", block_size=BS, num_blocks=160, max_num_batched_tokens=16)
    expected = [o.outputs[0].token_ids for o in plain.generate(prompts, GREEDY, use_tqdm=False)]
    llm = LLM(model=str(llama_dir), dtype="float32", block_size=BS, num_blocks=160, max_num_batched_tokens=16,
              kv_policy=policy, kv_budget=100, kv_window=8 if policy == "snapkv" else None)
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)] == expected
    kv = llm.engine.core.kv
    assert kv.num_free_blocks == kv.num_blocks


@pytest.mark.parametrize("policy", ["h2o", "snapkv", "quest"])
def test_a_binding_budget_drops_or_skips_kv_and_leaks_nothing(llama_dir, monkeypatch, policy):
    """Under a small budget the policy acts (outputs move on a random model), decoding keeps the
    table within budget where the policy evicts, and every block comes back."""
    monkeypatch.setattr("kvflow.attention.policy_step.QUEST_DENSE_LAYERS", 0)  # the test model has 2 layers
    prompt = mixed_prompts(6, count=6)[5]  # 60 tokens
    plain = _engine(llama_dir, max_num_batched_tokens=64)
    lossy = _engine(llama_dir, kv_policy=policy, kv_budget=16, kv_window=4, max_num_batched_tokens=64)
    outputs = []
    for e in (plain, lossy):
        e.add_request("r", prompt, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
        while e.has_unfinished_requests():
            outputs += [o.outputs[0].token_ids for o in e.step() if o.finished]
    assert outputs[0] != outputs[1], "the policy changed nothing"
    engine = _engine(llama_dir, kv_policy=policy, kv_budget=16, kv_window=4, max_num_batched_tokens=64)
    engine.add_request("r", prompt, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
    engine.step()  # the prompt
    (request,) = engine.core.scheduler.running
    if policy == "snapkv":
        assert request.kv_shift == len(prompt) - 16 and len(request.block_ids) == 4
    for _ in range(5):
        engine.step()
        held = request.num_computed_tokens - request.kv_shift
        if policy == "h2o":
            assert held <= 16 + BS - 1 and held == len(request.block_ids) * BS - (-held % BS)
        if policy == "quest":
            assert request.kv_shift == 0
    engine.abort_request("r")
    assert engine.core.kv.num_free_blocks == engine.core.kv.num_blocks


def test_snapkv_leaves_the_prompts_exact_blocks_in_the_prefix_cache(llama_dir):
    """SnapKV compacts into fresh blocks: a later plain request with the same prompt hits the
    original blocks and generates what a fresh engine does."""
    prompt = mixed_prompts(8, count=6)[5]
    fresh = LLM(model=str(llama_dir), dtype="float32", block_size=BS, num_blocks=96)
    expected = fresh.generate([prompt], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    llm = LLM(model=str(llama_dir), dtype="float32", block_size=BS, num_blocks=96)
    snap = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, kv_policy="snapkv", kv_budget=40)
    llm.generate([prompt], snap, use_tqdm=False)
    kv = llm.engine.core.kv
    hits = kv.stats.hit_tokens
    assert llm.generate([prompt], GREEDY, use_tqdm=False)[0].outputs[0].token_ids == expected
    assert kv.stats.hit_tokens - hits == (len(prompt) - 1) // BS * BS
    assert kv.num_free_blocks == kv.num_blocks


def test_requests_override_the_engines_policy(llama_dir):
    """One engine serves a plain request and a streaming one side by side; the override acts only
    on its own request."""
    prompts = mixed_prompts(9, count=6)[4:]
    llm = LLM(model=str(llama_dir), dtype="float32", block_size=BS, num_blocks=96, kv_budget=12)
    plain = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
    streaming = GREEDY.model_copy(update={"kv_policy": "streaming"})
    outs = llm.generate(prompts, [GREEDY, streaming], use_tqdm=False)
    assert outs[0].outputs[0].token_ids == plain[0]
    assert outs[1].outputs[0].token_ids != plain[1]  # 60 tokens through a 12-token cache


@pytest.mark.parametrize("kwargs,message", [
    (dict(kv_policy="lru", kv_budget=8), "kv_policy must be one of none, streaming, h2o, snapkv, quest"),
    (dict(kv_policy="streaming"), "kv_budget (tokens kept or read per sequence) is required"),
    (dict(kv_policy="snapkv", kv_budget=20), "kv_budget=20 is smaller than kv_sink_tokens + kv_window = 4 + 32"),
    (dict(kv_policy="h2o", kv_budget=8, kv_window=6), "kv_budget=8 is smaller than kv_sink_tokens + kv_window"),
    (dict(kv_sink_tokens=-1), "kv_sink_tokens must be >= 0"),
])
def test_bad_engine_settings_are_refused_naming_the_field(llama_dir, kwargs, message):
    with pytest.raises(ValueError) as exc:
        EngineConfig.create(str(llama_dir), **kwargs)
    assert message in str(exc.value)


def test_policies_refuse_sliding_window_models(tiny_models):
    with pytest.raises(ValueError, match="sliding-window layers"):
        EngineConfig.create(str(tiny_models["mistral"]), kv_policy="streaming", kv_budget=16)
    llm = LLM(model=str(tiny_models["mistral"]), dtype="float32", block_size=BS, num_blocks=32)
    with pytest.raises(ValueError, match="sliding-window layers"):
        llm.generate([[5, 6, 7]], SamplingParams(kv_policy="h2o", kv_budget=16), use_tqdm=False)


@pytest.mark.parametrize("params,message", [
    (dict(kv_policy="bogus", kv_budget=8), "request kv_policy must be one of"),
    (dict(kv_policy="streaming", kv_budget=3), "request kv_budget=3 is smaller than kv_sink_tokens"),
    (dict(kv_policy="quest", kv_budget=64), "needs the engine started with --kv-policy quest"),
    (dict(kv_policy="snapkv"), "kv_budget (tokens kept or read per sequence) is required"),
])
def test_bad_request_settings_fail_that_request_only(llama_dir, params, message):
    llm = LLM(model=str(llama_dir), dtype="float32", block_size=BS, num_blocks=64)
    with pytest.raises(ValueError) as exc:
        llm.generate([[5, 6, 7, 8]], SamplingParams(max_tokens=2, **params), use_tqdm=False)
    assert message in str(exc.value)
    assert llm.generate([[5, 6, 7, 8]], SamplingParams(max_tokens=2), use_tqdm=False)[0].outputs[0].token_ids
    assert not llm.engine.has_unfinished_requests()
    assert llm.engine.core.kv.num_free_blocks == llm.engine.core.kv.num_blocks
