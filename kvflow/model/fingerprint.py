"""A model's fingerprint: what KV computed by one engine run must match to be reused by another.

KV stored outside the process (the file tier of kvflow/kv_transfer/offload/) is only valid for the
same weights, loaded the same way. Hashing every weight byte would take seconds per gigabyte at each
start, so the fingerprint hashes what changes when the weights do: the architecture (the resolved
ModelConfig), the dtype and quantisation they are loaded with, the device type, and for each weight
file its name, size, header and sampled contents (the first and last MiB and 16 MiB-strided MiB
samples between; a fine-tune changes every tensor, so it changes the samples).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

from kvflow.config import EngineConfig

_SAMPLE = 1 << 20
_STRIDE = 16 << 20
_WEIGHT_SUFFIXES = (".safetensors", ".gguf")


def _weight_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(p for p in path.iterdir() if p.suffix in _WEIGHT_SUFFIXES and p.is_file())


def _hash_file(digest: hashlib._Hash, path: Path) -> None:
    size = path.stat().st_size
    digest.update(f"{path.name}:{size}".encode())
    with open(path, "rb") as f:
        offsets = sorted({0, *range(_STRIDE, size, _STRIDE), max(0, size - _SAMPLE)})
        for offset in offsets:
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
        for weights in _weight_files(path):
            _hash_file(digest, weights)
    return digest.hexdigest()
