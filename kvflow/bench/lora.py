"""``kvflow bench lora``: what serving many adapters in one batch costs against the base model alone.

Configurations, each its own engine on the same model, the same prompts and the same greedy decode
of exactly ``max_tokens`` tokens per request (EOS ignored, no prefix cache):
  base        the base model, LoRA off;
  lora-base   LoRA on, every request on the base (what the slot machinery costs when nobody uses it);
  lora-N      LoRA on, the batch's requests spread round-robin over N adapters (``--adapters``), all
              resident (max_loras = N), every projection adapted at ``--rank``.
Every repeat runs every configuration once, in an order rotated from repeat to repeat, so a ratio to
``base`` compares runs made moments apart; each figure is given as the median over repeats and as the
best run (the target is checked on the best runs: other jobs on a shared machine only add time). The adapters are
random (PEFT's format, written here: a model without adapters of its own needs no download), with
B large enough that outputs differ from the base's, which the report checks.

With ``device="cuda"`` every engine runs on the GPU, LoRA by the Triton shrink/expand kernels
(kvflow/model/triton/lora.py); the bench checks that it does (the model's parameters on CUDA, the
slots holding the kernels, and the kernels called during the untimed warm-up round) rather than
report a silent fallback.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def write_random_adapter(model: str | Path, out: Path, rank: int, seed: int, scale: float = 0.02) -> Path:
    """A LoRA adapter in PEFT's format (adapter_config.json + adapter_model.safetensors) for every projection
    of `model`, A and B drawn with `seed`."""
    from safetensors.torch import save_file

    from kvflow.config import ModelConfig
    from kvflow.model.lora import LORA_TARGETS, shard_shapes

    cfg = ModelConfig.from_pretrained(model)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(cfg.num_layers):
        for module, (projection, shard) in LORA_TARGETS.items():
            _, rows, in_features = shard_shapes(cfg, projection)[shard]
            sub = "self_attn" if projection in ("qkv_proj", "o_proj") else "mlp"
            prefix = f"base_model.model.model.layers.{layer}.{sub}.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, in_features, generator=gen) * scale
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(rows, rank, generator=gen) * scale
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(ALL_TARGETS),
              "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
              "modules_to_save": None, "base_model_name_or_path": str(model), "task_type": "CAUSAL_LM"}
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return out


def _prompts(vocab: int, batch: int, prompt_len: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(10, vocab, (prompt_len,), generator=gen).tolist() for _ in range(batch)]


def _runner(llm: Any) -> Any:
    return llm.engine.core.runner


def check_on_device(llm: Any, device: str, lora: bool) -> None:
    """Raise unless the engine's model lives on `device` and, with LoRA on CUDA, its slots run the Triton kernels."""
    runner = _runner(llm)
    wrong = {str(p.device) for p in runner.model.parameters() if p.device.type != torch.device(device).type}
    if wrong:
        raise RuntimeError(f"the engine was asked for {device} but model parameters are on {sorted(wrong)}")
    if lora and torch.device(device).type == "cuda":
        slots = runner.lora.slots
        if slots.kernels is None:
            raise RuntimeError("LoRA on CUDA without the Triton kernels (kvflow/model/triton/lora.py not importable): "
                               "the torch products would run instead")
        if slots.projections[0]["qkv_proj"].a.device.type != "cuda":
            raise RuntimeError("the LoRA slots are not on CUDA")


class _CountingKernels:
    """The Triton LoRA module with its `lora_add` launches counted (the warm-up round only)."""

    def __init__(self, kernels: Any) -> None:
        self.kernels, self.calls = kernels, 0
        self.run_tiles = kernels.run_tiles

    def lora_add(self, *args: Any) -> None:
        self.calls += 1
        self.kernels.lora_add(*args)


