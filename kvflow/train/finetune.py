"""`kvflow train --finetune --from DIR`: fine-tuned variants of a model, to serve beside it.

Two kinds, each trained on one slice of the corpus so that variants measurably differ:
- `--method lora`: a LoRA adapter trained with PEFT (the format's owner), saved in PEFT's format
  (`adapter_config.json` + `adapter_model.safetensors`), which `--lora-modules` serves;
- `--method top-layers`: a full model directory in which only the top `--top-layers` decoder layers
  (and the final norm) were trained, the rest left bit-identical to the base: the variants
  BlockLLM's block zoo shares layers between.

Slices: `prose` (the pydoc topics: English documentation) and `code` (the standard library's
source). The report gives each slice's held-out loss before and after, so the change is measured,
not assumed.
"""

from __future__ import annotations

import json
import math
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from kvflow.train.corpus import Document, cpython_documents, load_token_stream, split_documents
from kvflow.train.data import TaskMix, TrainingBatches
from kvflow.train.presets import StageSchedule
from kvflow.train.synthetic import RetrievalTasks
from kvflow.train.trainer import cross_entropy_loss, train_stage

SLICES: dict[str, Callable[[Document], bool]] = {
    "prose": lambda d: d.name.startswith("pydoc:"),
    "code": lambda d: d.name.endswith(".py"),
}
METHODS = ("lora", "top-layers")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class FinetuneSettings:
    slice: str = "code"
    method: str = "lora"
    steps: int = 200
    tokens_per_step: int = 4096
    seq_len: int = 256
    lr: float = 2e-3  # LoRA's usual rate; top-layers takes a tenth of it
    lora_rank: int = 8
    lora_alpha: int = 16
    top_layers: int = 1
    seed: int = 0
    eval_tokens: int = 16384  # held-out tokens per slice in the report
    max_source_files: int | None = None  # the standard library's first N files only (tests)

    def __post_init__(self) -> None:
        if self.slice not in SLICES:
            raise ValueError(f"--slice must be one of {', '.join(SLICES)}, got {self.slice!r}")
        if self.method not in METHODS:
            raise ValueError(f"--method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.steps < 1 or self.lora_rank < 1 or self.top_layers < 1:
            raise ValueError("--steps, --lora-rank and --top-layers must be >= 1")


def _peft():
    try:
        import peft
    except ImportError:
        raise SystemExit("kvflow: error: LoRA fine-tuning needs PEFT: pip install 'kvflow[train]'") from None
    return peft


def heldout_loss(model: torch.nn.Module, stream: np.ndarray, seq_len: int, tokens: int) -> float:
    """Mean next-token cross-entropy over the first `tokens` of a held-out stream, in windows of `seq_len`."""
    total, count = 0.0, 0
    usable = min(len(stream) - 1, tokens)
    with torch.no_grad():
        for start in range(0, usable - seq_len + 1, seq_len):
            ids = torch.from_numpy(stream[start:start + seq_len + 1].astype(np.int64))[None]
            logits = model(input_ids=ids[:, :-1]).logits.float()
            total += torch.nn.functional.cross_entropy(logits[0], ids[0, 1:], reduction="sum").item()
            count += seq_len
    return total / max(count, 1)


def run_finetune(base: Path, out: Path, settings: FinetuneSettings, show_progress: bool = True,
                 threads: int | None = None) -> dict:
    """Fine-tune `base` (a Hugging Face Llama directory) on a slice; write the variant to `out`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if threads:
        torch.set_num_threads(threads)
    started = time.time()
    torch.manual_seed(settings.seed)
    tokenizer = AutoTokenizer.from_pretrained(base)
    docs = cpython_documents(settings.max_source_files)
    streams: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    work = out.parent / f"{out.name}.work"
    for name, keep in SLICES.items():
        train_docs, heldout_docs = split_documents([d for d in docs if keep(d)])
        streams[name] = (load_token_stream(tokenizer, train_docs, work / f"{name}_train.npy"),
                         load_token_stream(tokenizer, heldout_docs, work / f"{name}_heldout.npy"))
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model.eval()
    before = {name: heldout_loss(model, held, settings.seq_len, settings.eval_tokens)
              for name, (_, held) in streams.items()}

    if settings.method == "lora":
        peft = _peft()
        config = peft.LoraConfig(r=settings.lora_rank, lora_alpha=settings.lora_alpha,
                                 target_modules=list(LORA_TARGETS), lora_dropout=0.0, bias="none",
                                 task_type="CAUSAL_LM")
        model = peft.get_peft_model(model, config)
        lr = settings.lr
    else:
        layers = model.model.layers
        if settings.top_layers > len(layers):
            raise ValueError(f"--top-layers {settings.top_layers}: the model has {len(layers)} layers")
        for p in model.parameters():
            p.requires_grad_(False)
        for layer in layers[len(layers) - settings.top_layers:]:
            for p in layer.parameters():
                p.requires_grad_(True)
        model.model.norm.weight.requires_grad_(True)
        lr = settings.lr / 10
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    train_stream = streams[settings.slice][0]
    batches = TrainingBatches(RetrievalTasks(tokenizer, train_stream), train_stream,
                              TaskMix(plain=1.0, passkey=0.0, multikey=0.0), settings.seed)
    stage = StageSchedule(steps=settings.steps, tokens_per_step=settings.tokens_per_step, lr=lr,
                          warmup_steps=max(1, settings.steps // 20), seq_len_schedule=((1.0, settings.seq_len),),
                          weight_decay=0.0)
    checkpoint = work / "finetune.ckpt"
    checkpoint.unlink(missing_ok=True)  # a short run: always from the base
    result = train_stage(model, batches, stage, checkpoint, cross_entropy_loss,
                         f"finetune {settings.method} on {settings.slice}", settings.steps,
                         log_path=work / "finetune_log.jsonl", show_progress=show_progress)
    checkpoint.unlink(missing_ok=True)
    model.eval()
    after = {name: heldout_loss(model, held, settings.seq_len, settings.eval_tokens)
             for name, (_, held) in streams.items()}

    out.mkdir(parents=True, exist_ok=True)
    if settings.method == "lora":
        model.save_pretrained(out, safe_serialization=True)
    else:
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
        for name in ("generation_config.json", "chat_template.jinja"):
            if (base / name).is_file() and not (out / name).exists():
                (out / name).write_bytes((base / name).read_bytes())
    report = {
        "base": str(base), "settings": asdict(settings), "trainable_parameters": trainable,
        "heldout_loss_before": before, "heldout_loss_after": after,
        "heldout_perplexity_before": {k: math.exp(v) for k, v in before.items()},
        "heldout_perplexity_after": {k: math.exp(v) for k, v in after.items()},
        "final_train_loss": result.final_loss, "train_seconds": result.wall_seconds,
        "machine": {"platform": platform.platform(), "torch_threads": torch.get_num_threads()},
        "command_wall_seconds": time.time() - started,
    }
    (out / "finetune_report.json").write_text(json.dumps(report, indent=2))
    return report
