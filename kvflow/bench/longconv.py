"""``kvflow bench longconv``: a long-conv model of the `135m` shape (random weights) against itself by
convolution method and against the attention model of the same shape.

Three measurements, each on seeded random weights (speed does not depend on their values):

* **prefill**: one layer's long convolution of N tokens ([1, H, N] with an N-tap kernel) by torch's
  FFT, FlashButterfly (three-pass beyond 8k) and the direct sum (only up to `--direct-max`, it is
  O(N²)), the kernel's spectrum computed inside the timing as a prefill would without a cache; beside
  it one attention layer's causal SDPA over the same N tokens (the 135m shape's 9 query and 3 kv heads
  of 64), up to `--attention-max` (O(N²)). The rest of a layer (projections, MLP) costs the same in
  both families to within 10%, so the mixers are what differ; ×layers gives the whole model's share.
  With `--device cuda` (prefill only): the same on the GPU, CUDA-event timed after two warm-up calls
  (Triton's compile, cuFFT's plans), plus the Triton FlashButterfly (`causal_conv(..., "triton")`: the
  fused kernel to FFT size 2048, the three-pass kernels to 65,536, torch's butterfly beyond), with its
  DFT plans built per call as the model runs it now and cached as an engine would; SDPA forced onto
  flash. Every convolution's output is checked against torch FFT and an fp64 FFT, and torch FFT's time
  over the Triton butterfly's is reported against issue 28's target (>= 1.5x from 8k tokens).
* **decode**: one decode step of the whole model (PyTorch modules, batch 1, bf16 weights prepacked
  for oneDNN as the engine loads them) at each context length, its history / KV filled with random
  values (a step's cost does not depend on them) — the long-conv model's vectorised history sum
  against the attention model's paged attention (torch-native backend), both through the same
  module path (the engine runs attention models through its C++ forward, which is faster still).
* **state**: bytes each token occupies in the paged cache (the KV-cache spec's count) for both.
* **engine prefill** (`--engine-lengths`): the time to first token of one N-token prompt through
  the whole engine (`LLM.generate`, one chunk, no prefix cache), both models saved as directories
  and loaded as a user would: the long-conv model on the PyTorch modules (FFT prefill), the attention
  model on whatever the engine picks (its C++ forward up to 4,096-token chunks, SDPA beyond).

Each figure is the median of `--repeats` runs; the machine is shared, so ratios of runs made moments
apart mean more than absolute times.
"""

from __future__ import annotations

import functools
import json
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

from kvflow.bench.make_model import SHAPES


