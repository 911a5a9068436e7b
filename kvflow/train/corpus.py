"""The training corpus: documentation and standard-library source shipped with CPython.

Every Python installation carries it, so training needs no download. Documents are split into
train and held-out sets by a hash of their name (a whole file lands on one side), which keeps
held-out perplexity honest and the split stable across machines and runs.
"""

from __future__ import annotations

import hashlib
import sysconfig
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Document:
    name: str
    text: str


def cpython_documents(max_source_files: int | None = None) -> list[Document]:
    """pydoc topics, then `Lib/**/*.py` of the running interpreter (no site-packages), sorted by path."""
    from pydoc_data.topics import topics

    docs = [Document(f"pydoc:{key}", topics[key]) for key in sorted(topics)]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    sources = sorted(p for p in stdlib.rglob("*.py") if "site-packages" not in p.relative_to(stdlib).parts)
    if max_source_files is not None:
        sources = sources[:max_source_files]
    for path in sources:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if text.strip():
            docs.append(Document(path.relative_to(stdlib).as_posix(), text))
    return docs


def is_heldout(name: str, heldout_percent: int = 3) -> bool:
    """Deterministic file-level split: about `heldout_percent`% of documents are held out."""
    digest = hashlib.sha1(name.encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "big") % 100 < heldout_percent


def split_documents(docs: Iterable[Document], heldout_percent: int = 3) -> tuple[list[Document], list[Document]]:
    train, heldout = [], []
    for doc in docs:
        (heldout if is_heldout(doc.name, heldout_percent) else train).append(doc)
    return train, heldout


def tokenize_documents(tokenizer, docs: list[Document], batch_size: int = 64) -> np.ndarray:
    """One int32 token stream: each document's tokens followed by EOS (no BOS; samples add their own)."""
    eos = tokenizer.eos_token_id
    pieces: list[np.ndarray] = []
    saved_max_length = tokenizer.model_max_length
    tokenizer.model_max_length = int(1e12)  # whole files are tokenized here, not model inputs
    try:
        for start in range(0, len(docs), batch_size):
            batch = [d.text for d in docs[start:start + batch_size]]
            for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
                pieces.append(np.asarray(ids + [eos], dtype=np.int32))
    finally:
        tokenizer.model_max_length = saved_max_length
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)


def load_token_stream(tokenizer, docs: list[Document], cache: Path | None = None) -> np.ndarray:
    """Tokenize once and keep the stream as .npy next to the run (tokenizing 30 MB takes a while)."""
    if cache is not None and cache.exists():
        return np.load(cache)
    stream = tokenize_documents(tokenizer, docs)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.save(cache, stream)
    return stream
