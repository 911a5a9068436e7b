"""Shared fixtures: tiny random models of each architecture, built once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from hypothesis import settings  # noqa: E402

from tests.model_utils import ARCHITECTURES, make_tiny_model  # noqa: E402

# The suite (and CI) replays the same property-test examples on every run, so a failure is always
# reproducible and never a coin toss. `HYPOTHESIS_PROFILE=explore pytest ...` searches new random
# examples when hunting for bugs; add what it finds as explicit regression tests.
settings.register_profile("default", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {arch: make_tiny_model(arch, root / arch) for arch in ARCHITECTURES}


@pytest.fixture(scope="session")
def llama_dir(tiny_models: dict[str, Path]) -> Path:
    return tiny_models["llama"]


@pytest.fixture(scope="session")
def llama64_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama with head_dim 64: KIVI quantises groups of 32 channels."""
    return make_tiny_model("llama", tmp_path_factory.mktemp("models") / "llama64", head_dim=64,
                           max_position_embeddings=1024)


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """`kvflow train --preset smoke` once per session (seconds): its output folder and report."""
    from kvflow.train.pipeline import run_training
    from kvflow.train.presets import PRESETS

    out = tmp_path_factory.mktemp("smoke_train")
    report = run_training(PRESETS["smoke"], out, show_progress=False)
    return out, report
