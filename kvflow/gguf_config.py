"""A GGUF file's metadata as the Hugging Face config and generation config it stands for.

It sits at the bottom layer, below `kvflow.config`, so that `ModelConfig.from_pretrained("x.gguf")`
reads a GGUF file the way it reads a `config.json`: one dict, parsed by the same `from_hf_dict`.
The weights, the tokenizer and the writer live in `kvflow/model/gguf/`. Only llama-architecture
files are read (Llama, Mistral and their fine-tunes: what llama.cpp's converter writes as "llama").
"""

from __future__ import annotations

import math
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# GGUF architecture -> the Hugging Face architecture kvflow runs it as.
GGUF_ARCHITECTURES = {"llama": "LlamaForCausalLM"}

# general.file_type -> the model dtype "auto" picks. Quantised files compute in float32: their
# float tensors (norms, and any left unquantised) are F32 in llama.cpp's own files.
_FILE_TYPE_DTYPES = {0: "float32", 1: "float16", 32: "bfloat16"}

# llama.cpp's sampling keys (general.sampling.*) -> generation_config.json's names.
_SAMPLING_KEYS = {
    "temp": "temperature",
    "top_k": "top_k",
    "top_p": "top_p",
    "min_p": "min_p",
    "penalty_repeat": "repetition_penalty",
}

# The tensor llama.cpp writes in place of llama3 rope-scaling metadata: one factor per frequency.
ROPE_FREQS_TENSOR = "rope_freqs.weight"


def is_gguf_path(path: str | os.PathLike) -> bool:
    """A path names a GGUF file by its suffix (a directory never does)."""
    return Path(path).suffix.lower() == ".gguf"


@dataclass(frozen=True)
class GGUFTensorInfo:
    """Where one tensor of a GGUF file lies, and the numpy view gguf's reader gives its bytes."""

    name: str
    tensor_type: Any  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # ggml order, innermost first (a matrix is [cols, rows])
    n_bytes: int
    data_offset: int
    array_shape: tuple[int, ...]  # the view: floats as their dtype, block formats as [rows, row bytes] uint8
    array_dtype: Any  # numpy dtype


@dataclass(frozen=True)
class GGUFFile:
    """A GGUF file's metadata as Python values and its tensors' places, without their bytes (`map_tensors`
    maps them afresh for each reader, so nothing one load writes reaches another)."""

    path: Path
    metadata: dict[str, Any]
    tensors: tuple[GGUFTensorInfo, ...]

    def map_tensors(self) -> Iterator[tuple[GGUFTensorInfo, Any]]:
        """Each tensor with its bytes as a numpy view over a fresh copy-on-write memory map of the file
        (zero-copy and writable, as gguf's reader maps it)."""
        import numpy as np

        data = np.memmap(self.path, dtype=np.uint8, mode="c")
        for t in self.tensors:
            array = data[t.data_offset:t.data_offset + t.n_bytes].view(t.array_dtype)
            yield t, array.reshape(t.array_shape)


def read_gguf(path: str | os.PathLike) -> GGUFFile:
    """The file's metadata and tensor table (`scan_gguf`, or gguf's reader for what the scan leaves), with one
    clear error for a missing, truncated or foreign file. Not cached: a scan takes 0.03-0.1 s, while a 152k-word
    vocabulary's metadata would stay resident (~18 MiB) for the life of the process."""
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"GGUF file {file} does not exist")
    try:
        try:
            parsed = scan_gguf(file)
        except GGUFScanUnsupported:
            parsed = read_with_gguf_reader(file)
    except Exception as exc:  # ValueError, IndexError, struct or Unicode errors on bad bytes
        raise ValueError(f"{file} is not a readable GGUF file ({type(exc).__name__}: {exc})") from None
    size = file.stat().st_size
    for t in parsed.tensors:
        if t.data_offset + t.n_bytes > size:
            raise ValueError(f"{file} is truncated: tensor {t.name} ends at byte {t.data_offset + t.n_bytes}, "
                             f"the file has {size}")
    return parsed


class GGUFScanUnsupported(Exception):
    """A file `scan_gguf` leaves to gguf's reader (byte-swapped files, arrays of arrays)."""


