"""Seeded random-weight Llama models with the reference shapes of BENCHMARKS.md.

Speed does not depend on weight values, so every speed benchmark runs on a model this module
makes from a shape name and a seed: any machine can rebuild exactly the same weights without
downloading anything.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

#: Reference shapes (Llama architecture, tied embeddings). Keys are ``LlamaConfig`` fields.
SHAPES: dict[str, dict[str, Any]] = {
    # like SmolLM2-135M
    "135m": dict(
        hidden_size=576,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        intermediate_size=1536,
        vocab_size=49152,
        tie_word_embeddings=True,
        max_position_embeddings=2048,
        rope_theta=10000.0,
    ),
    # like Qwen2.5-0.5B without the q/k/v bias
    "500m": dict(
        hidden_size=896,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        intermediate_size=4864,
        vocab_size=151936,
        tie_word_embeddings=True,
        max_position_embeddings=32768,
        rope_theta=1000000.0,
    ),
}

#: Shapes for tests only: small enough to build and run in well under a second. Kept apart
#: from ``SHAPES`` so the CLI and reports never offer them as reference shapes.
TEST_SHAPES: dict[str, dict[str, Any]] = {
    "tiny": dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=512,
        tie_word_embeddings=True,
        max_position_embeddings=512,
        rope_theta=10000.0,
    ),
}

#: Fields every made model shares, whatever its shape.
COMMON: dict[str, Any] = dict(
    hidden_act="silu",
    rms_norm_eps=1e-5,
    initializer_range=0.02,
    attention_bias=False,
    mlp_bias=False,
    bos_token_id=1,
    eos_token_id=2,
)

_DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
}


def to_torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """Map a dtype name ("bfloat16", "float32", ...) to torch; one place so names stay consistent."""
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(_DTYPES)}") from None


def shape_params(shape: str, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The full ``LlamaConfig`` keyword set for a shape name, with optional field overrides."""
    if shape in SHAPES:
        base = SHAPES[shape]
    elif shape in TEST_SHAPES:
        base = TEST_SHAPES[shape]
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {sorted(SHAPES)}")
    params = {**COMMON, **base, **(overrides or {})}
    if params["hidden_size"] % params["num_attention_heads"]:
        raise ValueError("hidden_size must be a multiple of num_attention_heads")
    if params["num_attention_heads"] % params["num_key_value_heads"]:
        raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
    return params


