"""The KV cache's physical memory (SpeContext's adaptive memory, `--kv-resident-memory`; CPU, Linux):
a pool whose pages can go back to the OS, and the file that holds what went back.

**Pages on demand.** Every layer's per-token components live in anonymous memory maps: the kernel
gives a page its memory when it is first written, so a pool of any size costs what its used blocks
hold (vAttention's idea for GPU memory; the OS does it for us on a CPU). `release` gives a run of
blocks' pages back (`madvise(MADV_DONTNEED)`): only pages wholly inside the run, so a page a block
outside it shares is never touched (blocks of `135m`'s layers are 6 KiB: a lone block frees one of
its two pages, a run of them all but the ends'). A released page reads as zeros and costs memory
again once written (the block handed to another request).

**The offload tier.** A file per layer and component with the pool's own layout (block b of layer l
at the same index), so moving a token in or out is the same indexed copy as any other: `spill`
copies whole blocks of a layer into it and releases them from the pool; SpeContext's elastic loader
reads the tokens a selection brings in from it (`kvflow/worker/retrieval_keys.py`). The files reserve
their disk at start (the pool's size in all: a full disk is an error then, not a SIGBUS mid-run), are
mapped shared, and are unlinked as soon as they are mapped, so they vanish with the process however
it ends.

What is resident is measured, not assumed: `resident_bytes` asks the kernel (`mincore`) which pages
of the pool have memory, the check of the memory model's count (`kvflow/core/kv_residency.py`).
"""

from __future__ import annotations

import ctypes
import logging
import math
import mmap
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from kvflow.attention.kv_spec import KVCacheSpec, LayerKV

PAGE = mmap.PAGESIZE
#: Filesystems whose files are memory: a tier there frees nothing.
MEMORY_FILESYSTEMS = ("tmpfs", "ramfs")
logger = logging.getLogger(__name__)


def residency_blocker(device: torch.device, spec: KVCacheSpec) -> str | None:
    """Why this runner cannot give KV pages back (None: it can)."""
    if device.type != "cpu":
        return "kv_resident_memory gives pages of host memory back to the OS: it runs on CPU (a GPU pool cannot " \
               "release part of a tensor)"
    if not sys.platform.startswith("linux"):
        return "kv_resident_memory needs Linux (madvise(MADV_DONTNEED) and mincore)"
    if spec.kivi_bits or spec.key_bounds_dtype is not None:
        return "kv_resident_memory keeps per-token KV only (no KIVI ring, no Quest key bounds)"
    return None


