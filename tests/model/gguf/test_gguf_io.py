"""Writing the shipped tiny model to GGUF and reading it back: config, tensors, tokenizer, refusals."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from kvflow.config import ModelConfig
from kvflow.model.gguf import iter_gguf_weights, tokenizer_from_gguf, write_gguf
from kvflow.model.loader import load_generation_config
from kvflow.model.quant.weights import QuantizedWeight
from tests.model.gguf.conftest import is_linear, quantize

TEXTS = [
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n",
    "The pass key is 40217. Remember it.  Twice:\t40217!",
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n",
    "Mixed: naïve 😀 café 你好 Straße   trailing   ",
    "x=1_000_000; y = x**2 // 3 # comment's ok, they'll see\r\n",
]


def test_config_round_trips(tiny_dir, tiny_f32_gguf):
    ours, theirs = ModelConfig.from_pretrained(tiny_dir), ModelConfig.from_pretrained(tiny_f32_gguf)
    assert theirs.path == str(tiny_f32_gguf)
    skip = {"path", "eos_token_ids"}
    assert {f.name: getattr(theirs, f.name) for f in dataclasses.fields(ours) if f.name not in skip} == {
        f.name: getattr(ours, f.name) for f in dataclasses.fields(ours) if f.name not in skip}
    # The directory splits its end ids over config.json (2) and generation_config.json (2, 4); the file
    # states eos and end-of-turn, so the engine stops on the same set either way.
    assert set(theirs.eos_token_ids) == set(ours.eos_token_ids) | {4}
    generation = load_generation_config(tiny_f32_gguf)
    assert generation["temperature"] == 0.8 and generation["top_p"] == 0.95
    assert set(generation["eos_token_id"]) == {2, 4}


def test_float_tensors_round_trip_exactly(tiny_weights, tiny_f32_gguf, gguf_dir, tiny_dir):
    back = dict(iter_gguf_weights(tiny_f32_gguf))
    assert back.keys() == tiny_weights.keys()  # tied: no lm_head in either
    for name, tensor in tiny_weights.items():
        assert back[name].dtype == torch.float32 and torch.equal(back[name], tensor), name
    bf16 = {k: v.bfloat16() for k, v in tiny_weights.items()}
    path = write_gguf(gguf_dir / "tiny-bf16.gguf", tiny_dir, bf16)
    assert ModelConfig.from_pretrained(path).dtype == torch.bfloat16
    for name, tensor in iter_gguf_weights(path):
        expected = bf16[name].float() if tensor.dim() == 1 else bf16[name]  # norms are stored as F32
        assert tensor.dtype == expected.dtype and torch.equal(tensor, expected), name


def test_block_tensors_round_trip_as_stored(tiny_weights, tiny_q8_weights, tiny_q8_gguf):
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    back = dict(iter_gguf_weights(tiny_q8_gguf))
    dense = dict(iter_gguf_weights(tiny_q8_gguf, dequantize=True))
    for name, original in tiny_weights.items():
        if not is_linear(name):
            assert torch.equal(back[name], original)
            continue
        weight = back[name]
        assert isinstance(weight, QuantizedWeight) and weight.format == "q8_0"
        assert weight.shape == tuple(original.shape) and weight.data["blocks"].dtype == torch.uint8
        assert torch.equal(weight.data["blocks"], tiny_q8_weights[name].data["blocks"]), name
        reference = dequantize(tiny_q8_weights[name].data["blocks"].numpy(), GGMLQuantizationType.Q8_0)
        assert torch.equal(dense[name], torch.from_numpy(reference)), name
    assert ModelConfig.from_pretrained(tiny_q8_gguf).dtype == torch.float32


def test_q4_formats_round_trip(tiny_dir, tiny_weights, gguf_dir):
    """Q4_0 from gguf's quantiser; Q4_K (which gguf cannot quantise) as random blocks with finite scales,
    on the projections whose rows are whole 256-wide super-blocks."""
    rng = np.random.default_rng(0)

    def q4_k(weight: torch.Tensor) -> QuantizedWeight:
        rows, cols = weight.shape
        blocks = rng.integers(0, 256, size=(rows, cols // 256, 144), dtype=np.uint8)
        blocks[:, :, 0:4] = np.frombuffer(np.float16([0.01, 0.002]).tobytes(), np.uint8)  # d, dmin
        return QuantizedWeight("q4_k", (rows, cols), {"blocks": torch.from_numpy(blocks.reshape(rows, -1))})

    weights = {k: (q4_k(v) if v.shape[1] % 256 == 0 else quantize(v, "q4_0")) if is_linear(k) else v
               for k, v in tiny_weights.items()}
    path = write_gguf(gguf_dir / "tiny-q4.gguf", tiny_dir, weights)
    for name, weight in iter_gguf_weights(path):
        if isinstance(weights[name], QuantizedWeight):
            assert weight.format == weights[name].format
            assert torch.equal(weight.data["blocks"], weights[name].data["blocks"]), name


def test_other_ggml_types_are_dequantised_with_one_log_line(tiny_dir, tiny_weights, gguf_dir, caplog, monkeypatch):
    """A Q5_0 tensor (a type kvflow does not run as blocks) comes back as float32, named in the log."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize
    from gguf.quants import quantize as gguf_quantize

    import kvflow.model.gguf.writer as writer

    name = "model.layers.0.mlp.up_proj.weight"
    blocks = gguf_quantize(tiny_weights[name].numpy(), GGMLQuantizationType.Q5_0)
    monkeypatch.setitem(writer.GGUF_BLOCK_TYPES, "q5_0", ("Q5_0", "MOSTLY_Q5_0"))
    weights = dict(tiny_weights, **{name: QuantizedWeight("q5_0", tuple(tiny_weights[name].shape),
                                                           {"blocks": torch.from_numpy(blocks)})})
    path = write_gguf(gguf_dir / "tiny-q5.gguf", tiny_dir, weights)
    with caplog.at_level("INFO", logger="kvflow.model.gguf.reader"):
        back = dict(iter_gguf_weights(path))
    assert torch.equal(back[name], torch.from_numpy(dequantize(blocks, GGMLQuantizationType.Q5_0)))
    lines = [r.getMessage() for r in caplog.records if "dequantised" in r.getMessage()]
    assert len(lines) == 1 and "blk.0.ffn_up.weight (Q5_0)" in lines[0]