def llama_param_count(cfg: Mapping[str, Any]) -> int:
    """Parameter count of a Llama config (a dict such as config.json), tied embeddings counted once.

    Used for the physical floors (weight bytes per decode step, 2·params FLOPs per token) without
    loading the model.
    """
    h = int(cfg["hidden_size"])
    n_layers = int(cfg["num_hidden_layers"])
    n_heads = int(cfg["num_attention_heads"])
    n_kv = int(cfg.get("num_key_value_heads") or n_heads)
    head_dim = int(cfg.get("head_dim") or h // n_heads)
    mlp = int(cfg["intermediate_size"])
    vocab = int(cfg["vocab_size"])
    attn = h * n_heads * head_dim * 2 + h * n_kv * head_dim * 2  # q, o + k, v
    if cfg.get("attention_bias"):
        attn += n_heads * head_dim + 2 * n_kv * head_dim + h
    per_layer = attn + 3 * h * mlp + 2 * h  # gate/up/down + two RMSNorms
    embed = vocab * h * (1 if cfg.get("tie_word_embeddings", True) else 2)
    return n_layers * per_layer + embed + h  # + final norm


def make_model(
    shape: str,
    out_dir: Path,
    seed: int = 0,
    dtype: str = "bfloat16",
    overrides: Mapping[str, Any] | None = None,
    tokenizer: bool | str = False,
) -> Path:
    """Build a seeded random-weight Llama model of ``shape`` and save it in HF format.

    Weights are drawn directly in ``dtype`` (normal, std = initializer_range; norms = 1), so the
    500m shape never needs a float32 copy. Writes config.json, model.safetensors and
    generation_config.json, and a tokenizer trained on CPython's own docs (benchmarks feed
    token ids; a tokenizer lets the directory take text and be converted): ``tokenizer`` is one
    of ``TOKENIZERS`` (True means "auto", False "none"). Returns ``out_dir``.
    """
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    out_dir = Path(out_dir)
    params = shape_params(shape, overrides)
    kind = _tokenizer_kind(tokenizer)
    torch_dtype = to_torch_dtype(dtype)
    config = LlamaConfig(**params)
    torch.manual_seed(seed)
    model = LlamaForCausalLM._from_config(config, dtype=torch_dtype)
    model.eval()
    model.config.dtype = torch_dtype
    model.generation_config = GenerationConfig(
        bos_token_id=params["bos_token_id"],
        eos_token_id=params["eos_token_id"],
        do_sample=False,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    _add_legacy_rope_theta(out_dir / "config.json", params["rope_theta"])
    for name in _TOKENIZER_FILES:  # a remade directory must not mix two tokenizers' files
        (out_dir / name).unlink(missing_ok=True)
    if kind == "sentencepiece":
        train_sentencepiece_tokenizer(out_dir, min(8000, params["vocab_size"]),
                                      model_max_length=params["max_position_embeddings"])
    elif kind == "bpe":
        from kvflow.train.tokenizer import train_tokenizer

        # Its special ids (pad 0, bos 1, eos 2) are the ones the generation config names.
        train_tokenizer(out_dir, vocab_size=params["vocab_size"],
                        model_max_length=params["max_position_embeddings"])
    # Record how the weights were made, so a result file can name its model exactly.
    (out_dir / "kvflow_model.json").write_text(
        json.dumps(
            {"shape": shape, "seed": seed, "dtype": dtype, "overrides": dict(overrides or {})},
            indent=2,
        )
        + "\n"
    )
    return out_dir


#: Tokenizer kinds of ``make_model``: "sentencepiece" (what llama.cpp's GGUF converter accepts
#: for a custom vocabulary; needs the ``bench`` extra), "bpe" (kvflow's byte-level BPE, no extra
#: packages), "auto" (sentencepiece when importable, else bpe) or "none".
TOKENIZERS = ("auto", "sentencepiece", "bpe", "none")
_TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _sentencepiece_available() -> bool:
    """sentencepiece trains it; transformers needs protobuf to read it back."""
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("sentencepiece", "google.protobuf"))


def _tokenizer_kind(tokenizer: bool | str) -> str:
    """Resolve ``make_model``'s ``tokenizer`` argument to "sentencepiece", "bpe" or "none"."""
    kind = ("auto" if tokenizer else "none") if isinstance(tokenizer, bool) else tokenizer
    if kind not in TOKENIZERS:
        raise ValueError(f"unknown tokenizer {tokenizer!r}; expected one of {TOKENIZERS}")
    if kind == "auto":
        if _sentencepiece_available():
            return "sentencepiece"
        print("note: sentencepiece/protobuf not installed (pip install 'kvflow[bench]'); writing a byte-level "
              "BPE tokenizer, which llama.cpp's GGUF converter does not accept")
        return "bpe"
    if kind == "sentencepiece" and not _sentencepiece_available():
        raise ImportError("the sentencepiece tokenizer needs sentencepiece and protobuf: "
                          "pip install 'kvflow[bench]' (or use --tokenizer bpe)")
    return kind


def train_sentencepiece_tokenizer(out_dir: Path, vocab_size: int = 8000, model_max_length: int = 2048) -> None:
    """Train a SentencePiece BPE on CPython's pydoc topics; save tokenizer.model and its HF form.

    llama.cpp's converter maps a custom vocabulary only from a SentencePiece ``tokenizer.model``
    (a byte-level BPE must match one of its known pre-tokenizer hashes); ids beyond the trained
    vocabulary become padding entries of the model's larger embedding. Special ids unk 0, bos 1,
    eos 2 match the generation config; byte fallback and no normalisation make every text
    round-trip (newlines, tabs, runs of spaces), as llama.cpp, which skips the normaliser, reads
    it. The same file saved through transformers' LlamaTokenizer gives HF the same encoding.
    """
    import io
    import shutil
    import tempfile
    from pydoc_data.topics import topics

    import sentencepiece as spm
    from transformers import LlamaTokenizer

    lines = [ln for key in sorted(topics) for ln in topics[key].splitlines() if ln.strip()]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        hard_vocab_limit=False, bos_id=1, eos_id=2, unk_id=0, pad_id=-1, byte_fallback=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, num_threads=1, minloglevel=2,
    )  # fmt: skip
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:  # only tokenizer.model there: HF converts it
        (Path(tmp) / "tokenizer.model").write_bytes(model.getvalue())
        hf = LlamaTokenizer.from_pretrained(tmp, model_max_length=model_max_length)
        hf.save_pretrained(out_dir)  # tokenizer.json + tokenizer_config.json
        shutil.copy(Path(tmp) / "tokenizer.model", out_dir / "tokenizer.model")


def _add_legacy_rope_theta(config_path: Path, rope_theta: float) -> None:
    """Also write ``rope_theta`` at the top level of config.json.

    transformers 5 nests it under ``rope_parameters``; loaders written for the older layout
    (peers' converters, simple readers) look for the top-level key, and transformers accepts both.
    """
    cfg = json.loads(config_path.read_text())
    cfg.setdefault("rope_theta", rope_theta)
    config_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def main_make_model(shape: str, out_dir: Path, seed: int = 0, dtype: str = "bfloat16",
                    tokenizer: bool | str = "auto", max_position_embeddings: int | None = None) -> Path:
    """CLI body: make the model and print where it went, its size and how long it took.
    `max_position_embeddings` lengthens (or shortens) the shape's context, for long-context runs."""
    start = time.perf_counter()
    overrides = {"max_position_embeddings": max_position_embeddings} if max_position_embeddings else None
    path = make_model(shape, out_dir, seed=seed, dtype=dtype, tokenizer=tokenizer, overrides=overrides)
    elapsed = time.perf_counter() - start
    n_params = llama_param_count(shape_params(shape))
    size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    print(
        f"made {shape} model ({n_params / 1e6:.1f}M params, {size / 2**20:.0f} MiB, seed {seed}, "
        f"{dtype}) at {path} in {elapsed:.1f} s"
    )
    return path
