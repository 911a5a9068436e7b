"""The whole engine on the Triton attention backend (under the interpreter on CPU): greedy tokens
equal the torch-native backend's, through prefill chunks, a cached prefix and decodes, and every
KV block comes back."""

from __future__ import annotations

import pytest
import torch

from kvflow import LLM, SamplingParams
from kvflow.attention.backend import get_backend

# The Triton backend runs where Triton runs: compiled on a GPU, interpreted on a CPU (conftest); both
# engines of a comparison run on the same device.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _generate(model_dir, backend: str, prompts: list[list[int]], **kw) -> tuple[list[list[int]], LLM]:
    llm = LLM(model=str(model_dir), dtype="float32", device=DEVICE, num_blocks=48, block_size=8,
              attention_backend=backend, cpu_kernels=False, max_num_batched_tokens=64, enable_prefix_caching=True, **kw)
    params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs], llm


def test_engine_greedy_output_matches_torch_backend(tiny_models):
    # 70 tokens > the 64-token step budget: a chunked prefill; the third prompt shares a prefix.
    prompts = [[(5 * i) % 300 + 3 for i in range(70)], [7, 8, 9], [(5 * i) % 300 + 3 for i in range(40)] + [11, 12]]
    expected, _ = _generate(tiny_models["llama"], "torch", prompts)
    got, llm = _generate(tiny_models["llama"], "triton", prompts)
    assert llm.engine.core.runner.backend.name == "triton"
    assert llm.engine.core.runner.cpu_forward is None
    assert got == expected
    kv = llm.engine.core.kv
    assert kv.num_free_blocks == kv.num_blocks, "blocks leaked"


def test_engine_int8_kv_cache_matches_torch_backend(tiny_models):
    """The same with an int8 KV cache: both backends store the same codes and read them back."""
    prompts = [[(5 * i) % 300 + 3 for i in range(70)], [7, 8, 9], [(5 * i) % 300 + 3 for i in range(40)] + [11, 12]]
    expected, _ = _generate(tiny_models["llama"], "torch", prompts, kv_cache_dtype="int8")
    got, llm = _generate(tiny_models["llama"], "triton", prompts, kv_cache_dtype="int8")
    assert llm.engine.core.runner.backend.name == "triton" and llm.engine.core.runner.kv_spec.kv_dtype == "int8"
    assert got == expected
    kv = llm.engine.core.kv
    assert kv.num_free_blocks == kv.num_blocks, "blocks leaked"


@pytest.mark.parametrize("policy,kv_cache_dtype", [("quest", "auto"), ("h2o", "auto"), ("snapkv", "int8"),
                                                    ("streaming", "auto")])
def test_engine_kv_policies_match_torch_backend(tiny_models, monkeypatch, policy, kv_cache_dtype):
    """KV policies under a binding budget read the same blocks on both backends: Quest's reduced
    tables through Triton's decode kernel, H2O's block mass from the reference (Triton's kernels do
    not return it), SnapKV's compaction of int8 codes and scales, StreamingLLM's eviction."""
    monkeypatch.setattr("kvflow.attention.policy_step.QUEST_DENSE_LAYERS", 0)  # the test model has 2 layers
    prompts = [[(5 * i) % 300 + 3 for i in range(70)], [(7 * i) % 300 + 3 for i in range(45)]]
    window = 0 if policy == "quest" else 8  # quest: the sink block, the query's own and one more
    kw = dict(kv_policy=policy, kv_budget=24, kv_window=window, kv_cache_dtype=kv_cache_dtype)
    expected, _ = _generate(tiny_models["llama"], "torch", prompts, **kw)
    unlimited, _ = _generate(tiny_models["llama"], "torch", prompts, kv_cache_dtype=kv_cache_dtype)
    got, llm = _generate(tiny_models["llama"], "triton", prompts, **kw)
    assert got == expected
    assert expected != unlimited, "the budget did not bind"
    kv = llm.engine.core.kv
    assert kv.num_free_blocks == kv.num_blocks, "blocks leaked"


