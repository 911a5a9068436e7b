"""kvflow/model/loader.py: what loading leaves resident."""

from __future__ import annotations

import ctypes

import pytest

from kvflow.model.loader import release_freed_heap


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