def median_ms(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm-up (plans, allocations)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def longconv_config(shape: str, kernel_length: int, dtype: str) -> dict[str, Any]:
    from kvflow.model.longconv.checkpoint import longconv_hf_config

    s = SHAPES[shape]
    return longconv_hf_config(s["vocab_size"], s["hidden_size"], s["num_hidden_layers"], s["intermediate_size"],
                              max(kernel_length, 2), kernel_length, squash_lambda=1e-3, smooth_width=1, dtype=dtype)


def attention_config(shape: str, max_len: int, dtype: str) -> dict[str, Any]:
    return {**SHAPES[shape], "architectures": ["LlamaForCausalLM"], "max_position_embeddings": max(max_len, 2048),
            "dtype": dtype}


def bytes_per_token(hf: dict[str, Any]) -> int:
    from kvflow.attention.kv_spec import KVCacheSpec
    from kvflow.config import ModelConfig

    cfg = ModelConfig.from_hf_dict(hf)
    return KVCacheSpec.for_format("auto", cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, 16, cfg.dtype).bytes_per_token


def device_median_ms(fn: Callable[[], Any], repeats: int, device: torch.device) -> float:
    """`median_ms`, on CUDA by CUDA events around each call (two warm-up calls first: Triton's compile, cuFFT's
    plans), each call's time measured to its last kernel's end."""
    if device.type != "cuda":
        return median_ms(fn, repeats)
    for _ in range(2):
        fn()
    torch.cuda.synchronize(device)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def triton_kind(n: int) -> str:
    """Which Triton FlashButterfly form `causal_conv(..., "triton")` takes for N tokens and an N-tap kernel."""
    from kvflow.model.longconv.conv import fft_size
    from kvflow.model.longconv.triton import butterfly as tb

    m = fft_size(n, n)
    if m <= tb.MAX_SIZE:
        return "fused"
    return "three-pass" if m <= tb.MAX_THREE_PASS else "torch butterfly (beyond the Triton kernels)"


def _cached_triton_plans() -> Callable[[], None]:
    """Memoise the DFT matrices and twiddles the Triton butterfly builds on every call (constants of the FFT
    size, which a serving engine would keep); returns the function that restores the per-call plans."""
    from kvflow.model.longconv.triton import butterfly as tb

    saved = tb.butterfly_plan, tb.plan_from_factors
    tb.butterfly_plan = functools.cache(saved[0])
    tb.plan_from_factors = functools.cache(saved[1])

    def restore() -> None:
        tb.butterfly_plan, tb.plan_from_factors = saved

    return restore


def _sdpa(q: torch.Tensor, kv: torch.Tensor) -> tuple[Callable[[], Any], str]:
    """Causal GQA SDPA; on CUDA forced onto the flash backend (GQA by enable_gqa, else kv heads repeated)."""
    sdpa = torch.nn.functional.scaled_dot_product_attention
    if q.device.type != "cuda":
        return partial(sdpa, q, kv, kv, is_causal=True, enable_gqa=True), "default"
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def flash(k: torch.Tensor, **kw: Any) -> torch.Tensor:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return sdpa(q, k, k, is_causal=True, **kw)

    try:
        flash(kv, enable_gqa=True)
        return partial(flash, kv, enable_gqa=True), "flash"
    except RuntimeError:
        repeated = kv.repeat_interleave(q.shape[1] // kv.shape[1], dim=1)
        flash(repeated)
        return partial(flash, repeated), "flash (kv heads repeated)"


def _errors(out: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    err = (out.double() - ref).abs().max().item()
    return {"max_abs_err": err, "rel_err": err / max(ref.abs().max().item(), 1e-30)}


def bench_prefill(shape: str, lengths: list[int], repeats: int, direct_max: int, attention_max: int,
                  max_factor: int, device: str = "cpu", conv_dtype: str = "float32",
                  triton: bool | None = None) -> list[dict[str, Any]]:
    """One layer's long convolution of N tokens by each method (and one attention layer's SDPA), on `device`.
    `triton` (default: on CUDA) adds the Triton FlashButterfly, timed with its DFT plans built per call (as the
    model runs it now) and cached; every convolution's output is checked against torch FFT and an fp64 one."""
    from kvflow.model.longconv.butterfly import butterfly_conv
    from kvflow.model.longconv.conv import causal_conv, direct_conv, fft_conv

    dev = torch.device(device)
    triton = dev.type == "cuda" if triton is None else triton
    s = SHAPES[shape]
    h, layers = s["hidden_size"], s["num_hidden_layers"]
    heads, kv_heads = s["num_attention_heads"], s["num_key_value_heads"]
    head_dim = h // heads
    dtype = getattr(torch, conv_dtype)
    rows = []
    for n in lengths:
        g = torch.Generator().manual_seed(n)
        u = torch.randn(1, h, n, generator=g).to(dev, dtype)
        k = (torch.randn(h, n, generator=g) * 0.01).to(dev, dtype)
        methods: dict[str, Callable[[], Any]] = {"fft": partial(fft_conv, u, k),
                                                 "butterfly": partial(butterfly_conv, u, k, max_factor)}
        if triton:
            methods["butterfly (Triton, plan per call)"] = partial(causal_conv, u, k, "triton")
            methods["butterfly (Triton)"] = partial(causal_conv, u, k, "triton")
        if n <= direct_max:
            methods["direct"] = partial(direct_conv, u, k)
        backend = None
        if n <= attention_max:
            q = torch.randn(1, heads, n, head_dim, generator=g, dtype=torch.bfloat16).to(dev)
            kv = torch.randn(1, kv_heads, n, head_dim, generator=g, dtype=torch.bfloat16).to(dev)
            methods["attention (SDPA, bf16)"], backend = _sdpa(q, kv)
        ref64 = fft_conv(u.double(), k.double())
        ref = fft_conv(u, k)
        for method, fn in methods.items():
            restore = _cached_triton_plans() if method == "butterfly (Triton)" else None
            try:
                ms = device_median_ms(fn, repeats if method != "direct" else 1, dev)
                row: dict[str, Any] = {"tokens": n, "method": method, "layer_ms": round(ms, 4 if dev.type == "cuda"
                                                                                          else 2),
                                       "model_s": round(ms * layers / 1000, 4 if dev.type == "cuda" else 2)}
                if method.startswith("butterfly (Triton"):
                    row["kernel"] = triton_kind(n)
                if method.startswith("attention"):
                    row["backend"] = backend
                elif method != "direct":  # the direct sum is the definition (and O(N²): not run again)
                    out = fn()
                    row["vs_fft"] = _errors(out, ref.double())
                    row["vs_fp64"] = _errors(out, ref64)
            except Exception as e:  # one method failing (a GPU we never ran on) must not lose the others' figures
                if dev.type != "cuda":
                    raise
                row = {"tokens": n, "method": method, "error": f"{type(e).__name__}: {e}"[:500]}
                print(f"prefill {n:>6} tokens  {method:<34} FAILED {row['error']}", flush=True)
                rows.append(row)
                continue
            finally:
                if restore is not None:
                    restore()
            rows.append(row)
            err = f"  rel err vs fft {row['vs_fft']['rel_err']:.1e}" if "vs_fft" in row else ""
            print(f"prefill {n:>6} tokens  {method:<34} {ms:10.3f} ms/layer  {ms * layers / 1000:8.3f} s/model{err}",
                  flush=True)
        del u, k, ref, ref64
    return rows


#: Issue 28's target: the Triton FlashButterfly at least 1.5x faster than torch's FFT from 8k tokens.
BUTTERFLY_TARGET, BUTTERFLY_TARGET_FROM = 1.5, 8192


def butterfly_vs_fft(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per length, torch FFT's time over the Triton butterfly's (both plan variants), and whether the target
    holds at every measured length from BUTTERFLY_TARGET_FROM (on the cached-plan figure; None: none measured)."""
    ms = {(r["tokens"], r["method"]): r["layer_ms"] for r in rows if "layer_ms" in r}
    ratios = []
    for n in sorted({r["tokens"] for r in rows}):
        fft = ms.get((n, "fft"))
        entry: dict[str, Any] = {"tokens": n, "fft_ms": fft}
        for key, method in (("speedup", "butterfly (Triton)"), ("speedup_plan_per_call",
                                                                "butterfly (Triton, plan per call)")):
            t = ms.get((n, method))
            entry[key] = round(fft / t, 3) if fft and t else None
        entry["butterfly_ms"] = ms.get((n, "butterfly (Triton)"))
        ratios.append(entry)
    judged = [e["speedup"] for e in ratios if e["tokens"] >= BUTTERFLY_TARGET_FROM and e["speedup"] is not None]
    judged_per_call = [e["speedup_plan_per_call"] for e in ratios
                       if e["tokens"] >= BUTTERFLY_TARGET_FROM and e["speedup_plan_per_call"] is not None]
    return {"target": BUTTERFLY_TARGET, "from_tokens": BUTTERFLY_TARGET_FROM, "by_length": ratios,
            "met": min(judged) >= BUTTERFLY_TARGET if judged else None,
            "met_plan_per_call": min(judged_per_call) >= BUTTERFLY_TARGET if judged_per_call else None}


def _decode_step(model: torch.nn.Module, cfg: Any, context: int, block_size: int = 16) -> Callable[[], Any]:
    """One decode step at `context` tokens over a cache of random values."""
    from kvflow.attention.kv_spec import KVCacheSpec
    from kvflow.attention.torch_native import TorchNativeBackend
    from kvflow.worker.step_inputs import paged_step_inputs

    spec = KVCacheSpec.for_format("auto", cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, block_size, cfg.dtype)
    blocks = -(-context // block_size)
    caches = spec.allocate(blocks + 1, "cpu")
    for cache in caches:
        cache.normal_(0, 0.5)
    positions, _, meta, _ = paged_step_inputs([context], [1], [list(range(1, blocks + 1))], block_size,
                                              torch.device("cpu"))
    ids = torch.tensor([7])
    backend = TorchNativeBackend()

    @torch.inference_mode()
    def step() -> torch.Tensor:
        backend.prepare(meta)
        hidden = model(ids, positions, caches, meta, backend)
        return model.compute_logits(hidden)

    return step


def bench_decode(shape: str, contexts: list[int], repeats: int, dtype: str) -> list[dict[str, Any]]:
    from kvflow.config import ModelConfig
    from kvflow.model.linear import PrepackedLinear, prepack_available
    from kvflow.model.llama import LlamaForCausalLM
    from kvflow.model.longconv.checkpoint import build_longconv
    from kvflow.model.longconv.model import init_weights

    torch_dtype = getattr(torch, dtype)
    top = max(contexts)
    conv_model = build_longconv(longconv_config(shape, top, dtype))
    init_weights(conv_model, 0)
    conv_model = conv_model.to(torch_dtype).eval()
    conv_model.finish_loading()
    attn_cfg = ModelConfig.from_hf_dict(attention_config(shape, top, dtype))
    attn_model = LlamaForCausalLM(attn_cfg)
    with torch.no_grad():
        for p in attn_model.parameters():
            p.normal_(0, 0.02)
    attn_model = attn_model.to(torch_dtype).eval()
    attn_model.finish_loading()
    if prepack_available(torch.device("cpu"), torch_dtype):  # the engine's bf16 weights: oneDNN-prepacked
        for model in (conv_model, attn_model):
            model.use_linear_method(PrepackedLinear())
    rows = []
    for context in contexts:
        for name, model in (("long-conv", conv_model), ("attention", attn_model)):
            ms = median_ms(_decode_step(model, model.config, context), repeats)
            rows.append({"context": context, "model": name, "step_ms": round(ms, 2),
                         "tokens_per_s": round(1000 / ms, 2)})
            print(f"decode context {context:>6}  {name:<10} {ms:9.1f} ms/token  {1000 / ms:7.2f} tok/s", flush=True)
    return rows


def bench_engine_prefill(shape: str, lengths: list[int], repeats: int, dtype: str) -> list[dict[str, Any]]:
    import tempfile

    from kvflow import LLM, SamplingParams
    from kvflow.bench.make_model import make_model
    from kvflow.model.longconv.checkpoint import build_longconv, save_longconv
    from kvflow.model.longconv.model import init_weights

    rows = []
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    with tempfile.TemporaryDirectory(prefix="kvflow-longconv-") as tmp:
        for n in lengths:
            context = n + 64
            hf = longconv_config(shape, context, dtype)
            conv = build_longconv(hf)
            init_weights(conv, 0)
            conv_dir = save_longconv(conv.to(getattr(torch, dtype)), hf, Path(tmp) / f"longconv-{n}")
            del conv
            attn_dir = make_model(shape, Path(tmp) / f"attention-{n}", dtype=dtype,
                                  overrides={"max_position_embeddings": context})
            vocab = SHAPES[shape]["vocab_size"]
            prompt = torch.randint(3, min(1000, vocab), (n,), generator=torch.Generator().manual_seed(n)).tolist()
            for name, path in (("long-conv", conv_dir), ("attention", attn_dir)):
                llm = LLM(model=str(path), dtype=dtype, max_num_batched_tokens=max(n, 2048),
                          enable_prefix_caching=False, kv_cache_memory=2.0)
                ms = median_ms(partial(llm.generate, [prompt], params, use_tqdm=False), repeats)
                rows.append({"tokens": n, "model": name, "ttft_ms": round(ms, 1)})
                print(f"engine prefill {n:>6} tokens  {name:<10} {ms / 1000:8.2f} s to the first token", flush=True)
                del llm
    return rows


def run_longconv_bench(shape: str = "135m", lengths: tuple[int, ...] = (2048, 8192, 32768),
                       contexts: tuple[int, ...] = (512, 2048, 8192, 32768), repeats: int = 3, direct_max: int = 2048,
                       attention_max: int = 8192, max_factor: int = 64, dtype: str = "bfloat16",
                       decode: bool = True, engine_lengths: tuple[int, ...] = (), device: str = "cpu",
                       conv_dtype: str = "float32", triton: bool | None = None) -> dict[str, Any]:
    """On CUDA only the prefill part runs (the decode and engine parts time the CPU module path)."""
    conv_hf, attn_hf = longconv_config(shape, 2048, dtype), attention_config(shape, 2048, dtype)
    cuda = torch.device(device).type == "cuda"
    result: dict[str, Any] = {
        "shape": shape, "dtype": dtype, "threads": torch.get_num_threads(), "torch": torch.__version__,
        "state_bytes_per_token": {"long-conv": bytes_per_token(conv_hf), "attention": bytes_per_token(attn_hf)},
    }
    if cuda or conv_dtype != "float32":
        result.update(device=device, conv_dtype=conv_dtype)
    if cuda:
        import triton as triton_module

        result.update(gpu=torch.cuda.get_device_name(torch.device(device)), triton=triton_module.__version__)
    result["prefill"] = bench_prefill(shape, list(lengths), repeats, direct_max, attention_max, max_factor,
                                      device, conv_dtype, triton)
    if any(r["method"].startswith("butterfly (Triton") for r in result["prefill"]):
        summary = result["butterfly_vs_fft"] = butterfly_vs_fft(result["prefill"])
        for e in summary["by_length"]:
            print(f"butterfly (Triton) vs torch FFT at {e['tokens']:>6} tokens: {e['speedup']}x "
                  f"(plan per call: {e['speedup_plan_per_call']}x)", flush=True)
        print(f"target >= {summary['target']}x from {summary['from_tokens']} tokens: met={summary['met']} "
              f"(plan per call: {summary['met_plan_per_call']})", flush=True)
    if decode and not cuda:
        result["decode"] = bench_decode(shape, list(contexts), repeats, dtype)
    if engine_lengths and not cuda:
        result["engine_prefill"] = bench_engine_prefill(shape, list(engine_lengths), repeats, dtype)
    return result


def save_report(result: dict[str, Any], out: Path, command: str) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**result, "command": command}, indent=2) + "\n")
