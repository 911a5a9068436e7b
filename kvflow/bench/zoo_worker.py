"""One process of `kvflow bench zoo`: load an engine, say "ready", wait for "go" on stdin, serve its
requests as one batch, print a JSON report (request latencies, tokens, peak RSS, weight bytes, the most KV
held at once). With a system prompt, every request's prompt starts with it, and one request per served
model computes it before "ready" (a deployment's standing prefix: the batch then finds it cached)."""

from __future__ import annotations

import argparse
import itertools
import json
import resource
import sys


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--variant", nargs="*", default=[], help="NAME=DIR of the zoo")
    parser.add_argument("--serve", nargs="+", required=True, help="variant names to send requests for (base: none)")
    parser.add_argument("--requests", type=int, default=8, help="per served name")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--kv-cache-memory", type=float, default=0.25, help="GiB of KV cache")
    parser.add_argument("--system-prompt-len", type=int, default=0, help="tokens every prompt starts with")
    parser.add_argument("--no-zoo-share-kv", action="store_true", help="variants keep KV of their own in every layer")
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from kvflow import LLM, SamplingParams

    llm = LLM(model=args.model, dtype=args.dtype, enable_prefix_caching=args.system_prompt_len > 0,
              variant=tuple(args.variant), kv_cache_memory=args.kv_cache_memory,
              zoo_share_kv=not args.no_zoo_share_kv)
    vocab = llm.engine.config.model.vocab_size
    gen = torch.Generator().manual_seed(0)
    names = [None if name == "base" else name for name in args.serve for _ in range(args.requests)]
    system = torch.randint(10, vocab, (args.system_prompt_len,), generator=gen).tolist()
    prompts = [system + torch.randint(10, vocab, (args.prompt_len,), generator=gen).tolist() for _ in names]
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    kv = llm.engine.core.kv
    if system:  # the standing prefix, computed once by each served model
        served = [None if name == "base" else name for name in args.serve]
        llm.generate([system] * len(served), SamplingParams(max_tokens=1), variant=served, use_tqdm=False)
    kv.reset_peak()
    runner = llm.engine.core.runner
    # Every tensor the model holds (prepacked weights are buffers), plus the zoo's own blocks (not submodules).
    weights = sum(t.nbytes for t in itertools.chain(runner.model.parameters(), runner.model.buffers()))
    unique = {} if runner.zoo is None else {k: v.unique_bytes / 2**20 for k, v in runner.zoo.variants.items()}
    if runner.zoo is not None:
        weights += runner.zoo.unique_bytes
    print("ready", flush=True)
    sys.stdin.readline()
    outs = llm.generate(prompts, params, variant=names, use_tqdm=False)
    latencies = [o.metrics["finished_time"] - o.metrics["arrival_time"] for o in outs]
    page_bytes = runner.kv_spec.bytes_per_block / kv.layer_groups
    print(json.dumps({"latencies": latencies, "tokens": sum(len(o.outputs[0].token_ids) for o in outs),
                      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "weight_mib": weights / 2**20, "variant_unique_mib": unique,
                      "kv_peak_mib": kv.peak_used_blocks * page_bytes / 2**20, "kv_layer_groups": kv.layer_groups}),
          flush=True)


if __name__ == "__main__":
    main()
