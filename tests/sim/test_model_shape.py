"""Model shapes: built-in sizes match the published parameter counts; config parsing; FLOP counts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvflow.sim.model_shape import KNOWN_SHAPES, ModelShape

# Published sizes: the OPT paper's nominal sizes; Hugging Face model pages' safetensors counts for the rest.
PUBLISHED_PARAMS = {
    "OPT-13B": 13e9, "OPT-66B": 66e9, "OPT-175B": 175e9,
    "Llama-2-7B": 6.74e9, "Llama-2-13B": 13.0e9, "Llama-2-70B": 69.0e9,
    "Llama-3-8B": 8.03e9, "Llama-3-70B": 70.6e9, "Mistral-7B": 7.24e9, "Qwen2.5-7B": 7.62e9,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_builtin_shapes_match_published_parameter_counts(name: str) -> None:
    shape = ModelShape.known(name)
    assert shape.num_params == pytest.approx(PUBLISHED_PARAMS[name], rel=0.02)
    assert shape.weight_bytes == 2 * shape.num_params


def test_llama_2_7b_counts_exactly() -> None:
    shape = ModelShape.known("llama-2-7b")  # case-insensitive
    assert shape.num_params == 6_738_415_616  # meta-llama/Llama-2-7b-hf safetensors total
    assert shape.kv_bytes_per_token == 2 * 32 * 4096 * 2 == 524288
    # GQA: 8 KV heads of 128 over 80 layers.
    assert ModelShape.known("Llama-2-70B").kv_bytes_per_token == 2 * 80 * 8 * 128 * 2
    # Every projection and MLP weight: 2 FLOPs per token each, the embeddings and norms apart.
    assert shape.linear_flops_per_token == 2 * (shape.num_params - 2 * 32000 * 4096 - 65 * 4096)
    assert shape.logits_flops == 2 * 32000 * 4096
    with pytest.raises(ValueError, match="unknown model"):
        ModelShape.known("GPT-5")


def test_opt_is_mha_with_a_non_gated_four_times_hidden_mlp() -> None:
    opt = KNOWN_SHAPES["OPT-175B"]
    assert (opt.num_layers, opt.hidden_size, opt.num_heads, opt.num_kv_heads) == (96, 12288, 96, 96)
    assert opt.intermediate_size == 4 * 12288 and not opt.gated_mlp and opt.tied_embeddings
    assert opt.mlp_params_per_layer == 2 * 12288 * 49152
    assert opt.kv_bytes_per_token == 2 * 96 * 12288 * 2


def test_attention_flops_of_chunks_add_up_to_the_whole_prompt() -> None:
    shape = KNOWN_SHAPES["Llama-2-7B"]
    whole = shape.attention_flops(1024, 0)
    assert whole == 2 * 32 * 128 * 32 * 1024**2
    assert sum(shape.attention_flops(256, 256 * i) for i in range(4)) == pytest.approx(whole)
    # A decode step: one query over ctx cached keys and itself.
    assert shape.attention_flops(1, 999) == 2 * 32 * 128 * 32 * (1 + 2 * 999)


def test_from_hf_config_reads_llama_qwen3_and_opt_keys(tmp_path: Path) -> None:
    llama3 = {"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 32, "hidden_size": 4096,
              "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8,
              "vocab_size": 128256, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
    assert ModelShape.from_hf_config(llama3, name="Llama-3-8B") == KNOWN_SHAPES["Llama-3-8B"]

    # Qwen3-4B: head_dim (128) is not hidden / heads (80); tied embeddings; stored as float32 here.
    qwen3 = {"num_hidden_layers": 36, "hidden_size": 2560, "intermediate_size": 9728, "num_attention_heads": 32,
             "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936, "tie_word_embeddings": True,
             "dtype": "float32"}
    (tmp_path / "config.json").write_text(json.dumps(qwen3))
    shape = ModelShape.from_pretrained(tmp_path)
    assert shape.head_dim == 128 and shape.param_bytes == 4 and shape.kv_bytes == 4 and shape.name == tmp_path.name
    assert shape.num_params == pytest.approx(4.02e9, rel=0.02)  # Qwen3-4B's published 4.0B
    assert ModelShape.from_pretrained(tmp_path, dtype="bf16").weight_bytes == 2 * shape.num_params
    with pytest.raises(ValueError, match="no config.json"):
        ModelShape.from_pretrained(tmp_path / "missing")

    opt = {"model_type": "opt", "num_hidden_layers": 40, "hidden_size": 5120, "ffn_dim": 20480,
           "num_attention_heads": 40, "vocab_size": 50272, "torch_dtype": "float16"}
    assert ModelShape.from_hf_config(opt, name="OPT-13B") == KNOWN_SHAPES["OPT-13B"]


def test_invalid_shapes_raise_and_dict_round_trips() -> None:
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        ModelShape("bad", 2, 64, 128, 4, 3, 16, 100)
    with pytest.raises(ValueError, match="hidden_size must be positive"):
        ModelShape("bad", 2, 0, 128, 4, 4, 16, 100)
    with pytest.raises(ValueError, match="unknown dtype"):
        ModelShape.from_hf_config({**KNOWN_SHAPES["OPT-13B"].to_dict(), "num_hidden_layers": 1,
                                   "num_attention_heads": 1, "torch_dtype": "float13"})
    for shape in KNOWN_SHAPES.values():
        assert ModelShape.from_dict(json.loads(json.dumps(shape.to_dict()))) == shape
