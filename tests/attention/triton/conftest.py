"""Triton kernel tests run on CPU through Triton's interpreter when there is no GPU.

TRITON_INTERPRET must be set before triton is first imported: `triton.jit` reads it at decoration
time, also for triton.language's own jit'd helpers. So it is set here, before importing triton and
before any test module imports `kvflow.attention.triton`; the directory is skipped without triton.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
