"""How many KV blocks an engine gets: the budget in bytes (given, or a share of free memory) divided
by the KV-cache spec's bytes per block, capped at what the sequences could ever use."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from kvflow.attention.kv_spec import KVCacheSpec
from kvflow.config import EngineConfig

logger = logging.getLogger(__name__)


def num_kv_blocks(config: EngineConfig, spec: KVCacheSpec, extra_bytes_per_block: int = 0) -> int:
    """`num_blocks` if given; else what `kv_cache_memory` (or the default budget) holds, each block
    also costing `extra_bytes_per_block` (a draft model's KV of the same tokens, paged alongside)."""
    cache = config.cache
    if cache.num_blocks is not None:
        return cache.num_blocks
    if cache.kv_cache_memory is not None:
        budget = int(cache.kv_cache_memory * 2**30)
    else:
        budget = default_kv_cache_bytes(config.device)
    max_model_len = config.model.max_model_len
    table_blocks = -(-max_model_len // spec.block_size)
    blocks_per_seq = table_blocks
    if cache.kv_policy == "specontext" and cache.kv_budget:  # its buffer blocks, besides its table
        blocks_per_seq += cache.kv_budget // spec.block_size
    # More blocks than every running sequence at full length could use is wasted memory (unless admission
    # is bounded by the cache itself, not by max_num_seqs).
    sched = config.scheduler
    memory_bound = sched.admission == "memory" or (sched.admission == "auto" and sched.batch_policy == "prefix-tree")
    useful = spec.num_blocks(budget) if memory_bound else blocks_per_seq * sched.max_num_seqs
    num_blocks = min(spec.num_blocks(budget) if not extra_bytes_per_block else
                     max(0, budget - spec.fixed_bytes) // (spec.bytes_per_block + extra_bytes_per_block), useful)
    if num_blocks < 1:
        ring = ""
        if spec.residual_slots:
            ring = (f" after KIVI's residual ring ({spec.fixed_bytes / 2**30:.3f} GiB: {spec.residual_slots} "
                    f"sequences x {spec.residual_window} tokens; lower --max-num-seqs or --kv-residual-tokens)")
        raise ValueError(
            f"kv_cache_memory of {budget / 2**30:.3f} GiB holds no block of {spec.bytes_per_block} bytes{ring}; "
            "raise --kv-cache-memory"
        )
    if num_blocks < table_blocks:
        logger.warning(
            "the KV cache holds %d tokens, less than max_model_len %d: long prompts will be refused",
            num_blocks * spec.block_size, max_model_len,
        )
    return num_blocks


def default_kv_cache_bytes(device: str = "cpu") -> int:
    """A budget that leaves the machine usable: 30% of available memory, at most 4 GiB on CPU. Available
    is the smaller of the machine's and what this process's memory cgroup still allows: in a container or
    a Kubernetes pod /proc/meminfo shows the host's memory, and a budget taken from it would have the
    kernel kill the engine at its first long batch (the `135m` image under a 2 GiB limit did, at start)."""
    if device.startswith("cuda"):
        import torch

        free, _ = torch.cuda.mem_get_info()
        return int(free * 0.8)
    available = _mem_available_bytes()
    room = cgroup_memory_room()
    if room is not None and room < available:
        logger.info("KV budget from the memory cgroup's limit: %.2f GiB left of it (the machine has %.2f GiB "
                    "available)", room / 2**30, available / 2**30)
        available = room
    return int(min(4 * 2**30, 0.3 * available))


def _mem_available_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


#: cgroup v1 writes "no limit" as the largest page-aligned int64 (2^63 - 4096); anything this large is none.
_V1_UNLIMITED = 2**62


def cgroup_memory_room(proc_cgroup: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup") -> int | None:
    """Bytes this process's memory cgroup, and every cgroup above it, still allows: the smallest of
    limit − usage + reclaimable file cache (inactive_file) over them; None where none sets a limit or
    there is no cgroup to read. cgroup v2 (`0::/path`: memory.max, memory.current) and v1 (`N:memory:/path`:
    memory.limit_in_bytes, memory.usage_in_bytes), each at the process's path or, in a container whose
    cgroup namespace hides it, at the mount's root."""
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
    except OSError:
        return None
    rooms: list[int] = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":
            files, base = ("memory.max", "memory.current", "inactive_file"), Path(root)
        elif "memory" in controllers.split(","):
            files = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
            base = Path(root) / "memory"
        else:
            continue
        leaf = base / path.lstrip("/")
        if not (leaf / files[0]).is_file():
            leaf = base
        for folder in (leaf, *leaf.parents):
            if not folder.is_relative_to(base):
                break
            room = _room(folder, *files)
            if room is not None:
                rooms.append(room)
    return min(rooms) if rooms else None


def _room(folder: Path, limit_file: str, usage_file: str, inactive_key: str) -> int | None:
    try:
        limit_text = (folder / limit_file).read_text().strip()
        if limit_text == "max" or int(limit_text) >= _V1_UNLIMITED:
            return None
        usage = int((folder / usage_file).read_text().strip())
    except (OSError, ValueError):
        return None
    inactive = 0
    try:
        for line in (folder / "memory.stat").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == inactive_key:
                inactive = int(value)
                break
    except (OSError, ValueError):
        pass
    return max(0, int(limit_text) - usage + inactive)
