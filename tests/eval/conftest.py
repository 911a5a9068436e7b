"""A `smoke`-preset model trained once per test session (a few seconds), shared by the eval tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="package", autouse=True)
def _one_torch_thread():
    """These models are tiny: one thread is as fast, and far faster when the cores are busy elsewhere."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="session")
def smoke_model(smoke_run: tuple[Path, dict]) -> Path:
    return smoke_run[0] / "smoke"


@pytest.fixture(scope="session")
def smoke_llm(smoke_model: Path):
    from kvflow import LLM

    return LLM(model=str(smoke_model), dtype="float32", num_blocks=512)


@pytest.fixture(scope="session")
def smoke_tokenizer(smoke_model: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smoke_model))


@pytest.fixture(scope="session")
def heldout_stream(smoke_model: Path, smoke_tokenizer):
    from kvflow.eval.data import resolve_split, token_stream

    _, heldout = resolve_split(smoke_model).documents()
    return token_stream(smoke_tokenizer, heldout)
