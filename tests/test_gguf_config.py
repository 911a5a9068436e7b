"""GGUF metadata -> config: Llama 3's rope scaling recovered from llama.cpp's per-frequency factors
(the parameters may differ from the original ones; the frequencies may not)."""

from __future__ import annotations

import pytest
import torch

from kvflow.config import ModelConfig, RopeConfig
from kvflow.gguf_config import is_gguf_path, llama3_rope_from_factors
from kvflow.model.gguf.writer import llama3_rope_factors
from kvflow.model.layers import rope_inv_freq


@pytest.mark.parametrize("rope", [
    RopeConfig(theta=500000.0, rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
               original_max_position_embeddings=8192),  # Llama 3.1
    RopeConfig(theta=500000.0, rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
               original_max_position_embeddings=8192),  # Llama 3.2
    RopeConfig(theta=10000.0, rope_type="llama3", factor=4.0, low_freq_factor=2.0, high_freq_factor=8.0,
               original_max_position_embeddings=512),
])
def test_llama3_rope_is_recovered_from_its_factors(rope):
    cfg = ModelConfig(path="", architecture="LlamaForCausalLM", vocab_size=8, hidden_size=128 * 4,
                      intermediate_size=8, num_layers=1, num_heads=4, num_kv_heads=4, head_dim=128, rms_norm_eps=1e-5,
                      max_model_len=131072, tie_word_embeddings=True, rope=rope)
    params = llama3_rope_from_factors(llama3_rope_factors(cfg), 128, rope.theta, "x.gguf")
    recovered = RopeConfig.from_hf({"rope_theta": rope.theta, "rope_scaling": params})
    assert recovered.rope_type == "llama3" and recovered.factor == rope.factor
    torch.testing.assert_close(rope_inv_freq(recovered, 128), rope_inv_freq(rope, 128), rtol=1e-5, atol=0)


def test_gguf_paths_are_named_by_suffix(tmp_path):
    assert is_gguf_path("m.gguf") and is_gguf_path(tmp_path / "M.GGUF") and not is_gguf_path(tmp_path)
