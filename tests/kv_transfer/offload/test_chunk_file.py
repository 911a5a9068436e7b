"""The chunk-file header: a round trip, and every kind of damage refused."""

from __future__ import annotations

import pytest

from kvflow.kv_transfer.offload.chunk_file import (
    ALIGN,
    BlockEntry,
    ChunkFormatError,
    ChunkHeader,
    header_length,
)

IDENTITY = bytes(range(16))


def _header(count: int = 3, block_size: int = 4) -> ChunkHeader:
    blocks = tuple(BlockEntry(100 + i, None if i == 0 else 99 + i, 7 * i, tuple(range(i, i + block_size)))
                   for i in range(count))
    return ChunkHeader(IDENTITY, block_size, 1000, blocks)


def test_round_trip_and_aligned_layout():
    header = _header()
    data = header.encode()
    assert len(data) == header.header_bytes == ALIGN
    assert header.slot_bytes == ALIGN and header.file_bytes == ALIGN + 3 * ALIGN
    assert header.record_offset(2) == 3 * ALIGN
    assert header_length(data) == ALIGN
    decoded = ChunkHeader.decode(data, IDENTITY)
    assert decoded == header
    assert decoded.blocks[0].parent is None and decoded.blocks[1].parent == 100


def test_a_chunk_starting_mid_sequence_keeps_its_first_parent():
    header = ChunkHeader(IDENTITY, 2, 10, (BlockEntry(5, 4, 0, (1, 2)),))
    assert ChunkHeader.decode(header.encode(), IDENTITY).blocks[0].parent == 4


def test_large_headers_span_several_pages():
    header = _header(count=64, block_size=64)  # 64 blocks x (20 + 256) bytes > 4 KiB
    assert header.header_bytes > ALIGN and header.header_bytes % ALIGN == 0
    assert ChunkHeader.decode(header.encode(), IDENTITY) == header


@pytest.mark.parametrize("damage", ["flip", "truncate", "magic", "identity"])
def test_damaged_headers_are_refused(damage):
    data = bytearray(_header().encode())
    identity = IDENTITY
    if damage == "flip":
        data[60] ^= 0x01  # inside the block table
    elif damage == "truncate":
        data = data[:50]
    elif damage == "magic":
        data[:8] = b"NOTKVFLW"
    else:
        identity = bytes(16)
    with pytest.raises(ChunkFormatError):
        ChunkHeader.decode(bytes(data), identity)


def test_block_token_count_must_match_the_block_size():
    header = ChunkHeader(IDENTITY, 4, 10, (BlockEntry(1, None, 0, (1, 2, 3)),))
    with pytest.raises(ValueError, match="3 tokens"):
        header.encode()
