"""The GPU paths of `kvflow bench longconv`, `kvflow bench lora` and `kvflow bench specontext` (the Triton
FlashButterfly timed beside torch's FFT; the engines' LoRA through the Triton kernels, counted; every SpeContext
bench engine on the Triton attention backend), run here on CPU under TRITON_INTERPRET=1 at toy sizes
(compiled on CUDA by .ci/gpu when a GPU is present)."""

from __future__ import annotations

import functools
import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("triton was imported without TRITON_INTERPRET=1 and there is no GPU: its kernels "
                    "cannot run here", allow_module_level=True)
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton's first import: jit reads it then
pytest.importorskip("triton")

from kvflow.bench import longconv  # noqa: E402
from kvflow.bench.make_model import SHAPES  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
           vocab_size=128, tie_word_embeddings=True, max_position_embeddings=256, rope_theta=10000.0)


def test_longconv_prefill_with_triton(monkeypatch):
    monkeypatch.setitem(SHAPES, "toy", TOY)
    result = longconv.run_longconv_bench("toy", (64, 300), repeats=1, direct_max=64, attention_max=64, decode=False,
                                         device=DEVICE, triton=True)
    rows = {(r["tokens"], r["method"]): r for r in result["prefill"]}
    for n in (64, 300):
        for method in ("butterfly (Triton)", "butterfly (Triton, plan per call)"):
            row = rows[n, method]
            assert row["kernel"] == "fused" and row["layer_ms"] > 0
            assert row["vs_fft"]["rel_err"] < 1e-5 and row["vs_fp64"]["rel_err"] < 1e-5
    assert [e["tokens"] for e in result["butterfly_vs_fft"]["by_length"]] == [64, 300]
    assert result["butterfly_vs_fft"]["met"] is None  # nothing measured from 8k tokens
    from kvflow.model.longconv.triton import butterfly as tb

    assert not hasattr(tb.butterfly_plan, "cache_info")  # the cached plans were put back
    assert longconv.triton_kind(1024) == "fused" and longconv.triton_kind(32768) == "three-pass"
    assert longconv.triton_kind(65536).startswith("torch butterfly")


def test_lora_bench_runs_the_triton_kernels(monkeypatch, tmp_path):
    """With the Triton kernels in the slots (as on CUDA), the engines' LoRA calls them and the adapters still change
    outputs; on CPU the Python forward is forced (the C++ one computes LoRA itself)."""
    import kvflow
    from kvflow.bench.lora import run_lora_bench, write_random_adapter
    from kvflow.bench.make_model import make_model
    from kvflow.model import lora
    from kvflow.model.triton import lora as lora_triton

    init = lora.LoRASlots.__init__

    def with_kernels(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.kernels = lora_triton

    if DEVICE == "cpu":
        monkeypatch.setattr(lora.LoRASlots, "__init__", with_kernels)
        monkeypatch.setattr(kvflow, "LLM", functools.partial(kvflow.LLM, cpu_kernels=False))
    # Large enough that the tiny model's greedy tokens change.
    monkeypatch.setattr("kvflow.bench.lora.write_random_adapter", functools.partial(write_random_adapter, scale=0.5))
    model = make_model("tiny", tmp_path / "m", dtype="float32")
    report = run_lora_bench(model, "float32", batch=4, num_adapters=2, rank=4, prompt_len=8, max_tokens=2, repeats=1,
                            adapter_dir=tmp_path / "a", device=DEVICE)
    calls = report["triton_lora_calls_warmup"]
    assert calls["lora-2"] > 0 and calls["lora-base"] == 0
    assert report["lora_base_equals_base"] is True and report["adapters_change_outputs"] > 0


def test_specontext_bench_on_the_triton_backend(monkeypatch, tmp_path):
    """Every method's engine on the Triton attention backend (as on CUDA, where the bench requires it), warmed up
    on the timed batch: Quest and SpeContext read their subsets through the Triton decode, SpeContext's counters
    move, and HF generate runs on the same device. On CPU the interpreter runs the kernels (the C++ forward off)."""
    import kvflow
    from kvflow.bench.make_model import make_model
    from kvflow.bench.specontext import format_report, run_specontext_bench

    if DEVICE == "cpu":
        monkeypatch.setattr(kvflow, "LLM", functools.partial(kvflow.LLM, attention_backend="triton", cpu_kernels=False))
    model = make_model("tiny", tmp_path / "m", dtype="float32", tokenizer=True)
    results = run_specontext_bench(str(model), "float32", (2,), prompt_len=80, max_tokens=3, budget=32,
                                   device=DEVICE, log=lambda _: None)
    assert results["attention_backend"] == {"full": "triton", "quest": "triton", "specontext": "triton"}
    rows = {r["method"]: r for r in results["runs"]}
    assert set(rows) == {"full", "quest", "specontext", "hf-generate"}
    assert rows["specontext"]["specontext_moved_bytes_per_step"] > 0
    assert rows["hf-generate"]["output_tokens"] == 2 * 3
    assert "triton attention" in format_report(results)
