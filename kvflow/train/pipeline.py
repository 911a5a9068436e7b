"""`kvflow train`: tokenizer -> teacher -> long-context extension -> distilled draft -> Hugging Face
directories.

Every stage writes its result under `<out>/work/` and is skipped when that result exists, and
the model stages resume from their last checkpoint, so an interrupted run is restarted with the
same command.
"""

from __future__ import annotations

import json
import platform
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch

from kvflow.train.corpus import cpython_documents, load_token_stream, split_documents
from kvflow.train.data import TrainingBatches
from kvflow.train.presets import ModelShape, TrainPreset
from kvflow.train.synthetic import RetrievalTasks
from kvflow.train.tokenizer import train_tokenizer
from kvflow.train.trainer import StageResult, cross_entropy_loss, distillation_loss, train_stage


def build_model(shape: ModelShape, tokenizer, seed: int) -> torch.nn.Module:
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    config = shape.hf_config(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config)


def export_model(model: torch.nn.Module, tokenizer, out_dir: Path, eos_ids: list[int]) -> None:
    """Save as a Hugging Face directory (safetensors + tokenizer + generation config)."""
    from transformers import GenerationConfig

    out_dir.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=eos_ids, pad_token_id=tokenizer.pad_token_id,
        do_sample=True, temperature=0.8, top_p=0.95,
    )
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def run_training(preset: TrainPreset, out_dir: Path, show_progress: bool = True, threads: int | None = None) -> dict:
    """Train the preset's tokenizer, teacher and draft; return (and save) a report."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    if threads:
        torch.set_num_threads(threads)
    work = out_dir / "work"
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    train_docs, heldout_docs = split_documents(cpython_documents(preset.max_source_files), preset.heldout_percent)

    tok_dir = work / "tokenizer"
    if not (tok_dir / "tokenizer.json").exists():
        train_tokenizer(tok_dir, preset.vocab_size, (d.text for d in train_docs),
                        model_max_length=preset.model.max_position_embeddings)
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    stream = load_token_stream(tokenizer, train_docs, work / "train_tokens.npy")
    batches = TrainingBatches(RetrievalTasks(tokenizer, stream), stream, preset.mix, preset.seed)
    eos_ids = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")]

    fingerprints = preset.fingerprints()
    teacher_dir = out_dir / preset.name
    teacher = build_model(preset.model, tokenizer, preset.seed)
    teacher_result = train_stage(
        teacher, batches, preset.teacher_stage, work / "teacher.ckpt", cross_entropy_loss, f"{preset.name} teacher",
        preset.checkpoint_every, log_path=work / "teacher_log.jsonl", show_progress=show_progress,
        fingerprint=fingerprints["teacher"])
    extension_result = None
    if preset.extension_stage is not None:
        extension_batches = TrainingBatches(batches.tasks, stream, preset.extension_mix or preset.mix,
                                            preset.seed + 2)
        extension_result = train_stage(
            teacher, extension_batches, preset.extension_stage, work / "extension.ckpt", cross_entropy_loss,
            f"{preset.name} long-context", preset.checkpoint_every, log_path=work / "extension_log.jsonl",
            show_progress=show_progress, fingerprint=fingerprints["extension"])
    export_model(teacher, tokenizer, teacher_dir, eos_ids)

    teacher = LlamaForCausalLM.from_pretrained(teacher_dir).eval()  # exactly what ships
    for p in teacher.parameters():
        p.requires_grad_(False)
    draft_dir = out_dir / f"{preset.name}-draft"
    draft = build_model(preset.draft, tokenizer, preset.seed + 1)
    draft_batches = TrainingBatches(batches.tasks, stream, preset.mix, preset.seed + 1)
    draft_result = train_stage(
        draft, draft_batches, preset.draft_stage, work / "draft.ckpt", distillation_loss(teacher, True),
        f"{preset.name} draft", preset.checkpoint_every, log_path=work / "draft_log.jsonl",
        show_progress=show_progress, fingerprint=fingerprints["draft"])
    export_model(draft, tokenizer, draft_dir, eos_ids)

    report = {
        "preset": asdict(preset),
        "teacher": _stage_report(teacher_result, teacher),
        "extension": _stage_report(extension_result, teacher) if extension_result else None,
        "draft": _stage_report(draft_result, draft),
        "corpus": {"train_documents": len(train_docs), "heldout_documents": len(heldout_docs),
                   "train_tokens": int(len(stream))},
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "torch_threads": torch.get_num_threads(), "torch": torch.__version__},
        "command_wall_seconds": time.time() - started,
    }
    (out_dir / "train_report.json").write_text(json.dumps(report, indent=2))
    for directory in (teacher_dir, draft_dir):
        shutil.copy(out_dir / "train_report.json", directory / "train_report.json")
    return report


def _stage_report(result: StageResult, model: torch.nn.Module) -> dict:
    return {**asdict(result), "parameters": sum(p.numel() for p in model.parameters())}
