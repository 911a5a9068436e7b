"""The releasable KV pool and its offload tier (kvflow/worker/kv_residency.py): pages cost memory once
written (the kernel's count, mincore), `release` gives back exactly the pages wholly inside the blocks
(checked against a page-by-page reference) and never a byte of another block, and the tier holds what
left, in the pool's layout, in files that are gone from the directory at once."""

from __future__ import annotations

import mmap
import sys

import pytest
import torch

from kvflow.attention.kv_spec import KVCacheSpec
from kvflow.worker.kv_residency import ReleasableCache, SpillTier, residency_blocker

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise/mincore: Linux")
PAGE = mmap.PAGESIZE


def _spec(kv_format: str = "bfloat16", heads: int = 3) -> KVCacheSpec:
    """135m's layout by default: 3 KV heads of 64 in bf16, blocks of 16 tokens (6 KiB: pages straddle blocks)."""
    return KVCacheSpec.for_format(kv_format, 2, heads, 64, 16, torch.bfloat16)


def _fill(cache: ReleasableCache, blocks: int) -> list[list[torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    copies = []
    for layer in range(cache.spec.num_layers):
        parts = cache.per_token_parts(layer)
        for part in parts:
            part[:, :blocks] = torch.randint(-100, 100, part[:, :blocks].shape, generator=g).to(part.dtype)
        copies.append([p[:, :blocks].clone() for p in parts])  # (reading a page maps it: only these)
    return copies


def _pages_inside(num_blocks: int, chunk: int, released: set[int]) -> int:
    """Reference: pages of one part (both halves) every byte of which belongs to a released block."""
    total = 0
    for page in range(2 * num_blocks * chunk // PAGE):
        owners = {(b // num_blocks, b % num_blocks) for b in range(page * PAGE // chunk,
                                                                   -(-(page + 1) * PAGE // chunk))}
        total += all(block in released for _, block in owners)
    return total * PAGE


def test_pages_cost_memory_once_written_and_release_gives_back_whole_pages_only():
    spec = _spec()
    cache = ReleasableCache(spec, 40)
    assert cache.resident_bytes() == 0  # 40 blocks of address space, no memory yet
    copies = _fill(cache, 12)
    chunk = 3 * 16 * 64 * 2
    written = cache.resident_bytes()
    assert written >= 2 * 2 * 12 * chunk  # 2 layers, K and V, 12 blocks
    assert written <= 2 * 2 * (12 * chunk + PAGE)
    released = {2, 3, 4, 5, 9}
    freed = cache.release(1, sorted(released))
    assert freed == _pages_inside(40, chunk, {2, 3, 4, 5}) + _pages_inside(40, chunk, {9})
    assert cache.resident_bytes() == written - freed
    for layer in range(2):
        part = cache.per_token_parts(layer)[0]
        for block in range(12):
            if layer == 1 and block in released:
                continue
            assert torch.equal(part[:, block], copies[layer][0][:, block]), (layer, block)  # untouched
    # A page wholly inside a released run reads zeros (blocks 3 and 4 lie inside pages freed with 2..5).
    assert not cache.per_token_parts(1)[0][:, 3:5].any()
    # Writing a released block again costs memory again.
    cache.per_token_parts(1)[0][:, 3] = 1
    assert cache.resident_bytes() > written - freed


@pytest.mark.skipif(PAGE != 4096, reason="the expected figures are for 4 KiB pages")
@pytest.mark.parametrize("kv_format,block_size,least", [("bfloat16", 16, 2 * PAGE), ("bfloat16", 32, 3 * 2 * PAGE),
                                                       ("int8", 16, 0), ("int8", 64, 3 * 2 * PAGE)])
def test_one_layer_block_gives_back_at_least_its_share_wherever_it_lies(kv_format, block_size, least):
    """`release_per_layer_block` is the least any single block's release gives back (the model counts it)."""
    cache = ReleasableCache(KVCacheSpec.for_format(kv_format, 1, 3, 64, block_size, torch.bfloat16), 24)
    chunks = [2 * p[0, 0].numel() * p.element_size() for p in cache.per_token_parts(0)]
    assert cache.layer_block_bytes == sum(chunks)
    assert cache.release_per_layer_block == least
    _fill(cache, 24)
    given = []
    for block in range(0, 24, 2):  # every other block alone: no neighbour's pages to share
        before = cache.resident_bytes()
        cache.release(0, [block])
        given.append(before - cache.resident_bytes())
    assert min(given) == cache.release_per_layer_block
    if least == cache.layer_block_bytes:  # whole pages: every block gives back all of it
        assert set(given) == {least}


@pytest.mark.parametrize("kv_format", ["bfloat16", "int8"])
def test_the_tier_holds_what_left_and_its_files_are_gone(tmp_path, kv_format):
    spec = _spec(kv_format)
    cache = ReleasableCache(spec, 20)
    copies = _fill(cache, 10)
    tier = SpillTier(cache, str(tmp_path))
    assert list(tmp_path.iterdir()) == []  # mapped, then unlinked: nothing to clean up
    before = cache.resident_bytes()
    freed = tier.spill(1, [4, 5, 6, 7])
    assert freed > 0 and cache.resident_bytes() == before - freed == before - tier.released_bytes
    per_token = [c for c in spec.components if c.per_token]
    assert len(tier.parts(1)) == len(per_token)
    for twin, original in zip(tier.parts(1), copies[1]):
        assert torch.equal(twin[:, 4:8], original[:, 4:8])
        assert not twin[:, :4].any()  # only what was spilled
    assert tier.spilled_bytes == 4 * 2 * sum(3 * 16 * c.bytes_per_head for c in per_token)


def test_what_cannot_release_pages_is_refused():
    spec = _spec()
    assert residency_blocker(torch.device("cpu"), spec) is None
    assert "runs on CPU" in residency_blocker(torch.device("cuda"), spec)
    kivi = KVCacheSpec.for_format("kivi4", 2, 2, 64, 32, torch.float32, residual_tokens=32, residual_slots=2)
    assert "no KIVI" in residency_blocker(torch.device("cpu"), kivi)


def test_a_tier_in_memory_is_called_out(caplog):
    """A tier on tmpfs (memory) would move KV from RAM to RAM: the engine says so."""
    from pathlib import Path

    from kvflow.worker.kv_residency import filesystem_type

    shm = Path("/dev/shm")
    if filesystem_type(shm) != "tmpfs":
        pytest.skip("no tmpfs at /dev/shm")
    cache = ReleasableCache(_spec(), 4)
    with caplog.at_level("WARNING"):
        SpillTier(cache, str(shm))
    assert "is on tmpfs, which is memory" in caplog.text
    assert filesystem_type(Path("/proc/self")) == "proc"


def test_a_disk_without_room_for_the_tier_is_an_error_at_start(tmp_path, monkeypatch):
    """The tier reserves its disk when it opens: no room is a clear error then, never a SIGBUS when a
    spill writes into a mapped page mid-run; nothing is left behind."""
    import errno
    import os

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full, raising=False)
    with pytest.raises(OSError, match="the KV offload tier needs .* GiB more of disk under"):
        SpillTier(ReleasableCache(_spec(), 4), str(tmp_path))
    assert list(tmp_path.iterdir()) == []
