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


def run(fmt: str | None, dtype: str = "float32", **kwargs) -> tuple[LLM, list[list[int]], torch.Tensor, torch.Tensor]:
    """Greedy tokens per prompt, the logprobs of every prompt token (teacher-forced) and of every generated one."""
    llm = LLM(model=str(TINY), dtype=dtype, num_blocks=32, quantization=fmt, **kwargs)
    params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True, logprobs=1, prompt_logprobs=1)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    tokens, prompt_lps, token_lps = [], [], []
    for prompt, out in zip(PROMPTS, outs):
        completion = out.outputs[0]
        tokens.append(completion.token_ids)
        prompt_lps += [pos[t].logprob for pos, t in zip(out.prompt_logprobs[1:], prompt[1:])]
        token_lps += [pos[t].logprob for pos, t in zip(completion.logprobs, completion.token_ids)]
    return llm, tokens, torch.tensor(prompt_lps, dtype=torch.float64), torch.tensor(token_lps, dtype=torch.float64)


def check_same(fast: tuple, plain: tuple, dtype: str, rounding: bool = False) -> None:
    """fp32: the same greedy tokens, logprobs within summation order. bf16, where a changed summation order
    flips near-tied tokens of the shipped model even for dense weights: the teacher-forced prompt logprobs
    within bf16 rounding. `rounding`: activations rounded to int8 per block on both sides but summed in another
    order, where an fp32 ulp can move a code by one step: the same tokens, logprobs within a hundredth or so."""
    _, tokens, prompt_lps, token_lps = fast
    _, ref_tokens, ref_prompt_lps, ref_token_lps = plain
    if rounding:
        assert tokens == ref_tokens
        both, ref_both = torch.cat([prompt_lps, token_lps]), torch.cat([ref_prompt_lps, ref_token_lps])
        assert torch.allclose(both, ref_both, atol=0.03, rtol=0)
        assert float((both - ref_both).abs().mean()) < 3e-3
    elif dtype == "float32":
        assert tokens == ref_tokens
        assert torch.allclose(prompt_lps, ref_prompt_lps, atol=2e-4, rtol=0)
        assert torch.allclose(token_lps, ref_token_lps, atol=2e-4, rtol=0)
    else:
        assert torch.allclose(prompt_lps, ref_prompt_lps, atol=0.15, rtol=0)
        assert float((prompt_lps - ref_prompt_lps).abs().mean()) < 0.03


@pytest.mark.parametrize(("fmt", "kwargs"), [
    ("q4_k", {}), ("q8_0", {"quant_activations": "q8"}), ("int8", {"quantization_activation_bits": 8}),
    ("bipolar", {"quantization_bits": 3}),
], ids=["q4_k-exact", "q8_0-q8", "int8-w8a8", "bipolar3"])
def test_the_modules_run_the_kernels_with_the_references_logits(fmt, kwargs, monkeypatch):
    calls = []
    real, real_vnni = kernels.quant_matmul, kernels.int8_vnni_matmul

    def spy(x, qw, activation="exact", **kw):
        calls.append(activation)
        return real(x, qw, activation, **kw)

    real_gguf = kernels.gguf_vnni_matmul

    def spy_vnni(*args):
        calls.append("q8-vnni")
        return real_vnni(*args)

    def spy_gguf(*args):
        calls.append("q8-vnni")
        return real_gguf(*args)

    monkeypatch.setattr(kernels, "quant_matmul", spy)
    monkeypatch.setattr(kernels, "int8_vnni_matmul", spy_vnni)
    monkeypatch.setattr(kernels, "gguf_vnni_matmul", spy_gguf)
    fast = run(fmt, cpu_kernels=False, **kwargs)
    packed = fmt in ("int8", "q8_0") and kernels.int8_vnni_available()  # W8A8 / q8-mode GGUF codes VNNI-packed
    assert set(calls) == {"exact" if fmt in ("q4_k", "bipolar") else "q8-vnni" if packed else "q8"}
    monkeypatch.setattr(linear_methods, "_KERNELS", {})  # every method on its torch reference
    # The packed GGUF kernels sum each output over blocks in their own order (int8 W8A8's sums are exact).
    check_same(fast, run(fmt, cpu_kernels=False, **kwargs), "float32", rounding=packed and fmt == "q8_0")