# GGUF value types (gguf.GGUFValueType) -> struct formats, little-endian; 8 is a string, 9 an array.
_SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q",
                   12: "<d"}
_STRING, _ARRAY, _FLOAT32 = 8, 9, 6
# ggml tensor types gguf's reader views as their own numpy dtype (the rest as bytes).
_ELEMENT_DTYPES = {"F16": "<f2", "F32": "<f4", "F64": "<f8", "I8": "<i1", "I16": "<i2", "I32": "<i4", "I64": "<i8"}


class _Cursor:
    """Reads GGUF's little-endian values from `buf` in order."""

    def __init__(self, buf: Any) -> None:
        self.buf, self.pos = buf, 0

    def unpack(self, fmt: str) -> Any:
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.unpack("<Q")
        raw = self.buf[self.pos:self.pos + n]
        if len(raw) != n:
            raise ValueError(f"a string of {n} bytes runs past the end of the file at byte {self.pos}")
        self.pos += n
        return raw.decode("utf-8")

    def value(self, kind: int) -> Any:
        import numpy as np

        if kind == _STRING:
            return self.string()
        if kind != _ARRAY:
            value = self.unpack(_SCALAR_FORMATS[kind])
            return float(str(np.float32(value))) if kind == _FLOAT32 else value  # the shortest decimal: 1e-05
        item, count = self.unpack("<I"), self.unpack("<Q")
        if item == _STRING:
            return [self.string() for _ in range(count)]
        if item == _ARRAY:
            raise GGUFScanUnsupported("an array of arrays")
        array = np.frombuffer(self.buf, np.dtype(_SCALAR_FORMATS[item].replace("?", "b1")), count, self.pos)
        self.pos += array.nbytes
        return array.tolist()


