"""Multi-LoRA end to end, against PEFT's own merged models: a batch mixing the base and several adapters
scores and generates exactly what each adapter merged into the base does alone (C++ forward and the
PyTorch modules); adapters beyond the resident slots queue and load on demand without leaks or mix-ups;
prefix blocks are never shared across adapters; an adapter changed on disk is refused, not run."""

from __future__ import annotations

import functools
import shutil
from pathlib import Path

import pytest
import torch

from kvflow import LLM, SamplingParams
from kvflow.lora_request import LoRARequest
from tests.lora_utils import hf_greedy, make_peft_adapter, merged_hf_model
from tests.model.test_parity import cpu_kernels  # noqa: F401 - a fixture
from tests.model_utils import load_hf

MAX_TOKENS = 8
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
PROMPTS = [[5, 17, 99, 300, 12, 8, 41], [7, 8, 9, 10], [5, 17, 99, 300, 12, 8, 41, 77, 3], [250, 3, 3, 91, 60]]


@pytest.fixture(scope="module")
def adapters(llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two adapters unlike each other: every projection at rank 8, and q/v only at rank 4 with rsLoRA."""
    root = tmp_path_factory.mktemp("adapters")
    return {
        "all": make_peft_adapter(llama_dir, root / "all", seed=1, rank=8, alpha=16, scale=0.2),
        "qv": make_peft_adapter(llama_dir, root / "qv", seed=2, rank=4, alpha=8, targets=("q_proj", "v_proj"),
                                scale=0.3, use_rslora=True),
    }


@functools.cache
def _reference(base: str, adapter: str | None):
    return load_hf(Path(base)) if adapter is None else merged_hf_model(Path(base), Path(adapter))


def _reference_logprobs(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, -1)


def test_mixed_batch_equals_peft_merged_models(llama_dir, adapters, cpu_kernels):  # noqa: F811
    """Base + two adapters in one batch: every prompt position's logprob and the greedy tokens equal
    PEFT's merge_and_unload of that adapter alone."""
    llm = LLM(model=str(llama_dir), dtype="float32", cpu_kernels=cpu_kernels, enable_lora=True, max_loras=2,
              lora_modules={name: str(path) for name, path in adapters.items()}, enable_prefix_caching=False)
    assert (llm.engine.core.runner.cpu_forward is not None) == cpu_kernels
    loras = ["all", "qv", None, "all"]
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, prompt_logprobs=0)
    outs = llm.generate(PROMPTS, params, lora_request=loras, use_tqdm=False)
    differs = 0
    for prompt, lora, out in zip(PROMPTS, loras, outs):
        ref = _reference(str(llama_dir), None if lora is None else str(adapters[lora]))
        expected = _reference_logprobs(ref, prompt)
        got = torch.tensor([next(iter(lp.values())).logprob for lp in out.prompt_logprobs[1:]])
        want = expected[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])]
        torch.testing.assert_close(got, want, atol=2e-4, rtol=0)
        assert out.outputs[0].token_ids == hf_greedy(ref, prompt, MAX_TOKENS)
        base = _reference_logprobs(_reference(str(llama_dir), None), prompt)
        differs += int(lora is not None and (expected - base).abs().max().item() > 0.05)
    assert differs == 3  # the adapters really change the model: the comparison could fail


def test_lora_request_loads_on_first_use_and_base_is_unchanged(llama_dir, adapters):
    llm = LLM(model=str(llama_dir), dtype="float32", enable_lora=True, max_loras=1)
    assert llm.engine.registry.refs() == []
    out = llm.generate(PROMPTS[:1], GREEDY, lora_request=LoRARequest("qv", 7, str(adapters["qv"])), use_tqdm=False)
    assert out[0].outputs[0].token_ids == hf_greedy(_reference(str(llama_dir), str(adapters["qv"])), PROMPTS[0],
                                                   MAX_TOKENS)
    assert [r.name for r in llm.engine.registry.refs()] == ["qv"]
    base = llm.generate(PROMPTS[:1], GREEDY, use_tqdm=False)
    assert base[0].outputs[0].token_ids == hf_greedy(_reference(str(llama_dir), None), PROMPTS[0], MAX_TOKENS)


