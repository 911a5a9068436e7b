"""`kvflow quantize`'s work: a Hugging Face model directory -> a quantised directory (and/or a GGUF file).

Every linear projection of the decoder layers is quantised; the embedding, the norms and the LM head
stay in the checkpoint's dtype (llama.cpp's q4_k_m keeps the head at 6 bits; a small model's head
is a large share of its weights, but its errors land straight on the logits), unless `lm_head`
quantises the head too: a tied head is then written as a quantised `lm_head.weight` of its own (the
directory's config becomes untied, the embedding stays dense; in a GGUF file, an `output.weight`,
which llama.cpp reads instead of the embedding). A projection whose
width the format cannot split takes the format's fallback (`formats.quantize_fitting`), else stays
dense; the report says which.

Methods: `rtn` rounds each weight to nearest; `awq` first folds activation-aware scales into the
checkpoint (awq.py), searched with this very format's quantiser, then rounds.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from kvflow.model.loader import safetensors_files
from kvflow.model.quant.awq import awq
from kvflow.model.quant.formats import dequantize, get_format, quantize_fitting
from kvflow.model.quant.weights import QuantizedWeight

METHODS = ("rtn", "awq")
_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class QuantizeReport:
    format: str
    method: str
    params: dict[str, int]
    quantized: dict[str, str] = field(default_factory=dict)  # tensor -> format it took (fallbacks show here)
    dense: list[str] = field(default_factory=list)  # projections no format could split
    weight_error: float = 0.0  # ||W - deq(Q(W))|| / ||W|| over the quantised projections (after AWQ's folding)
    bits_per_weight: float = 0.0  # over the quantised projections, scales included
    model_bits_per_weight: float = 0.0  # over every tensor (dense ones at their dtype's bits)
    awq_alphas: dict[str, float] = field(default_factory=dict)
    lm_head: str = "dense"  # "dense", "quantised", or "tied: a quantised copy" (--lm-head)
    seconds: float = 0.0
    outputs: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def is_projection(name: str) -> bool:
    parts = name.split(".")
    return len(parts) >= 2 and parts[-1] == "weight" and parts[-2] in _PROJECTIONS and ".layers." in name


def read_checkpoint(model_dir: str | Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in safetensors_files(model_dir):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                out[name] = f.get_tensor(name)
    return out


def quantize_checkpoint(model_dir: str | Path, fmt: str, *, params: dict[str, int] | None = None, method: str = "rtn",
                        calibration: torch.Tensor | None = None, out_dir: str | Path | None = None,
                        gguf_path: str | Path | None = None, lm_head: bool = False,
                        progress: Callable[[Iterable, str], Iterable] = lambda it, _desc: it) -> QuantizeReport:
    """Quantise `model_dir`'s projections (and with `lm_head` its LM head) to `fmt` and write `out_dir`
    (loadable by kvflow) and/or `gguf_path` (loadable by llama.cpp; GGUF block formats only).
    `calibration`: token ids [samples, length] for `awq`."""
    start = time.perf_counter()
    params = dict(params or {})
    get_format(fmt)  # a clear error for an unknown name before any work
    if method not in METHODS:
        raise ValueError(f"unknown quantisation method {method!r}; supported: {', '.join(METHODS)}")
    if out_dir is None and gguf_path is None:
        raise ValueError("nothing to write: give an output directory and/or a GGUF path")
    if gguf_path is not None and fmt not in ("q8_0", "q4_0", "q4_k"):
        raise ValueError(f"GGUF files hold llama.cpp's block formats (q8_0, q4_0, q4_k), not {fmt}")
    original = read_checkpoint(model_dir)
    dtypes = {name: t.dtype for name, t in original.items()}
    report = QuantizeReport(fmt, method, params)

    def fake_quant(w: torch.Tensor) -> torch.Tensor:
        qw = quantize_fitting(w, fmt, **params)
        return w if qw is None else dequantize(qw)

    weights: dict[str, torch.Tensor | QuantizedWeight]
    if method == "awq":
        if calibration is None:
            raise ValueError("awq needs calibration token ids")
        result = awq(model_dir, calibration, fake_quant, progress=lambda it: progress(it, "awq scales"))
        report.awq_alphas = result.alphas
        weights = {name: t for name, t in result.state_dict.items() if name in original}
    else:
        weights = dict(original)
    err_num = err_den = 0.0
    code_bits = code_weights = 0.0
    for name in progress([n for n in weights if is_projection(n)], "quantising"):
        w = weights[name].float()
        qw = quantize_fitting(w, fmt, **params)
        if qw is None:
            report.dense.append(name)
            continue
        report.quantized[name] = qw.format
        err_num += float((dequantize(qw) - w).pow(2).sum())
        err_den += float(w.pow(2).sum())
        code_bits += qw.nbytes() * 8
        code_weights += w.numel()
        weights[name] = qw
    for name, value in weights.items():  # unquantised tensors keep the checkpoint's dtype
        if not isinstance(value, QuantizedWeight):
            weights[name] = value.to(dtypes[name])
    report.weight_error = (err_num / err_den) ** 0.5 if err_den else 0.0
    report.bits_per_weight = code_bits / code_weights if code_weights else 0.0
    if lm_head:
        tied = "lm_head.weight" not in weights
        head = weights.get("lm_head.weight", weights.get("model.embed_tokens.weight"))
        qhead = None if head is None else quantize_fitting(head.float(), fmt, **params)
        if qhead is None:
            raise ValueError(f"{model_dir}: the LM head has no {fmt} layout (or no head was found); drop --lm-head")
        weights["lm_head.weight"] = qhead
        report.quantized["lm_head.weight"] = qhead.format
        report.lm_head = "tied: a quantised copy" if tied else "quantised"
    total_bits = sum(v.nbytes() * 8 if isinstance(v, QuantizedWeight) else v.numel() * v.element_size() * 8
                     for v in weights.values())
    total_weights = sum(t.numel() for t in original.values())  # the model's parameters (a tied head's copy adds bits)
    report.model_bits_per_weight = total_bits / total_weights
    if out_dir is not None:
        _write_directory(Path(model_dir), Path(out_dir), weights, report)
        report.outputs.append(str(out_dir))
    if gguf_path is not None:
        from kvflow.model.gguf.writer import write_gguf

        report.outputs.append(str(write_gguf(gguf_path, model_dir, weights)))
    report.seconds = time.perf_counter() - start
    return report


def _write_directory(model_dir: Path, out: Path, weights: dict[str, torch.Tensor | QuantizedWeight],
                     report: QuantizeReport) -> None:
    """save_quantized's layout (checkpoint.py), plus quantize_report.json: how it was made, what it cost."""
    from kvflow.model.quant.checkpoint import save_quantized

    hf = json.loads((model_dir / "config.json").read_text())
    hf["quantization_config"] = {"quant_method": "kvflow", "format": report.format, **report.params}
    if report.lm_head != "dense":
        hf["quantization_config"]["lm_head"] = True
        hf["tie_word_embeddings"] = False  # the head is a tensor of its own now: the quantised copy
    save_quantized(out, hf, weights, copy_from=model_dir)
    if (model_dir / "train_report.json").is_file():  # the corpus split the model was trained on (kvflow eval)
        shutil.copyfile(model_dir / "train_report.json", out / "train_report.json")
    (out / "quantize_report.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
