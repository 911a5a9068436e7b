"""The file tier: size bound, LRU, restarts, and every fault a miss with a log line, never wrong KV."""

from __future__ import annotations

import errno
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from kvflow.kv_transfer.offload import file_tier as file_tier_module
from kvflow.kv_transfer.offload.chunk_file import ALIGN, SUFFIX, BlockEntry, record_crc
from kvflow.kv_transfer.offload.file_tier import FileTier
from kvflow.kv_transfer.offload.tier import Expected, TierIdentity

BLOCK = 4
RECORD = 5000  # two 4 KiB slots per record: offsets and padding are exercised
IDENTITY = TierIdentity("model-a", "fmt", BLOCK, RECORD)
FILE_BYTES = ALIGN + 2 * 2 * ALIGN  # a chunk of two blocks


def _chunk(first_key: int, count: int = 2, parent: int | None = None) -> tuple[list[BlockEntry], torch.Tensor]:
    gen = torch.Generator().manual_seed(first_key)
    records = torch.randint(0, 256, (count, RECORD), dtype=torch.uint8, generator=gen)
    entries, prev = [], parent
    for i in range(count):
        key = first_key + i
        entries.append(BlockEntry(key, prev, record_crc(records[i].numpy().data), tuple(range(key, key + BLOCK))))
        prev = key
    return entries, records


def _expect(entries: list[BlockEntry]) -> list[Expected]:
    return [Expected(e.key, e.parent, e.tokens) for e in entries]


def _read(tier: FileTier, entries: list[BlockEntry]) -> tuple[int, torch.Tensor]:
    out = torch.zeros(len(entries), RECORD, dtype=torch.uint8)
    return tier.read(_expect(entries), out), out


def _files(tier: FileTier) -> list[Path]:
    return sorted(tier.folder.glob(f"*{SUFFIX}"))


@pytest.mark.parametrize("io", ["direct", "buffered"])
def test_round_trip(tmp_path, io):
    tier = FileTier(tmp_path, IDENTITY, 1 << 30, io)
    assert tier.direct == (io == "direct")
    entries, records = _chunk(10, count=3)
    tier.write(entries, records)
    got, out = _read(tier, entries)
    assert got == 3 and torch.equal(out, records)
    got, out = _read(tier, entries[1:])  # a run starting inside a chunk
    assert got == 2 and torch.equal(out, records[1:])
    assert tier.stats.blocks_written == 3 and tier.stats.hit_blocks == 5
    assert not list(tier.folder.glob("*.tmp"))


def test_never_exceeds_its_size_and_evicts_least_recently_used(tmp_path):
    tier = FileTier(tmp_path, IDENTITY, 3 * FILE_BYTES + 100, "buffered")
    chunks = [_chunk(100 * i) for i in range(6)]
    for i, (entries, records) in enumerate(chunks):
        tier.write(entries, records)
        if i == 1:
            assert _read(tier, chunks[0][0])[0] == 2  # chunk 0 used again: chunk 1 is older now
        on_disk = sum(p.stat().st_size for p in _files(tier))
        assert on_disk == tier.stats.stored_bytes <= tier.capacity
    assert [tier.contains(chunks[i][0][0].key) for i in range(6)] == [False, False, False, True, True, True]
    assert tier.stats.evicted_blocks == 6
    big_entries, big_records = _chunk(900, count=8)  # larger than the whole tier: not written
    tier.write(big_entries, big_records)
    assert not tier.contains(900)


def test_survives_a_restart_and_ignores_other_models(tmp_path, caplog):
    first = FileTier(tmp_path, IDENTITY, 1 << 30, "auto")
    entries, records = _chunk(1)
    first.write(entries, records)
    first.close()
    (first.folder / f"partial{SUFFIX}.tmp").write_bytes(b"half a file")  # a write a crash interrupted
    with caplog.at_level(logging.INFO):
        other = FileTier(tmp_path, TierIdentity("model-b", "fmt", BLOCK, RECORD), 1 << 30, "auto")
    assert not other.contains(1)
    assert "ignoring" in caplog.text and "model-a" not in other.folder.name
    second = FileTier(tmp_path, IDENTITY, 1 << 30, "auto")
    got, out = _read(second, entries)
    assert got == 2 and torch.equal(out, records)
    assert not list(second.folder.glob("*.tmp"))
    assert "ignoring" in caplog.text


def test_a_restart_with_a_smaller_size_evicts_the_oldest(tmp_path):
    tier = FileTier(tmp_path, IDENTITY, 1 << 30, "buffered")
    for i in range(3):
        tier.write(*_chunk(10 * i))
    os.utime(_files(tier)[0], (1, 1))  # the oldest use
    tier.close()
    smaller = FileTier(tmp_path, IDENTITY, 2 * FILE_BYTES, "buffered")
    assert smaller.stats.stored_bytes <= 2 * FILE_BYTES and len(_files(smaller)) == 2
    assert not smaller.contains(0)


