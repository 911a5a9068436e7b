"""The KV-cache spec: the one statement of what a KV block holds.

A block holds `block_size` tokens of every layer's keys and values. Each layer's cache is one tensor
per *component* in the head-major paged layout

    [2 (keys, values), num_blocks, num_kv_heads, block_size, width]

where a component is what is stored per token and kv head: the keys and values themselves (a
dense cache: one component "kv" of the model's dtype, width head_dim), or, for a quantised cache,
codes plus their scales (and zero points), each a component of its own dtype and width. The
formats (`--kv-cache-dtype`, `kvflow.config.KV_CACHE_DTYPES`) map to specs in `for_format`:

    auto / bfloat16 / float16 / float32   one component "kv" [.., head_dim] of that dtype
    int8                                   "codes" int8 [.., head_dim] + "scales" fp32 [.., 1]
                                           (symmetric, one scale per token and kv head; kv_quant.py)
    fp8_e4m3                               "codes" float8_e4m3fn [.., head_dim], and per layer one
                                           fp32 "head_scales" [2, kv_heads, 1]: one scale per kv head
                                           for keys and for values, given (`kv_scale`) or calibrated
                                           from the first prompt (kv_quant.py)
    kivi4 / kivi2                          "codes" uint8 [.., head_dim * bits / 8] (packed) + "meta"
                                           fp16 [.., head_dim / 16] (KIVI's scales and zero points:
                                           per channel and 32-token group for keys, per token and
                                           32-channel group for values), and per layer a "residual"
                                           ring [2, slots, kv_heads, R + 32, head_dim] of the model's
                                           dtype holding each running sequence's newest tokens (kivi.py)

A long-conv model (no attention; kvflow/model/longconv/) keeps per layer and token its conv input,
hidden_size values, in the dense format with one kv head of width hidden_size / 2: the first half of
the channels in the keys plane, the second in the values plane (conv_history.py reads and writes it).

A component held per kv head rather than per token (`per_token=False`), or per running sequence
(`residual=True`, KIVI's ring), is a fixed amount of memory per layer, outside the blocks. KV
transfer does not move per-head scales (both sides must have the same, which is why the wire format
names a given scale and refuses calibrated ones); it does move a KIVI sequence's ring rows, the
newest tokens that are not in its blocks yet (see `gather`). A block's
rows for one kv head are contiguous, which the attention kernels rely on (torch-native, Triton and
the C++ CPU kernel all read every format above in place).

Everything that needs to know the layout asks this spec: the memory budget (bytes per token and
per block, hence the number of blocks), allocation, the attention backends (which say which specs
they support) and KV transfer, which moves a request's tokens with `gather` / `scatter` in a
per-token wire layout independent of the block size, so two instances may page differently.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvflow.attention.kivi import KIVI_DEFAULT_RESIDUAL, KIVI_FORMATS, KIVI_GROUP, meta_width, quantised_length

#: The layouts a spec can describe. Head-major: [2, blocks, kv_heads, block_size, width].
KV_LAYOUTS = ("head_major",)

#: Formats stored as computed, in that dtype (the others are quantised).
DENSE_KV_DTYPES = ("bfloat16", "float16", "float32")

#: A layer's cache: one tensor for a dense spec, one tensor per component otherwise.
LayerKV = torch.Tensor | tuple[torch.Tensor, ...]


@dataclass(frozen=True)
class KVComponent:
    """What a block stores per token and kv head, for keys and values alike."""

    name: str  # "kv" for a dense cache; e.g. "codes", "scales" for a quantised one
    dtype: torch.dtype
    width: int  # elements per token and kv head: head_dim for the keys/values, 1 for a per-token scale
    per_token: bool = True  # False: one row per kv head for the whole layer (a per-head scale)
    residual: bool = False  # KIVI's ring: `residual_window` rows per running sequence (per_token is False)

    @property
    def bytes_per_head(self) -> int:
        """Bytes per token (per layer, if not per token) and kv head, for keys or for values."""
        return self.width * torch.empty((), dtype=self.dtype).element_size()


@dataclass(frozen=True)
class KVCacheSpec:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    components: tuple[KVComponent, ...]
    layout: str = "head_major"
    #: The format's name (`--kv-cache-dtype`, resolved: "auto" becomes the model's dtype).
    kv_dtype: str = ""
    #: fp8_e4m3: the scale given for every layer's keys and values (None: calibrated from the first prompt).
    kv_scale: float | None = None
    #: Quest (`--kv-policy quest`): each block also has, per layer and kv head, the elementwise min
    #: and max of its keys in this dtype, kept beside the cache (kv_policy_ops.py); None: no bounds.
    key_bounds_dtype: torch.dtype | None = None
    #: KIVI: R, the newest tokens each sequence keeps in the model's dtype, and the number of ring slots
    #: (sequences that can run at once).
    residual_tokens: int = 0
    residual_slots: int = 0

    def __post_init__(self) -> None:
        if min(self.num_layers, self.num_kv_heads, self.head_dim, self.block_size) < 1:
            raise ValueError(f"a KV cache needs >= 1 layer, kv head, head_dim and block size, got {self}")
        if not self.components or len({c.name for c in self.components}) != len(self.components):
            raise ValueError("a KV cache spec needs at least one component, each with its own name")
        if self.layout not in KV_LAYOUTS:
            raise ValueError(f"KV layout must be one of {KV_LAYOUTS}, got {self.layout!r}")

    @classmethod
    def dense(cls, num_layers: int, num_kv_heads: int, head_dim: int, block_size: int,
              dtype: torch.dtype) -> KVCacheSpec:
        """Keys and values stored as they are computed, in `dtype`."""
        return cls(num_layers, num_kv_heads, head_dim, block_size, (KVComponent("kv", dtype, head_dim),),
                   kv_dtype=str(dtype).removeprefix("torch."))

    @classmethod
    def for_format(cls, kv_cache_dtype: str, num_layers: int, num_kv_heads: int, head_dim: int, block_size: int,
                   model_dtype: torch.dtype, kv_scale: float | None = None,
                   residual_tokens: int = KIVI_DEFAULT_RESIDUAL, residual_slots: int = 1) -> KVCacheSpec:
        """The spec of a `--kv-cache-dtype` (see the table above) for a model (`residual_*`: KIVI's ring)."""
        if kv_scale is not None and kv_cache_dtype != "fp8_e4m3":
            raise ValueError(f"kv_scale applies to kv_cache_dtype fp8_e4m3, not {kv_cache_dtype}")
        if kv_cache_dtype in KIVI_FORMATS:
            bits = KIVI_FORMATS[kv_cache_dtype]
            if head_dim % KIVI_GROUP or block_size % KIVI_GROUP:
                raise ValueError(f"kv_cache_dtype {kv_cache_dtype} quantises groups of {KIVI_GROUP} channels and "
                                 f"tokens: head_dim ({head_dim}) and block_size ({block_size}) must be multiples "
                                 f"of {KIVI_GROUP}")
            if residual_tokens < 0 or residual_tokens % KIVI_GROUP or residual_slots < 1:
                raise ValueError(f"KIVI's residual window must be a multiple of {KIVI_GROUP} tokens, with at least "
                                 f"one slot; got {residual_tokens} tokens, {residual_slots} slots")
            components = (KVComponent("codes", torch.uint8, head_dim * bits // 8),
                          KVComponent("meta", torch.float16, meta_width(head_dim)),
                          KVComponent("residual", model_dtype, head_dim, per_token=False, residual=True))
            return cls(num_layers, num_kv_heads, head_dim, block_size, components, kv_dtype=kv_cache_dtype,
                       residual_tokens=residual_tokens, residual_slots=residual_slots)
        if kv_cache_dtype == "auto":
            return cls.dense(num_layers, num_kv_heads, head_dim, block_size, model_dtype)
        if kv_cache_dtype == "int8":
            components = (KVComponent("codes", torch.int8, head_dim), KVComponent("scales", torch.float32, 1))
            return cls(num_layers, num_kv_heads, head_dim, block_size, components, kv_dtype="int8")
        if kv_cache_dtype == "fp8_e4m3":
            components = (KVComponent("codes", torch.float8_e4m3fn, head_dim),
                          KVComponent("head_scales", torch.float32, 1, per_token=False))
            return cls(num_layers, num_kv_heads, head_dim, block_size, components, kv_dtype="fp8_e4m3",
                       kv_scale=kv_scale)
        dtype = getattr(torch, kv_cache_dtype, None)
        if kv_cache_dtype not in DENSE_KV_DTYPES or not isinstance(dtype, torch.dtype):
            raise ValueError(f"unknown KV cache dtype {kv_cache_dtype!r}")
        return cls.dense(num_layers, num_kv_heads, head_dim, block_size, dtype)

    @property
    def is_dense(self) -> bool:
        return len(self.components) == 1 and self.components[0].name == "kv"

    @property
    def kivi_bits(self) -> int:
        """KIVI's code width (4 or 2); 0 for other formats."""
        return KIVI_FORMATS.get(self.kv_dtype, 0)

    @property
    def residual_window(self) -> int:
        """KIVI: W = R + G, the ring's rows per sequence (positions p sit at p % W)."""
        return self.residual_tokens + KIVI_GROUP if self.kivi_bits else 0

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of a dense cache (the model's keys and values as stored)."""
        if not self.is_dense:
            raise ValueError("a quantised KV cache has no single dtype; ask its components")
        return self.components[0].dtype

    # ------------------------------------------------------------------ memory
    @property
    def token_components(self) -> tuple[KVComponent, ...]:
        """The components stored per token, in the blocks."""
        return tuple(c for c in self.components if c.per_token)

    @property
    def bytes_per_token_per_layer(self) -> int:
        """Bytes one token occupies in one layer (keys and values, every per-token component)."""
        return 2 * self.num_kv_heads * sum(c.bytes_per_head for c in self.token_components)

    @property
    def fixed_bytes(self) -> int:
        """Bytes of the per-head and per-sequence components of every layer: memory outside the blocks."""
        return self.num_layers * sum(math.prod(self.shape(c, 0)) * c.bytes_per_head // c.width
                                     for c in self.components if not c.per_token)

    @property
    def bytes_per_token(self) -> int:
        """Bytes one token occupies across all layers: what the memory budget divides."""
        return self.num_layers * self.bytes_per_token_per_layer

    @property
    def key_bounds_bytes_per_block(self) -> int:
        """Bytes of a block's Quest key bounds, all layers (0 without them)."""
        if self.key_bounds_dtype is None:
            return 0
        size = torch.empty((), dtype=self.key_bounds_dtype).element_size()
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * size

    @property
    def bytes_per_block(self) -> int:
        return self.block_size * self.bytes_per_token + self.key_bounds_bytes_per_block

    def num_blocks(self, budget_bytes: int) -> int:
        """The most whole blocks a budget holds (after the per-head components)."""
        return max(0, (budget_bytes - self.fixed_bytes) // self.bytes_per_block)

    # -------------------------------------------------------------- allocation
    def shape(self, component: KVComponent, num_blocks: int) -> tuple[int, ...]:
        if component.residual:
            return (2, self.residual_slots, self.num_kv_heads, self.residual_window, component.width)
        if not component.per_token:
            return (2, self.num_kv_heads, component.width)
        return (2, num_blocks, self.num_kv_heads, self.block_size, component.width)

    def allocate(self, num_blocks: int, device: torch.device | str) -> list[LayerKV]:
        """Zeroed caches for every layer: a tensor per layer (dense), else a tuple per layer. Per-head
        scales start at the given `kv_scale`, else at 0, which means "not calibrated yet"."""
        caches: list[LayerKV] = []
        for _ in range(self.num_layers):
            parts = tuple(torch.full(self.shape(c, num_blocks), 0 if c.per_token else (self.kv_scale or 0.0),
                                     dtype=c.dtype, device=device)
                          for c in self.components)
            caches.append(parts[0] if self.is_dense else parts)
        return caches

    def parts(self, layer: LayerKV) -> tuple[torch.Tensor, ...]:
        """A layer's component tensors, in the spec's order."""
        parts = (layer,) if isinstance(layer, torch.Tensor) else tuple(layer)
        if len(parts) != len(self.components):
            raise ValueError(f"a layer cache has {len(parts)} tensors; the spec has {len(self.components)} components")
        return parts

    def num_blocks_of(self, layer: LayerKV) -> int:
        return self.parts(layer)[0].shape[1]

    # ------------------------------------------------------- whole blocks (offload tiers)
    @property
    def block_record_bytes(self) -> int:
        """Bytes of one block's KV as `gather_blocks` lays it out: every layer's per-token components."""
        return self.block_size * self.bytes_per_token

    def _block_parts(self, caches: list[LayerKV]) -> list[tuple[int, torch.Tensor]]:
        """(byte offset in a block record, the part viewed as bytes [2, blocks, kv_heads, block_size, bytes])
        for each layer's per-token components, in record order."""
        if self.kivi_bits or self.key_bounds_dtype is not None:
            raise ValueError("a block record holds a block's per-token KV alone; KIVI's ring rows and Quest's key "
                             "bounds live outside the blocks")
        out, offset = [], 0
        for layer in caches:
            for component, part in zip(self.components, self.parts(layer)):
                if component.per_token:
                    out.append((offset, part.view(torch.uint8)))
                    offset += 2 * self.num_kv_heads * self.block_size * component.bytes_per_head
        return out

    def gather_blocks(self, caches: list[LayerKV], block_ids: list[int], out: torch.Tensor) -> None:
        """Copy whole blocks into `out` (uint8 [len(block_ids), block_record_bytes], on any device): a
        record holds, layer by layer, each per-token component's [2, kv_heads, block_size, width] rows."""
        if tuple(out.shape) != (len(block_ids), self.block_record_bytes) or out.dtype != torch.uint8:
            raise ValueError(f"gather_blocks needs a uint8 [{len(block_ids)}, {self.block_record_bytes}] buffer")
        parts = self._block_parts(caches)
        ids = torch.tensor(block_ids, dtype=torch.long, device=parts[0][1].device)
        for offset, part in parts:
            rows = part.index_select(1, ids).transpose(0, 1)  # [n, 2, H, bs, bytes]
            nbytes = rows[0].numel()
            out[:, offset:offset + nbytes].unflatten(1, rows.shape[1:]).copy_(rows, non_blocking=True)

    def scatter_blocks(self, caches: list[LayerKV], block_ids: list[int], data: torch.Tensor) -> None:
        """Write `gather_blocks` records (uint8 [len(block_ids), block_record_bytes]) into `block_ids`."""
        if tuple(data.shape) != (len(block_ids), self.block_record_bytes) or data.dtype != torch.uint8:
            raise ValueError(f"scatter_blocks needs uint8 [{len(block_ids)}, {self.block_record_bytes}] records")
        parts = self._block_parts(caches)
        ids = torch.tensor(block_ids, dtype=torch.long, device=parts[0][1].device)
        for offset, part in parts:
            shape = (len(block_ids), 2, *part.shape[2:])
            rows = data[:, offset:offset + math.prod(shape[1:])].unflatten(1, shape[1:]).to(part.device)
            part.index_copy_(1, ids, rows.transpose(0, 1))

    # ------------------------------------------------------- per-token transfer
    @property
    def wire_format(self) -> str:
        """What two instances must agree on to exchange KV (block sizes may differ): the components'
        names, dtypes and widths, per layer and kv head."""
        comps = ",".join(f"{c.name}:{str(c.dtype).removeprefix('torch.')}:{c.width}" for c in self.components)
        scale = "" if self.kv_scale is None else f"/scale={self.kv_scale!r}"
        residual = f"/residual={self.residual_tokens}" if self.kivi_bits else ""  # R decides which tokens are dense
        return f"{self.num_layers}x{self.num_kv_heads}x{self.head_dim}/{self.kv_dtype}/{comps}{scale}{residual}"

    @property
    def transferable(self) -> bool:
        """Whether two instances can exchange this KV: per-head scales must be given, not calibrated
        (each instance would calibrate its own from another first prompt)."""
        return all(c.per_token or c.residual for c in self.components) or self.kv_scale is not None

    def wire_split(self, num_tokens: int) -> int:
        """Of a prompt of `num_tokens` whose KV crosses the wire, how many travel as the blocks hold them;
        the rest (KIVI: positions [Q, n), still dense in the sequence's ring) travel in the model's dtype.
        Q is the same on both sides because R is part of the wire format, and a computed prompt's Q does
        not depend on its prefix hit (a hit is never longer than Q: `kivi.shareable_prefix`)."""
        return quantised_length(num_tokens, self.residual_tokens) if self.kivi_bits else num_tokens

    @property
    def residual_bytes_per_token_per_layer(self) -> int:
        """KIVI: bytes of one dense ring token in one layer (keys and values)."""
        return sum(2 * self.num_kv_heads * c.bytes_per_head for c in self.components if c.residual)

    def wire_nbytes(self, num_tokens: int, start: int = 0) -> int:
        """Bytes on the wire of one layer's tokens [start, num_tokens) of a prompt of `num_tokens`."""
        split = self.wire_split(num_tokens)
        return ((max(0, split - start)) * self.bytes_per_token_per_layer
                + (num_tokens - split) * self.residual_bytes_per_token_per_layer)

    def gather_residual(self, layer: LayerKV, slot: int, num_tokens: int) -> torch.Tensor | None:
        """KIVI: a copy of the ring rows of positions [Q, num_tokens) of the sequence in ring `slot`, as
        [2, kv_heads, tokens, head_dim] (None for other formats). Taken while the sequence still owns
        the slot: a prefill instance frees it with the request, before its KV is pulled."""
        if not self.kivi_bits:
            return None
        ring = next(part for c, part in zip(self.components, self.parts(layer)) if c.residual)
        positions = torch.arange(self.wire_split(num_tokens), num_tokens, device=ring.device)
        return ring[:, slot][:, :, positions % self.residual_window].contiguous()

    def gather(self, layer: LayerKV, block_ids: list[int], num_tokens: int, start: int = 0,
               residual: torch.Tensor | None = None) -> torch.Tensor:
        """One layer's tokens [start, num_tokens) of a prompt, as raw bytes: per per-token component, in
        the spec's order, a contiguous [2, kv_heads, tokens, width] array of slots [start, split) of
        `block_ids` (`wire_split`); then, for KIVI, `residual` (`gather_residual`'s rows [split, n))."""
        split = self.wire_split(num_tokens)
        if start > split:
            raise ValueError(f"tokens from {start} on are not all in blocks (the first {split} are)")
        chunks = [_gather_tokens(part, block_ids, split, start).view(torch.uint8).reshape(-1)
                  for c, part in zip(self.components, self.parts(layer)) if c.per_token]
        if self.kivi_bits:
            expected = (2, self.num_kv_heads, num_tokens - split, self.head_dim)
            if residual is None or tuple(residual.shape) != expected:
                raise ValueError(f"a KIVI transfer of {num_tokens} tokens needs its sequence's ring rows {expected}")
            chunks.append(residual.contiguous().view(torch.uint8).reshape(-1))
        return chunks[0] if len(chunks) == 1 else torch.cat(chunks)

    def scatter(self, layer: LayerKV, block_ids: list[int], data: torch.Tensor, start: int = 0,
                num_tokens: int | None = None, residual_slot: int | None = None) -> None:
        """Write `gather`'s bytes for tokens [start, num_tokens) into `block_ids` (other slots untouched)
        and, for KIVI, the dense rows into ring `residual_slot` (`num_tokens` is then required: it
        decides which tokens are which)."""
        if self.kivi_bits:
            if num_tokens is None or residual_slot is None:
                raise ValueError("a KIVI transfer needs the prompt length and the sequence's ring slot")
            split = self.wire_split(num_tokens)
            if data.numel() != self.wire_nbytes(num_tokens, start) or start > split:
                raise ValueError(f"{data.numel()} bytes are not tokens [{start}, {num_tokens}) of this KV cache")
        else:
            split = start + data.numel() // self.bytes_per_token_per_layer
            if (split - start) * self.bytes_per_token_per_layer != data.numel() or (num_tokens or split) != split:
                raise ValueError(f"{data.numel()} bytes are not a whole number of tokens of this KV cache")
        offset = 0
        for component, part in zip(self.components, self.parts(layer)):
            count = (split - start) if component.per_token else (num_tokens or 0) - split
            if not (component.per_token or component.residual) or count <= 0:
                continue
            nbytes = 2 * self.num_kv_heads * count * component.bytes_per_head
            rows = data[offset:offset + nbytes].view(component.dtype).view(2, self.num_kv_heads, count, component.width)
            offset += nbytes
            if component.per_token:
                _scatter_tokens(part, block_ids, rows, start)
            else:
                positions = torch.arange(split, split + count, device=part.device) % self.residual_window
                part[:, residual_slot][:, :, positions] = rows.to(part.device)


def _gather_tokens(cache: torch.Tensor, block_ids: list[int], num_tokens: int, start: int) -> torch.Tensor:
    """Slots [start, num_tokens) of `block_ids` as one contiguous [2, H, T, W] tensor."""
    _, _, heads, block_size, width = cache.shape
    first = start // block_size
    n_blocks = max(0, math.ceil(num_tokens / block_size) - first)
    ids = torch.tensor(block_ids[first:first + n_blocks], dtype=torch.long, device=cache.device)
    blocks = cache.index_select(1, ids)  # [2, nb, H, bs, W]
    tokens = blocks.permute(0, 2, 1, 3, 4).reshape(2, heads, n_blocks * block_size, width)
    offset = first * block_size
    return tokens[:, :, start - offset:num_tokens - offset].contiguous()


def _scatter_tokens(cache: torch.Tensor, block_ids: list[int], tokens: torch.Tensor, start: int) -> None:
    """Write [2, H, T, W] tokens into slots [start, start + T) of `block_ids`."""
    if cache.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):  # index_copy_ has no float8 kernel: copy bytes
        cache, tokens = cache.view(torch.uint8), tokens.view(torch.uint8)
    _, _, heads, block_size, width = cache.shape
    first, skip = divmod(start, block_size)
    block_ids = block_ids[first:]
    if skip and tokens.shape[2]:  # the head of a block another request's tokens fill
        head = min(block_size - skip, tokens.shape[2])
        cache[:, block_ids[0], :, skip:skip + head] = tokens[:, :, :head]
        tokens, block_ids = tokens[:, :, head:], block_ids[1:]
    num_tokens = tokens.shape[2]
    full, rest = divmod(num_tokens, block_size)
    if full:
        ids = torch.tensor(block_ids[:full], dtype=torch.long, device=cache.device)
        blocks = tokens[:, :, : full * block_size].reshape(2, heads, full, block_size, width).permute(0, 2, 1, 3, 4)
        cache.index_copy_(1, ids, blocks.to(cache.dtype))
    if rest:
        cache[:, block_ids[full], :, :rest] = tokens[:, :, full * block_size :]
