"""Paged KV cache bookkeeping: a block pool with reference counts and a prefix index.

Only ids and counts live here; the tensors themselves belong to the model runner. A block is
"cached" when it is full and registered in the prefix index under a hash chained over all tokens
up to and including it. A cached block whose reference count drops to zero stays in the index
and joins the free queue; it is evicted (its hash dropped) only when the pool hands it out again,
least recently freed first. Hits are verified token by token, and against the parent block, so a
hash collision can never splice the wrong KV into a request.

A request's cache salt (empty by default) is chained into its first block's hash and kept with
every block it indexes: requests whose KV differs for the same tokens (another adapter, model
variant or KV format, or a tenant that must not share) never share blocks. The engine's KV format
(the KV-cache spec's wire format, e.g. int8 codes + scales) is part of every request's salt.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvflow.attention.kivi import shareable_prefix
from kvflow.core.request import LayerGroupBlocks

if TYPE_CHECKING:
    from kvflow.core.request import Request


@dataclass
class KVBlock:
    block_id: int
    ref_cnt: int = 0
    # Set while the block is registered in the prefix index.
    block_hash: int | None = None
    tokens: tuple[int, ...] | None = None
    parent_id: int | None = None
    salt: str | None = None
    # Layers whose pages of this block went back to the OS (SpeContext's adaptive memory,
    # kvflow/core/kv_residency.py); they get memory again when the block is handed out and written.
    released_layers: int = 0


@dataclass
class PrefixCacheStats:
    queried_tokens: int = 0
    hit_tokens: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0


def hash_block(parent_hash: int | None, tokens: Sequence[int], salt: str | None = None) -> int:
    """Chain a block's tokens onto its parent's hash; the first block of a salted request chains onto
    its salt instead. A 64-bit BLAKE2b digest, not Python's `hash` (whose strings are salted per
    process): the same prefix has the same hashes in every process, so a KV offload tier written by
    one server run (kvflow/kv_transfer/offload/) is found by the next."""
    digest = hashlib.blake2b(digest_size=8)
    if parent_hash is not None:
        digest.update(parent_hash.to_bytes(8, "little", signed=True))
    elif salt:
        digest.update(b"salt:" + salt.encode() + b"\0")
    digest.update(array("q", tokens).tobytes())
    return int.from_bytes(digest.digest(), "little", signed=True)


class BlockPool:
    """Fixed set of blocks: free queue (LRU over cached blocks), ref counts, prefix index.

    Blocks never handed out yet cost nothing: they are a range of ids ahead of the free queue
    (a pool of a million blocks, as a GPU or the planner's simulated instances have, starts at
    once), and a block's record exists from its first allocation on.
    """

    def __init__(self, num_blocks: int, reuse_first: bool = False) -> None:
        """`reuse_first`: hand out free blocks outside the prefix cache before never-used ones (a pool whose
        never-used blocks cost no memory, `--kv-resident-memory`: the memory touched then stays near the most
        blocks held at once, while cached blocks keep their KV as long as they would anyway)."""
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.reuse_first = reuse_first
        self.blocks: list[KVBlock] = []  # ids [0, len(blocks)) have been handed out at least once
        # Freed blocks in eviction order (the first entry is handed out first), after the fresh ones.
        self._free: OrderedDict[int, None] = OrderedDict()
        self._index: dict[int, int] = {}  # block hash -> block id
        self.peak_used = 0  # most blocks held by requests (or pins) at once
        self.released_layers = 0  # sum of the blocks' `released_layers`
        # With reuse_first: blocks that became free and unindexed (nothing will read their KV again) since
        # the last `take_dead`, whose memory can go back (kvflow/core/kv_residency.py).
        self.dead: list[int] = []
        self._free_uncached: OrderedDict[int, None] = OrderedDict()  # with reuse_first: free, not indexed

    @property
    def num_free(self) -> int:
        return self.num_blocks - len(self.blocks) + len(self._free)

    def _note_usage(self) -> None:
        self.peak_used = max(self.peak_used, self.num_blocks - self.num_free)

    @property
    def num_cached(self) -> int:
        return len(self._index)

    def allocate(self, count: int) -> list[int]:
        """Take `count` blocks: never-used ones first (with `reuse_first`, free unindexed ones before them),
        then the free queue's head, evicting their cached content."""
        if count > self.num_free:
            raise RuntimeError(f"asked for {count} blocks with {self.num_free} free")
        ids = []
        for _ in range(count):
            if self._free_uncached:
                block_id, _ = self._free_uncached.popitem(last=False)
                del self._free[block_id]
                block = self.blocks[block_id]
            elif len(self.blocks) < self.num_blocks:
                block = KVBlock(len(self.blocks))
                self.blocks.append(block)
            else:
                block_id, _ = self._free.popitem(last=False)
                block = self.blocks[block_id]
                if block.block_hash is not None:
                    self._evict(block)
            self.released_layers -= block.released_layers  # its new owner writes every layer
            block.released_layers = 0
            block.ref_cnt = 1
            ids.append(block.block_id)
        self._note_usage()
        return ids

    def touch(self, block_ids: Sequence[int]) -> None:
        """Take a reference on blocks found by a prefix hit (they may be sitting in the free queue)."""
        for block_id in block_ids:
            block = self.blocks[block_id]
            if block.ref_cnt == 0:
                del self._free[block_id]
                self._free_uncached.pop(block_id, None)
            block.ref_cnt += 1
        self._note_usage()

    def release(self, block_ids: Sequence[int], evict: bool = False) -> None:
        """Drop one reference per block; a block reaching zero joins the tail of the free queue.

        Callers pass a request's blocks last-first, so a request's tail is evicted before its
        head, which other requests are more likely to share. `evict`: a block reaching zero leaves
        the prefix index and goes to the head of the queue instead (its content is known to be done
        with: a prefix group's last member finished), so it is handed out before any cached block.
        """
        for block_id in block_ids:
            block = self.blocks[block_id]
            if block.ref_cnt <= 0:
                raise RuntimeError(f"block {block_id} released more often than taken")
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self._free[block_id] = None
                if evict:
                    if block.block_hash is not None:
                        self._evict(block)
                    self._free.move_to_end(block_id, last=False)
                if self.reuse_first and block.block_hash is None:
                    self.dead.append(block_id)
                    self._free_uncached[block_id] = None

    def register(self, block_id: int, block_hash: int, tokens: tuple[int, ...], parent_id: int | None,
                 salt: str | None = None) -> int:
        """Index a full block and return the id now indexed for its content.

        When equal content is already indexed (two requests computed the same prefix at once),
        the existing block keeps the slot and its id is returned, so the caller chains its next
        block onto the indexed one.
        """
        existing = self.lookup(block_hash, tokens, parent_id, salt)
        if existing is not None:
            return existing
        if block_hash in self._index:
            return block_id  # a colliding hash holds the slot: leave this block unindexed
        block = self.blocks[block_id]
        block.block_hash, block.tokens, block.parent_id, block.salt = block_hash, tokens, parent_id, salt
        self._index[block_hash] = block_id
        return block_id

    def lookup(self, block_hash: int, tokens: tuple[int, ...], parent_id: int | None,
               salt: str | None = None) -> int | None:
        block_id = self._index.get(block_hash)
        if block_id is None:
            return None
        block = self.blocks[block_id]
        if block.tokens != tokens or block.parent_id != parent_id or block.salt != salt:
            return None  # hash collision, stale parent or another salt: treat as a miss
        return block_id

    def release_layers(self, block_id: int, layers: int) -> None:
        """Record that the pages of `layers` layers of a held block went back to the OS (it leaves the
        prefix index: its KV is no longer whole)."""
        block = self.blocks[block_id]
        if block.block_hash is not None:
            self._evict(block)
        self.released_layers += layers - block.released_layers
        block.released_layers = layers

    def drop_free_cached(self) -> int:
        """Evict every cached block nobody holds (vLLM's `reset_prefix_cache`); returns how many."""
        dropped = 0
        for block_id in self._free:
            block = self.blocks[block_id]
            if block.block_hash is not None:
                self._evict(block)
                dropped += 1
                if self.reuse_first:
                    self.dead.append(block_id)
                    self._free_uncached[block_id] = None
        return dropped

    def evict_free_cached(self) -> int | None:
        """Evict the least recently used cached block nobody holds; its id (None: there is none)."""
        for block_id in self._free:
            block = self.blocks[block_id]
            if block.block_hash is not None:
                self._evict(block)
                if self.reuse_first:
                    self._free_uncached[block_id] = None
                return block_id
        return None

    def take_dead(self) -> list[int]:
        """The blocks that became free and unindexed since the last call and still are."""
        dead, self.dead = self.dead, []
        return [b for b in dict.fromkeys(dead) if self.blocks[b].ref_cnt == 0 and self.blocks[b].block_hash is None]

    def _evict(self, block: KVBlock) -> None:
        if self._index.get(block.block_hash) == block.block_id:
            del self._index[block.block_hash]
        block.block_hash = block.tokens = block.parent_id = block.salt = None