def test_tokenizer_from_metadata_matches_the_directory(tiny_dir, tiny_f32_gguf):
    ours, theirs = AutoTokenizer.from_pretrained(tiny_dir), tokenizer_from_gguf(tiny_f32_gguf)
    for text in TEXTS:
        ids = ours.encode(text)
        assert theirs.encode(text) == ids, text
        assert theirs.decode(ids) == ours.decode(ids)
        assert theirs.decode(ids, skip_special_tokens=True) == ours.decode(ids, skip_special_tokens=True)
    assert (theirs.bos_token, theirs.eos_token, theirs.pad_token) == (ours.bos_token, ours.eos_token, ours.pad_token)
    messages = [{"role": "user", "content": "hello 42"}]
    assert theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        ours.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def test_untied_llama3_rope_model_with_a_gpt2_pre_tokenizer_round_trips(llama_dir, tmp_path):
    """The tiny random Llama of the parity tests: untied head (output.weight), llama3 rope scaling
    (written as llama.cpp's rope_freqs factors and recovered from them), GPT-2's pre-tokenizer."""
    from safetensors.torch import load_file

    weights = load_file(str(llama_dir / "model.safetensors"))
    path = write_gguf(tmp_path / "llama.gguf", llama_dir, weights)
    ours, theirs = ModelConfig.from_pretrained(llama_dir), ModelConfig.from_pretrained(path)
    assert not theirs.tie_word_embeddings and theirs.rope.rope_type == "llama3"
    assert theirs.rope.factor == ours.rope.factor
    from kvflow.model.layers import rope_inv_freq

    torch.testing.assert_close(rope_inv_freq(theirs.rope, theirs.head_dim), rope_inv_freq(ours.rope, ours.head_dim),
                               rtol=1e-5, atol=0)
    back = dict(iter_gguf_weights(path))
    assert back.keys() == weights.keys() and all(torch.equal(back[k], weights[k]) for k in weights)
    tok_ours, tok_theirs = AutoTokenizer.from_pretrained(llama_dir), tokenizer_from_gguf(path)
    assert all(tok_theirs.encode(t) == tok_ours.encode(t) for t in TEXTS)


