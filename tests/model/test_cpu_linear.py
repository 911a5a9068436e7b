"""oneDNN-prepacked bf16 linears: bit-identical to torch's own linear, and to the engine without them."""

from __future__ import annotations

import pytest
import torch

from kvflow import LLM, SamplingParams
from kvflow.model.cpu_linear import PackedLinear, prepack_available, prepack_linears
from tests.model.test_parity import mixed_prompts

CPU = torch.device("cpu")
pytestmark = pytest.mark.skipif(not prepack_available(CPU, torch.bfloat16), reason="no oneDNN on this CPU build")


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(1, 96), (7, 96), (3, 5, 96), (64, 96)])
def test_packed_linear_equals_linear_bit_for_bit(shape, bias):
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 200, bias=bias).to(torch.bfloat16)
    x = torch.randn(*shape, dtype=torch.bfloat16)
    packed = PackedLinear.from_linear(linear)
    assert torch.equal(packed(x), linear(x))
    wide = torch.randn(shape[0], 192, dtype=torch.bfloat16)[:, ::2]  # a strided (non-contiguous) input
    assert torch.equal(packed(wide), linear(wide))


def test_prepack_replaces_every_linear_and_only_where_it_is_exact():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Sequential(torch.nn.Linear(8, 4)))
    model = model.to(torch.bfloat16)
    assert prepack_linears(model) == 2
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert not prepack_available(CPU, torch.float32)  # fp32 stays on torch's path (the reference)
    assert not prepack_available(torch.device("meta"), torch.bfloat16)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_engine_outputs_do_not_change_with_prepacking(tiny_models, arch):
    """Greedy bf16 continuations and their logprobs, packed vs plain; qwen2 has q/k/v biases."""
    prompts = [{"prompt_token_ids": p} for p in mixed_prompts(7)]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=2)
    results = {}
    for prepack in (False, True):
        llm = LLM(model=str(tiny_models[arch]), dtype="bfloat16", num_blocks=256, block_size=4,
                  prepack_weights=prepack)
        runner = llm.engine.core.runner
        assert (runner.model.packed_logits is not None) == prepack
        outputs = llm.generate(prompts, params, use_tqdm=False)
        results[prepack] = [(o.outputs[0].token_ids, o.outputs[0].cumulative_logprob,
                             [{t: lp.logprob for t, lp in pos.items()} for pos in o.outputs[0].logprobs])
                            for o in outputs]
    assert results[True] == results[False]
