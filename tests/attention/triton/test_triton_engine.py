"""The whole engine on the Triton attention backend (under the interpreter on CPU): greedy tokens
equal the torch-native backend's, through prefill chunks, a cached prefix and decodes, and every
KV block comes back."""

from __future__ import annotations

import pytest
import torch

from kvflow import LLM, SamplingParams
from kvflow.attention.backend import get_backend


def _generate(model_dir, backend: str, prompts: list[list[int]]) -> tuple[list[list[int]], LLM]:
    llm = LLM(model=str(model_dir), dtype="float32", num_blocks=48, block_size=8, attention_backend=backend,
              cpu_kernels=False, max_num_batched_tokens=64, enable_prefix_caching=True)
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
    """The issue's end-to-end GPU check: Triton attention on CUDA, fp32, equals the CPU engine."""
    prompts = [[(5 * i) % 300 + 3 for i in range(70)], [7, 8, 9]]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    outs = {}
    for device in ("cpu", "cuda"):
        llm = LLM(model=str(tiny_models["llama"]), dtype="float32", device=device, num_blocks=48, block_size=8)
        outs[device] = [list(o.outputs[0].token_ids) for o in
                        llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)]
        if device == "cuda":
            assert llm.engine.core.runner.backend.name == "triton"
    assert outs["cuda"] == outs["cpu"]
