"""The table of formats: names agree with the config, stated sizes with stored bytes, fallbacks for
widths a block does not divide, and row shards quantise to the shards of the whole."""

from __future__ import annotations

import pytest
import torch

from kvflow.config import QUANT_FORMATS
from kvflow.model.quant.formats import FORMATS, concat_rows, dequantize, get_format, quantize, quantize_fitting


def test_the_table_names_the_configs_formats():
    assert tuple(FORMATS) == QUANT_FORMATS
    with pytest.raises(ValueError, match="supported: q8_0, q4_0, q4_k, int8, bipolar"):
        get_format("q5_k")


@pytest.mark.parametrize("fmt", QUANT_FORMATS)
def test_stated_bits_per_weight_are_the_stored_bytes(fmt):
    w = torch.randn(32, 512) * 0.05
    qw = quantize(w, fmt)
    assert qw.shape == (32, 512) and all(t.shape[0] == 32 for t in qw.data.values())  # N first
    assert qw.nbytes() * 8 / w.numel() == FORMATS[fmt].bits_per_weight(512, qw.params)
    assert dequantize(qw).shape == (32, 512) and dequantize(qw).dtype == torch.float32


def test_bipolar_bits_per_weight_follows_its_parameters():
    fmt = get_format("bipolar")
    for bits, group in [(2, 64), (3, 32), (8, 128)]:
        qw = quantize(torch.randn(8, 256) * 0.05, "bipolar", bits=bits, group_size=group)
        assert qw.nbytes() * 8 / (8 * 256) == fmt.bits_per_weight(256, qw.params) == bits + 32 / group


def test_unsplittable_widths_fall_back_or_stay_dense():
    w = torch.randn(8, 704) * 0.05  # tiny's down_proj: 704 = 22 x 32, not a multiple of 256
    assert quantize_fitting(w, "q4_k").format == "q4_0"
    assert quantize_fitting(torch.randn(8, 40), "q8_0") is None
    assert quantize_fitting(w, "bipolar", bits=3, group_size=64).params == {"bits": 3, "group_size": 64}
    with pytest.raises(ValueError, match="divisible by 256"):
        quantize(w, "q4_k")
    with pytest.raises(ValueError, match="takes no parameter bits"):
        quantize(w, "q8_0", bits=8)


@pytest.mark.parametrize("fmt", QUANT_FORMATS)
def test_row_shards_concatenate_to_the_quantised_whole(fmt):
    """What lets fused q/k/v and gate/up load from per-projection quantised tensors."""
    w = torch.randn(48, 256) * 0.05
    whole = quantize(w, fmt)
    parts = concat_rows([quantize(w[:16], fmt), quantize(w[16:40], fmt), quantize(w[40:], fmt)])
    assert parts.shape == whole.shape
    assert all(torch.equal(parts.data[k], whole.data[k]) for k in whole.data)
    with pytest.raises(ValueError, match="one format"):
        concat_rows([quantize(w[:16], "q8_0"), quantize(w[16:], "q4_0")])