def test_corrupt_record_is_a_miss_and_its_file_is_deleted(tmp_path, caplog):
    tier = FileTier(tmp_path, IDENTITY, 1 << 30, "buffered")
    entries, records = _chunk(50, count=3)
    tier.write(entries, records)
    (path,) = _files(tier)
    data = bytearray(path.read_bytes())
    data[ALIGN + 2 * 2 * ALIGN + 17] ^= 0xFF  # inside the third block's record
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        got, out = _read(tier, entries)
    assert got == 2 and torch.equal(out[:2], records[:2])  # what verified is served; the damaged block is not
    assert "checksum" in caplog.text
    assert not path.exists() and not tier.contains(50) and tier.stats.errors == 1


@pytest.mark.parametrize("damage", ["truncate", "header"])
def test_damaged_files_are_deleted_at_start(tmp_path, damage, caplog):
    tier = FileTier(tmp_path, IDENTITY, 1 << 30, "buffered")
    tier.write(*_chunk(1))
    (path,) = _files(tier)
    data = path.read_bytes()
    path.write_bytes(data[:ALIGN + 100] if damage == "truncate" else b"\0" * 8 + data[8:])
    tier.close()
    with caplog.at_level(logging.WARNING):
        reopened = FileTier(tmp_path, IDENTITY, 1 << 30, "buffered")
    assert not reopened.contains(1) and not path.exists()
    assert "damaged" in caplog.text and reopened.stats.errors == 1


def test_truncated_after_start_is_a_miss(tmp_path):
    tier = FileTier(tmp_path, IDENTITY, 1 << 30, "buffered")
    entries, records = _chunk(1)
    tier.write(entries, records)
    (path,) = _files(tier)
    os.truncate(path, ALIGN + 100)
    assert _read(tier, entries)[0] == 0
    assert not tier.contains(1) and not path.exists()


def test_read_error_is_a_miss(tmp_path, monkeypatch, caplog):
    tier = FileTier(tmp_path, IDENTITY, 1 << 30, "buffered")
    entries, records = _chunk(1)
    tier.write(entries, records)

    def failing_preadv(*args, **kwargs):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(file_tier_module.os, "preadv", failing_preadv)
    with caplog.at_level(logging.WARNING):
        assert _read(tier, entries)[0] == 0
    assert "Input/output error" in caplog.text and not tier.contains(1) and tier.stats.errors == 1


def test_full_disk_leaves_no_partial_file_and_stops_growing(tmp_path, monkeypatch):
    tier = FileTier(tmp_path, IDENTITY, 1 << 30, "buffered")
    tier.write(*_chunk(1))
    real_write = os.write

    def full(fd, data):
        real_write(fd, bytes(memoryview(data)[:100]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(file_tier_module.os, "write", full)
    with pytest.raises(OSError, match="No space"):
        tier.write(*_chunk(10))
    assert not list(tier.folder.glob("*.tmp")) and len(_files(tier)) == 1
    assert tier.capacity == tier.stats.stored_bytes == FILE_BYTES  # what fits now is what is stored
    monkeypatch.setattr(file_tier_module.os, "write", real_write)
    tier.write(*_chunk(20))  # the next write makes room by evicting the oldest file
    assert tier.contains(20) and not tier.contains(1) and tier.stats.stored_bytes <= tier.capacity


def test_a_folder_without_permission_is_refused(tmp_path):
    """Run as a user that may not write the folder (as root: drop to nobody in a child process)."""
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o500)
    script = textwrap.dedent(f"""
        import os, sys
        from kvflow.kv_transfer.offload.file_tier import FileTier
        from kvflow.kv_transfer.offload.tier import TierIdentity
        if os.geteuid() == 0:  # after the imports: the interpreter's own files may be root's alone
            os.setgid(65534); os.setuid(65534)
        try:
            FileTier({str(folder)!r}, TierIdentity("m", "f", 4, 100), 1 << 20)
        except PermissionError as exc:
            print("refused:", exc)
            sys.exit(0)
        sys.exit(1)
    """)
    tmp_path.chmod(0o755)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).parents[3])
    assert done.returncode == 0, done.stdout + done.stderr
    assert "refused" in done.stdout


def test_bandwidth_probe_leaves_nothing_behind(tmp_path):
    tier = FileTier(tmp_path, IDENTITY, 1 << 30, "auto")
    assert tier.probe_bandwidth(1 << 20) > 0
    assert sorted(p.name for p in tier.folder.iterdir()) == ["lock", "manifest.json"]


def test_one_process_at_a_time(tmp_path):
    first = FileTier(tmp_path, IDENTITY, 1 << 30, "buffered")
    with pytest.raises(OSError, match="another process"):
        FileTier(tmp_path, IDENTITY, 1 << 30, "buffered")
    first.close()
    FileTier(tmp_path, IDENTITY, 1 << 30, "buffered").close()


def test_a_chunk_larger_than_the_tier_is_not_stored_and_says_so(tmp_path, caplog):
    tier = FileTier(tmp_path, IDENTITY, FILE_BYTES - 1, "buffered")
    with caplog.at_level(logging.WARNING):
        assert tier.write(*_chunk(1)) == 0
        assert tier.write(*_chunk(5)) == 0
    assert caplog.text.count("does not fit") == 1 and not _files(tier)