def test_engine_fp8_kv_cache_matches_torch_backend(tiny_models):
    """The same with an fp8_e4m3 KV cache whose scales are calibrated on the first prompt: both
    backends calibrate the same scales, store the same codes and read them back."""
    prompts = [[(5 * i) % 300 + 3 for i in range(70)], [7, 8, 9], [(5 * i) % 300 + 3 for i in range(40)] + [11, 12]]
    expected, llm_torch = _generate(tiny_models["llama"], "torch", prompts, kv_cache_dtype="fp8_e4m3")
    got, llm = _generate(tiny_models["llama"], "triton", prompts, kv_cache_dtype="fp8_e4m3")
    runner = llm.engine.core.runner
    assert runner.backend.name == "triton" and runner.kv_spec.kv_dtype == "fp8_e4m3"
    assert got == expected
    scales, torch_scales = ([s for _, s in r.engine.core.runner.kv_caches] for r in (llm, llm_torch))
    assert all((s > 0).all() for s in scales)
    # The first layer's k/v are the same numbers; later layers' differ in rounding (attention's).
    assert torch.equal(scales[0], torch_scales[0])
    torch.testing.assert_close(scales, torch_scales, rtol=1e-5, atol=0)
    kv = llm.engine.core.kv
    assert kv.num_free_blocks == kv.num_blocks, "blocks leaked"


def test_backend_names_are_checked(monkeypatch):
    from kvflow.config import RunnerConfig

    with pytest.raises(ValueError, match="attention_backend must be one of"):
        RunnerConfig(attention_backend="flash")
    assert get_backend("cpu", "torch").name == get_backend("cpu").name
    with pytest.raises(ValueError, match="unknown attention backend"):
        get_backend("cpu", "flash")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="CUDA device"):
        get_backend("cpu", "triton")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the Triton kernels compiled)")
def test_engine_on_gpu_matches_cpu_greedy_output(tiny_models):
    """The issue's end-to-end GPU check: Triton attention on CUDA, fp32, equals the CPU engine:
    greedy tokens, a seeded sampled request (its generator stays on the CPU, so the draws are the
    same), and logprobs / prompt logprobs (the paths that build tensors from host lists)."""
    prompts = [[(5 * i) % 300 + 3 for i in range(70)], [7, 8, 9]]
    requests = [
        (prompts[0], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)),
        (prompts[1], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=3, prompt_logprobs=2)),
        (prompts[1], SamplingParams(temperature=0.8, top_k=20, top_p=0.9, seed=7, max_tokens=8, ignore_eos=True)),
    ]
    outs = {}
    for device in ("cpu", "cuda"):
        llm = LLM(model=str(tiny_models["llama"]), dtype="float32", device=device, num_blocks=48, block_size=8)
        outs[device] = [llm.generate([{"prompt_token_ids": p}], params, use_tqdm=False)[0] for p, params in requests]
        if device == "cuda":
            assert llm.engine.core.runner.backend.name == "triton"
            kv = llm.engine.core.kv
            assert kv.num_free_blocks == kv.num_blocks, "blocks leaked"
    for cpu, cuda in zip(outs["cpu"], outs["cuda"]):
        assert list(cuda.outputs[0].token_ids) == list(cpu.outputs[0].token_ids)
    cpu, cuda = outs["cpu"][1], outs["cuda"][1]
    for a, b in zip(cpu.outputs[0].logprobs, cuda.outputs[0].logprobs):
        assert a.keys() == b.keys()
        for tok in a:
            assert abs(a[tok].logprob - b[tok].logprob) < 1e-4
    for a, b in zip(cpu.prompt_logprobs[1:], cuda.prompt_logprobs[1:]):
        assert a.keys() == b.keys() and all(abs(a[t].logprob - b[t].logprob) < 1e-4 for t in a)


@pytest.fixture(scope="module")
def llama_head64(tmp_path_factory) -> str:
    """A tiny Llama with head_dim 64 (KIVI quantises groups of 32 channels)."""
    from tests.model_utils import make_tiny_model

    return str(make_tiny_model("llama", tmp_path_factory.mktemp("models") / "llama_hd64", head_dim=64,
                               max_position_embeddings=1024))


