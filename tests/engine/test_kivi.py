"""KIVI end to end (--kv-cache-dtype kivi4|kivi2): greedy outputs equal Hugging Face attending through
KIVI's view of the cache (quantised in numpy here, independently of kvflow), also after a prefix
hit; a residual window above the context changes nothing; fewer bits cost more; bad settings are
refused before any work; blocks and ring slots come back."""

from __future__ import annotations

import functools
import random

import numpy as np
import pytest
import torch

from kvflow import LLM, SamplingParams
from kvflow.config import EngineConfig
from tests.attention.test_kivi import numpy_dequant_keys, numpy_dequant_values
from tests.model.test_parity import cpu_kernels  # noqa: F401 - a fixture
from tests.model_utils import hf_greedy, load_hf_with_attention

BS = 32
MAX_TOKENS = 24
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)

# What the HF reference applies (per request): bits, R, prompt length, prefix floor H, and for
# StreamingLLM its sink blocks and window (window 0: no policy).
_KIVI: dict[str, int] = {}


def _evicted(p: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Whether key position k's block is gone when position p is computed: the prompt is one chunk
    (nothing evicted yet); after it, every full block past the sinks ending at or before p - window."""
    sinks, window, prompt = _KIVI.get("sink_blocks", 0), _KIVI.get("window", 0), _KIVI["prompt"]
    if not window:
        return torch.zeros(torch.broadcast_shapes(p.shape, k.shape), dtype=torch.bool)
    block = k // BS
    return (p >= prompt) & (block >= sinks) & ((block + 1) * BS <= p - window)


def _quantised(p: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Whether query p reads key k quantised: none inside the prompt's own chunk (after a prefix hit,
    the hit); from then on the engine's rule on cache indices, k - evicted before it < max(H, 32 *
    floor((p - evicted - R) / 32))."""
    floor, prompt, residual = _KIVI["floor"], _KIVI["prompt"], _KIVI["residual"]
    starts = torch.arange(0, int(p.max()) + 1, BS)[None, :]  # every block's first position
    gone_before = lambda x: (_evicted(p, starts) & (starts < x)).sum(-1, keepdim=True) * BS  # noqa: E731
    shift_p = gone_before(p)  # all of p's evicted blocks lie before it
    q_len = torch.clamp(floor - shift_p, min=0).maximum(32 * (torch.clamp(p - shift_p - residual, min=0) // 32))
    q_len = torch.where(p < prompt, torch.full_like(p, floor), q_len)
    gone = _evicted(p[..., None], starts[..., None, :]) & (starts[..., None, :] < k[..., None])
    cache_index = k - gone.sum(-1) * BS
    return cache_index < q_len


def _kivi_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Each query p sees keys/values below `_quantised_before(p)` as KIVI reads them back (quantised
    per 32-token group and channel for keys, per token and 32 channels for values), the rest dense."""
    bits = _KIVI["bits"]
    q_len, k_len = query.shape[2], key.shape[2]
    whole = k_len // 32 * 32
    k_np = key[0].transpose(0, 1).numpy()  # [n, KVH, D]
    v_np = value[0].transpose(0, 1).numpy()
    k_deq, v_deq = key.clone(), value.clone()
    if whole:
        k_deq[0, :, :whole] = torch.tensor(numpy_dequant_keys(k_np[:whole], bits), dtype=key.dtype).transpose(0, 1)
        v_deq[0, :, :whole] = torch.tensor(numpy_dequant_values(v_np[:whole], bits), dtype=key.dtype).transpose(0, 1)
    group = query.shape[1] // key.shape[1]
    key, value, k_deq, v_deq = (t.repeat_interleave(group, 1).double() for t in (key, value, k_deq, v_deq))
    positions = torch.arange(k_len - q_len, k_len)[:, None]
    keys_at = torch.arange(k_len)[None, :]
    use_deq = _quantised(positions, keys_at)  # [q, k]
    q = query.double()
    scores = torch.where(use_deq, q @ k_deq.transpose(-1, -2), q @ key.transpose(-1, -2)) * scaling
    scores = scores.masked_fill((keys_at > positions) | _evicted(positions, keys_at), float("-inf"))
    probs = torch.softmax(scores, -1)
    out = (probs * use_deq) @ v_deq + (probs * ~use_deq) @ value
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


@functools.cache
def _hf_kivi(path: str):
    return load_hf_with_attention(path, "kvflow_kivi", _kivi_attention)


def _prompts(seed: int, lengths: list[int]) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 500) for _ in range(n)] for n in lengths]


@functools.cache
def _reference(path: str, prompt: tuple[int, ...], bits: int, residual: int, floor: int, sink_blocks: int = 0,
               window: int = 0) -> list[int]:
    _KIVI.update(bits=bits, residual=residual, prompt=len(prompt), floor=floor, sink_blocks=sink_blocks,
                 window=window)
    return hf_greedy(_hf_kivi(path), list(prompt), MAX_TOKENS)


@pytest.mark.parametrize(("fmt", "residual"), [("kivi4", 32), ("kivi2", 64)])
def test_greedy_matches_hf_reading_kivis_view(llama64_dir, cpu_kernels, fmt, residual):  # noqa: F811
    """Prompts whose decodes cross group boundaries: every token equals HF's when each query reads
    positions below the quantised length dequantised (numpy) and the residual window dense."""
    llm = LLM(model=str(llama64_dir), dtype="float32", cpu_kernels=cpu_kernels, block_size=BS, num_blocks=64,
              max_num_batched_tokens=512, kv_cache_dtype=fmt, kv_residual_tokens=residual,
              enable_prefix_caching=False)
    for prompt in _prompts(1, [70, 150]):
        out = llm.generate([prompt], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
        assert out == _reference(str(llama64_dir), tuple(prompt), int(fmt[-1]), residual, 0), f"{len(prompt)} tokens"
    kv = llm.engine.core.kv
    assert kv.num_free_blocks == kv.num_blocks
    assert kv.num_free_residual_slots == llm.engine.config.scheduler.max_num_seqs


def test_a_prefix_hit_reads_its_blocks_quantised(llama64_dir):
    """A second request finds the first one's prompt blocks, all but the newest R tokens' (rounded up
    to blocks): it reads them quantised and computes the rest, exactly as HF with that floor."""
    llm = LLM(model=str(llama64_dir), dtype="float32", block_size=BS, num_blocks=64, max_num_batched_tokens=512,
              kv_cache_dtype="kivi4", kv_residual_tokens=64, cpu_kernels=False)
    (first,) = _prompts(2, [200])
    second = first + _prompts(3, [20])[0]
    llm.generate([first], GREEDY, use_tqdm=False)
    out = llm.generate([second], GREEDY, use_tqdm=False)[0]
    # 200 tokens = 6 full blocks cached; the last 2 (64 tokens) may have been dense: 4 blocks hit.
    assert out.num_cached_tokens == 128
    assert out.outputs[0].token_ids == _reference(str(llama64_dir), tuple(second), 4, 64, 128)


def test_a_residual_window_above_the_context_is_exactly_dense(llama64_dir):
    """Nothing is quantised while the context fits R: chunked prefill, decodes and prefix hits read the
    ring alone and give the dense cache's logprobs."""
    prompts = _prompts(4, [30, 90, 130])
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=0, prompt_logprobs=0)
    outs = {}
    for fmt in ("auto", "kivi2"):
        llm = LLM(model=str(llama64_dir), dtype="float32", block_size=BS, num_blocks=64, max_num_batched_tokens=40,
                  kv_cache_dtype=fmt, kv_residual_tokens=256, cpu_kernels=False)
        outs[fmt] = llm.generate(prompts + prompts, params, use_tqdm=False)
    assert sum(o.num_cached_tokens for o in outs["kivi2"]) == 0  # every prefix may still be dense: no hit
    for dense, kivi in zip(outs["auto"], outs["kivi2"]):
        tokens = dense.outputs[0].token_ids
        assert kivi.outputs[0].token_ids == tokens
        for lp_kivi, lp_dense, tok in zip(kivi.outputs[0].logprobs, dense.outputs[0].logprobs, tokens):
            assert lp_kivi[tok].logprob == pytest.approx(lp_dense[tok].logprob, abs=1e-4)
        prompt = dense.prompt_token_ids
        for lp_kivi, lp_dense, tok in zip(kivi.prompt_logprobs[1:], dense.prompt_logprobs[1:], prompt[1:]):
            assert lp_kivi[tok].logprob == pytest.approx(lp_dense[tok].logprob, abs=1e-4)


def _prompt_logprob_error(llama64_dir, fmt: str) -> float:
    """Mean |logprob - dense logprob| of a 240-token prompt computed in 32-token chunks (each chunk
    reads the earlier ones as the cache holds them)."""
    (prompt,) = _prompts(5, [240])
    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
    values = []
    for kv_dtype in ("auto", fmt):
        llm = LLM(model=str(llama64_dir), dtype="float32", block_size=BS, num_blocks=64, max_num_batched_tokens=32,
                  kv_cache_dtype=kv_dtype, kv_residual_tokens=32, cpu_kernels=False)
        out = llm.generate([prompt], params, use_tqdm=False)[0]
        values.append(np.array([lp[tok].logprob for lp, tok in zip(out.prompt_logprobs[1:], prompt[1:])]))
    return float(np.abs(values[1] - values[0]).mean())


def test_fewer_bits_cost_more(llama64_dir):
    err4, err2 = _prompt_logprob_error(llama64_dir, "kivi4"), _prompt_logprob_error(llama64_dir, "kivi2")
    assert 0 < err4 < err2, (err4, err2)
    assert err4 < 0.05


def test_bad_settings_are_refused_before_any_work(llama64_dir, llama_dir):
    base = dict(dtype="float32", num_blocks=16)
    with pytest.raises(ValueError, match="block_size must be a multiple of 32"):
        EngineConfig.create(str(llama64_dir), kv_cache_dtype="kivi4", block_size=16, **base)
    with pytest.raises(ValueError, match="kv_residual_tokens must be a multiple of 32"):
        EngineConfig.create(str(llama64_dir), kv_cache_dtype="kivi2", block_size=32, kv_residual_tokens=100, **base)
    with pytest.raises(ValueError, match="kv_policy=quest with kv_cache_dtype kivi4 is not supported"):
        EngineConfig.create(str(llama64_dir), kv_cache_dtype="kivi4", block_size=32, kv_policy="quest",
                            kv_budget=64, **base)
    assert EngineConfig.create(str(llama64_dir), kv_cache_dtype="kivi2", **base).cache.block_size == 32  # default
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of .*kivi4, kivi2"):
        EngineConfig.create(str(llama64_dir), kv_cache_dtype="kivi3", block_size=32, **base)
    with pytest.raises(ValueError, match=r"head_dim \(16\)"):  # KIVI groups 32 channels
        LLM(model=str(llama_dir), kv_cache_dtype="kivi4", block_size=32, **base)
    # A request's own policy is refused; the engine keeps serving.
    llm = LLM(model=str(llama64_dir), kv_cache_dtype="kivi4", block_size=32, **base)
    with pytest.raises(ValueError, match="request kv_policy=h2o with kv_cache_dtype kivi4"):
        llm.generate([[5, 6, 7]], SamplingParams(max_tokens=2, kv_policy="h2o", kv_budget=64), use_tqdm=False)
    out = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=2, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 2
    kv = llm.engine.core.kv
    assert kv.num_free_blocks == kv.num_blocks
    assert kv.num_free_residual_slots == llm.engine.config.scheduler.max_num_seqs


@pytest.mark.parametrize("residual", [512, 32])
def test_snapkv_on_a_kivi_cache(llama64_dir, residual):
    """KIVI + SnapKV: with R above every context, SnapKV reads and compacts through the ring alone and
    generates exactly what it does on the dense cache; with R = 32 the kept tokens are quantised anew.
    Either way the compacted table holds the budget and every block and ring slot comes back."""
    prompts = _prompts(6, [150, 220])
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    outs = {}
    for fmt in ("auto", "kivi4"):
        llm = LLM(model=str(llama64_dir), dtype="float32", block_size=BS, num_blocks=64, max_num_batched_tokens=128,
                  kv_cache_dtype=fmt, kv_residual_tokens=residual, kv_policy="snapkv", kv_budget=96, kv_window=16,
                  cpu_kernels=False)
        engine = llm.engine
        engine.add_request("probe", prompts[1], params)
        while not any(r.kv_altered for r in engine.core.scheduler.running):
            engine.step()
        (probe,) = engine.core.scheduler.running
        assert len(probe.block_ids) == 3 and probe.kv_shift == 220 - 96 and probe.kv_prefix_floor == 0
        while engine.has_unfinished_requests():
            engine.step()
        outs[fmt] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        kv = engine.core.kv
        assert kv.num_free_blocks == kv.num_blocks
        assert kv.num_free_residual_slots == (engine.config.scheduler.max_num_seqs if fmt != "auto" else 0)
    if residual == 512:
        assert outs["kivi4"] == outs["auto"]
    else:
        assert outs["kivi4"] != outs["auto"]  # lossy: the compacted tokens are quantised


def test_snapkv_on_kivi_runs_alike_on_the_cpp_forward(llama64_dir):
    """The C++ forward runs SnapKV's compaction after each layer's KIVI store: the same greedy tokens as
    the PyTorch modules."""
    prompts = _prompts(7, [150, 220])
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    outs = {}
    for cpu in (True, False):
        llm = LLM(model=str(llama64_dir), dtype="float32", block_size=BS, num_blocks=64, max_num_batched_tokens=128,
                  kv_cache_dtype="kivi2", kv_residual_tokens=32, kv_policy="snapkv", kv_budget=96, kv_window=16,
                  cpu_kernels=cpu)
        assert (llm.engine.core.runner.cpu_forward is not None) == cpu
        outs[cpu] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        assert llm.engine.core.kv.num_free_blocks == llm.engine.core.kv.num_blocks
    assert outs[True] == outs[False]


@pytest.mark.parametrize(("fmt", "sinks", "budget"), [("kivi4", 4, 100), ("kivi2", 32, 130)])
def test_streaming_on_kivi_matches_hf(llama64_dir, cpu_kernels, fmt, sinks, budget):  # noqa: F811
    """KIVI + StreamingLLM: blocks outside the sinks and the window leave the table once quantised
    (the window covers R + 32); the ring follows its cache indices down. Every greedy token equals HF's
    attending through the same sinks + window, the kept blocks below Q dequantised."""
    residual = 32
    llm = LLM(model=str(llama64_dir), dtype="float32", cpu_kernels=cpu_kernels, block_size=BS, num_blocks=64,
              max_num_batched_tokens=512, kv_cache_dtype=fmt, kv_residual_tokens=residual, kv_policy="streaming",
              kv_budget=budget, kv_sink_tokens=sinks, enable_prefix_caching=False)
    params = SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True)
    for prompt in _prompts(8, [150]):
        out = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids
        _KIVI.update(bits=int(fmt[-1]), residual=residual, prompt=len(prompt), floor=0,
                     sink_blocks=-(-sinks // BS), window=budget - sinks)
        assert out == hf_greedy(_hf_kivi(str(llama64_dir)), prompt, 60)
    kv = llm.engine.core.kv
    assert kv.num_free_blocks == kv.num_blocks


def test_streaming_on_kivi_needs_a_window_over_the_ring(llama64_dir):
    with pytest.raises(ValueError, match="needs a window of at least kv_residual_tokens \\+ 32 = 160"):
        EngineConfig.create(str(llama64_dir), dtype="float32", kv_cache_dtype="kivi4", kv_policy="streaming",
                            kv_budget=100, num_blocks=8)