# ------------------------------------------------------------------ refusals
def test_non_llama_architecture_is_refused(tmp_path):
    import gguf

    writer = gguf.GGUFWriter(tmp_path / "qwen.gguf", arch="qwen2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="GGUF architecture 'qwen2' is not supported"):
        ModelConfig.from_pretrained(tmp_path / "qwen.gguf")
    with pytest.raises(ValueError, match="not supported"):
        list(iter_gguf_weights(tmp_path / "qwen.gguf"))


def test_corrupt_and_truncated_files_are_refused(tmp_path, tiny_f32_gguf):
    (tmp_path / "junk.gguf").write_bytes(b"this is not a gguf file at all" * 10)
    with pytest.raises(ValueError, match="is not a readable GGUF file"):
        ModelConfig.from_pretrained(tmp_path / "junk.gguf")
    data = Path(tiny_f32_gguf).read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated|not a readable GGUF file"):
        list(iter_gguf_weights(tmp_path / "cut.gguf"))
    with pytest.raises(ValueError, match="does not exist"):
        ModelConfig.from_pretrained(tmp_path / "missing.gguf")


def test_writer_refuses_what_llama_cpp_cannot_load(tiny_dir, tiny_weights, tiny_models, tmp_path):
    with pytest.raises(ValueError, match="weights lack 1 tensors.*blk.0.ffn_down.weight"):
        write_gguf(tmp_path / "a.gguf", tiny_dir,
                   {k: v for k, v in tiny_weights.items() if k != "model.layers.0.mlp.down_proj.weight"})
    with pytest.raises(ValueError, match="llama-architecture.*Qwen2ForCausalLM"):
        write_gguf(tmp_path / "b.gguf", tiny_models["qwen2"], {})
    name = "model.layers.0.mlp.down_proj.weight"  # 704 columns: not whole 256-wide Q4_K super-blocks
    bad = QuantizedWeight("q4_k", tuple(tiny_weights[name].shape), {"blocks": torch.zeros(256, 396, dtype=torch.uint8)})
    with pytest.raises(ValueError, match="divisible by 256"):
        write_gguf(tmp_path / "c.gguf", tiny_dir, dict(tiny_weights, **{name: bad}))
    with pytest.raises(ValueError, match="no GGUF block type"):
        write_gguf(tmp_path / "d.gguf", tiny_dir, dict(tiny_weights, **{name: QuantizedWeight("int8", (256, 704), {})}))


# ------------------------------------------------------------------ SentencePiece
SPM_TEXTS = ["def fibonacci(n):\n    return n", "Hello world 12345  spaces\ttab", "naïve café 你好\n\n  x"]


@pytest.fixture(scope="module")
def spm_gguf(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny random Llama with `kvflow bench make-model`'s SentencePiece tokenizer (byte fallback),
    written to GGUF as tokenizer.ggml.model "llama" with its scores."""
    pytest.importorskip("sentencepiece", reason="the SentencePiece tokenizer needs sentencepiece (kvflow[bench])")
    from safetensors.torch import load_file

    from kvflow.bench.make_model import train_sentencepiece_tokenizer
    from tests.model_utils import make_tiny_model

    root = tmp_path_factory.mktemp("spm")
    model = make_tiny_model("llama", root / "model", tokenizer=False, vocab_size=1024, rope_scaling=None)
    train_sentencepiece_tokenizer(model, vocab_size=1000)  # fewer tokens than rows: the rest is padding
    return model, write_gguf(root / "spm.gguf", model, load_file(str(model / "model.safetensors")))


def test_sentencepiece_tokenizer_round_trips(spm_gguf):
    model, path = spm_gguf
    ours, theirs = AutoTokenizer.from_pretrained(model), tokenizer_from_gguf(path)
    for text in SPM_TEXTS:
        ids = ours.encode(text)
        assert theirs.encode(text) == ids and theirs.decode(ids) == ours.decode(ids), text


def test_llama_cpp_tokenizes_the_sentencepiece_file_like_the_directory(spm_gguf):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python (the bench peer) is not installed")
    model, path = spm_gguf
    ours = AutoTokenizer.from_pretrained(model)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_threads=2, verbose=False)
    for text in SPM_TEXTS:
        assert llm.tokenize(text.encode(), add_bos=ours.encode("a")[0] == ours.bos_token_id, special=True) == \
            ours.encode(text), text


def test_a_model_config_with_linear_rope_scaling_round_trips(tiny_dir, tiny_weights, tmp_path):
    from kvflow.config import RopeConfig

    cfg = dataclasses.replace(ModelConfig.from_pretrained(tiny_dir), rope=RopeConfig(theta=5e5, rope_type="linear",
                                                                                     factor=2.5))
    path = write_gguf(tmp_path / "linear.gguf", cfg, tiny_weights)
    assert ModelConfig.from_pretrained(path).rope == cfg.rope


def test_each_load_reads_the_file_as_it_is_now(tiny_dir, tiny_weights, tmp_path):
    """What one load writes into its tensors (copy-on-write views of the file) never reaches the file or the
    next load, and a rewritten file reads its new values."""
    path = write_gguf(tmp_path / "m.gguf", tiny_dir, tiny_weights)
    first = dict(iter_gguf_weights(path))
    norm = "model.norm.weight"
    torch.testing.assert_close(first[norm], tiny_weights[norm].float(), rtol=0, atol=0)
    first[norm].add_(1.0)
    torch.testing.assert_close(dict(iter_gguf_weights(path))[norm], tiny_weights[norm].float(), rtol=0, atol=0)
    changed = dict(tiny_weights, **{norm: tiny_weights[norm] * 2})
    write_gguf(path, tiny_dir, changed)
    torch.testing.assert_close(dict(iter_gguf_weights(path))[norm], changed[norm].float(), rtol=0, atol=0)