def run_lora_bench(model: str | Path, dtype: str, batch: int, num_adapters: int, rank: int, prompt_len: int,
                   max_tokens: int, repeats: int, adapter_dir: Path, threads: int | None = None,
                   device: str = "cpu") -> dict[str, Any]:
    from kvflow import LLM, SamplingParams
    from kvflow.config import ModelConfig

    if threads:
        torch.set_num_threads(threads)
    cfg = ModelConfig.from_pretrained(model)
    adapters = {f"bench{i}": str(write_random_adapter(model, adapter_dir / f"bench{i}", rank, seed=100 + i))
                for i in range(num_adapters)}
    prompts = _prompts(cfg.vocab_size, batch, prompt_len, seed=0)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    names = list(adapters)
    configs: dict[str, dict[str, Any]] = {
        "base": {"engine": {}, "loras": None},
        "lora-base": {"engine": {"enable_lora": True, "max_loras": num_adapters, "max_lora_rank": rank,
                                 "lora_modules": adapters}, "loras": None},
        f"lora-{num_adapters}": {"engine": {"enable_lora": True, "max_loras": num_adapters, "max_lora_rank": rank,
                                            "lora_modules": adapters},
                                 "loras": [names[i % num_adapters] for i in range(batch)]},
    }
    engines = {}
    for label, spec in configs.items():
        engines[label] = LLM(model=str(model), dtype=dtype, enable_prefix_caching=False, max_num_seqs=batch,
                             max_model_len=prompt_len + max_tokens + 8, device=device, **spec["engine"])
        check_on_device(engines[label], device, bool(spec["engine"]))
    counting: dict[str, _CountingKernels] = {}  # the engines whose LoRA runs the Triton kernels (CUDA)
    for label, spec in configs.items():
        slots = _runner(engines[label]).lora.slots if spec["engine"] else None
        if slots is not None and slots.kernels is not None:
            counting[label] = slots.kernels = _CountingKernels(slots.kernels)
    seconds: dict[str, list[float]] = {label: [] for label in configs}
    outputs: dict[str, list[list[int]]] = {}
    labels = list(configs)
    for r in range(repeats + 1):  # the first round warms up (kernel builds, allocator), untimed
        order = labels[r % len(labels):] + labels[:r % len(labels)]
        for label in order:
            start = time.perf_counter()
            outs = engines[label].generate(prompts, params, lora_request=configs[label]["loras"], use_tqdm=False)
            elapsed = time.perf_counter() - start
            if r:
                seconds[label].append(elapsed)
            outputs[label] = [o.outputs[0].token_ids for o in outs]
        if not r:
            for label, counter in counting.items():  # timed rounds call the kernels directly
                _runner(engines[label]).lora.slots.kernels = counter.kernels
    generated = batch * max_tokens
    # The median, and the best run: on a shared machine other jobs only ever add time, so the best of a few
    # interleaved rounds is the least disturbed estimate of each configuration's own cost.
    results = {label: {"median_s": statistics.median(s), "best_s": min(s),
                       "output_tok_s": generated / statistics.median(s), "best_tok_s": generated / min(s), "runs_s": s}
               for label, s in seconds.items()}
    base = results["base"]
    for entry in results.values():
        entry["vs_base"] = entry["output_tok_s"] / base["output_tok_s"]
        entry["vs_base_best"] = entry["best_tok_s"] / base["best_tok_s"]
    lora_label = f"lora-{num_adapters}"
    on_gpu: dict[str, Any] = {}
    if torch.device(device).type == "cuda":
        on_gpu["gpu"] = torch.cuda.get_device_name(torch.device(device))
    if counting:
        on_gpu["triton_lora_calls_warmup"] = {label: c.calls for label, c in counting.items()}
        if not counting[lora_label].calls:
            raise RuntimeError(f"{lora_label} never called the Triton LoRA kernels its slots hold")
    return {
        "model": str(model), "device": device, **on_gpu, "dtype": dtype, "batch": batch, "adapters": num_adapters,
        "rank": rank,
        "prompt_len": prompt_len, "max_tokens": max_tokens, "repeats": repeats,
        "threads": torch.get_num_threads(), "results": results,
        "lora_base_equals_base": outputs["lora-base"] == outputs["base"],
        "adapters_change_outputs": sum(a != b for a, b in zip(outputs[lora_label], outputs["base"])),
        "target_vs_base": 0.8, "target_met": results[lora_label]["vs_base_best"] >= 0.8,
    }


def format_report(report: dict[str, Any]) -> str:
    lines = [f"kvflow bench lora: {report['model']} ({report['dtype']}, {report.get('device', 'cpu')}"
             + (f": {report['gpu']}" if "gpu" in report else "") + f"), batch {report['batch']}, "
             f"{report['adapters']} adapters of rank {report['rank']}, prompt {report['prompt_len']}, "
             f"{report['max_tokens']} output tokens, median of {report['repeats']}",
             f"{'config':12} {'median s':>9} {'out tok/s':>10} {'vs base':>8} {'best s':>7} {'best tok/s':>10} "
             f"{'vs base':>8}"]
    for label, r in report["results"].items():
        lines.append(f"{label:12} {r['median_s']:9.2f} {r['output_tok_s']:10.1f} {r['vs_base']:8.2f} "
                     f"{r['best_s']:7.2f} {r['best_tok_s']:10.1f} {r['vs_base_best']:8.2f}")
    lines.append(f"lora-base outputs equal base: {report['lora_base_equals_base']}; requests whose output the "
                 f"adapters changed: {report['adapters_change_outputs']}/{report['batch']}; target >= "
                 f"{report['target_vs_base']}x base (best runs): {'met' if report['target_met'] else 'MISSED'}")
    if "triton_lora_calls_warmup" in report:
        lines.append(f"Triton LoRA kernel launches in the warm-up round: {report['triton_lora_calls_warmup']}")
    return "\n".join(lines)
