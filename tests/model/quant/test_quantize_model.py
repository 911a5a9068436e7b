"""`kvflow quantize`'s pipeline: what it writes is exactly the formats' quantisation of the checkpoint,
in a directory kvflow reads back and a GGUF file whose blocks are the same bytes."""

from __future__ import annotations

import json

import pytest
import torch

from kvflow.model.quant.checkpoint import read_safetensors
from kvflow.model.quant.formats import quantize_fitting
from kvflow.model.quant.quantize_model import is_projection, quantize_checkpoint, read_checkpoint
from kvflow.model.quant.weights import QuantizedWeight

TINY = "kvflow/assets/tiny"


@pytest.fixture(scope="module")
def original() -> dict[str, torch.Tensor]:
    return read_checkpoint(TINY)


def test_directory_holds_the_formats_own_quantisation(tmp_path, original) -> None:
    report = quantize_checkpoint(TINY, "q4_k", out_dir=tmp_path / "q")
    stored = dict(read_safetensors(tmp_path / "q" / "model.safetensors", torch.float32))
    projections = [n for n in original if is_projection(n)]
    assert len(projections) == 7 * 4 and set(report.quantized) == set(projections)
    for name in projections:
        expected = quantize_fitting(original[name].float(), "q4_k")
        got = stored[name]
        assert isinstance(got, QuantizedWeight) and got.format == expected.format
        assert torch.equal(got.data["blocks"], expected.data["blocks"])
    # down_proj's 704 inputs do not split into q4_k's 256-wide super-blocks: q4_0, the same 4.5 bits
    assert report.quantized["model.layers.0.mlp.down_proj.weight"] == "q4_0"
    assert report.bits_per_weight == pytest.approx(4.5)
    for name, tensor in original.items():  # everything else unchanged, in its dtype
        if name not in projections:
            assert torch.equal(stored[name], tensor)
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization_config"] == {"quant_method": "kvflow", "format": "q4_k"}
    assert (tmp_path / "q" / "tokenizer.json").is_file() and (tmp_path / "q" / "train_report.json").is_file()
    assert 0 < report.weight_error < 0.2


def test_gguf_output_carries_the_same_blocks(tmp_path, original) -> None:
    from kvflow.model.gguf.reader import iter_gguf_weights

    quantize_checkpoint(TINY, "q8_0", gguf_path=tmp_path / "m.gguf")
    read = dict(iter_gguf_weights(tmp_path / "m.gguf"))
    name = "model.layers.1.mlp.up_proj.weight"
    assert torch.equal(read[name].data["blocks"], quantize_fitting(original[name].float(), "q8_0").data["blocks"])
    q = "model.layers.1.self_attn.q_proj.weight"  # rows permuted for llama.cpp's rope and back on reading
    assert torch.equal(read[q].data["blocks"], quantize_fitting(original[q].float(), "q8_0").data["blocks"])


def test_refusals(tmp_path) -> None:
    with pytest.raises(ValueError, match="GGUF files hold"):
        quantize_checkpoint(TINY, "int8", gguf_path=tmp_path / "x.gguf")
    with pytest.raises(ValueError, match="unknown weight format"):
        quantize_checkpoint(TINY, "q3_k", out_dir=tmp_path / "x")
    with pytest.raises(ValueError, match="awq needs calibration"):
        quantize_checkpoint(TINY, "q8_0", method="awq", out_dir=tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_lm_head_stored_quantised_loads_like_the_head_quantised_at_load(tmp_path):
    """`kvflow quantize --lm-head`: the tied head is written as a quantised tensor of its own (the config
    untied, the embedding dense), loads quantised, and computes what `--quantization-lm-head` does at load;
    the GGUF file carries it as output.weight and reads back quantised."""
    from kvflow.config import EngineConfig, ModelConfig
    from kvflow.model import loader
    from kvflow.model.gguf import iter_gguf_weights

    report = quantize_checkpoint(TINY, "q8_0", out_dir=tmp_path / "q8", gguf_path=tmp_path / "q8.gguf", lm_head=True)
    assert report.quantized["lm_head.weight"] == "q8_0" and report.lm_head == "tied: a quantised copy"
    config = json.loads((tmp_path / "q8" / "config.json").read_text())
    assert config["tie_word_embeddings"] is False and config["quantization_config"]["lm_head"] is True
    stored_cfg = ModelConfig.from_pretrained(tmp_path / "q8", dtype="float32")
    assert stored_cfg.quantization.lm_head and "LM head quantised" in stored_cfg.quantization.describe()
    stored = loader.load_model(stored_cfg)
    at_load = loader.load_model(EngineConfig.create(TINY, dtype="float32", quantization="q8_0",
                                                    quantization_lm_head=True).model)
    assert stored.lm_head.method.name == at_load.lm_head.method.name == "q8_0"
    assert torch.equal(stored.lm_head.method.weight(stored.lm_head).data["blocks"],
                       at_load.lm_head.method.weight(at_load.lm_head).data["blocks"])
    assert torch.equal(stored.embed_tokens.weight, at_load.embed_tokens.weight)
    hidden = torch.randn(3, stored.config.hidden_size, generator=torch.Generator().manual_seed(0))
    assert torch.equal(stored.compute_logits(hidden), at_load.compute_logits(hidden))
    gguf_head = dict(iter_gguf_weights(tmp_path / "q8.gguf"))["lm_head.weight"]
    assert gguf_head.format == "q8_0"
    from_gguf = loader.load_model(ModelConfig.from_pretrained(tmp_path / "q8.gguf", dtype="float32"))
    assert from_gguf.lm_head.method.name == "q8_0"
    # Asking a stored checkpoint with a dense head for a quantised one is refused; with its own, it loads.
    plain = quantize_checkpoint(TINY, "q8_0", out_dir=tmp_path / "plain")
    assert plain.lm_head == "dense"
    with pytest.raises(ValueError, match="with a dense LM head"):
        EngineConfig.create(str(tmp_path / "plain"), quantization="q8_0", quantization_lm_head=True)
    assert EngineConfig.create(str(tmp_path / "q8"), quantization="q8_0",
                               quantization_lm_head=True).model.quantization.lm_head