def scan_gguf(path: str | os.PathLike) -> GGUFFile:
    """The GGUF file's metadata and tensor table, read in one pass over its header. gguf's own reader makes
    numpy views of every field's every part (each token and merge of a vocabulary: ~1.6 s and ~130 MiB of
    transient objects on a 49k one, ~5 s on 152k); this gives the same values (tests compare the two) in a
    fraction of that, and hands byte-swapped files and arrays of arrays to the reader."""
    import mmap

    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import quant_shape_to_byte_shape

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        cursor = _Cursor(buf)
        if buf[:4] != b"GGUF":
            raise ValueError("GGUF magic invalid")
        cursor.pos = 4
        version = cursor.unpack("<I")
        if version & 0xFFFF == 0:
            raise GGUFScanUnsupported("a byte-swapped file")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} is not supported (2 and 3 are)")
        tensor_count, kv_count = cursor.unpack("<Q"), cursor.unpack("<Q")
        metadata: dict[str, Any] = {}
        for _ in range(kv_count):
            key = cursor.string()
            kind = cursor.unpack("<I")
            if key in metadata:
                raise ValueError(f"duplicate metadata key {key}")
            metadata[key] = cursor.value(kind)
            if key == "general.alignment" and kind != 4:  # uint32
                raise ValueError("Bad type for general.alignment field")
        table = []
        for _ in range(tensor_count):
            name = cursor.string()
            dims = [cursor.unpack("<Q") for _ in range(cursor.unpack("<I"))]
            table.append((name, dims, cursor.unpack("<I"), cursor.unpack("<Q")))
        alignment = int(metadata.get("general.alignment", 32))
        if alignment <= 0 or alignment & (alignment - 1):
            raise ValueError("Invalid alignment: must be a non-zero power of two")
        start = -(-cursor.pos // alignment) * alignment
    tensors, names = [], set()
    for name, dims, raw_type, offset in table:
        if name in names:
            raise ValueError(f"Found duplicated tensor with name {name}")
        names.add(name)
        ggml_type = GGMLQuantizationType(raw_type)
        n_elements = int(np.prod(dims))
        block_size, type_size = GGML_QUANT_SIZES[ggml_type]
        n_bytes = n_elements * type_size // block_size
        array_shape = tuple(reversed(dims))
        dtype = _ELEMENT_DTYPES.get(ggml_type.name)
        if dtype is None:
            dtype, array_shape = "u1", tuple(quant_shape_to_byte_shape(array_shape, ggml_type))
        tensors.append(GGUFTensorInfo(name, ggml_type, tuple(dims), n_bytes, start + offset, array_shape,
                                      np.dtype(dtype)))
    return GGUFFile(Path(path), metadata, tuple(tensors))


def read_with_gguf_reader(path: str | os.PathLike) -> GGUFFile:
    """What `scan_gguf` reads, by `gguf.GGUFReader`: the reference, and the reader of what the scan leaves."""
    from gguf import GGUFReader

    reader = GGUFReader(path, mode="r")
    tensors = tuple(GGUFTensorInfo(t.name, t.tensor_type, tuple(int(d) for d in t.shape), int(t.n_bytes),
                                   int(t.data_offset), tuple(t.data.shape), t.data.dtype) for t in reader.tensors)
    return GGUFFile(Path(path), read_metadata(reader), tensors)


def read_metadata(reader: Any) -> dict[str, Any]:
    """Every key/value of a `gguf.GGUFReader`'s file as Python values (strings, numbers, lists).
    float32 scalars come back as the shortest decimal that rounds to them (1e-05, not 9.99999974e-06)."""
    import numpy as np
    from gguf import GGUFValueType

    out = {}
    for key, f in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        value = f.contents()
        if f.types == [GGUFValueType.FLOAT32]:
            value = float(str(np.float32(value)))
        out[key] = value
    return out


def gguf_architecture(meta: dict[str, Any], path: str | os.PathLike) -> str:
    arch = meta.get("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported; kvflow reads "
                         f"{', '.join(GGUF_ARCHITECTURES)}-architecture files (Llama, Mistral and their fine-tunes)")
    return str(arch)


def hf_config_from_gguf(path: str | os.PathLike) -> dict[str, Any]:
    """The `config.json` dict a llama-architecture GGUF file stands for; ValueError for anything else."""
    parsed = read_gguf(path)
    meta = parsed.metadata
    arch = gguf_architecture(meta, path)
    tensors = {t.name: t for t in parsed.tensors}

    def key(name: str, default: Any = None) -> Any:
        return meta.get(f"{arch}.{name}", default)

    if key("expert_count", 0):
        raise ValueError(f"{path}: mixture-of-experts GGUF files ({key('expert_count')} experts) are not supported")
    for required in ("embedding_length", "block_count", "feed_forward_length", "attention.head_count"):
        if key(required) is None:
            raise ValueError(f"{path}: GGUF metadata lacks {arch}.{required}")
    if "token_embd.weight" not in tensors:
        raise ValueError(f"{path}: GGUF file has no token_embd.weight tensor")
    hidden, heads = int(key("embedding_length")), int(key("attention.head_count"))
    head_dim = int(key("attention.key_length") or hidden // heads)
    rope_dim = key("rope.dimension_count")
    if rope_dim is not None and int(rope_dim) != head_dim:
        raise ValueError(f"{path}: rotary embedding over {rope_dim} of {head_dim} head dimensions (partial rotary) "
                         "is not supported")
    if key("attention.value_length") not in (None, head_dim):
        raise ValueError(f"{path}: value heads of {key('attention.value_length')} != key heads of {head_dim}")
    file_type = meta.get("general.file_type")
    hf: dict[str, Any] = {
        "architectures": [GGUF_ARCHITECTURES[arch]],
        "model_type": arch,
        "vocab_size": int(tensors["token_embd.weight"].shape[1]),  # ggml dims: [hidden, vocab]
        "hidden_size": hidden,
        "intermediate_size": int(key("feed_forward_length")),
        "num_hidden_layers": int(key("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(key("attention.head_count_kv") or heads),
        "head_dim": head_dim,
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon", 1e-5)),
        "max_position_embeddings": int(key("context_length", 2048)),
        "rope_theta": float(key("rope.freq_base", 10000.0)),
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": "blk.0.attn_q.bias" in tensors,
        "mlp_bias": "blk.0.ffn_up.bias" in tensors,
        "dtype": _FILE_TYPE_DTYPES.get(int(file_type), "float32") if file_type is not None else "float32",
    }
    scaling = _rope_scaling(parsed, arch, head_dim, hf["rope_theta"])
    if scaling is not None:
        hf["rope_scaling"] = scaling
    hf.update(_special_ids(meta))
    return hf


def _rope_scaling(parsed: GGUFFile, arch: str, head_dim: int, theta: float) -> dict[str, Any] | None:
    """Rope scaling from `{arch}.rope.scaling.*`, or llama3's from the per-frequency factors in
    `rope_freqs.weight` (llama.cpp's converter writes llama3 scaling only as that tensor)."""
    kind = parsed.metadata.get(f"{arch}.rope.scaling.type", "none")
    factor = parsed.metadata.get(f"{arch}.rope.scaling.factor")
    for t, factors in parsed.map_tensors():
        if t.name == ROPE_FREQS_TENSOR:
            return llama3_rope_from_factors(factors, head_dim, theta, parsed.path)
    if kind == "none" or (kind == "linear" and factor in (None, 1.0)):
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(factor)}
    return {"rope_type": str(kind)}  # RopeConfig refuses it with the supported list


def llama3_rope_from_factors(factors: Any, head_dim: int, theta: float, path: str | os.PathLike) -> dict[str, Any]:
    """Llama 3's rope scaling parameters that reproduce llama.cpp's per-frequency factors.

    Each frequency f_i = theta^(-2i/d) (wavelength w_i = 2π / f_i) is divided by a factor: 1 above
    the high-frequency cut-off, `factor` below the low one, and 1 / ((1 - s)/factor + s) between,
    where s = (original / w - low) / (high - low) is affine in 1/w. The blended factors give that
    affine map (a / w + b) and `factor`; the cut-offs follow (w_low = -a / b, w_high = a / (1 - b)),
    and any (low, high, original) with those cut-offs gives the same frequencies: with high - low
    = 3 (Llama 3.1's 1 and 4), original = 3a and low = -3b.
    """
    values = [float(v) for v in list(factors.reshape(-1))]
    if len(values) != head_dim // 2:
        raise ValueError(f"{path}: {ROPE_FREQS_TENSOR} has {len(values)} factors, expected {head_dim // 2}")
    factor = max(values)
    if factor <= 1.0:
        return {"rope_type": "default"}
    wavelens = [2 * math.pi * theta ** (2 * i / head_dim) for i in range(head_dim // 2)]
    blended = [(1 / w, (1 / v - 1 / factor) / (1 - 1 / factor)) for v, w in zip(values, wavelens)
               if 1.0 + 1e-6 < v < factor * (1 - 1e-6)]
    if len(blended) < 2:
        raise ValueError(f"{path}: {ROPE_FREQS_TENSOR} does not follow llama3 rope scaling (fewer than two "
                         "blended frequencies to recover its parameters from)")
    n = len(blended)
    mx, my = sum(x for x, _ in blended) / n, sum(y for _, y in blended) / n
    a = sum((x - mx) * (y - my) for x, y in blended) / sum((x - mx) ** 2 for x, _ in blended)
    b = my - a * mx
    return {"rope_type": "llama3", "factor": factor, "low_freq_factor": -3 * b, "high_freq_factor": 3 - 3 * b,
            "original_max_position_embeddings": 3 * a}


def _special_ids(meta: dict[str, Any]) -> dict[str, Any]:
    """bos and every end-of-generation id (eos, eot, eom), as config.json spells them."""
    out: dict[str, Any] = {}
    if (bos := meta.get("tokenizer.ggml.bos_token_id")) is not None:
        out["bos_token_id"] = int(bos)
    eos = [int(meta[k]) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                                  "tokenizer.ggml.eom_token_id") if meta.get(k) is not None]
    if eos:
        out["eos_token_id"] = sorted(set(eos)) if len(set(eos)) > 1 else eos[0]
    if (pad := meta.get("tokenizer.ggml.padding_token_id")) is not None:
        out["pad_token_id"] = int(pad)
    return out


def generation_config_from_gguf(path: str | os.PathLike) -> dict[str, Any]:
    """The `generation_config.json` dict of a GGUF file: special ids and llama.cpp's sampling defaults."""
    meta = read_gguf(path).metadata
    out = _special_ids(meta)
    for key, name in _SAMPLING_KEYS.items():
        if (value := meta.get(f"general.sampling.{key}")) is not None:
            out[name] = value
    if out.get("temperature") == 0.0:
        out["do_sample"] = False
    return out
