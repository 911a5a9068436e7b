"""llama.cpp's tensor names <-> Hugging Face's, and the q/k row permutation between them.

llama.cpp's converter reorders the rows of every q and k projection of a llama model: Hugging Face
checkpoints rotate the two halves of each head's dimensions (rotate_half, "NeoX" style), llama.cpp's
llama graph rotates adjacent pairs (the original Meta layout). Per head, HF row order
[x_0 .. x_{d/2-1}, y_0 .. y_{d/2-1}] becomes [x_0, y_0, x_1, y_1, ...]. Rows move whole, so the same
permutation applies to quantised rows (each row's blocks stay together) and to biases.
"""

from __future__ import annotations

import re

import torch

# Per-layer tensors: GGUF suffix (after "blk.N.") <-> HF suffix (after "model.layers.N.").
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_HF_LAYER = {v: k for k, v in _LAYER_NAMES.items()}
_HF_GLOBAL = {v: k for k, v in _GLOBAL_NAMES.items()}

_GGUF_LAYER_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")
_HF_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.([a-z_.]+)\.(weight|bias)$")


def hf_name(gguf_name: str) -> str | None:
    """The Hugging Face name of a GGUF tensor; None for tensors with no HF counterpart."""
    if m := _GGUF_LAYER_RE.match(gguf_name):
        layer, part, kind = m.groups()
        return f"model.layers.{layer}.{_LAYER_NAMES[part]}.{kind}" if part in _LAYER_NAMES else None
    base, _, kind = gguf_name.rpartition(".")
    return f"{_GLOBAL_NAMES[base]}.{kind}" if base in _GLOBAL_NAMES else None


def gguf_name(hf: str) -> str | None:
    """The GGUF name of a Hugging Face tensor; None for tensors llama.cpp does not store (rotary tables)."""
    if m := _HF_LAYER_RE.match(hf):
        layer, part, kind = m.groups()
        return f"blk.{layer}.{_HF_LAYER[part]}.{kind}" if part in _HF_LAYER else None
    base, _, kind = hf.rpartition(".")
    return f"{_HF_GLOBAL[base]}.{kind}" if base in _HF_GLOBAL else None


def rope_heads(name: str, num_heads: int, num_kv_heads: int) -> int | None:
    """How many heads a tensor's rows hold when llama.cpp permutes them (q and k only), else None.
    Accepts either naming."""
    if name.endswith(("attn_q.weight", "attn_q.bias", "q_proj.weight", "q_proj.bias")):
        return num_heads
    if name.endswith(("attn_k.weight", "attn_k.bias", "k_proj.weight", "k_proj.bias")):
        return num_kv_heads
    return None


def rope_row_order(rows: int, heads: int, to_gguf: bool) -> torch.Tensor:
    """Row indices that take HF rows to llama.cpp's order (`to_gguf`) or back: `new = old[order]`."""
    half = rows // heads // 2
    if rows != heads * half * 2:
        raise ValueError(f"{rows} rows do not split into {heads} heads of an even size")
    hf = torch.arange(rows).view(heads, 2, half)  # HF: per head, the two halves
    if to_gguf:
        return hf.transpose(1, 2).reshape(-1)  # interleave the halves
    return torch.arange(rows).view(heads, half, 2).transpose(1, 2).reshape(-1)
