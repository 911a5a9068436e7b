"""The linear-method seam: oneDNN-prepacked bf16 linears are bit-identical to torch's own linear and
to the engine without them; a method the C++ forward cannot run sends the engine to the PyTorch
modules with a log line, and the outputs stay the same."""

from __future__ import annotations

import logging

import pytest
import torch

from kvflow import LLM, SamplingParams
from kvflow.model.linear import DenseLinear, Linear, LinearMethod, PrepackedLinear, linear_layers, prepack_available
from tests.model.test_parity import mixed_prompts

CPU = torch.device("cpu")
needs_onednn = pytest.mark.skipif(not prepack_available(CPU, torch.bfloat16), reason="no oneDNN on this CPU build")


def _linear(in_features: int, out_features: int, bias: bool) -> tuple[Linear, torch.nn.Linear]:
    reference = torch.nn.Linear(in_features, out_features, bias=bias).to(torch.bfloat16)
    layer = Linear(in_features, out_features, bias=bias).to(torch.bfloat16)
    with torch.no_grad():
        layer.weight.copy_(reference.weight)
        if bias:
            layer.bias.copy_(reference.bias)
    return layer, reference


@needs_onednn
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(1, 96), (7, 96), (3, 5, 96), (64, 96)])
def test_packed_linear_equals_linear_bit_for_bit(shape, bias):
    torch.manual_seed(0)
    packed, linear = _linear(96, 200, bias)
    packed.use(PrepackedLinear())
    x = torch.randn(*shape, dtype=torch.bfloat16)
    assert torch.equal(packed(x), linear(x))
    wide = torch.randn(shape[0], 192, dtype=torch.bfloat16)[:, ::2]  # a strided (non-contiguous) input
    assert torch.equal(packed(wide), linear(wide))


@needs_onednn
def test_prepacking_releases_the_loaded_weight_and_only_applies_where_it_is_exact():
    layer, _ = _linear(8, 8, bias=True)
    layer.use(PrepackedLinear(decode_copy=True))
    assert "weight" not in dict(layer.named_parameters()) and layer.packed_weight is not None
    assert layer.blocked_weight is None  # 8 x 8 does not divide into the GEMV's 4 x 32 blocks
    assert not prepack_available(CPU, torch.float32)  # fp32 stays on torch's path (the reference)
    assert not prepack_available(torch.device("meta"), torch.bfloat16)


def test_dense_linear_is_f_linear():
    torch.manual_seed(0)
    layer, reference = _linear(16, 24, bias=True)
    x = torch.randn(5, 16, dtype=torch.bfloat16)
    assert isinstance(layer.method, DenseLinear) and torch.equal(layer(x), reference(x))


@needs_onednn
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_engine_outputs_do_not_change_with_prepacking(tiny_models, arch):
    """Greedy bf16 continuations and their logprobs, packed vs plain; qwen2 has q/k/v biases."""
    prompts = [{"prompt_token_ids": p} for p in mixed_prompts(7)]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=2)
    results = {}
    for prepack in (False, True):
        llm = LLM(model=str(tiny_models[arch]), dtype="bfloat16", num_blocks=256, block_size=4,
                  prepack_weights=prepack)
        model = llm.engine.core.runner.model
        methods = {layer.method.name for layer in linear_layers(model)}
        assert methods == ({"onednn-prepacked"} if prepack else {"dense"})  # every projection and the head
        outputs = llm.generate(prompts, params, use_tqdm=False)
        results[prepack] = [(o.outputs[0].token_ids, o.outputs[0].cumulative_logprob,
                             [{t: lp.logprob for t, lp in pos.items()} for pos in o.outputs[0].logprobs])
                            for o in outputs]
    assert results[True] == results[False]


class NegatedTwice(LinearMethod):
    """A method the C++ forward knows nothing of: stores -W and negates the result back (exact)."""

    name = "negated-twice"

    def process_weights(self, layer: Linear) -> None:
        layer.register_buffer("negated", -layer.weight.detach(), persistent=False)

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        return -torch.nn.functional.linear(x, layer.negated, None if layer.bias is None else -layer.bias)


def test_a_method_the_cpp_forward_cannot_run_sends_the_engine_to_the_modules(tiny_models, monkeypatch, caplog):
    from kvflow.worker import model_runner

    prompts = [{"prompt_token_ids": p} for p in mixed_prompts(5)]
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    reference = LLM(model=str(tiny_models["qwen2"]), dtype="float32", num_blocks=256, block_size=4)
    assert reference.engine.core.runner.cpu_forward is not None  # this machine runs the C++ forward
    expected = [o.outputs[0].token_ids for o in reference.generate(prompts, params, use_tqdm=False)]
    monkeypatch.setattr(model_runner.ModelRunner, "_linear_method", lambda self, use_cpu_kernels: NegatedTwice())
    with caplog.at_level(logging.INFO, logger="kvflow.worker.model_runner"):
        llm = LLM(model=str(tiny_models["qwen2"]), dtype="float32", num_blocks=256, block_size=4)
    assert llm.engine.core.runner.cpu_forward is None
    assert "cannot run negated-twice linear weights; running the PyTorch modules" in caplog.text
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)] == expected
