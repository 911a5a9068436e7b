"""`kvflow train --preset tiny-retrieval`: distil a target model's attention into a retrieval head
(kvflow/model/retrieval_head.py) for SpeContext.

What the head must learn is where the target looks, not what it predicts, so the loss is on
attention, not logits: for each KV head h of the target and each query position t, the target's
attention averaged over its layers and the query heads of h's group (one selection serves every
layer: SpeContext's global selection), restricted to the tokens a selection decides on (past the
sinks and before the recent window, which every step reads anyway) and renormalised. The head's
distribution is the mean of its query heads' softmaxes; the loss is KL(target || head), each row
weighted by the target mass it has outside the window (a row that only looks at recent tokens does
not care what is selected). The report gives, on held-out batches, the share of that mass the head's
top-K captures against the oracle's (the target's own top-K).
"""

from __future__ import annotations

import json
import math
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from kvflow.model.retrieval_head import RetrievalHead, RetrievalHeadConfig, save_retrieval_head, token_windows
from kvflow.train.data import TaskMix, TrainingBatches
from kvflow.train.presets import StageSchedule
from kvflow.train.trainer import lr_lambda, make_optimizer


@dataclass(frozen=True)
class RetrievalPreset:
    name: str
    teacher: str  # default teacher directory ("tiny": the shipped model); --teacher overrides
    stage: StageSchedule
    embed_dim: int = 32
    window: int = 8
    query_heads_per_kv: int = 2
    head_dim: int = 32
    mix: TaskMix = field(default_factory=lambda: TaskMix(plain=0.3, passkey=0.35, multikey=0.35))
    sink_tokens: int = 4  # always read: not trained on
    # Not trained on: the newest tokens, which every decode reads anyway (the engine's default specontext
    # window, kvflow.config.SPECONTEXT_DEFAULT_WINDOW, is as long: tokens it leaves to the head must be
    # ones the head learned to score).
    recent_tokens: int = 32
    eval_batches: int = 4
    eval_budgets: tuple[int, ...] = (64, 128, 256)
    max_source_files: int | None = None
    heldout_percent: int = 3
    seed: int = 7
    checkpoint_every: int = 100


RETRIEVAL_PRESETS: dict[str, RetrievalPreset] = {
    "tiny-retrieval": RetrievalPreset(
        name="tiny-retrieval", teacher="tiny",
        # (Training mostly at 2,048 tokens instead, 400 steps, did not recover the needles this head misses
        # more than ~1,000 tokens back at 2,048, and captured less mass: docs/benchmarks.md.)
        stage=StageSchedule(steps=500, tokens_per_step=4096, lr=3e-3, warmup_steps=25,
                            seq_len_schedule=((0.4, 512), (0.8, 1024), (1.0, 2048)), weight_decay=0.0),
    ),
    "smoke-retrieval": RetrievalPreset(
        name="smoke-retrieval", teacher="",
        stage=StageSchedule(steps=6, tokens_per_step=512, lr=3e-3, warmup_steps=1,
                            seq_len_schedule=((1.0, 128),), weight_decay=0.0),
        embed_dim=8, window=4, head_dim=16, eval_batches=1, eval_budgets=(16, 32),
        max_source_files=40, heldout_percent=10, checkpoint_every=3,
    ),
}


