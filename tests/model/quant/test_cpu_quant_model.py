"""The shipped tiny model quantised at load, run on CPU by the C++ quantised kernels: its prompt and
greedy logprobs equal those of the same quantised model run by the methods' torch references (exact
activations up to fp32 rounding; q8 activations against the reference that rounds them alike)."""

from __future__ import annotations

import pytest
import torch

from kvflow import LLM, SamplingParams
from kvflow.assets import default_model_path
from kvflow.model.quant import kernels, linear_methods

TINY = default_model_path()
PROMPTS = [[1, 450, 3012, 77, 1400, 23, 9, 310, 2048, 600, 5, 17], [1, 20, 21, 22, 900]]
pytestmark = pytest.mark.skipif(kernels.load_extension() is None, reason="the C++ quantised kernels cannot build")


def run(fmt: str, **kwargs) -> tuple[LLM, list[list[int]], torch.Tensor]:
    """Greedy tokens per prompt, and the logprobs of every prompt token and every generated one."""
    llm = LLM(model=str(TINY), dtype="float32", num_blocks=32, quantization=fmt, **kwargs)
    params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True, logprobs=1, prompt_logprobs=1)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    tokens, lps = [], []
    for prompt, out in zip(PROMPTS, outs):
        completion = out.outputs[0]
        tokens.append(completion.token_ids)
        lps += [pos[t].logprob for pos, t in zip(out.prompt_logprobs[1:], prompt[1:])]
        lps += [pos[t].logprob for pos, t in zip(completion.logprobs, completion.token_ids)]
    return llm, tokens, torch.tensor(lps, dtype=torch.float64)


@pytest.mark.parametrize(("fmt", "kwargs"), [
    ("q4_k", {}), ("q8_0", {"quant_activations": "q8"}), ("int8", {"quantization_activation_bits": 8}),
], ids=["q4_k-exact", "q8_0-q8", "int8-w8a8"])
def test_the_modules_run_the_kernels_with_the_references_logits(fmt, kwargs, monkeypatch):
    calls = []
    real = kernels.quant_matmul

    def spy(x, qw, activation="exact", **kw):
        calls.append(activation)
        return real(x, qw, activation, **kw)

    monkeypatch.setattr(kernels, "quant_matmul", spy)
    _, tokens, lps = run(fmt, cpu_kernels=False, **kwargs)
    assert set(calls) == {"exact" if fmt == "q4_k" else "q8"}
    monkeypatch.setattr(linear_methods, "_KERNELS", {})  # every method on its torch reference
    _, ref_tokens, ref_lps = run(fmt, cpu_kernels=False, **kwargs)
    assert tokens == ref_tokens
    assert torch.allclose(lps, ref_lps, atol=2e-4, rtol=0)
