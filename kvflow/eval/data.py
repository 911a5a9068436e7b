"""Evaluation text: the held-out CPython documents and the unigram statistics of the train split.

The split is the trainer's (`kvflow.train.corpus.split_documents`, by a hash of each file name),
so held-out text was never trained on. When the model directory carries the trainer's
`train_report.json`, its preset's split settings are used (the `smoke` preset holds out 10% of
a smaller corpus); otherwise the shipped `tiny` preset's (3% of every document).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kvflow.train.corpus import Document, cpython_documents, split_documents, tokenize_documents

DEFAULT_HELDOUT_PERCENT = 3


@dataclass(frozen=True)
class CorpusSplit:
    heldout_percent: int
    max_source_files: int | None  # None: every stdlib module
    source: str  # where the settings came from: "train_report.json", "default" or "override"

    def documents(self) -> tuple[list[Document], list[Document]]:
        """(train, held-out) documents."""
        return split_documents(cpython_documents(self.max_source_files), self.heldout_percent)


def resolve_split(model_path: str | Path, heldout_percent: int | None = None,
                  max_source_files: int | None = None) -> CorpusSplit:
    """The split the model was trained with when known; explicit arguments win (0 files = all)."""
    report_file = Path(model_path) / "train_report.json"
    percent, files, source = DEFAULT_HELDOUT_PERCENT, None, "default"
    if report_file.is_file():
        try:
            preset = json.loads(report_file.read_text())["preset"]
            percent, files, source = int(preset["heldout_percent"]), preset.get("max_source_files"), "train_report.json"
        except (KeyError, TypeError, ValueError, json.JSONDecodeError):
            pass
    if heldout_percent is not None:
        percent, source = heldout_percent, "override"
    if max_source_files is not None:
        files, source = (max_source_files or None), "override"
    return CorpusSplit(percent, files, source)


@contextlib.contextmanager
def _long_inputs(tokenizer: Any) -> Iterator[None]:
    """`tokenize_documents` raises `model_max_length` to tokenize whole files; undo that afterwards."""
    saved = getattr(tokenizer, "model_max_length", None)
    try:
        yield
    finally:
        if saved is not None:
            tokenizer.model_max_length = saved


def token_stream(tokenizer: Any, docs: list[Document]) -> np.ndarray:
    """Documents as one int32 stream, each followed by EOS (the trainer's format)."""
    with _long_inputs(tokenizer):
        return tokenize_documents(tokenizer, docs)


def unigram_counts(tokenizer: Any, docs: list[Document], cache_dir: Path | None = None,
                   cache_key: str = "", chunk_docs: int = 256) -> np.ndarray:
    """Token counts over the documents' stream (int64, indexed by token id).

    Tokenizing the whole train split takes tens of seconds, so the counts can be cached under
    `cache_dir`, keyed by the tokenizer, the split and the Python installation (the corpus).
    """
    cache_file = None
    if cache_dir is not None:
        digest = _tokenizer_digest(tokenizer)
        if digest is not None:
            key = hashlib.sha1(f"{digest}|{cache_key}|{sys.version}|{sysconfig.get_paths()['stdlib']}".encode())
            cache_file = Path(cache_dir) / f"unigram-{key.hexdigest()[:20]}.npy"
            if cache_file.is_file():
                return np.load(cache_file)
    counts = np.zeros(len(tokenizer), dtype=np.int64)
    for start in range(0, len(docs), chunk_docs):
        stream = token_stream(tokenizer, docs[start:start + chunk_docs])
        if len(stream):
            piece = np.bincount(stream, minlength=len(counts))
            if len(piece) > len(counts):
                counts = np.concatenate([counts, np.zeros(len(piece) - len(counts), dtype=np.int64)])
            counts[:len(piece)] += piece
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        np.save(cache_file, counts)
    return counts


def _tokenizer_digest(tokenizer: Any) -> str | None:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    return hashlib.sha1(backend.to_str().encode("utf-8")).hexdigest()


def calibration_tokens(tokenizer: Any, split: CorpusSplit, samples: int, length: int, seed: int = 0) -> np.ndarray:
    """`samples` windows of `length` tokens from the TRAIN split (never the held-out text the quality
    figures score), for calibrating quantisation (`kvflow quantize --method awq`). Documents are drawn
    in a seeded order and tokenized only until enough tokens exist; each window starts at a seeded
    offset of the stream. int64 [samples, length]."""
    train, _ = split.documents()
    if not train:
        raise ValueError("the corpus' train split is empty: no calibration text")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(train))
    need = samples * length * 4  # enough text that windows rarely overlap
    pieces, have = [], 0
    for start in range(0, len(order), 64):
        piece = token_stream(tokenizer, [train[i] for i in order[start:start + 64]])
        pieces.append(piece)
        have += len(piece)
        if have >= need:
            break
    stream = np.concatenate(pieces)
    if len(stream) < length:
        raise ValueError(f"the train split holds {len(stream)} tokens, fewer than one window of {length}")
    starts = rng.integers(0, len(stream) - length + 1, size=samples)
    return np.stack([stream[s:s + length] for s in starts]).astype(np.int64)
