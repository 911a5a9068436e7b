"""``kvflow bench longconv``: a long-conv model of the `135m` shape (random weights) against itself by
convolution method and against the attention model of the same shape.

Three measurements, each on seeded random weights (speed does not depend on their values):

* **prefill**: one layer's long convolution of N tokens ([1, H, N] with an N-tap kernel) by torch's
  FFT, FlashButterfly (three-pass beyond 8k) and the direct sum (only up to `--direct-max`, it is
  O(N²)), the kernel's spectrum computed inside the timing as a prefill would without a cache; beside
  it one attention layer's causal SDPA over the same N tokens (the 135m shape's 9 query and 3 kv heads
  of 64), up to `--attention-max` (O(N²)). The rest of a layer (projections, MLP) costs the same in
  both families to within 10%, so the mixers are what differ; ×layers gives the whole model's share.
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


def bench_prefill(shape: str, lengths: list[int], repeats: int, direct_max: int, attention_max: int,
                  max_factor: int) -> list[dict[str, Any]]:
    from kvflow.model.longconv.butterfly import butterfly_conv
    from kvflow.model.longconv.conv import direct_conv, fft_conv

    s = SHAPES[shape]
    h, layers = s["hidden_size"], s["num_hidden_layers"]
    heads, kv_heads = s["num_attention_heads"], s["num_key_value_heads"]
    head_dim = h // heads
    rows = []
    for n in lengths:
        g = torch.Generator().manual_seed(n)
        u, k = torch.randn(1, h, n, generator=g), torch.randn(h, n, generator=g) * 0.01
        methods: dict[str, Callable[[], Any]] = {"fft": partial(fft_conv, u, k),
                                                 "butterfly": partial(butterfly_conv, u, k, max_factor)}
        if n <= direct_max:
            methods["direct"] = partial(direct_conv, u, k)
        if n <= attention_max:
            q = torch.randn(1, heads, n, head_dim, generator=g, dtype=torch.bfloat16)
            kv = torch.randn(1, kv_heads, n, head_dim, generator=g, dtype=torch.bfloat16)
            methods["attention (SDPA, bf16)"] = partial(torch.nn.functional.scaled_dot_product_attention, q, kv, kv,
                                                        is_causal=True, enable_gqa=True)
        for method, fn in methods.items():
            ms = median_ms(fn, repeats if method != "direct" else 1)
            rows.append({"tokens": n, "method": method, "layer_ms": round(ms, 2),
                         "model_s": round(ms * layers / 1000, 2)})
            print(f"prefill {n:>6} tokens  {method:<24} {ms:10.1f} ms/layer  {ms * layers / 1000:8.2f} s/model",
                  flush=True)
    return rows


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
                       decode: bool = True, engine_lengths: tuple[int, ...] = ()) -> dict[str, Any]:
    conv_hf, attn_hf = longconv_config(shape, 2048, dtype), attention_config(shape, 2048, dtype)
    result: dict[str, Any] = {
        "shape": shape, "dtype": dtype, "threads": torch.get_num_threads(), "torch": torch.__version__,
        "state_bytes_per_token": {"long-conv": bytes_per_token(conv_hf), "attention": bytes_per_token(attn_hf)},
        "prefill": bench_prefill(shape, list(lengths), repeats, direct_max, attention_max, max_factor),
    }
    if decode:
        result["decode"] = bench_decode(shape, list(contexts), repeats, dtype)
    if engine_lengths:
        result["engine_prefill"] = bench_engine_prefill(shape, list(engine_lengths), repeats, dtype)
    return result


def save_report(result: dict[str, Any], out: Path, command: str) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**result, "command": command}, indent=2) + "\n")
