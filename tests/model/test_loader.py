"""kvflow/model/loader.py: what loading leaves resident."""

from __future__ import annotations

import ctypes
import subprocess
import sys
from pathlib import Path

import pytest

from kvflow.model.loader import release_freed_heap
from tests.model.longconv.longconv_utils import make_longconv_model
from tests.model_utils import make_tiny_model


def _resident_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def _has_malloc_trim() -> bool:
    try:
        return hasattr(ctypes.CDLL("libc.so.6"), "malloc_trim")
    except OSError:
        return False


@pytest.mark.skipif(not _has_malloc_trim(), reason="glibc's malloc_trim (Linux)")
def test_release_freed_heap_returns_the_holes_loading_leaves():
    """Freed blocks between live ones (what quantising at load leaves: dense copies freed among the codes kept)
    stay resident until the heap is trimmed; release_freed_heap gives them back."""
    blocks = [bytearray(4096) for _ in range(50_000)]  # ~200 MiB from malloc (above pymalloc's 512 bytes)
    kept = blocks[::64]  # one live block in 64: free() cannot shrink the heap past them
    del blocks
    before = _resident_mib()
    release_freed_heap()
    after = _resident_mib()
    assert len(kept) == 782
    assert before - after > 100, f"resident {before:.0f} -> {after:.0f} MiB"


def test_loading_builds_the_model_without_importing_torch_dynamo(tmp_path):
    """The loader builds the model on the meta device; an init op there (nn.Embedding's normal_, the rotary
    table's division) runs torch's Python references, whose first call imports torch._dynamo and Triton: ~1 s
    and ~140 MiB resident per process. A fresh process loads a model and a long-conv one with neither."""
    llama = make_tiny_model("llama", tmp_path / "llama", tokenizer=False)
    conv = make_longconv_model(tmp_path / "conv", tokenizer=False)
    code = ("import sys\nfrom kvflow.config import ModelConfig\nfrom kvflow.model.loader import load_model\n"
            "for path in sys.argv[1:]:\n    load_model(ModelConfig.from_pretrained(path, dtype='float32'))\n"
            "print(sorted(m for m in ('torch._dynamo', 'triton') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code, str(llama), str(conv)], capture_output=True, text=True,
                          timeout=300, cwd=Path(__file__).parents[2])
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"