class KVCacheManager:
    """Allocates blocks to requests and shares full blocks between them through the prefix index.

    Layer groups: the cache may be split into G groups of consecutive layers (a block zoo whose variants
    share their leading layers with the base). A pool entry is then a page holding one group's layers for
    a block of tokens, and each request has one table per group (`Request.kv_groups` beside its own
    fields, which are group 0's). Each group indexes its pages under its own salt: a group whose layers a
    request's variant shares with the base (all of them and every layer below: KV depends on the layers
    under it) leaves the variant out of it, so the base and its variants read one copy of that KV. A
    prefix hit may then cover more blocks in some groups than in others: the request computes from the
    shortest, and the runner stores nothing into the pages it found (they are someone else's, read-only).
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 kv_format: str = "", residual_slots: int = 0, residual_tokens: int = 0, layer_groups: int = 1,
                 shared_groups: Mapping[str, int] | None = None, reuse_first: bool = False) -> None:
        """`num_blocks`: the pool's entries (pages of one layer group each when `layer_groups` > 1).
        `kv_format`: what the blocks hold (`KVCacheSpec.wire_format`), chained into every hash.
        `residual_slots`, `residual_tokens`: KIVI's ring (kvflow/attention/kivi.py): a running request
        holds one of its slots, and a prefix hit leaves out the blocks its newest tokens may still be
        dense in (they are not quantised in the block). `shared_groups`: variant key -> how many leading
        layer groups compute the base's KV in that variant. `reuse_first`: see `BlockPool`."""
        if layer_groups < 1:
            raise ValueError(f"layer_groups must be >= 1, got {layer_groups}")
        self.block_size = block_size
        self.pool = BlockPool(num_blocks, reuse_first)
        self.enable_prefix_caching = enable_prefix_caching
        self.kv_format = kv_format
        self.stats = PrefixCacheStats()
        self.residual_tokens = residual_tokens
        self._free_slots = list(range(residual_slots - 1, -1, -1))  # popped from the end: slot 0 first
        self._uses_slots = residual_slots > 0
        self.layer_groups = layer_groups
        self.shared_groups = dict(shared_groups or {})

    def salt(self, request: Request, group: int = 0) -> str | None:
        """The salt a request's blocks (of layer `group`) are indexed under: the KV format, its model variant
        (unless the group's layers compute the base's KV in it) and LoRA adapter (name and digest of each),
        the request's own salt, and the group where the cache has several."""
        variant = request.variant
        if variant is not None and group < self.shared_groups.get(variant.key, 0):
            variant = None
        parts = [part for part in (self.kv_format, variant and f"variant:{variant.key}",
                                   request.lora and f"lora:{request.lora.key}", request.cache_salt,
                                   self.layer_groups > 1 and f"layers:{group}/{self.layer_groups}") if part]
        return "|".join(parts) or None

    def tables(self, request: Request) -> list[Request | LayerGroupBlocks]:
        """The request's table of each layer group (itself for group 0: its own fields are that group's)."""
        missing = self.layer_groups - 1 - len(request.kv_groups)
        if missing > 0:
            request.kv_groups.extend(LayerGroupBlocks() for _ in range(missing))
        return [request, *request.kv_groups]

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    @property
    def num_token_blocks(self) -> int:
        """Blocks of tokens (of every layer) the cache holds: its pool entries, or pages of one group each."""
        return self.pool.num_blocks // self.layer_groups

    def usage(self) -> float:
        """Fraction of blocks held by live requests (free-but-cached blocks count as free)."""
        return 1.0 - self.pool.num_free / self.pool.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def pages_needed(self, request: Request, num_new_tokens: int) -> int:
        """Pool entries `allocate` would take for `num_new_tokens` more tokens (a block per group)."""
        blocks = self.blocks_needed(request.num_computed_tokens - request.kv_shift + num_new_tokens)
        return sum(max(0, blocks - len(table.block_ids)) for table in self.tables(request))

    def match_prefix(self, request: Request, min_compute: int = 1) -> int:
        """Attach the longest cached prefix of a waiting request; returns the tokens it covers.

        At least `min_compute` tokens (one, or a KV policy's observation window) are always left to
        compute, because the step that computes them is the one that samples the next token.
        """
        if not self.enable_prefix_caching or request.skip_prefix_cache or self._holds_blocks(request):
            return 0
        hits = [self._cached_prefix(request, group, min_compute) for group in range(self.layer_groups)]
        computed = min(len(h) for h in hits)
        self.stats.queried_tokens += request.num_tokens
        self.stats.hit_tokens += computed * self.block_size
        return self._attach(request, hits, computed)

    def cached_prefix_tokens(self, request: Request) -> int:
        """How many of a waiting request's tokens the prefix cache holds now (nothing is taken or counted)."""
        if not self.enable_prefix_caching or request.skip_prefix_cache:
            return 0
        return min(len(self._cached_prefix(request, group)) for group in range(self.layer_groups)) * self.block_size

    def pin_prefix(self, request: Request, num_blocks: int) -> list[int] | None:
        """Take a reference on the first `num_blocks` cached blocks of the request's prompt (in every layer
        group, group after group), so they stay cached whoever else frees them (a prefix group's shared
        blocks, held by its policy until the group is done); None, and nothing taken, unless all of them are
        cached."""
        if not self.enable_prefix_caching or request.skip_prefix_cache or num_blocks <= 0:
            return None
        pinned: list[int] = []
        for group in range(self.layer_groups):
            hits = self._cached_prefix(request, group)
            if len(hits) < num_blocks:
                return None
            pinned.extend(hits[:num_blocks])
        self.pool.touch(pinned)
        return pinned

    def unpin(self, block_ids: list[int], keep: int = 0) -> None:
        """Drop `pin_prefix`'s references. Past the first `keep` blocks (of each group), those nobody else holds
        leave the cache at once (not to LRU); the first `keep` (still wanted: another group shares them) go back
        to the free queue's LRU order like any freed cached block."""
        per_group = len(block_ids) // self.layer_groups
        for at in range(0, len(block_ids), max(per_group, 1)):
            pinned = block_ids[at : at + per_group]
            self.pool.release(list(reversed(pinned[keep:])), evict=True)
            self.pool.release(list(reversed(pinned[:keep])))

    def reset_prefix_cache(self) -> int:
        """Forget the cached prefixes of blocks no request holds (benchmarks measure cold prefixes so);
        returns how many blocks were dropped. Blocks in use stay indexed."""
        return self.pool.drop_free_cached()

    @property
    def peak_used_blocks(self) -> int:
        """The most blocks held at once since the engine started (or `reset_peak`)."""
        return self.pool.peak_used

    def reset_peak(self) -> None:
        self.pool.peak_used = self.pool.num_blocks - self.pool.num_free

    def _cached_prefix(self, request: Request, group: int = 0, min_compute: int = 1) -> list[int]:
        """The indexed blocks of the request's longest cached prefix in one layer group, leaving at least
        `min_compute` tokens."""
        tokens = request.all_token_ids
        max_blocks = max(0, len(tokens) - min_compute) // self.block_size
        table = self.tables(request)[group]
        self._update_hashes(request, table, group, max_blocks)
        salt = self.salt(request, group)
        hits: list[int] = []
        parent: int | None = None
        for i in range(max_blocks):
            chunk = tuple(tokens[i * self.block_size : (i + 1) * self.block_size])
            block_id = self.pool.lookup(table.block_hashes[i], chunk, parent, salt)
            if block_id is None:
                break
            hits.append(block_id)
            parent = block_id
        return hits[:self._shareable_blocks(len(hits))]

    def _shareable_blocks(self, num_blocks: int) -> int:
        """Of a computed prefix's first full blocks, how many hold their KV complete (KIVI: not its newest
        tokens, which may still be dense in the ring of the request that computed them)."""
        if not self._uses_slots:
            return num_blocks
        return shareable_prefix(num_blocks * self.block_size, self.residual_tokens, self.block_size) // self.block_size

    def share_prefix(self, request: Request, source: Request, num_blocks: int) -> int:
        """Give `request` the first `num_blocks` full blocks of `source` (n > 1 siblings), in every layer group."""
        num_blocks = self._shareable_blocks(num_blocks)
        if self._holds_blocks(request) or num_blocks <= 0:
            return 0
        return self._attach(request, [table.block_ids[:num_blocks] for table in self.tables(source)], num_blocks)

    def num_cached_blocks(self, request: Request) -> int:
        """The request's leading blocks indexed in every layer group (a group's prefix hits may reach further)."""
        if self.layer_groups == 1:
            return request.num_cached_blocks
        return min(table.num_cached_blocks for table in self.tables(request))

    def _holds_blocks(self, request: Request) -> bool:
        return bool(request.block_ids) or any(table.block_ids for table in request.kv_groups)

    def _attach(self, request: Request, hits: list[list[int]], computed: int) -> int:
        """Take the blocks found for each layer group; the request has computed the first `computed` blocks
        (the shortest group's: in the others, the blocks past it are read, never written)."""
        if not any(hits):
            return 0
        for table, blocks in zip(self.tables(request), hits):
            self.pool.touch(blocks)
            table.block_ids = list(blocks)
            table.num_cached_blocks = len(blocks)
            table.indexed_parent_id = blocks[-1] if blocks else None
        request.num_computed_tokens = computed * self.block_size
        request.num_cached_tokens = max(request.num_cached_tokens,
                                        min(request.num_computed_tokens, request.num_prompt_tokens))
        request.kv_prefix_floor = request.num_computed_tokens
        return request.num_computed_tokens

    def allocate(self, request: Request, num_new_tokens: int, spare: int = 0) -> bool:
        """Make room for `num_new_tokens` more tokens of `request` (and hold `spare` blocks for its KV
        policy's work this step); False (and no change) if full."""
        needed = self.blocks_needed(request.num_computed_tokens - request.kv_shift + num_new_tokens)
        tables = self.tables(request) if self.layer_groups > 1 else [request]
        missing = [max(0, needed - len(table.block_ids)) for table in tables]
        extra = max(0, spare - len(request.kv_spare_blocks))
        if sum(missing) + extra > self.pool.num_free:
            return False
        if self._uses_slots and request.kv_residual_slot is None:
            if not self._free_slots:
                return False
            request.kv_residual_slot = self._free_slots.pop()
        for table, count in zip(tables, missing):
            if count:
                table.block_ids.extend(self.pool.allocate(count))
        if extra:
            request.kv_spare_blocks.extend(self.pool.allocate(extra))
        return True

    def evict_block(self, request: Request, index: int) -> None:
        """A KV policy drops the full block at `index` of the request's table: later tokens move one
        block forward in the cache, and the request's KV no longer matches full attention."""
        self._one_group("a KV policy's eviction")
        if not 0 <= index < len(request.block_ids) - 1:
            raise ValueError(f"block {index} of {len(request.block_ids)} cannot be evicted (the newest block stays)")
        self.pool.release([request.block_ids.pop(index)])
        request.kv_shift += self.block_size
        request.kv_altered = True
        if self._uses_slots:  # KIVI: later cache indices move down a block, the ring's rows with them
            request.kv_ring_shift += self.block_size
            request.kv_prefix_floor = max(0, request.kv_prefix_floor - self.block_size)

    def replace_blocks(self, request: Request, shift: int) -> None:
        """A KV policy has copied what the request keeps into its spare blocks (SnapKV): they become its
        table, its old blocks are released (indexed ones stay cached), and `shift` positions are gone."""
        self._one_group("a KV policy's compaction")
        old, request.block_ids, request.kv_spare_blocks = request.block_ids, request.kv_spare_blocks, []
        self.release(old)
        request.kv_shift += shift
        request.kv_altered = True
        request.kv_prefix_floor = 0  # KIVI: the new blocks start a sequence of their own

    def _one_group(self, what: str) -> None:
        if self.layer_groups > 1:
            raise RuntimeError(f"{what} needs a cache of one layer group (this one has {self.layer_groups})")

    def trim(self, request: Request) -> None:
        """Give back the blocks past those of the request's computed tokens (speculative decoding: the
        KV of rejected proposals), as a step that computed only those would have left it. None of them
        is indexed: only blocks of computed tokens (and a group's prefix hits, which stay) are."""
        computed = self.blocks_needed(request.num_computed_tokens - request.kv_shift)
        for table in self.tables(request):
            # (With one group, indexed blocks are computed ones; a KV policy's evictions may leave fewer.)
            keep = max(computed, table.num_cached_blocks) if self.layer_groups > 1 else computed
            if len(table.block_ids) > keep:
                extra = table.block_ids[keep:]
                del table.block_ids[keep:]
                self.pool.release(list(reversed(extra)))

    def free(self, request: Request) -> None:
        """Return a request's blocks (full cached blocks stay reusable until evicted)."""
        self.release(self.detach(request))

    @property
    def num_free_residual_slots(self) -> int:
        return len(self._free_slots)

    def detach(self, request: Request) -> list[int]:
        """Take a request's blocks from it without freeing them (a prefill instance's connector
        holds them until their KV is pulled, then `release`s them); its ring slot is free at once."""
        if request.kv_residual_slot is not None:
            self._free_slots.append(request.kv_residual_slot)
            request.kv_residual_slot = None
        request.kv_prefix_floor = request.kv_ring_shift = 0
        block_ids = request.block_ids + request.kv_spare_blocks
        for table in request.kv_groups:  # the other layer groups' tables, head first like group 0's
            block_ids += table.block_ids
            table.block_ids, table.num_cached_blocks, table.indexed_parent_id = [], 0, None
        request.block_ids, request.num_cached_blocks, request.indexed_parent_id = [], 0, None
        request.kv_spare_blocks, request.kv_shift, request.kv_altered = [], 0, False
        if request.kv_policy is not None:
            request.kv_policy.reset()
        return block_ids

    def release(self, block_ids: list[int]) -> None:
        """Free detached blocks, the tail first (so a prompt's head stays cached the longest)."""
        self.pool.release(list(reversed(block_ids)))

    def cache_full_blocks(self, request: Request) -> None:
        """Index every block whose tokens are all computed and not yet indexed (in each layer group)."""
        if not self.enable_prefix_caching or request.kv_altered:
            return
        num_full = request.num_computed_tokens // self.block_size
        tokens = request.all_token_ids
        for group, table in enumerate(self.tables(request)):
            if num_full <= table.num_cached_blocks:
                continue
            self._update_hashes(request, table, group, num_full)
            salt = self.salt(request, group)
            parent = table.indexed_parent_id if table.num_cached_blocks else None
            for i in range(table.num_cached_blocks, num_full):
                chunk = tuple(tokens[i * self.block_size : (i + 1) * self.block_size])
                parent = self.pool.register(table.block_ids[i], table.block_hashes[i], chunk, parent, salt)
            table.indexed_parent_id = parent
            table.num_cached_blocks = num_full

    def _update_hashes(self, request: Request, table: Request | LayerGroupBlocks, group: int,
                       num_blocks: int) -> None:
        hashes = table.block_hashes
        tokens = request.all_token_ids
        salt = self.salt(request, group)
        for i in range(len(hashes), num_blocks):
            parent = hashes[i - 1] if i else None
            hashes.append(hash_block(parent, tokens[i * self.block_size : (i + 1) * self.block_size], salt))
