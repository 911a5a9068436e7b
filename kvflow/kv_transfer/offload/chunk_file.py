"""The file tier's on-disk format: one *chunk file* per run of consecutive blocks of one sequence.

A chunk file is written once, whole, and never changed (a new file is written under a temporary
name and renamed into place, so a reader sees a complete file or none):

    header   magic "KVFLOWKV", version, header bytes, block count, block size, record bytes, the
             tier's identity digest, then per block: its prefix-cache hash, its parent's hash, the
             CRC-32 of its record, its tokens; then the CRC-32 of all of the above. Padded to 4 KiB.
    records  each block's KV record (`KVCacheSpec.gather_blocks`), each padded to 4 KiB, so one
             block, or a run of them, can be read with O_DIRECT at an aligned offset.

Nothing in a chunk file is trusted that a checksum does not cover: a header that fails its CRC
makes the whole file unreadable (it is deleted), a record that fails its own makes that block a
miss, and a loader also checks the block's hash, parent and tokens against the request it loads
for, so a hash collision or a file from another run is never served.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

MAGIC = b"KVFLOWKV"
VERSION = 1
ALIGN = 4096  # O_DIRECT's alignment (the logical block size of any current SSD, or a multiple of it)
SUFFIX = ".kvchunk"

_FIXED = struct.Struct("<8sIIIIQ16s")  # magic, version, header bytes, blocks, block size, record bytes, identity
_BLOCK = struct.Struct("<qqII")  # hash, parent hash, has a parent, record CRC-32 (the tokens follow as int32)
_CRC = struct.Struct("<I")


class ChunkFormatError(ValueError):
    """A chunk file that is not one of this tier's, or is damaged."""


def align(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


@dataclass(frozen=True)
class BlockEntry:
    """What a chunk file's header says of one of its blocks."""

    key: int  # the block's prefix-cache hash (kvflow/core/kv_cache_manager.py's `hash_block`)
    parent: int | None  # the previous block's hash (None: the sequence's first block)
    crc: int  # CRC-32 of its record
    tokens: tuple[int, ...]


@dataclass(frozen=True)
class ChunkHeader:
    identity: bytes  # 16 bytes: what the tier's KV belongs to (model, KV format, block size)
    block_size: int
    record_bytes: int
    blocks: tuple[BlockEntry, ...]

    @property
    def header_bytes(self) -> int:
        raw = _FIXED.size + len(self.blocks) * (_BLOCK.size + 4 * self.block_size) + _CRC.size
        return align(raw)

    @property
    def slot_bytes(self) -> int:
        """Bytes one record occupies in the file (padded to the alignment)."""
        return align(self.record_bytes)

    @property
    def file_bytes(self) -> int:
        return self.header_bytes + len(self.blocks) * self.slot_bytes

    def record_offset(self, index: int) -> int:
        return self.header_bytes + index * self.slot_bytes

    def encode(self) -> bytes:
        parts = [_FIXED.pack(MAGIC, VERSION, self.header_bytes, len(self.blocks), self.block_size,
                             self.record_bytes, self.identity)]
        for block in self.blocks:
            if len(block.tokens) != self.block_size:
                raise ValueError(f"a block of {len(block.tokens)} tokens in a tier of {self.block_size}-token blocks")
            parent = 0 if block.parent is None else block.parent
            parts.append(_BLOCK.pack(block.key, parent, block.parent is not None, block.crc))
            parts.append(struct.pack(f"<{self.block_size}i", *block.tokens))
        body = b"".join(parts)
        body += _CRC.pack(zlib.crc32(body))
        return body.ljust(self.header_bytes, b"\0")

    @classmethod
    def decode(cls, data: bytes | memoryview, identity: bytes) -> ChunkHeader:
        """Parse and check a header (ChunkFormatError if it is damaged or belongs to another tier)."""
        if len(data) < _FIXED.size:
            raise ChunkFormatError("truncated header")
        magic, version, header_bytes, count, block_size, record_bytes, found = _FIXED.unpack_from(data)
        if magic != MAGIC or version != VERSION:
            raise ChunkFormatError(f"not a version-{VERSION} chunk file")
        raw = _FIXED.size + count * (_BLOCK.size + 4 * block_size)
        if header_bytes != align(raw + _CRC.size) or len(data) < raw + _CRC.size:
            raise ChunkFormatError("truncated header")
        (crc,) = _CRC.unpack_from(data, raw)
        if zlib.crc32(bytes(data[:raw])) != crc:
            raise ChunkFormatError("header checksum mismatch")
        if found != identity:
            raise ChunkFormatError("written for another model, KV format or block size")
        blocks, offset = [], _FIXED.size
        for _ in range(count):
            key, parent, has_parent, block_crc = _BLOCK.unpack_from(data, offset)
            offset += _BLOCK.size
            tokens = struct.unpack_from(f"<{block_size}i", data, offset)
            offset += 4 * block_size
            blocks.append(BlockEntry(key, parent if has_parent else None, block_crc, tokens))
        return cls(identity, block_size, record_bytes, tuple(blocks))


def header_length(data: bytes | memoryview) -> int:
    """The header's size in bytes, from its first bytes (ChunkFormatError if they are not a chunk file's)."""
    if len(data) < _FIXED.size:
        raise ChunkFormatError("truncated header")
    magic, version, header_bytes, *_ = _FIXED.unpack_from(data)
    if magic != MAGIC or version != VERSION:
        raise ChunkFormatError(f"not a version-{VERSION} chunk file")
    return header_bytes


def record_crc(record: bytes | memoryview) -> int:
    return zlib.crc32(record)
