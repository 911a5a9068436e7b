"""KV policies, scheduler side: which of a request's KV blocks are kept, evicted or read.

One object per request (`make_kv_policy`), from `--kv-policy` or the request's own `kv_policy`:

- `streaming` (StreamingLLM): the first `sink_tokens` and the newest `window` tokens; a block wholly
  between them is freed.
- `h2o` (Heavy-Hitter Oracle): sinks, the newest `window` tokens and the blocks that took the most
  attention over the decode steps so far; after each decode step, while the sequence holds more
  than `budget` tokens, the block with the least accumulated attention is freed.
- `snapkv`: when the prompt has been computed, each layer and kv head keeps `budget` tokens of it,
  chosen by its last `window` queries, copied into fresh blocks; the original blocks are freed
  (and stay in the prefix cache: their KV is exact).
- `quest`: nothing is freed; each decode step reads only `budget` tokens' worth of blocks per layer,
  those with the largest bound on q·k (the first two layers read all).
- `specontext` (SpeContext): nothing is freed; each decode step, a retrieval head distilled from
  the model chooses, per KV head, the tokens every layer reads (one global selection), moved into
  buffer blocks the request holds besides its table (only what changed since the last step), read
  with the newest block(s): `budget` tokens per step.

Rules every policy keeps (docs/kv_cache.md):
- Positions are never renumbered: a token keeps its position for the rotary embedding, and sits
  at cache index position - `request.kv_shift` (what was dropped before it).
- KV computed after a request's cache was altered depends on what was dropped, so from then on its
  blocks are private: none is registered in the prefix index or shared with an n > 1 sibling.
  Blocks registered before stay valid for everyone. A decode that reads a subset (quest,
  specontext) alters its request the same way: the token's KV depends on what was read.
- Eviction works in whole blocks; the block receiving tokens is never evicted.
The worker side (selection by attention, copies, Quest's reads) is kvflow/attention/policy_step.py.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvflow.config import KVPolicySettings
from kvflow.worker.step import KVPolicyOp, RunnerOutput, ScheduledChunk

if TYPE_CHECKING:
    from kvflow.core.kv_cache_manager import KVCacheManager
    from kvflow.core.request import Request


def _blocks(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)


class KVPolicy:
    """Base: keeps everything. Hooks the scheduler calls for a request that has a policy."""

    name = "none"

    def __init__(self, settings: KVPolicySettings, block_size: int) -> None:
        self.settings = settings
        self.block_size = block_size
        self.sink_blocks = _blocks(settings.sink_tokens, block_size)

    def reset(self) -> None:
        """The request lost its blocks (preempted): it starts over."""

    def min_final_chunk(self) -> int:
        """Tokens the chunk that ends a prompt must compute (a prefix hit leaves at least these)."""
        return 1

    def chunk_tokens(self, request: Request, n: int) -> int:
        """How many of the `n` tokens the step offers the request should compute."""
        return n

    def spare_blocks(self, request: Request, n: int) -> int:
        """Blocks the request needs this step beyond its tokens' own (SnapKV's destination)."""
        return 0

    def op(self, request: Request, start: int, n: int) -> KVPolicyOp | None:
        """What the runner does for this chunk."""
        return None

    def after_step(self, request: Request, kv: KVCacheManager, chunk: ScheduledChunk, result: RunnerOutput) -> None:
        """Evict or compact once the step's KV is in (and its full blocks were indexed)."""