# ----------------------------------------------------------------------------- the C++ forward
FORWARD_CASES = [
    ("q8_0", "float32", {}), ("q4_0", "float32", {}), ("q4_k", "float32", {}), ("int8", "float32", {}),
    ("int8", "float32", {"quantization_activation_bits": 8}), ("q4_0", "float32", {"quant_activations": "q8"}),
    ("q8_0", "float32", {"quant_activations": "q8"}),
    ("q8_0", "bfloat16", {}), ("bipolar", "float32", {"quantization_bits": 3, "quantization_group_size": 32}),
    ("bipolar", "bfloat16", {"quantization_bits": 4}),
    ("bipolar", "float32", {"quantization_bits": 3, "quantization_activation_bits": 6}),
]


@pytest.mark.parametrize(("fmt", "dtype", "kwargs"), FORWARD_CASES,
                         ids=["q8_0", "q4_0", "q4_k", "int8-w8a16", "int8-w8a8", "q4_0-q8", "q8_0-q8", "q8_0-bf16",
                              "bipolar3", "bipolar4-bf16", "bipolar3-a6"])
def test_the_cpp_forward_runs_quantised_layers_like_the_modules(fmt, dtype, kwargs):
    """Every projection on the quantised kernels inside the one-call C++ step: the greedy tokens and logprobs
    of the modules path (which runs the same kernels per layer), within fp32 summation order (bf16: the
    fast-path check's near-tie bound on the logprobs)."""
    fast = run(fmt, dtype=dtype, **kwargs)
    runner = fast[0].engine.core.runner
    assert runner.cpu_forward is not None
    projections = [m for layer in runner.model.layers for m in (layer.self_attn.qkv_proj, layer.mlp.down_proj)]
    assert all(m.method.cpu_kernel_weights(m).quant is not None for m in projections)
    check_same(fast, run(fmt, dtype=dtype, cpu_kernels=False, **kwargs), dtype)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_model_mixing_dense_and_quantised_layers_runs_in_the_cpp_forward(dtype, monkeypatch):
    """Layer 1 quantised, the others dense (bf16: oneDNN-prepacked, with decode copies) in the same step."""
    from safetensors.torch import load_file

    from kvflow.model import loader
    from kvflow.model.quant.formats import quantize

    dense = load_file(str(TINY / "model.safetensors"))

    def pairs(path, dtype):
        for name, w in dense.items():
            quantised = ".layers.1." in name and name.endswith("_proj.weight")
            yield name, quantize(w, "q8_0") if quantised else w.to(dtype)

    monkeypatch.setattr(loader, "iter_weights", pairs)
    fast = run(None, dtype=dtype)
    runner = fast[0].engine.core.runner
    assert runner.cpu_forward is not None
    methods = {m.method.name for m in runner.model.layers[1].modules() if hasattr(m, "method")}
    assert methods == {"q8_0"}
    assert runner.model.layers[0].self_attn.qkv_proj.method.name == (
        "onednn-prepacked" if dtype == "bfloat16" else "dense")
    plain = run(None, dtype=dtype, cpu_kernels=False, prepack_weights=False)
    assert plain[0].engine.core.runner.cpu_forward is None
    check_same(fast, plain, dtype)


def test_methods_the_kernels_cannot_run_decline_the_cpp_forward():
    """A-bit bipolar whose groups are not whole 64-bit words has no popcount kernel: its torch reference runs."""
    llm = LLM(model=str(TINY), dtype="float32", num_blocks=32, quantization="bipolar", quantization_bits=3,
              quantization_group_size=32, quantization_activation_bits=6)
    assert llm.engine.core.runner.cpu_forward is None  # the PyTorch modules run it
    out = llm.generate([{"prompt_token_ids": PROMPTS[0]}], SamplingParams(temperature=0.0, max_tokens=3),
                       use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 3
