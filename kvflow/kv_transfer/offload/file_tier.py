"""The file tier: block records in chunk files on local SSD, bounded by size, surviving restarts.

Layout: `DIR/kvflow-kv-<identity digest>/` holds one tier (one model fingerprint, KV format and
block size: `TierIdentity`), with a `manifest.json` saying which, and its chunk files
(`chunk_file.py`). Other `kvflow-kv-*` folders in DIR belong to other models or formats: they are
left alone and logged once at start. A chunk file is a run of consecutive blocks written by one
step of one sequence, so a prefix is read back with few large sequential reads.

I/O: `direct` opens files with O_DIRECT (aligned 4 KiB writes and reads that bypass the page
cache: what the SSD itself delivers, and no second copy of the KV in RAM); `buffered` goes through
the page cache (recently written KV is read from RAM while it lasts, and the kernel reads ahead);
`auto` probes both at start (a cold 32 MiB read each) and keeps the faster. Both write each file in
one call from an aligned buffer.

Size: the files' sizes never exceed the capacity (`--kv-offload-size`, at most what the disk has
free at start). Before a file is written the least recently used files are deleted to make room; a
read moves its file to the back and updates its mtime, which is the LRU order after a restart.

Faults are misses, never errors of a request: a header that fails its checksum deletes its file
(at start or when read), a record that fails its own ends the run read there, a read error drops
the file from the index, a failed write (a full disk) deletes the partial file and lowers the
capacity to what is stored, each with a log line.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import mmap
import os
import shutil
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from kvflow.kv_transfer.offload.chunk_file import (
    ALIGN,
    SUFFIX,
    BlockEntry,
    ChunkFormatError,
    ChunkHeader,
    align,
    header_length,
    record_crc,
)
from kvflow.kv_transfer.offload.tier import Expected, TierIdentity, TierStats

logger = logging.getLogger(__name__)

_FOLDER_PREFIX = "kvflow-kv-"
_TMP_SUFFIX = ".tmp"
_LOCK_NAME = "lock"
#: After a full disk, how long the tier waits before it looks at the free space again.
_RECHECK_FULL_S = 60.0


@dataclass
class _Chunk:
    header: ChunkHeader
    path: Path

    @property
    def size(self) -> int:
        return self.header.file_bytes


def supports_direct_io(folder: Path) -> bool:
    """Whether files in `folder` can be opened with O_DIRECT (tmpfs and some overlay file systems cannot)."""
    if not hasattr(os, "O_DIRECT"):
        return False
    probe = folder / f".direct-probe-{uuid.uuid4().hex}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o600)
    except OSError:
        return False
    try:
        buffer = mmap.mmap(-1, ALIGN)
        os.write(fd, buffer)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
        probe.unlink(missing_ok=True)


class FileTier:
    name = "file"

    def __init__(self, root: str | os.PathLike, identity: TierIdentity, capacity_bytes: int, io: str = "auto") -> None:
        """Open (or create) the tier for `identity` under `root`; OSError if the folder cannot be used."""
        self.identity = identity
        self._digest = identity.digest
        self.folder = Path(root) / f"{_FOLDER_PREFIX}{self._digest.hex()}"
        self.folder.mkdir(parents=True, exist_ok=True)
        if not os.access(self.folder, os.R_OK | os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, "no read and write permission", str(self.folder))
        self._lock_file = self._take_lock()
        self._write_manifest()
        self._log_other_tiers()
        if io == "direct" and not supports_direct_io(self.folder):
            raise OSError(errno.EINVAL, "this file system does not support O_DIRECT (use --kv-offload-io buffered)",
                          str(self.folder))
        self.direct = io == "direct"
        self._lock = threading.Lock()
        self._chunks: OrderedDict[str, _Chunk] = OrderedDict()  # least recently used first
        self._index: dict[int, tuple[str, int]] = {}  # block hash -> (chunk file name, slot)
        self._used = 0
        self._buffers = threading.local()  # each I/O thread's aligned buffer
        self._configured = capacity_bytes
        self._full_since: float | None = None
        self._warned_small = False
        self.stats = TierStats(self.name)
        if io == "auto" and supports_direct_io(self.folder):
            self.direct = self._direct_reads_faster()
        self._scan()
        free = shutil.disk_usage(self.folder).free
        self.capacity = min(capacity_bytes, self._used + free)
        if self.capacity < capacity_bytes:
            logger.warning("KV offload: %s has %.2f GiB free, so the file tier holds at most %.2f GiB (asked for "
                           "%.2f GiB)", self.folder, free / 2**30, self.capacity / 2**30, capacity_bytes / 2**30)
        self.stats.capacity_bytes = self.capacity
        with self._lock:
            self._evict_to(self.capacity)
        logger.info("KV offload: file tier at %s (%s I/O): %d blocks in %d files from earlier runs, %.2f of "
                    "%.2f GiB", self.folder, "direct" if self.direct else "buffered", len(self._index),
                    len(self._chunks), self._used / 2**30, self.capacity / 2**30)

    # --------------------------------------------------------------- start-up
    def _take_lock(self) -> int:
        """Hold the folder for this process: two servers writing one tier would delete each other's files
        (OSError if another process holds it; the lock goes with the process)."""
        fd = os.open(self.folder / _LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise OSError(errno.EBUSY, "another process is using this tier (give each server its own "
                          "--kv-offload-dir)", str(self.folder)) from None
        return fd

    def _write_manifest(self) -> None:
        manifest = self.folder / "manifest.json"
        if not manifest.exists():
            tmp = manifest.with_suffix(_TMP_SUFFIX)
            tmp.write_text(json.dumps(self.identity.manifest(), indent=1))
            os.replace(tmp, manifest)

    def _log_other_tiers(self) -> None:
        for other in sorted(self.folder.parent.glob(f"{_FOLDER_PREFIX}*")):
            if other == self.folder or not other.is_dir():
                continue
            try:
                about = json.loads((other / "manifest.json").read_text())
            except (OSError, ValueError):
                about = {}
            logger.info("KV offload: ignoring %s, written for another model, KV format or block size (model %s, "
                        "format %s, block size %s)", other, about.get("model", about.get("model_fingerprint", "?")),
                        about.get("kv_format", "?"), about.get("block_size", "?"))

    def _scan(self) -> None:
        """Index the chunk files of earlier runs, oldest use first; delete damaged and partial ones."""
        found = []
        for path in self.folder.iterdir():
            if path.name.endswith(_TMP_SUFFIX):
                path.unlink(missing_ok=True)  # a write a crash interrupted
                continue
            if path.suffix != SUFFIX:
                continue
            try:
                header = self._read_header(path)
                if path.stat().st_size < header.file_bytes:
                    raise ChunkFormatError("truncated")
                found.append((path.stat().st_mtime, path.name, _Chunk(header, path)))
            except (OSError, ChunkFormatError) as exc:
                logger.warning("KV offload: deleting damaged chunk file %s (%s)", path, exc)
                self.stats.errors += 1
                path.unlink(missing_ok=True)
        for _, name, chunk in sorted(found, key=lambda item: (item[0], item[1])):
            self._add(name, chunk)

    def _read_header(self, path: Path) -> ChunkHeader:
        with open(path, "rb") as f:
            head = f.read(ALIGN)
            need = header_length(head)
            if need > len(head):
                head += f.read(need - len(head))
        return ChunkHeader.decode(head, self._digest)

    # ------------------------------------------------------------------ index
    def _add(self, name: str, chunk: _Chunk) -> None:
        self._chunks[name] = chunk
        self._used += chunk.size
        for slot, entry in enumerate(chunk.header.blocks):
            self._index[entry.key] = (name, slot)
        self._update_stored()

    def _drop(self, name: str, delete: bool) -> None:
        """Forget a chunk file (under the lock); `delete` it too."""
        chunk = self._chunks.pop(name, None)
        if chunk is None:
            return
        self._used -= chunk.size
        for slot, entry in enumerate(chunk.header.blocks):
            if self._index.get(entry.key) == (name, slot):
                del self._index[entry.key]
        self._update_stored()
        if delete:
            chunk.path.unlink(missing_ok=True)

    def _evict_to(self, limit: int) -> None:
        while self._chunks and self._used > limit:
            name = next(iter(self._chunks))
            self.stats.evicted_blocks += len(self._chunks[name].header.blocks)
            self._drop(name, delete=True)

    def _update_stored(self) -> None:
        self.stats.stored_blocks = len(self._index)
        self.stats.stored_bytes = self._used

    def contains(self, key: int) -> bool:
        return key in self._index

    # ------------------------------------------------------------------ write
    def _buffer(self, nbytes: int) -> mmap.mmap:
        """This thread's page-aligned buffer of at least `nbytes` (O_DIRECT needs aligned memory)."""
        buffer = getattr(self._buffers, "buffer", None)
        if buffer is None or len(buffer) < nbytes:
            if buffer is not None:
                buffer.close()
            buffer = mmap.mmap(-1, align(nbytes))
            self._buffers.buffer = buffer
        return buffer

    def write(self, blocks: list[BlockEntry], records: torch.Tensor) -> int:
        """Write one chunk file of `blocks` (uint8 records [n, record_bytes] on the CPU); returns the blocks
        stored (0: the chunk is larger than the tier). OSError if the write failed (nothing is left of it)."""
        started = time.perf_counter()
        header = ChunkHeader(self._digest, self.identity.block_size, self.identity.record_bytes, tuple(blocks))
        size = header.file_bytes
        with self._lock:
            self._recheck_disk()
            if size > self.capacity:
                if not self._warned_small:
                    self._warned_small = True
                    logger.warning("KV offload: a chunk of %d blocks (%.1f MiB) does not fit the file tier (%.1f "
                                   "MiB); such chunks are not stored", len(blocks), size / 2**20, self.capacity / 2**20)
                return 0
            self._evict_to(self.capacity - size)
        buffer = self._buffer(size)
        view = torch.frombuffer(buffer, dtype=torch.uint8, count=size)
        view[:header.header_bytes].copy_(torch.frombuffer(bytearray(header.encode()), dtype=torch.uint8))
        slots = view[header.header_bytes:].view(len(blocks), header.slot_bytes)
        slots[:, :header.record_bytes].copy_(records)
        del view, slots
        name = f"{time.time_ns():x}-{uuid.uuid4().hex[:8]}{SUFFIX}"
        path = self.folder / name
        tmp = path.with_name(name + _TMP_SUFFIX)
        try:
            self._write_file(tmp, memoryview(buffer)[:size])
            os.replace(tmp, path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            with self._lock:
                self.stats.errors += 1
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):  # hold what is stored now; look again later
                    self.capacity = min(self.capacity, self._used)
                    self.stats.capacity_bytes = self.capacity
                    self._full_since = time.monotonic()
            raise
        with self._lock:
            self._add(name, _Chunk(header, path))
            self.stats.blocks_written += len(blocks)
            self.stats.bytes_written += size
            self.stats.write_seconds += time.perf_counter() - started
        return len(blocks)

    def _write_file(self, path: Path, data: memoryview) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | (os.O_DIRECT if self.direct else 0)
        fd = os.open(path, flags, 0o600)
        try:
            done = 0
            while done < len(data):  # a write may be short (e.g. past 2 GiB); O_DIRECT keeps 4 KiB steps
                written = os.write(fd, data[done:])
                if written <= 0:
                    raise OSError(errno.ENOSPC, "no progress writing", str(path))
                done += written
        finally:
            os.close(fd)

    def _recheck_disk(self) -> None:
        """After a full disk, give the tier back the room the disk has again (once a minute, under the lock)."""
        if self._full_since is None or time.monotonic() - self._full_since < _RECHECK_FULL_S:
            return
        self._full_since = None
        free = shutil.disk_usage(self.folder).free
        self.capacity = min(self._configured, self._used + free)
        self.stats.capacity_bytes = self.capacity

    # ------------------------------------------------------------------- read
    def read(self, expected: list[Expected], out: torch.Tensor) -> int:
        """Read a run of blocks, a chunk file at a time (one read per run of consecutive slots)."""
        started = time.perf_counter()
        done = 0
        while done < len(expected):
            with self._lock:
                where = self._index.get(expected[done].key)
                chunk = self._chunks.get(where[0]) if where else None
                if chunk is None or where is None:
                    break
                self._chunks.move_to_end(where[0])
            slot = where[1]
            count = 1
            while (done + count < len(expected) and slot + count < len(chunk.header.blocks)
                   and chunk.header.blocks[slot + count].key == expected[done + count].key):
                count += 1
            got = self._read_run(chunk, where[0], slot, expected[done:done + count], out[done:done + count])
            done += got
            if got < count:
                break
        with self._lock:
            self.stats.hit_blocks += done
            self.stats.read_seconds += time.perf_counter() - started
        return done

    def _read_run(self, chunk: _Chunk, name: str, slot: int, expected: list[Expected], out: torch.Tensor) -> int:
        header = chunk.header
        offset, nbytes = header.record_offset(slot), len(expected) * header.slot_bytes
        buffer = self._buffer(nbytes)
        try:
            fd = os.open(chunk.path, os.O_RDONLY | (os.O_DIRECT if self.direct else 0))
            try:
                got = os.preadv(fd, [memoryview(buffer)[:nbytes]], offset)
                os.utime(fd)  # the LRU order a restart sees
            finally:
                os.close(fd)
            if got != nbytes:
                raise ChunkFormatError(f"truncated ({got} of {nbytes} bytes at {offset})")
        except (OSError, ChunkFormatError) as exc:
            with self._lock:
                gone = name not in self._chunks  # evicted while this read opened it: a plain miss
                if not gone:
                    self.stats.errors += 1
                    self._drop(name, delete=True)  # an unreadable file is useless and would hold its room
            if not gone:
                logger.warning("KV offload: cannot read %s (%s); its blocks are misses from now on", chunk.path,
                               exc)
            return 0
        with self._lock:
            self.stats.bytes_read += nbytes
        slots = torch.frombuffer(buffer, dtype=torch.uint8, count=nbytes).view(len(expected), header.slot_bytes)
        for i, want in enumerate(expected):
            entry = header.blocks[slot + i]
            record = memoryview(buffer)[i * header.slot_bytes:i * header.slot_bytes + header.record_bytes]
            if not want.matches(entry):
                return i  # another sequence's block under a colliding hash: a miss
            if record_crc(record) != entry.crc:
                logger.warning("KV offload: block %d of %s fails its checksum; deleting the file", slot + i,
                               chunk.path)
                with self._lock:
                    self.stats.errors += 1
                    self._drop(name, delete=True)
                return i
            out[i].copy_(slots[i, :header.record_bytes])
        return len(expected)

    def probe_bandwidth(self, nbytes: int = 16 << 20) -> float:
        """Bytes per second of reading `nbytes` the way the tier does, the page cache dropped first (the
        cost model's prior; loads then refine it)."""
        return self._probe_read(nbytes, self.direct)

    def _probe_read(self, nbytes: int, direct: bool) -> float:
        path = self.folder / f".probe-{uuid.uuid4().hex}{_TMP_SUFFIX}"
        buffer = self._buffer(nbytes)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | (os.O_DIRECT if direct else 0), 0o600)
            try:
                os.write(fd, memoryview(buffer)[:nbytes])
                if not direct:
                    os.fsync(fd)  # written back, so the page cache can drop it
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                started = time.perf_counter()
                os.preadv(fd, [memoryview(buffer)[:nbytes]], 0)
                return nbytes / max(time.perf_counter() - started, 1e-6)
            finally:
                os.close(fd)
        except OSError:
            return 100e6  # a disk we cannot probe: assume a slow one
        finally:
            path.unlink(missing_ok=True)

    def _direct_reads_faster(self) -> bool:
        """`--kv-offload-io auto`: O_DIRECT or buffered, whichever reads a cold 32 MiB file faster here (an
        SSD behind a virtual disk can favour the page cache's read-ahead; a bare NVMe drive, O_DIRECT)."""
        direct = self._probe_read(32 << 20, True)
        buffered = self._probe_read(32 << 20, False)
        logger.info("KV offload: cold reads at %.2f GB/s with O_DIRECT, %.2f GB/s buffered: using %s I/O",
                    direct / 1e9, buffered / 1e9, "direct" if direct >= buffered else "buffered")
        return direct >= buffered

    def close(self) -> None:
        buffer = getattr(self._buffers, "buffer", None)
        if buffer is not None:
            buffer.close()
            self._buffers.buffer = None
        if self._lock_file is not None:
            os.close(self._lock_file)  # releases the folder
            self._lock_file = None
