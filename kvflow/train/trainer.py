"""The training loop: AdamW, warmup + cosine schedule, gradient clipping, bf16 autocast,
checkpoint/resume, and a progress bar with loss and tokens/s.

One loop serves both stages; what differs is the loss: cross-entropy on the data for the teacher,
KL divergence to the teacher's distribution for the distilled draft.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from kvflow.train.data import TrainingBatches
from kvflow.train.presets import StageSchedule

# (student logits [B, T, V] fp32, targets [B, T], weights [B, T], inputs [B, T]) -> loss
LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class StageResult:
    steps: int
    tokens: int
    wall_seconds: float
    final_loss: float
    final_answer_accuracy: float


def cross_entropy_loss(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor,
                       inputs: torch.Tensor) -> torch.Tensor:
    ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
    return (ce * weights.flatten()).sum() / weights.sum()


def distillation_loss(teacher: torch.nn.Module, autocast: bool) -> LossFn:
    """KL(teacher || student) per position, weighted like the teacher's own loss."""

    def loss(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            teacher_logits = teacher(input_ids=inputs).logits
        teacher_logp = F.log_softmax(teacher_logits.float(), dim=-1)
        student_logp = F.log_softmax(logits, dim=-1)
        kl = (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1)
        return (kl * weights).sum() / weights.sum()

    return loss


def lr_lambda(stage: StageSchedule) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < stage.warmup_steps:
            return (step + 1) / stage.warmup_steps
        progress = (step - stage.warmup_steps) / max(1, stage.steps - stage.warmup_steps)
        cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return stage.min_lr_ratio + (1 - stage.min_lr_ratio) * cosine

    return factor


def make_optimizer(model: torch.nn.Module, stage: StageSchedule) -> torch.optim.Optimizer:
    """Weight decay on matrices only (not on norms), as is usual for transformers."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": stage.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=stage.lr, betas=(0.9, 0.95), eps=1e-8)


def train_stage(model: torch.nn.Module, batches: TrainingBatches, stage: StageSchedule, checkpoint: Path,
                loss_fn: LossFn, desc: str, checkpoint_every: int = 100, autocast: bool = True,
                log_path: Path | None = None, show_progress: bool = True, fingerprint: str = "") -> StageResult:
    """Train `model` in place for `stage.steps` steps, resuming from `checkpoint` if it exists.

    `fingerprint` identifies the settings the checkpoint belongs to; resuming one written under
    other settings is refused rather than silently mixing two runs.
    """
    optimizer = make_optimizer(model, stage)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(stage))
    start_step, elapsed, tokens = 0, 0.0, 0
    loss_value, accuracy = float("nan"), float("nan")
    if checkpoint.exists():
        state = torch.load(checkpoint, weights_only=True)
        found = state.get("fingerprint", "")
        if fingerprint and found and found != fingerprint:
            raise ValueError(f"{checkpoint} was written by different training settings ({found}, now "
                             f"{fingerprint}); remove it, or train into another --out folder")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_step, elapsed, tokens = int(state["step"]), float(state["elapsed"]), int(state["tokens"])
        loss_value, accuracy = float(state["loss"]), float(state["accuracy"])
    model.train()
    bar = tqdm(total=stage.steps, initial=start_step, desc=desc, unit="step", disable=not show_progress)
    log = open(log_path, "a") if log_path is not None else None
    try:
        for step in range(start_step, stage.steps):
            began = time.perf_counter()
            seq_len = stage.seq_len_at(step)
            ids, weights = batches.batch(step, max(1, stage.tokens_per_step // seq_len), seq_len)
            inputs, targets = ids[:, :-1], ids[:, 1:]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                logits = model(input_ids=inputs).logits
            logits = logits.float()
            loss = loss_fn(logits, targets, weights, inputs)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), stage.grad_clip)
            optimizer.step()
            scheduler.step()
            answers = weights > 1
            if answers.any():
                accuracy = (logits.argmax(-1)[answers] == targets[answers]).float().mean().item()
            loss_value = loss.item()
            seconds = time.perf_counter() - began
            elapsed += seconds
            tokens += ids[:, 1:].numel()
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.3f}", ans_acc=f"{accuracy:.2f}", seq=seq_len,
                            tok_s=f"{ids[:, 1:].numel() / seconds:.0f}")
            if log is not None:
                log.write(json.dumps({"step": step + 1, "loss": loss_value, "answer_accuracy": accuracy,
                                      "seq_len": seq_len, "lr": scheduler.get_last_lr()[0],
                                      "grad_norm": float(grad_norm), "seconds": seconds}) + "\n")
                log.flush()
            if (step + 1) % checkpoint_every == 0 or step + 1 == stage.steps:
                _save_checkpoint(checkpoint, model, optimizer, scheduler, step + 1, elapsed, tokens,
                                 loss_value, accuracy, fingerprint)
    finally:
        bar.close()
        if log is not None:
            log.close()
    model.eval()
    return StageResult(stage.steps, tokens, elapsed, loss_value, accuracy)


def _save_checkpoint(path: Path, model, optimizer, scheduler, step: int, elapsed: float, tokens: int,
                     loss: float, accuracy: float, fingerprint: str) -> None:
    """Write to a temporary file and rename, so an interrupted save never corrupts the checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "step": step, "elapsed": elapsed, "tokens": tokens,
                "loss": loss, "accuracy": accuracy, "fingerprint": fingerprint}, tmp)
    os.replace(tmp, path)
