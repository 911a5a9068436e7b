"""The engine over a quantised KV cache (--kv-cache-dtype): greedy outputs equal Hugging Face
transformers whose attention reads int8-quantised keys and values, in every engine regime; the
memory budget counts codes and scales exactly; bad formats are refused before any work."""

from __future__ import annotations

import functools

import pytest
import torch

from kvflow import LLM, SamplingParams
from kvflow.attention.kv_spec import KVCacheSpec
from kvflow.config import KV_CACHE_DTYPES
from tests.model.test_parity import cpu_kernels, mixed_prompts  # noqa: F401 - cpu_kernels is a fixture
from tests.model_utils import ARCHITECTURES, hf_greedy, load_hf

MAX_TOKENS = 8
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)


def _fake_int8(x: torch.Tensor) -> torch.Tensor:
    """Symmetric int8 per row of head_dim, written out independently of kvflow: what the cache
    holds, read back."""
    amax = x.abs().amax(dim=-1, keepdim=True)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    return torch.round(x * inv).clamp(-127, 127) * (amax / 127.0)


def _fake_fp8(x: torch.Tensor, head_scales: torch.Tensor) -> torch.Tensor:
    """x [B, kv_heads, S, D] through float8_e4m3fn codes of its heads' scales [kv_heads], saturating."""
    s = head_scales.view(1, -1, 1, 1)
    return (x / s).clamp(-448, 448).to(torch.float8_e4m3fn).float() * s


# fp8 scales per layer, (keys [kv_heads], values [kv_heads]), for the HF reference: the engine's own.
_FP8_SCALES: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}