def test_many_adapters_few_slots_queue_and_never_mix(llama_dir, tmp_path, cpu_kernels):  # noqa: F811
    """Six adapters, two slots, host memory for three: every request gets its own adapter's output,
    adapters are evicted and read again, no step runs more than two, and every block comes back."""
    paths = {f"a{i}": make_peft_adapter(llama_dir, tmp_path / f"a{i}", seed=10 + i, rank=4, scale=0.25)
             for i in range(6)}
    llm = LLM(model=str(llama_dir), dtype="float32", cpu_kernels=cpu_kernels, enable_lora=True, max_loras=2,
              max_cpu_loras=3, lora_modules={k: str(v) for k, v in paths.items()}, max_num_seqs=8)
    runner = llm.engine.core.runner
    seen: list[int] = []
    prepare = runner.lora.prepare

    def counting(chunks):
        seen.append(len({c.request.lora.key for c in chunks if c.request.lora is not None}))
        return prepare(chunks)

    runner.lora.prepare = counting
    names = [f"a{i % 6}" for i in range(12)] + [None] * 2
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(names))]
    outs = llm.generate(prompts, GREEDY, lora_request=names, use_tqdm=False)
    for prompt, name, out in zip(prompts, names, outs):
        ref = _reference(str(llama_dir), None if name is None else str(paths[name]))
        assert out.outputs[0].token_ids == hf_greedy(ref, prompt, MAX_TOKENS), name
    assert max(seen) == 2 and len(seen) > 0
    stats = runner.lora.stats
    assert stats.disk_loads > 6 and stats.host_evictions > 0  # host memory held 3 of 6: some were read again
    assert len(runner.lora.host) <= 3
    kv = llm.engine.core.kv
    llm.reset_prefix_cache()
    assert kv.num_free_blocks == kv.num_blocks


def test_prefix_blocks_are_salted_by_adapter(llama_dir, adapters):
    """The same prompt under another adapter (or the base) never hits the first one's blocks; under the
    same adapter it does."""
    llm = LLM(model=str(llama_dir), dtype="float32", enable_lora=True, block_size=4,
              lora_modules={name: str(path) for name, path in adapters.items()})
    prompt = list(range(20, 45))
    first = llm.generate([prompt], GREEDY, lora_request="all", use_tqdm=False)[0]
    assert first.num_cached_tokens == 0
    for other in ("qv", None):
        out = llm.generate([prompt], GREEDY, lora_request=other, use_tqdm=False)[0]
        assert out.num_cached_tokens == 0
        ref = _reference(str(llama_dir), None if other is None else str(adapters[other]))
        assert out.outputs[0].token_ids == hf_greedy(ref, prompt, MAX_TOKENS)
    again = llm.generate([prompt], GREEDY, lora_request="all", use_tqdm=False)[0]
    assert again.num_cached_tokens == 24 and again.outputs[0].token_ids == first.outputs[0].token_ids


def test_adapter_changed_on_disk_is_refused_not_run(llama_dir, adapters, tmp_path):
    """Files replaced after registration: the request ends (aborted) instead of running other weights, and
    the engine goes on serving the base and other adapters."""
    moved = tmp_path / "moving"
    shutil.copytree(adapters["qv"], moved)
    llm = LLM(model=str(llama_dir), dtype="float32", enable_lora=True, max_loras=2,
              lora_modules={"moving": str(moved), "all": str(adapters["all"])})
    shutil.rmtree(moved)
    shutil.copytree(adapters["all"], moved)  # same name and path, other weights
    outs = llm.generate(PROMPTS[:3], GREEDY, lora_request=["moving", "all", None], use_tqdm=False)
    assert outs[0].outputs[0].finish_reason == "abort"
    assert outs[1].outputs[0].token_ids == hf_greedy(_reference(str(llama_dir), str(adapters["all"])), PROMPTS[1],
                                                     MAX_TOKENS)
    assert outs[2].outputs[0].token_ids == hf_greedy(_reference(str(llama_dir), None), PROMPTS[2], MAX_TOKENS)
    kv = llm.engine.core.kv
    llm.reset_prefix_cache()
    assert kv.num_free_blocks == kv.num_blocks


