"""Training presets: `tiny` (the shipped model) and `smoke` (seconds, for the tests).

A preset fixes everything that decides the result (shapes, data mix, steps, schedule, seed), so
`kvflow train --preset tiny` reproduces the shipped model up to floating-point noise.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

from kvflow.train.data import TaskMix


@dataclass(frozen=True)
class ModelShape:
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0

    def hf_config(self, vocab_size: int, bos: int, eos: int, pad: int):
        from transformers import LlamaConfig

        return LlamaConfig(
            vocab_size=vocab_size, hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers, num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads, max_position_embeddings=self.max_position_embeddings,
            rope_theta=self.rope_theta, rms_norm_eps=1e-5, tie_word_embeddings=True,
            bos_token_id=bos, eos_token_id=eos, pad_token_id=pad, torch_dtype="float32",
        )


@dataclass(frozen=True)
class StageSchedule:
    """Optimisation of one model (the teacher, or the draft by distillation)."""

    steps: int
    tokens_per_step: int
    lr: float
    warmup_steps: int
    # (fraction of steps, sequence length): the context grows as training goes on.
    seq_len_schedule: tuple[tuple[float, int], ...]
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    min_lr_ratio: float = 0.1

    def seq_len_at(self, step: int) -> int:
        for fraction, seq_len in self.seq_len_schedule:
            if step < fraction * self.steps:
                return seq_len
        return self.seq_len_schedule[-1][1]


@dataclass(frozen=True)
class TrainPreset:
    name: str
    vocab_size: int
    model: ModelShape
    draft: ModelShape
    teacher_stage: StageSchedule
    draft_stage: StageSchedule
    mix: TaskMix = field(default_factory=TaskMix)
    # Long-context extension: the trained teacher goes on at full length with a fresh warmup and
    # cosine (as in Llama's long-context continued pretraining), on a mix richer in retrieval.
    extension_stage: StageSchedule | None = None
    extension_mix: TaskMix | None = None
    max_source_files: int | None = None
    heldout_percent: int = 3
    seed: int = 0
    checkpoint_every: int = 100

    def fingerprints(self) -> dict[str, str]:
        """A digest per model stage of everything its checkpoint depends on (its own settings and
        every upstream stage's), so a checkpoint left by a different preset is never resumed."""
        d = asdict(self)
        shared = {k: d[k] for k in ("vocab_size", "max_source_files", "heldout_percent", "seed")}
        teacher = _digest(shared, d["model"], d["teacher_stage"], d["mix"])
        extension = _digest(teacher, d["extension_stage"], d["extension_mix"])
        draft = _digest(extension, d["draft"], d["draft_stage"])
        return {"teacher": teacher, "extension": extension, "draft": draft}


def _digest(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


PRESETS: dict[str, TrainPreset] = {
    "tiny": TrainPreset(
        name="tiny",
        vocab_size=4096,
        model=ModelShape(hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=704),
        draft=ModelShape(hidden_size=128, num_layers=3, num_heads=2, num_kv_heads=1, intermediate_size=352),
        teacher_stage=StageSchedule(
            steps=2000, tokens_per_step=8192, lr=2e-3, warmup_steps=100,
            seq_len_schedule=((0.5, 512), (0.8, 1024), (1.0, 2048)),
        ),
        extension_stage=StageSchedule(steps=800, tokens_per_step=8192, lr=1e-3, warmup_steps=50,
                                      seq_len_schedule=((1.0, 2048),)),
        extension_mix=TaskMix(plain=0.4, passkey=0.35, multikey=0.25),
        draft_stage=StageSchedule(
            steps=1000, tokens_per_step=8192, lr=3e-3, warmup_steps=50,
            seq_len_schedule=((0.5, 512), (1.0, 2048)),
        ),
    ),
    "smoke": TrainPreset(
        name="smoke",
        vocab_size=384,
        model=ModelShape(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=128,
                         max_position_embeddings=512),
        draft=ModelShape(hidden_size=32, num_layers=1, num_heads=1, num_kv_heads=1, intermediate_size=64,
                         max_position_embeddings=512),
        teacher_stage=StageSchedule(steps=12, tokens_per_step=1024, lr=3e-3, warmup_steps=2,
                                    seq_len_schedule=((0.5, 128), (1.0, 256))),
        extension_stage=StageSchedule(steps=4, tokens_per_step=1024, lr=1e-3, warmup_steps=1,
                                      seq_len_schedule=((1.0, 256),)),
        extension_mix=TaskMix(plain=0.4, passkey=0.35, multikey=0.25),
        draft_stage=StageSchedule(steps=6, tokens_per_step=1024, lr=3e-3, warmup_steps=1,
                                  seq_len_schedule=((1.0, 128),)),
        max_source_files=40,
        heldout_percent=10,
        checkpoint_every=5,
    ),
}
