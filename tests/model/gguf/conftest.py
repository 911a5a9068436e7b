"""GGUF files written once per session from the shipped tiny model: F32, and Q8_0 (the linear
projections quantised with gguf's reference quantiser, the embedding kept F32)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kvflow.assets import default_model_path
from kvflow.model.gguf import write_gguf
from kvflow.model.quant.weights import QuantizedWeight

LINEAR_PARTS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def quantize(weight: torch.Tensor, kind: str) -> QuantizedWeight:
    """gguf's numpy reference quantiser, rows in Hugging Face order."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize as gguf_quantize

    blocks = gguf_quantize(weight.float().numpy(), GGMLQuantizationType[kind.upper()])
    return QuantizedWeight(kind, tuple(weight.shape), {"blocks": torch.from_numpy(blocks)})


def is_linear(name: str) -> bool:
    return any(f".{part}." in name for part in LINEAR_PARTS)


@pytest.fixture(scope="session")
def tiny_dir() -> Path:
    return default_model_path()


@pytest.fixture(scope="session")
def tiny_weights(tiny_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(tiny_dir / "model.safetensors"))


@pytest.fixture(scope="session")
def tiny_q8_weights(tiny_weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | QuantizedWeight]:
    return {k: quantize(v, "q8_0") if is_linear(k) else v for k, v in tiny_weights.items()}


@pytest.fixture(scope="session")
def gguf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gguf")


@pytest.fixture(scope="session")
def tiny_f32_gguf(gguf_dir: Path, tiny_dir: Path, tiny_weights: dict[str, torch.Tensor]) -> Path:
    return write_gguf(gguf_dir / "tiny-f32.gguf", tiny_dir, tiny_weights)


@pytest.fixture(scope="session")
def tiny_q8_gguf(gguf_dir: Path, tiny_dir: Path, tiny_q8_weights: dict) -> Path:
    return write_gguf(gguf_dir / "tiny-q8_0.gguf", tiny_dir, tiny_q8_weights)
