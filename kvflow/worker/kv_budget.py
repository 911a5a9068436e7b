"""How many KV blocks an engine gets: the budget in bytes (given, or a share of free memory) divided
by the KV-cache spec's bytes per block, capped at what the sequences could ever use."""

from __future__ import annotations

import logging
import os

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
    blocks_per_seq = -(-max_model_len // spec.block_size)
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
    if num_blocks < blocks_per_seq:
        logger.warning(
            "the KV cache holds %d tokens, less than max_model_len %d: long prompts will be refused",
            num_blocks * spec.block_size, max_model_len,
        )
    return num_blocks


def default_kv_cache_bytes(device: str = "cpu") -> int:
    """A budget that leaves the machine usable: 30% of available memory, at most 4 GiB on CPU."""
    if device.startswith("cuda"):
        import torch

        free, _ = torch.cuda.mem_get_info()
        return int(free * 0.8)
    available = _mem_available_bytes()
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
