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


def _write_every_kind(path, endianess=None, nested: bool = False):
    """A GGUF file with a value of every type, arrays of numbers, bools and strings, and tensors viewed as
    their own dtype (F32, F16, I32) and as bytes (Q8_0)."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(path, "llama", **({"endianess": endianess} if endianess is not None else {}))
    for kind, value in [("uint8", 200), ("int8", -7), ("uint16", 60000), ("int16", -30000), ("uint32", 4_000_000_000),
                        ("int32", -2_000_000_000), ("float32", 1e-5), ("uint64", 2**60), ("int64", -(2**60)),
                        ("float64", 0.1), ("bool", True), ("string", "naïve 😀 café")]:
        getattr(writer, f"add_{kind}")(f"test.{kind}", value)
    writer.add_array("test.ints", [3, -1, 4])
    writer.add_array("test.floats", [0.5, -2.25])
    writer.add_array("test.bools", [True, False, True])
    writer.add_array("test.strings", ["a", "", "ü b"])
    if nested:
        writer.add_array("test.nested", [[1, 2], [3]])
    rng = np.random.default_rng(0)
    writer.add_tensor("t.f32", rng.standard_normal((3, 32)).astype(np.float32))
    writer.add_tensor("t.f16", rng.standard_normal((2, 64)).astype(np.float16))
    writer.add_tensor("t.i32", np.arange(5, dtype=np.int32))
    blocks = gguf.quants.quantize(rng.standard_normal((4, 64)).astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("t.q8", blocks, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_the_header_scan_reads_what_gguf_reader_reads(tmp_path):
    """scan_gguf against gguf's own reader: every value type, arrays, tensor places and views; a byte-swapped
    file and arrays of arrays go to the reader itself."""
    import gguf

    from kvflow.gguf_config import GGUFScanUnsupported, read_gguf, read_with_gguf_reader, scan_gguf

    path = _write_every_kind(tmp_path / "every.gguf")
    scanned, reference = scan_gguf(path), read_with_gguf_reader(path)
    assert scanned.metadata == reference.metadata and scanned.tensors == reference.tensors
    assert scanned.metadata["test.float32"] == 1e-5 and scanned.metadata["test.strings"] == ["a", "", "ü b"]
    assert [t.array_dtype.name for t in scanned.tensors] == ["float32", "float16", "int32", "uint8"]
    for (t, mine), (_, theirs) in zip(scanned.map_tensors(), reference.map_tensors()):
        assert mine.shape == t.array_shape and mine.tobytes() == theirs.tobytes()
    for special in (_write_every_kind(tmp_path / "big.gguf", endianess=gguf.GGUFEndian.BIG),
                    _write_every_kind(tmp_path / "nested.gguf", nested=True)):
        with pytest.raises(GGUFScanUnsupported):
            scan_gguf(special)
        assert read_gguf(special).metadata == read_with_gguf_reader(special).metadata
    assert read_gguf(tmp_path / "nested.gguf").metadata["test.nested"] == read_with_gguf_reader(
        tmp_path / "nested.gguf").metadata["test.nested"]