class ReleasableCache:
    """The KV cache of every layer with its per-token components in anonymous maps (pages on demand,
    releasable); per-head components (an fp8 scale) are ordinary tensors."""

    def __init__(self, spec: KVCacheSpec, num_blocks: int) -> None:
        self.spec = spec
        self.num_blocks = num_blocks
        self.caches: list[LayerKV] = []
        self._maps: list[list[tuple[mmap.mmap, torch.Tensor]]] = []  # per layer: (map, its tensor) per part
        for _ in range(spec.num_layers):
            parts, maps = [], []
            for c in spec.components:
                shape = spec.shape(c, num_blocks)
                if not c.per_token:
                    parts.append(torch.full(shape, spec.kv_scale or 0.0, dtype=c.dtype))
                    continue
                nbytes = math.prod(shape) * c.bytes_per_head // c.width
                region = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
                tensor = torch.frombuffer(region, dtype=c.dtype).view(shape)
                parts.append(tensor)
                maps.append((region, tensor))
            self.caches.append(parts[0] if spec.is_dense else tuple(parts))
            self._maps.append(maps)

    def per_token_parts(self, layer: int) -> list[torch.Tensor]:
        return [tensor for _, tensor in self._maps[layer]]

    @property
    def layer_block_bytes(self) -> int:
        """One layer's KV of one block: keys and values, every per-token component."""
        return sum(2 * tensor[0, 0].numel() * tensor.element_size() for _, tensor in self._maps[0])

    def touched_bytes(self, blocks: int) -> int:
        """The memory of blocks [0, blocks) written in every layer: the pages their chunks lie on."""
        total = 0
        for maps in self._maps:
            for _, tensor in maps:
                chunk = tensor[0, 0].numel() * tensor.element_size()
                for half in (0, 1):
                    start = half * self.num_blocks * chunk
                    total += (-(-(start + blocks * chunk) // PAGE) - start // PAGE) * PAGE if blocks else 0
        return total

    @property
    def release_per_layer_block(self) -> int:
        """The bytes releasing one layer of one block gives back at least, wherever the block lies: the pages
        wholly inside its keys' chunk and its values' (a run of blocks gives back more, pages between
        neighbours too). Equal to `layer_block_bytes` when a chunk is whole pages."""
        total = 0
        for _, tensor in self._maps[0]:
            chunk = tensor[0, 0].numel() * tensor.element_size()
            period = PAGE // math.gcd(chunk, PAGE)  # chunk offsets repeat modulo a page after this many blocks
            total += 2 * min(max(0, ((b + 1) * chunk) // PAGE - -(-(b * chunk) // PAGE)) * PAGE for b in range(period))
        return total

    def release(self, layer: int, block_ids: list[int]) -> int:
        """Give back the pages wholly inside these blocks of one layer (keys and values, every per-token
        component); returns the bytes given back."""
        freed = 0
        for run_start, run_end in _runs(block_ids):
            for region, tensor in self._maps[layer]:
                chunk = tensor[0, 0].numel() * tensor.element_size()  # one block of keys (or values)
                for half in (0, 1):
                    start = (half * self.num_blocks + run_start) * chunk
                    end = (half * self.num_blocks + run_end) * chunk
                    lo, hi = -(-start // PAGE) * PAGE, end // PAGE * PAGE
                    if hi > lo:
                        region.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
                        freed += hi - lo
        return freed

    def release_blocks(self, block_ids: list[int]) -> int:
        """Give back every layer's pages of these blocks (nothing will read them again)."""
        return sum(self.release(layer, block_ids) for layer in range(self.spec.num_layers))

    def resident_bytes(self) -> int:
        """Bytes of the pool's per-token components that have memory now (the kernel's count; a page only
        read maps the zero page and counts too: nothing in the engine reads a block it has not written)."""
        return sum(_resident(region, tensor) for maps in self._maps for region, tensor in maps)

    @property
    def mapped_bytes(self) -> int:
        return sum(len(region) for maps in self._maps for region, _ in maps)


class SpillTier:
    """The offload tier of a `ReleasableCache`: a file per layer and per-token component, in the pool's
    layout, under `directory` (a fresh folder in it, removed at once: the mapped files outlive their
    names)."""

    def __init__(self, cache: ReleasableCache, directory: str | None = None) -> None:
        self.cache = cache
        base = Path(directory) if directory is not None else Path(tempfile.gettempdir())
        base.mkdir(parents=True, exist_ok=True)
        kind = filesystem_type(base)
        if kind in MEMORY_FILESYSTEMS:
            logger.warning("the KV offload tier's directory %s is on %s, which is memory: what leaves the KV cache "
                           "stays in RAM; give --kv-spill-dir a directory on a disk", base, kind)
        folder = Path(tempfile.mkdtemp(prefix="kvflow-spill-", dir=base))
        self.layers: list[list[torch.Tensor]] = []
        self.spilled_bytes = 0  # cumulative: KV written to the tier (a layer of a block at a time)
        self.released_bytes = 0  # cumulative: pool memory given back with them
        self.read_tokens = 0  # cumulative: (layer, KV head, token) entries moves read from the tier
        try:
            for layer in range(cache.spec.num_layers):
                twins = []
                for i, part in enumerate(cache.per_token_parts(layer)):
                    path = folder / f"layer{layer}-{i}.kv"
                    nbytes = part.numel() * part.element_size()
                    _reserve(path, nbytes)
                    raw = np.memmap(path, dtype=np.uint8, mode="r+", shape=(nbytes,))
                    twins.append(torch.from_numpy(raw).view(part.dtype).view(part.shape))
                    path.unlink()
                self.layers.append(twins)
        finally:
            for leftover in folder.iterdir():
                leftover.unlink()
            folder.rmdir()

    def parts(self, layer: int) -> tuple[torch.Tensor, ...]:
        """Layer `layer`'s per-token components in the tier (the order of the cache's)."""
        return tuple(self.layers[layer])

    def spill(self, layer: int, block_ids: list[int]) -> int:
        """Copy whole blocks of one layer into the tier, then release them from the pool; returns the bytes
        released."""
        if not block_ids:
            return 0
        index = torch.tensor(block_ids, dtype=torch.long)
        for part, twin in zip(self.cache.per_token_parts(layer), self.layers[layer]):
            twin[:, index] = part[:, index]
            self.spilled_bytes += 2 * len(block_ids) * part[0, 0].numel() * part.element_size()
        released = self.cache.release(layer, block_ids)
        self.released_bytes += released
        return released


def _reserve(path: Path, nbytes: int) -> None:
    """Create `path` with `nbytes` of disk reserved (a write into a mapped file with no room behind it
    would kill the process with SIGBUS; reserved, a full disk is an error here, at start)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        if hasattr(os, "posix_fallocate"):
            try:
                os.posix_fallocate(fd, 0, nbytes)
            except OSError as exc:
                raise OSError(exc.errno, f"the KV offload tier needs {nbytes / 2**30:.3f} GiB more of disk "
                                         f"under {path.parent.parent} (a layer's share of --kv-cache-memory): "
                                         f"{exc.strerror}; free space or give --kv-spill-dir elsewhere") from exc
        else:
            os.ftruncate(fd, nbytes)
    finally:
        os.close(fd)


def filesystem_type(path: Path) -> str | None:
    """The type of the filesystem `path` lies on (the longest mount point above it in /proc/mounts)."""
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return None
    resolved, best, kind = str(path.resolve()), "", None
    for line in mounts:
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        inside = resolved == point or resolved.startswith(point.rstrip("/") + "/")
        if inside and len(point) > len(best):
            best, kind = point, fields[2]
    return kind


def _runs(block_ids: list[int]) -> list[tuple[int, int]]:
    """Sorted ids as half-open runs of consecutive ids."""
    runs: list[tuple[int, int]] = []
    for b in sorted(set(block_ids)):
        if runs and runs[-1][1] == b:
            runs[-1] = (runs[-1][0], b + 1)
        else:
            runs.append((b, b + 1))
    return runs


_libc = None


def _resident(region: mmap.mmap, tensor: torch.Tensor) -> int:
    """Bytes of one map with memory behind them (mincore)."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    length = len(region)
    pages = -(-length // PAGE)
    vec = (ctypes.c_ubyte * pages)()
    if _libc.mincore(ctypes.c_void_p(tensor.data_ptr()), ctypes.c_size_t(length), vec) != 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    return int((np.frombuffer(vec, dtype=np.uint8) & 1).sum()) * PAGE