def teacher_attention(teacher: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """[B, T] ids -> the teacher's attention [B, kv_heads, T, T], averaged over layers and each KV
    head's group of query heads."""
    config = teacher.config
    with torch.no_grad():
        out = teacher(input_ids=ids, output_attentions=True)
    att = torch.stack(out.attentions).float()  # [L, B, H, T, T]
    layers, b, h, t, _ = att.shape
    kvh = config.num_key_value_heads
    return att.view(layers, b, kvh, h // kvh, t, t).mean(dim=(0, 3))


def candidate_mask(t: int, sink_tokens: int, recent_tokens: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """[T, T] bool: token j is a selection candidate for query t (past the sinks, older than the window)."""
    q = torch.arange(t, device=device)[:, None]
    k = torch.arange(t, device=device)[None, :]
    return (k >= sink_tokens) & (k <= q - recent_tokens)


def head_log_probs(head: RetrievalHead, ids: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """log of the head's attention over candidates, [B, kv_heads, T, T] (the mean over its query heads
    per KV head); rows without candidates are 0 (masked by the caller)."""
    b, t = ids.shape
    windows = token_windows(ids, head.config.window)
    positions = torch.arange(t, device=ids.device).expand(b, t)
    q = head.queries(windows, positions)  # [B, T, KVH, G, D]
    k = head.keys(windows, positions)  # [B, T, KVH, D]
    scores = torch.einsum("bqhgd,bkhd->bhgqk", q, k) * head.scale
    scores = scores.masked_fill(~candidates, float("-inf"))
    logp = torch.log_softmax(scores, dim=-1).nan_to_num(neginf=-1e4)  # rows with no candidate: finite
    return torch.logsumexp(logp, dim=2) - math.log(head.config.query_heads_per_kv)


def distillation_loss(head: RetrievalHead, teacher: torch.nn.Module, ids: torch.Tensor, sink_tokens: int,
                      recent_tokens: int) -> torch.Tensor:
    """KL(target's candidate attention || head's), weighted by the target's mass on candidates."""
    candidates = candidate_mask(ids.shape[1], sink_tokens, recent_tokens, ids.device)
    target = teacher_attention(teacher, ids) * candidates
    mass = target.sum(-1)  # [B, KVH, T]
    target = target / mass.clamp(min=1e-12)[..., None]
    logp = head_log_probs(head, ids, candidates)
    kl = (target * (target.clamp(min=1e-12).log() - logp)).masked_fill(~candidates, 0.0).sum(-1)
    return (kl * mass).sum() / mass.sum().clamp(min=1e-12)


def captured_mass(head: RetrievalHead, teacher: torch.nn.Module, ids: torch.Tensor, budgets: tuple[int, ...],
                  sink_tokens: int, recent_tokens: int, min_query: int = 256) -> dict[str, dict[int, float]]:
    """Share of the target's candidate attention mass inside the head's top-K (max over its query
    heads, as the engine selects) and inside the oracle's own top-K, for queries at t >= min_query."""
    t = ids.shape[1]
    candidates = candidate_mask(t, sink_tokens, recent_tokens, ids.device)
    target = teacher_attention(teacher, ids) * candidates  # [B, KVH, T, T]
    with torch.no_grad():
        windows = token_windows(ids, head.config.window)
        positions = torch.arange(t).expand_as(ids)
        scores = torch.einsum("bqhgd,bkhd->bhgqk", head.queries(windows, positions), head.keys(windows, positions))
        probs = torch.softmax(scores.masked_fill(~candidates, float("-inf")), dim=-1).nan_to_num(0.0).amax(2)
    rows = slice(min(min_query, t - 1), t)
    target, probs = target[:, :, rows], probs[:, :, rows]
    total = target.sum().clamp(min=1e-12)
    out: dict[str, dict[int, float]] = {"head": {}, "oracle": {}}
    for k in budgets:
        k = min(k, t)
        out["head"][k] = float(target.gather(-1, probs.topk(k, dim=-1).indices).sum() / total)
        out["oracle"][k] = float(target.topk(k, dim=-1).values.sum() / total)
    return out


def run_retrieval_training(preset: RetrievalPreset, teacher_dir: Path, out_dir: Path, show_progress: bool = True,
                           threads: int | None = None) -> dict:
    """Train the preset's retrieval head from the teacher at `teacher_dir`; save it to
    <out>/<preset name> with a report (parameters, loss, captured mass)."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    from kvflow.train.corpus import cpython_documents, load_token_stream, split_documents
    from kvflow.train.synthetic import RetrievalTasks

    if threads:
        torch.set_num_threads(threads)
    started = time.time()
    work = out_dir / "work"
    work.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    teacher = LlamaForCausalLM.from_pretrained(teacher_dir, attn_implementation="eager").eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    tc = teacher.config
    train_docs, heldout_docs = split_documents(cpython_documents(preset.max_source_files), preset.heldout_percent)
    stream = load_token_stream(tokenizer, train_docs, work / "train_tokens.npy")
    heldout = load_token_stream(tokenizer, heldout_docs, work / "heldout_tokens.npy")
    batches = TrainingBatches(RetrievalTasks(tokenizer, stream), stream, preset.mix, preset.seed)
    eval_batches = TrainingBatches(RetrievalTasks(tokenizer, heldout), heldout, preset.mix, preset.seed + 1)

    torch.manual_seed(preset.seed)
    config = RetrievalHeadConfig(
        vocab_size=tc.vocab_size, hidden_size=tc.hidden_size, num_kv_heads=tc.num_key_value_heads,
        embed_dim=preset.embed_dim,
        window=preset.window, query_heads_per_kv=preset.query_heads_per_kv, head_dim=preset.head_dim,
        rope_theta=float(getattr(tc, "rope_theta", None) or tc.rope_parameters["rope_theta"]),
        max_position_embeddings=tc.max_position_embeddings, target=str(teacher_dir.name))
    head = RetrievalHead(config)
    head.attach_embedding(teacher.get_input_embeddings().weight)  # shared, frozen: the target's own
    stage = preset.stage
    optimizer = make_optimizer(head, stage)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(stage))
    checkpoint = work / "retrieval.ckpt"
    start, losses = 0, []
    if checkpoint.exists():
        state = torch.load(checkpoint, weights_only=True)
        if state.get("config") != asdict(config):
            raise ValueError(f"{checkpoint} was written for another head ({state.get('config')}); remove it")
        head.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start, losses = int(state["step"]), list(state["losses"])
    bar = tqdm(total=stage.steps, initial=start, desc=f"{preset.name}", unit="step", disable=not show_progress)
    head.train()
    for step in range(start, stage.steps):
        seq_len = stage.seq_len_at(step)
        ids, _ = batches.batch(step, max(1, stage.tokens_per_step // seq_len), seq_len)
        loss = distillation_loss(head, teacher, ids[:, :-1], preset.sink_tokens, preset.recent_tokens)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(head.parameters(), stage.grad_clip)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.3f}", seq=seq_len)
        if (step + 1) % preset.checkpoint_every == 0 or step + 1 == stage.steps:
            tmp = checkpoint.with_suffix(".tmp")
            torch.save({"model": head.state_dict(), "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(), "step": step + 1, "losses": losses,
                        "config": asdict(config)}, tmp)
            tmp.replace(checkpoint)
    bar.close()
    head.eval()

    seq_len = stage.seq_len_schedule[-1][1]
    captured: dict[str, dict[int, list[float]]] = {"head": {}, "oracle": {}}
    for i in range(preset.eval_batches):
        ids, _ = eval_batches.batch(i, 1, seq_len)
        for who, by_k in captured_mass(head, teacher, ids[:, :-1], preset.eval_budgets, preset.sink_tokens,
                                       preset.recent_tokens, min_query=seq_len // 4).items():
            for k, v in by_k.items():
                captured[who].setdefault(k, []).append(v)
    target_dir = out_dir / preset.name
    save_retrieval_head(head, target_dir)
    report = {
        "preset": asdict(preset),
        "teacher": str(teacher_dir),
        "parameters": head.num_parameters(),
        "final_loss": sum(losses[-10:]) / max(1, len(losses[-10:])),
        "first_loss": losses[0] if losses else None,
        "heldout_captured_mass": {who: {str(k): sum(v) / len(v) for k, v in by_k.items()}
                                  for who, by_k in captured.items()},
        "heldout_sequence_length": seq_len,
        "machine": {"platform": platform.platform(), "torch_threads": torch.get_num_threads(),
                    "torch": torch.__version__},
        "command_wall_seconds": time.time() - started,
    }
    (target_dir / "train_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
