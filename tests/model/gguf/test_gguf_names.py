"""Tensor names and llama.cpp's q/k row permutation, against the converter's own formula."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvflow.model.gguf.names import gguf_name, hf_name, rope_heads, rope_row_order


def converter_permute(rows: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py permutation of q/k rows, as it is written there."""
    return rows.reshape(heads, 2, rows.shape[0] // heads // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


@pytest.mark.parametrize("heads,head_dim", [(4, 64), (2, 16), (1, 8)])
def test_row_order_is_the_converters_permutation_and_its_inverse(heads, head_dim):
    w = torch.randn(heads * head_dim, 12)
    to_gguf = rope_row_order(w.shape[0], heads, to_gguf=True)
    assert torch.equal(w[to_gguf], torch.from_numpy(converter_permute(w.numpy(), heads)))
    assert torch.equal(w[to_gguf][rope_row_order(w.shape[0], heads, to_gguf=False)], w)


def test_row_order_refuses_rows_that_do_not_split_into_heads():
    with pytest.raises(ValueError, match="heads"):
        rope_row_order(30, 4, to_gguf=True)


def test_names_round_trip_and_permuted_tensors():
    hf_names = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"] + [
        f"model.layers.3.{p}.weight" for p in (
            "input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "post_attention_layernorm", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    gguf_names = [gguf_name(n) for n in hf_names]
    assert gguf_names[:3] == ["token_embd.weight", "output_norm.weight", "output.weight"]
    assert gguf_names[4] == "blk.3.attn_q.weight" and gguf_names[-1] == "blk.3.ffn_down.weight"
    assert [hf_name(n) for n in gguf_names] == hf_names
    assert hf_name("blk.0.attn_q.bias") == "model.layers.0.self_attn.q_proj.bias"
    assert gguf_name("model.layers.0.self_attn.rotary_emb.inv_freq") is None and hf_name("blk.0.ssm_a") is None
    assert rope_heads("blk.0.attn_q.weight", 8, 2) == 8
    assert rope_heads("model.layers.1.self_attn.k_proj.bias", 8, 2) == 2
    assert rope_heads("blk.0.attn_v.weight", 8, 2) is None