def _quantised_kv_attention(module, query, key, value, *args, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if _FP8_SCALES:
        k_scale, v_scale = _FP8_SCALES[module.layer_idx]
        key, value = _fake_fp8(key, k_scale), _fake_fp8(value, v_scale)
    else:
        key, value = _fake_int8(key), _fake_int8(value)
    return sdpa_attention_forward(module, query, key, value, *args, **kwargs)


@functools.cache
def _hf_quantised(path: str):
    """The HF model with its attention reading quantised K/V (after RoPE, as the cache stores them):
    int8, or fp8 with the scales in _FP8_SCALES."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register("kvflow_quantised_kv", _quantised_kv_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register("kvflow_quantised_kv", sdpa_mask)  # SDPA's masks, sliding windows too
    model = load_hf(path)
    model.set_attn_implementation("kvflow_quantised_kv")
    return model


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_int8_kv_greedy_matches_hf_reading_int8_kv(arch, tiny_models, cpu_kernels):  # noqa: F811
    """Mixed batch, small prefill chunks and prefix-cache hits over an int8 cache: token for token
    what HF generates when its attention reads the same int8 keys and values."""
    path = tiny_models[arch]
    llm = LLM(model=str(path), dtype="float32", cpu_kernels=cpu_kernels, block_size=4, num_blocks=256,
              max_num_batched_tokens=16, kv_cache_dtype="int8")
    assert llm.engine.core.runner.kv_spec.kv_dtype == "int8"
    if cpu_kernels:
        assert llm.engine.core.runner.cpu_forward is not None, "the C++ forward did not take the int8 cache"
    _FP8_SCALES.clear()
    _generate_like_hf(llm, str(path), arch)


def _generate_like_hf(llm: LLM, path: str, arch: str) -> None:
    """Two batches (the second hits the first prompt's cached blocks): each output equals HF's
    greedy continuation with its attention reading the same quantised K/V."""
    prompts = mixed_prompts(7, count=5, shared_prefix=9)
    model = _hf_quantised(path)
    for batch in (prompts[:1], prompts):
        outputs = llm.generate(batch, GREEDY, use_tqdm=False)
        for prompt, out in zip(batch, outputs):
            assert out.outputs[0].token_ids == hf_greedy(model, prompt, MAX_TOKENS), f"{arch}: {len(prompt)} tokens"
    assert llm.engine.core.kv.stats.hit_tokens > 0
    kv = llm.engine.core.kv
    assert kv.num_free_blocks == kv.num_blocks, "blocks leaked"


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_fp8_kv_greedy_matches_hf_reading_fp8_kv(arch, tiny_models, cpu_kernels):  # noqa: F811
    """fp8 with scales calibrated on the first prompt (by the PyTorch backend; the C++ forward
    takes over from the next step): HF reading K/V through the same codes and scales agrees."""
    path = tiny_models[arch]
    llm = LLM(model=str(path), dtype="float32", cpu_kernels=cpu_kernels, block_size=4, num_blocks=256,
              max_num_batched_tokens=16, kv_cache_dtype="fp8_e4m3")
    runner = llm.engine.core.runner
    if cpu_kernels:
        assert runner.cpu_forward is not None, "the C++ forward did not take the fp8 cache"
    assert not runner._scales_ready()
    llm.generate([[5, 6, 7, 8, 9]], SamplingParams(max_tokens=1), use_tqdm=False)  # calibrates the scales
    assert runner._scales_ready()
    _FP8_SCALES.clear()
    for layer, (_, head_scales) in enumerate(runner.kv_caches):
        assert (head_scales > 0).all()
        _FP8_SCALES[layer] = (head_scales[0, :, 0].clone(), head_scales[1, :, 0].clone())
    try:
        _generate_like_hf(llm, str(path), arch)
    finally:
        _FP8_SCALES.clear()


def test_int8_kv_differs_from_dense_yet_stays_close(llama_dir):
    """The format is really used (prompt logprobs move) and its error is small on this model."""
    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
    prompt = mixed_prompts(8, count=6)[5]
    logprobs = {}
    for kv_dtype in ("auto", "int8"):
        llm = LLM(model=str(llama_dir), dtype="float32", block_size=4, num_blocks=64, kv_cache_dtype=kv_dtype)
        out = llm.generate([prompt], params, use_tqdm=False)[0]
        logprobs[kv_dtype] = torch.tensor([next(iter(e.values())).logprob for e in out.prompt_logprobs[1:]])
    diff = (logprobs["int8"] - logprobs["auto"]).abs()
    assert 0 < diff.max() < 0.05


@pytest.mark.parametrize("model_dtype", ["float32", "bfloat16"])
def test_budget_counts_codes_and_scales_exactly(llama_dir, model_dtype):
    budget_gib = 0.001
    blocks = {}
    for kv_dtype in ("auto", "int8", "fp8_e4m3"):
        llm = LLM(model=str(llama_dir), dtype=model_dtype, block_size=4, kv_cache_memory=budget_gib,
                  max_num_seqs=256, kv_cache_dtype=kv_dtype)
        runner = llm.engine.core.runner
        spec = runner.kv_spec
        assert runner.num_blocks == (int(budget_gib * 2**30) - spec.fixed_bytes) // spec.bytes_per_block
        assert sum(t.numel() * t.element_size() for layer in runner.kv_caches for t in spec.parts(layer)) \
            == runner.num_blocks * spec.bytes_per_block + spec.fixed_bytes
        blocks[kv_dtype] = runner.num_blocks
    cfg = llm.engine.config.model
    width = 2 * cfg.head_dim if model_dtype == "bfloat16" else 4 * cfg.head_dim  # dense bytes per token and head
    assert blocks["int8"] / blocks["auto"] == pytest.approx(width / (cfg.head_dim + 4), rel=0.01)
    assert blocks["fp8_e4m3"] / blocks["auto"] == pytest.approx(width / cfg.head_dim, rel=0.01)


def test_bad_kv_cache_settings_are_refused_naming_the_field(llama_dir):
    choices = ", ".join(KV_CACHE_DTYPES)
    with pytest.raises(ValueError, match=f"kv_cache_dtype must be one of {choices}, got 'int4'"):
        LLM(model=str(llama_dir), kv_cache_dtype="int4")
    with pytest.raises(ValueError, match="kv_scale must be a positive number, with kv_cache_dtype fp8_e4m3"):
        LLM(model=str(llama_dir), kv_cache_dtype="int8", kv_scale=0.1)
    with pytest.raises(ValueError, match="kv_scale must be a positive number"):
        LLM(model=str(llama_dir), kv_cache_dtype="fp8_e4m3", kv_scale=-1.0)


def test_dense_kv_dtype_other_than_the_model_runs_the_modules(llama_dir, caplog):
    """A float16 cache under an fp32 model: the C++ forward (which reads the model's dtype) steps
    aside with a log line, the modules run, the cache really is float16."""
    llm = LLM(model=str(llama_dir), dtype="float32", block_size=4, num_blocks=64, kv_cache_dtype="float16")
    runner = llm.engine.core.runner
    assert runner.kv_caches[0].dtype == torch.float16 and runner.cpu_forward is None
    assert llm.generate([[5, 6, 7]], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    assert runner.kv_spec == KVCacheSpec.dense(2, runner.kv_spec.num_kv_heads, runner.kv_spec.head_dim, 4,
                                               torch.float16)