class _EvictingPolicy(KVPolicy):
    """Streaming and H2O: whole blocks leave a request's table; `evicted` remembers their original
    indices (block i held positions [i * block_size, (i + 1) * block_size))."""

    def __init__(self, settings: KVPolicySettings, block_size: int) -> None:
        super().__init__(settings, block_size)
        self.evicted: list[int] = []

    def reset(self) -> None:
        self.evicted = []

    def origins(self, request: Request) -> list[int]:
        """The original block index of each block in the request's table."""
        gone = set(self.evicted)
        total = len(request.block_ids) + len(gone)
        return [i for i in range(total) if i not in gone]

    def candidates(self, request: Request) -> list[int]:
        """Table indices of blocks that may go: full, past the sinks, wholly older than the window,
        and not the newest block."""
        recent_from = request.num_computed_tokens - self.settings.window
        origins = self.origins(request)
        bs = self.block_size
        return [j for j, o in enumerate(origins[:-1]) if o >= self.sink_blocks and (o + 1) * bs <= recent_from]

    def evict(self, request: Request, kv: KVCacheManager, index: int) -> None:
        self.evicted.append(self.origins(request)[index])
        self.evicted.sort()
        kv.evict_block(request, index)


class StreamingPolicy(_EvictingPolicy):
    name = "streaming"

    def after_step(self, request: Request, kv: KVCacheManager, chunk: ScheduledChunk, result: RunnerOutput) -> None:
        for index in reversed(self.candidates(request)):
            self.evict(request, kv, index)


class H2OPolicy(_EvictingPolicy):
    name = "h2o"

    def __init__(self, settings: KVPolicySettings, block_size: int) -> None:
        super().__init__(settings, block_size)
        self.mass: list[float] = []  # accumulated attention per block of the table

    def reset(self) -> None:
        super().reset()
        self.mass = []

    def op(self, request: Request, start: int, n: int) -> KVPolicyOp | None:
        return KVPolicyOp("h2o") if n == 1 else None

    def after_step(self, request: Request, kv: KVCacheManager, chunk: ScheduledChunk, result: RunnerOutput) -> None:
        """Add this decode step's block mass and evict the lightest blocks while over budget. Steps
        without a decode (prefill chunks) evict nothing: the first choice waits for the first
        decode query's attention over the whole prompt."""
        mass = result.kv_block_mass.get(request.request_id)
        if mass is None:
            return
        self.mass.extend([0.0] * (len(request.block_ids) - len(self.mass)))
        for j, m in enumerate(mass):
            self.mass[j] += m
        while request.num_computed_tokens - request.kv_shift > self.settings.budget:
            candidates = self.candidates(request)
            if not candidates:
                break
            victim = min(candidates, key=lambda j: self.mass[j])
            self.evict(request, kv, victim)
            del self.mass[victim]


class SnapKVPolicy(KVPolicy):
    name = "snapkv"

    def __init__(self, settings: KVPolicySettings, block_size: int) -> None:
        super().__init__(settings, block_size)
        self.compacted = False

    def reset(self) -> None:
        self.compacted = False

    def min_final_chunk(self) -> int:
        return self.settings.window

    def chunk_tokens(self, request: Request, n: int) -> int:
        """Leave the prompt's last chunk at least the observation window (when the step's budget allows)."""
        rest = request.num_tokens_to_compute - request.num_computed_tokens
        if self.compacted or n >= rest:
            return n
        shortfall = self.settings.window - (rest - n)
        return n - shortfall if shortfall > 0 and n - shortfall > 0 else n

    def _compacts(self, request: Request, start: int, n: int) -> bool:
        return not self.compacted and start + n == request.num_tokens and start + n > self.settings.budget

    def spare_blocks(self, request: Request, n: int) -> int:
        if self._compacts(request, request.num_computed_tokens, n):
            return _blocks(self.settings.budget, self.block_size)
        return 0

    def op(self, request: Request, start: int, n: int) -> KVPolicyOp | None:
        if not self._compacts(request, start, n):
            return None
        s = self.settings
        return KVPolicyOp("snapkv", budget=s.budget, window=s.window, dest_block_ids=list(request.kv_spare_blocks))

    def after_step(self, request: Request, kv: KVCacheManager, chunk: ScheduledChunk, result: RunnerOutput) -> None:
        if chunk.kv_op is None or chunk.kv_op.name != "snapkv":
            return
        kv.replace_blocks(request, shift=request.num_computed_tokens - self.settings.budget)
        self.compacted = True


