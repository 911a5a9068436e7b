"""`kvflow train --preset tiny-longconv`: a long-convolution model the size of `tiny`, on tiny's data.

Everything but the sequence mixer is `tiny`'s: its tokenizer (read from the shipped model, so the
two models' perplexities are over the same tokens), its corpus split, seed and data mix (CPython
text with passkey and multi-key retrieval sequences), and the training loop (trainer.py). The model
is kvflow's own `LongConvForCausalLM` (no Hugging Face class exists), trained through its
reference forward (whole sequences by FFT) behind a thin adapter that gives the loop the
`model(input_ids=...).logits` it expects, and saved as an ordinary model directory.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch

from kvflow.model.longconv.checkpoint import build_longconv, longconv_hf_config, save_longconv
from kvflow.model.longconv.model import LongConvForCausalLM, init_weights
from kvflow.train.corpus import cpython_documents, load_token_stream, split_documents
from kvflow.train.data import TaskMix, TrainingBatches
from kvflow.train.presets import PRESETS, StageSchedule, _digest
from kvflow.train.synthetic import RetrievalTasks
from kvflow.train.trainer import cross_entropy_loss, train_stage


@dataclass(frozen=True)
class LongConvPreset:
    name: str
    hidden_size: int
    num_layers: int
    intermediate_size: int
    max_position_embeddings: int
    kernel_length: int
    squash_lambda: float
    smooth_width: int
    stage: StageSchedule
    data_preset: str = "tiny"  # the TrainPreset whose corpus split and seed this one shares
    tokenizer_model: str = "tiny"  # the shipped model whose tokenizer this one uses
    mix: TaskMix = field(default_factory=TaskMix)
    max_source_files: int | None = None
    checkpoint_every: int = 50

    def fingerprint(self) -> str:
        return _digest(asdict(self))


LONGCONV_PRESETS: dict[str, LongConvPreset] = {
    # Budgeted at about 30 minutes on 2 shared cores (tiny's teacher ran 2,000 steps in 69 min, plus 800
    # steps of long-context extension; a long-conv step of 8,192 tokens takes ~0.8 s alone): fewer steps,
    # the context growing to 2,048 as tiny's did, on tiny's extension mix (richer in retrieval).
    "tiny-longconv": LongConvPreset(
        name="tiny-longconv", hidden_size=256, num_layers=4, intermediate_size=384,
        max_position_embeddings=2048, kernel_length=2048, squash_lambda=1e-3, smooth_width=3,
        stage=StageSchedule(steps=1400, tokens_per_step=8192, lr=2e-3, warmup_steps=70,
                            seq_len_schedule=((0.4, 512), (0.7, 1024), (1.0, 2048))),
        mix=TaskMix(plain=0.4, passkey=0.35, multikey=0.25),
    ),
    "smoke-longconv": LongConvPreset(
        name="smoke-longconv", hidden_size=32, num_layers=1, intermediate_size=64, max_position_embeddings=256,
        kernel_length=256, squash_lambda=1e-3, smooth_width=3,
        stage=StageSchedule(steps=4, tokens_per_step=512, lr=3e-3, warmup_steps=1,
                            seq_len_schedule=((1.0, 128),)),
        max_source_files=20, checkpoint_every=2,
    ),
}


class CausalLMAdapter(torch.nn.Module):
    """`adapter(input_ids=ids).logits` [B, T, V] through the model's reference forward: what the trainer calls."""

    def __init__(self, model: LongConvForCausalLM) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=self.model.compute_logits(self.model.full_forward(input_ids)))


def run_longconv_training(preset: LongConvPreset, out_dir: Path, show_progress: bool = True,
                          threads: int | None = None) -> dict:
    """Train the preset's model into `<out>/<name>` (resumable from `<out>/work`); return its report."""
    from transformers import AutoTokenizer

    from kvflow.assets import shipped_model_path

    if threads:
        torch.set_num_threads(threads)
    data = PRESETS[preset.data_preset]
    work = out_dir / "work"
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    tokenizer_dir = shipped_model_path(preset.tokenizer_model)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    train_docs, heldout_docs = split_documents(cpython_documents(preset.max_source_files), data.heldout_percent)
    stream = load_token_stream(tokenizer, train_docs, work / "train_tokens.npy")
    batches = TrainingBatches(RetrievalTasks(tokenizer, stream), stream, preset.mix, data.seed)

    hf = longconv_hf_config(
        len(tokenizer), preset.hidden_size, preset.num_layers, preset.intermediate_size,
        preset.max_position_embeddings, preset.kernel_length, preset.squash_lambda, preset.smooth_width,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    model = build_longconv(hf)
    init_weights(model, data.seed)
    result = train_stage(CausalLMAdapter(model), batches, preset.stage, work / "longconv.ckpt", cross_entropy_loss,
                         preset.name, preset.checkpoint_every, log_path=work / "longconv_log.jsonl",
                         show_progress=show_progress, fingerprint=preset.fingerprint())
    eos_ids = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")]
    generation = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": eos_ids,
                  "pad_token_id": tokenizer.pad_token_id, "do_sample": True, "temperature": 0.8, "top_p": 0.95}
    model_dir = save_longconv(model, hf, out_dir / preset.name, tokenizer, generation)
    for extra in ("chat_template.jinja",):
        if (tokenizer_dir / extra).is_file() and not (model_dir / extra).is_file():
            (model_dir / extra).write_text((tokenizer_dir / extra).read_text())
    report = {
        "preset": {**asdict(preset), "heldout_percent": data.heldout_percent},  # what `kvflow eval` holds out
        "model": {**asdict(result), "parameters": sum(p.numel() for p in model.parameters()),
                  "kernel_parameters": sum(layer.conv.kernel.numel() for layer in model.layers)},
        "corpus": {"train_documents": len(train_docs), "heldout_documents": len(heldout_docs),
                   "train_tokens": int(len(stream)), "tokenizer": preset.tokenizer_model},
        "machine": {"platform": platform.platform(), "torch_threads": torch.get_num_threads(),
                    "torch": torch.__version__},
        "command_wall_seconds": time.time() - started,
    }
    (model_dir / "train_report.json").write_text(json.dumps(report, indent=2))
    return report
