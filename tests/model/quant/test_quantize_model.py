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
