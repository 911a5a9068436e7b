"""SpeContext's retrieval head: the part of a distilled model that scores which context tokens the
target model should read (docs/kv_cache.md, "SpeContext").

A full draft model is far more than scoring needs: SpeContext keeps only the embedding and the
query/key projections of one attention. Ours is that, made small on purpose:

- the embedding is the target's own (shared, as EAGLE-style drafts share it: nothing more is held),
  projected to `embed_dim` per token; an own embedding would be most of the head (the tied
  4096 x 128 embedding is half of `tiny-draft`) and, narrow enough to be cheap, too narrow to tell
  tokens apart, which matching a query to its context needs;
- each query and key reads a short window of tokens (the token and the `window - 1` before it),
  concatenated and projected: the only context mixing, and what lets a key at a value's digits know
  the word before them (`kv["word"] = 1234`), as the target's induction heads do;
- one key per target KV head and `query_heads_per_kv` queries per KV head, with the rotary
  embedding at the tokens' real positions, so scores depend on relative position like the target's.

Keys are a pure function of (token window, position), so they are cached per KV block beside the
target's cache and recomputed from token ids wherever a block's KV arrived by another path
(kvflow/worker/retrieval_keys.py). The head is trained by distilling the target's attention
(`kvflow train --preset tiny-retrieval`, kvflow/train/retrieval.py); a directory holds
`config.json` (architecture `KVFlowRetrievalHead`) and `model.safetensors`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn

ARCHITECTURE = "KVFlowRetrievalHead"


@dataclass(frozen=True)
class RetrievalHeadConfig:
    vocab_size: int  # the target's
    hidden_size: int  # the target's embedding width (the head reads the target's embedding)
    num_kv_heads: int  # the target's: one selection per target KV head
    embed_dim: int = 32  # each token's embedding projected to this
    window: int = 8
    query_heads_per_kv: int = 2  # a KV head's score is the max over these
    head_dim: int = 32
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    target: str = ""  # the model it was distilled from (its name or fingerprint), informative

    @classmethod
    def from_dir(cls, path: str | Path) -> RetrievalHeadConfig:
        file = Path(path) / "config.json"
        try:
            raw = json.loads(file.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path} is not a retrieval head directory: cannot read {file.name} ({exc})") from None
        if ARCHITECTURE not in raw.get("architectures", []):
            raise ValueError(f"{path} is not a retrieval head: config.json architectures is "
                             f"{raw.get('architectures')}, expected [{ARCHITECTURE!r}] (train one with "
                             "`kvflow train --preset tiny-retrieval`)")
        fields = {k: raw[k] for k in cls.__dataclass_fields__ if k in raw}
        return cls(**fields)

    @property
    def key_cache_bytes_per_token(self) -> int:
        """Bytes the engine keeps per token for this head (kvflow/worker/retrieval_keys.py): the keys
        (fp32), and the token window and position each was computed from (int32)."""
        return 4 * (self.num_kv_heads * self.head_dim + self.window + 1)

    def to_json(self) -> dict:
        return {"architectures": [ARCHITECTURE], **asdict(self)}


def token_windows(ids: torch.Tensor, window: int, before: torch.Tensor | None = None) -> torch.Tensor:
    """[..., T] token ids -> [..., T, window]: each token's window (oldest first, itself last), with
    `before` [..., window - 1] the ids preceding the first token (-1 where there are none)."""
    if before is None:
        before = torch.full((*ids.shape[:-1], window - 1), -1, dtype=ids.dtype, device=ids.device)
    padded = torch.cat([before, ids], dim=-1)
    return padded.unfold(-1, window, 1)


class RetrievalHead(nn.Module):
    """Call `attach_embedding` with the target's embedding matrix before use (it is not a parameter
    of the head: neither trained, saved nor counted)."""

    def __init__(self, config: RetrievalHeadConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.embedding: torch.Tensor | None = None
        self.token_proj = nn.Linear(c.hidden_size, c.embed_dim, bias=False)
        self.q_proj = nn.Linear(c.window * c.embed_dim, c.num_kv_heads * c.query_heads_per_kv * c.head_dim, bias=False)
        self.k_proj = nn.Linear(c.window * c.embed_dim, c.num_kv_heads * c.head_dim, bias=False)
        exponents = torch.arange(0, c.head_dim, 2, dtype=torch.float32) / c.head_dim
        self.register_buffer("inv_freq", 1.0 / (c.rope_theta**exponents), persistent=False)

    @property
    def scale(self) -> float:
        return self.config.head_dim**-0.5

    def num_parameters(self) -> int:
        """The head's own parameters (the shared embedding is the target's)."""
        return sum(p.numel() for p in self.parameters())

    def attach_embedding(self, weight: torch.Tensor) -> None:
        """The target's token embedding [vocab_size, hidden_size] (read, never copied or changed)."""
        c = self.config
        if tuple(weight.shape) != (c.vocab_size, c.hidden_size):
            raise ValueError(f"the retrieval head reads a {c.vocab_size} x {c.hidden_size} embedding; the model's "
                             f"is {tuple(weight.shape)[0]} x {tuple(weight.shape)[1]}: distil a head from this model "
                             "(`kvflow train --preset tiny-retrieval --teacher DIR`)")
        self.embedding = weight.detach()

    def _features(self, windows: torch.Tensor) -> torch.Tensor:
        """[..., window] ids (-1: before the sequence) -> [..., window * embed_dim]."""
        if self.embedding is None:
            raise RuntimeError("attach_embedding(the target's embedding) before scoring")
        w = self.token_proj.weight
        vectors = self.token_proj(self.embedding[windows.clamp(min=0)].to(w.dtype))
        return (vectors * (windows >= 0)[..., None].to(w.dtype)).flatten(-2)

    def _rotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotary embedding (rotate-half, as Llama) of x [..., T, heads, head_dim] at positions [..., T]."""
        angles = positions[..., None].float() * self.inv_freq  # [..., T, D/2]
        cos = torch.cat([angles.cos(), angles.cos()], -1)[..., None, :].to(x.dtype)
        sin = torch.cat([angles.sin(), angles.sin()], -1)[..., None, :].to(x.dtype)
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rotated * sin

    def keys(self, windows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """[..., T, window] ids and [..., T] positions -> keys [..., T, kv_heads, head_dim]."""
        c = self.config
        k = self.k_proj(self._features(windows)).unflatten(-1, (c.num_kv_heads, c.head_dim))
        return self._rotate(k, positions)

    def queries(self, windows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """[..., T, window] ids and [..., T] positions -> queries [..., T, kv_heads, group, head_dim]."""
        c = self.config
        q = self.q_proj(self._features(windows)).unflatten(-1, (c.num_kv_heads * c.query_heads_per_kv, c.head_dim))
        q = self._rotate(q, positions)
        return q.unflatten(-2, (c.num_kv_heads, c.query_heads_per_kv))


def load_retrieval_head(path: str | Path, embedding: torch.Tensor, device: torch.device | str = "cpu") -> RetrievalHead:
    """A retrieval head directory -> the module in fp32 (its work is tiny; precision is free), reading
    `embedding`, the target's."""
    from safetensors.torch import load_file

    config = RetrievalHeadConfig.from_dir(path)
    head = RetrievalHead(config)
    file = Path(path) / "model.safetensors"
    if not file.exists():
        raise ValueError(f"{path} is not a retrieval head directory: {file.name} is missing")
    state = load_file(str(file))
    missing = set(head.state_dict()) - set(state)
    unexpected = set(state) - set(head.state_dict())
    if missing or unexpected:
        raise ValueError(f"{file} does not match its config.json: missing {sorted(missing)}, "
                         f"unexpected {sorted(unexpected)}")
    head.load_state_dict(state)
    head = head.to(device).eval()
    head.attach_embedding(embedding)
    return head


def save_retrieval_head(head: RetrievalHead, path: str | Path) -> None:
    from safetensors.torch import save_file

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(head.config.to_json(), indent=2) + "\n")
    save_file({k: v.detach().contiguous().cpu() for k, v in head.state_dict().items()}, str(out / "model.safetensors"))