@pytest.mark.parametrize("kind", ["rank", "base", "dora", "head", "pickle", "missing"])
def test_bad_adapters_are_refused_at_load_with_the_reason(llama_dir, tiny_models, tmp_path, kind):
    from safetensors.torch import load_file, save_file

    path = tmp_path / kind
    expected = {"rank": "max_lora_rank", "base": "another base model", "dora": "DoRA", "head": "lm_head",
                "pickle": "pickle", "missing": "adapter_config.json"}[kind]
    if kind == "rank":
        make_peft_adapter(llama_dir, path, seed=0, rank=32)
    elif kind == "base":
        make_peft_adapter(tiny_models["qwen3"], path, seed=0, rank=4)  # head_dim 32: other q/k/v sizes
    elif kind == "dora":
        make_peft_adapter(llama_dir, path, seed=0, rank=4, use_dora=True)
    elif kind == "head":
        make_peft_adapter(llama_dir, path, seed=0, rank=4, targets=("q_proj", "lm_head"))
    elif kind == "pickle":
        make_peft_adapter(llama_dir, path, seed=0, rank=4)
        tensors = load_file(path / "adapter_model.safetensors")
        torch.save(tensors, path / "adapter_model.bin")
        (path / "adapter_model.safetensors").unlink()
    else:
        path.mkdir()
        save_file({}, path / "adapter_model.safetensors")
    llm = LLM(model=str(llama_dir), dtype="float32", enable_lora=True, max_lora_rank=16)
    with pytest.raises(ValueError, match=expected):
        llm.generate(PROMPTS[:1], GREEDY, lora_request=LoRARequest(kind, 1, str(path)), use_tqdm=False)
    with pytest.raises(ValueError, match=expected):
        LLM(model=str(llama_dir), dtype="float32", enable_lora=True, lora_modules={kind: str(path)})
    assert llm.engine.registry.refs() == [] and not llm.engine.has_unfinished_requests()
    assert llm.generate(PROMPTS[:1], GREEDY, use_tqdm=False)[0].outputs[0].token_ids == hf_greedy(
        _reference(str(llama_dir), None), PROMPTS[0], MAX_TOKENS)


def test_lora_needs_enable_lora_and_known_names(llama_dir, adapters):
    plain = LLM(model=str(llama_dir), dtype="float32")
    with pytest.raises(ValueError, match="enable_lora"):
        plain.generate(PROMPTS[:1], GREEDY, lora_request="all", use_tqdm=False)
    with pytest.raises(ValueError, match="enable_lora"):
        LLM(model=str(llama_dir), dtype="float32", lora_modules={"all": str(adapters["all"])})
    llm = LLM(model=str(llama_dir), dtype="float32", enable_lora=True)
    with pytest.raises(LookupError, match="no adapter named 'nope'"):
        llm.generate(PROMPTS[:1], GREEDY, lora_request="nope", use_tqdm=False)
    with pytest.raises(ValueError, match="NAME=DIR"):
        LLM(model=str(llama_dir), dtype="float32", enable_lora=True, lora_modules=("nodir",))


@pytest.mark.parametrize("engine", [
    {"max_num_batched_tokens": 6},  # chunked prefill: a prompt's chunks and other requests' decodes share steps
    {"num_blocks": 12, "block_size": 4, "max_num_seqs": 4},  # preemption: recomputed under the same adapter
    {"speculative_method": "ngram", "num_speculative_tokens": 3},  # verification runs the adapter too
])
def test_adapters_compose_with_the_engine(llama_dir, adapters, engine):
    llm = LLM(model=str(llama_dir), dtype="float32", enable_lora=True, max_loras=2,
              lora_modules={name: str(path) for name, path in adapters.items()}, **engine)
    loras = ["all", "qv", None, "all"]
    prompts = [p * 2 for p in PROMPTS]
    outs = llm.generate(prompts, GREEDY, lora_request=loras, use_tqdm=False)
    for prompt, lora, out in zip(prompts, loras, outs):
        ref = _reference(str(llama_dir), None if lora is None else str(adapters[lora]))
        assert out.outputs[0].token_ids == hf_greedy(ref, prompt, MAX_TOKENS)
    if "num_blocks" in engine:
        assert llm.engine.stats().num_preemptions > 0
    kv = llm.engine.core.kv
    llm.reset_prefix_cache()
    assert kv.num_free_blocks == kv.num_blocks