@pytest.mark.parametrize("fmt", ["kivi4", "kivi2"])
def test_engine_kivi_matches_torch_backend(llama_head64, fmt):
    """KIVI on the Triton kernels (blocks and ring read in place, then store_kivi) gives the torch
    backend's greedy tokens: a chunked 100-token prompt whose decodes quantise more groups, a short
    one read from its ring alone, and a prompt that finds the first one's blocks in the prefix cache
    (a floor), decoding side by side with the first one."""
    prompts = [[(5 * i) % 300 + 3 for i in range(100)], [7, 8, 9], [(5 * i) % 300 + 3 for i in range(96)] + [11, 12]]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=0)
    outs = {}
    for backend in ("torch", "triton"):
        llm = LLM(model=llama_head64, dtype="float32", device=DEVICE, num_blocks=32, block_size=32,
                  attention_backend=backend, cpu_kernels=False, max_num_batched_tokens=64,
                  enable_prefix_caching=True, kv_cache_dtype=fmt,
                  kv_residual_tokens=32)
        assert llm.engine.core.runner.backend.name == {"torch": "torch_native"}.get(backend, backend)
        first = llm.generate([{"prompt_token_ids": prompts[0]}], params, use_tqdm=False)
        rest = llm.generate([{"prompt_token_ids": p} for p in prompts[1:]], params, use_tqdm=False)
        outs[backend] = first + rest
        assert rest[-1].num_cached_tokens > 0, "no prefix hit"
        kv = llm.engine.core.kv
        assert kv.num_free_blocks == kv.num_blocks, "blocks leaked"
    for expected, got in zip(outs["torch"], outs["triton"]):
        tokens = expected.outputs[0].token_ids
        assert got.outputs[0].token_ids == tokens
        for a, b, tok in zip(expected.outputs[0].logprobs, got.outputs[0].logprobs, tokens):
            assert abs(a[tok].logprob - b[tok].logprob) < 1e-4


def test_engine_specontext_matches_torch_backend(tiny_models, tmp_path):
    """SpeContext's buffer and window blocks through Triton's decode kernel, its loads on a side
    stream on a GPU (a thread on CPU): the same tokens as the torch backend, every block back."""
    from kvflow.model.retrieval_head import RetrievalHead, RetrievalHeadConfig, save_retrieval_head

    torch.manual_seed(5)
    save_retrieval_head(RetrievalHead(RetrievalHeadConfig(vocab_size=512, hidden_size=64, num_kv_heads=2)),
                        tmp_path / "head")
    prompts = [[(5 * i) % 300 + 3 for i in range(70)], [(7 * i) % 300 + 3 for i in range(45)]]
    kw = dict(kv_policy="specontext", kv_budget=24, retrieval_model=str(tmp_path / "head"))
    expected, _ = _generate(tiny_models["llama"], "torch", prompts, **kw)
    unlimited, _ = _generate(tiny_models["llama"], "torch", prompts)
    got, llm = _generate(tiny_models["llama"], "triton", prompts, **kw)
    assert got == expected
    assert expected != unlimited, "the budget did not bind"
    assert llm.engine.core.stats().specontext_steps > 0
    kv = llm.engine.core.kv
    assert kv.num_free_blocks == kv.num_blocks, "blocks leaked"


def test_engine_block_zoo_with_layer_groups_matches_torch_backend(tiny_models, tmp_path):
    """A variant sharing layer 0 of 2 with the base: the cache in two layer groups, each layer reading its
    group's tables and slots through Triton's store and attention kernels; a variant's request over the base's
    cached prompt reads the base's layer-0 pages. Tokens equal the torch-native backend's."""
    from tests.engine.test_block_zoo import make_variant

    base = tiny_models["llama"]
    variant = {"top": str(make_variant(base, tmp_path / "top", (1,), seed=1, final_norm=True))}
    prompts = [[(5 * i) % 300 + 3 for i in range(70)], [(5 * i) % 300 + 3 for i in range(70)], [7, 8, 9]]
    outputs = {}
    for backend in ("torch", "triton"):
        llm = LLM(model=str(base), dtype="float32", device=DEVICE, num_blocks=48, block_size=8,
                  attention_backend=backend, cpu_kernels=False, max_num_batched_tokens=64, variant=variant)
        params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
        first = llm.generate(prompts[:1], params, use_tqdm=False)  # the base computes the prompt
        rest = llm.generate(prompts[1:], params, variant=["top", None], use_tqdm=False)
        kv = llm.engine.core.kv
        assert llm.engine.core.runner.backend.name == {"torch": "torch_native"}.get(backend, backend)
        assert kv.layer_groups == 2
        outputs[backend] = [list(o.outputs[0].token_ids) for o in first + rest]
        llm.reset_prefix_cache()
        assert kv.num_free_blocks == kv.num_blocks, "pages leaked"
    assert outputs["triton"] == outputs["torch"]