class QuestPolicy(KVPolicy):
    name = "quest"

    def op(self, request: Request, start: int, n: int) -> KVPolicyOp | None:
        s, bs = self.settings, self.block_size
        if n != 1 or start + 1 - request.kv_shift <= s.budget:
            return None
        window_blocks = 1 + _blocks(s.window, bs) if s.window else 1
        read = max(s.budget // bs, self.sink_blocks + window_blocks)
        request.kv_altered = True  # this token's KV is computed from a subset of the context: never shared
        return KVPolicyOp("quest", budget=s.budget, window=s.window, read_blocks=read,
                          sink_blocks=self.sink_blocks, window_blocks=window_blocks)


class SpeContextPolicy(KVPolicy):
    """Reads `buffer_tokens` entries per KV head (the sinks and the retrieval head's best, a whole
    number of blocks) and the newest `window_blocks` blocks. The buffer blocks are the request's
    spare blocks, held from its first sparse decode until it ends or is preempted; what they hold
    is reported by the runner each step and handed back with the next op (so the runner moves only
    the difference). Nothing is freed: the prompt's blocks stay in the prefix cache (those its sparse
    decodes complete are private, like Quest's)."""

    name = "specontext"

    def __init__(self, settings: KVPolicySettings, block_size: int) -> None:
        super().__init__(settings, block_size)
        bs = block_size
        self.window_blocks = 1 + _blocks(settings.window, bs) if settings.window else 1
        self.buffer_blocks = max(1, settings.budget // bs - self.window_blocks)
        self.buffer_tokens = self.buffer_blocks * bs
        self.reset()

    def reset(self) -> None:
        self.held = None  # [kv_heads, buffer_tokens] entries per buffer slot (None: an empty buffer)
        self.verified = 0  # entries whose retrieval keys the runner has checked against the tokens
        # --kv-resident-memory (kvflow/core/kv_residency.py): layers [offload_layer, L) of the first
        # `offloaded_blocks` blocks are in the offload tier (None: nothing is).
        self.offload_layer: int | None = None
        self.offloaded_blocks = 0

    def _sparse(self, start: int, n: int) -> bool:
        """A decode whose older entries (before the window blocks) outnumber the buffer's slots."""
        blocks = _blocks(start + n, self.block_size)
        return n == 1 and (blocks - self.window_blocks) * self.block_size > self.buffer_tokens

    def spare_blocks(self, request: Request, n: int) -> int:
        return self.buffer_blocks if self._sparse(request.num_computed_tokens, n) else 0

    def op(self, request: Request, start: int, n: int) -> KVPolicyOp | None:
        if not self._sparse(start, n):
            return None
        s = self.settings
        request.kv_altered = True  # this token's KV is computed from a subset of the context: never shared
        return KVPolicyOp("specontext", budget=self.buffer_tokens, window=s.window, sink_tokens=s.sink_tokens,
                          window_blocks=self.window_blocks,
                          dest_block_ids=request.kv_spare_blocks[: self.buffer_blocks], buffer_tokens=self.held,
                          verified_tokens=self.verified)

    def after_step(self, request: Request, kv: KVCacheManager, chunk: ScheduledChunk, result: RunnerOutput) -> None:
        done = result.kv_specontext.get(request.request_id)
        if done is None:
            return
        self.held, self.verified = done.buffer_tokens, done.verified_tokens


_POLICIES: dict[str, type[KVPolicy]] = {p.name: p for p in (StreamingPolicy, H2OPolicy, SnapKVPolicy, QuestPolicy,
                                                             SpeContextPolicy)}


def make_kv_policy(settings: KVPolicySettings | None, block_size: int) -> KVPolicy | None:
    """The policy object for one request (None: it keeps and reads all its KV)."""
    if settings is None:
        return None
    return _POLICIES[settings.policy](settings, block_size)
