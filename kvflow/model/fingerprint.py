"""A model's fingerprint: what KV computed by one engine run must match to be reused by another.

KV stored outside the process (the file tier of kvflow/kv_transfer/offload/) is only valid for the
same weights, loaded the same way. The fingerprint hashes the architecture (the resolved
ModelConfig), the dtype and quantisation the weights are loaded with, the device type, and each weight
file's name, size and contents: all of its bytes up to 2 GiB of weights in all (BLAKE2b, about a
second per GiB at start), beyond that a 1 MiB sample every 4 MiB plus the first and last MiB of each
file (a full hash of a 14 GiB model would add ~15 s to every start; a fine-tune that changes only
tensors between samples of a larger model is the case this misses).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

from kvflow.config import EngineConfig

_SAMPLE = 1 << 20
_STRIDE = 4 << 20
_FULL_HASH_LIMIT = 2 << 30
_WEIGHT_SUFFIXES = (".safetensors", ".gguf")


def _weight_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(p for p in path.iterdir() if p.suffix in _WEIGHT_SUFFIXES and p.is_file())


def _hash_file(digest: hashlib._Hash, path: Path, whole: bool) -> None:
    size = path.stat().st_size
    digest.update(f"{path.name}:{size}".encode())
    with open(path, "rb") as f:
        if whole:
            while chunk := f.read(16 << 20):
                digest.update(chunk)
            return
        for offset in sorted({0, *range(_STRIDE, size, _STRIDE), max(0, size - _SAMPLE)}):
            f.seek(offset)
            digest.update(f.read(_SAMPLE))


def model_fingerprint(config: EngineConfig) -> str:
    """A hex digest naming the weights and how this engine loads them (see the module docstring)."""
    model = config.model
    described = {k: v for k, v in dataclasses.asdict(model).items() if k not in ("path", "tokenizer", "max_model_len")}
    digest = hashlib.blake2b(digest_size=16)
    digest.update(json.dumps(described, sort_keys=True, default=str).encode())
    digest.update(f"device={config.device.split(':')[0]}".encode())
    path = Path(os.fspath(model.path))
    if path.exists():
        files = _weight_files(path)
        whole = sum(f.stat().st_size for f in files) <= _FULL_HASH_LIMIT
        for weights in files:
            _hash_file(digest, weights, whole)
    return digest.hexdigest()
