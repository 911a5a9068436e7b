"""A prefill and a decode EngineCore in one process, driven step by step: the connector's
behaviour without processes or HTTP in the way."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from kvflow.config import EngineConfig, KVTransferConfig
from kvflow.disagg.wire import KVTransferParams
from kvflow.engine.core import EngineCore, EngineCoreOutput
from kvflow.engine.request import Request
from kvflow.sampling import SamplingParams


def make_core(model: Path, transfer: KVTransferConfig | None = None, **engine: object) -> EngineCore:
    args = dict(dtype="float32", block_size=4, num_blocks=96, max_model_len=128)
    args.update(engine)
    config = EngineConfig.create(str(model), **args)
    return EngineCore(dataclasses.replace(config, kv_transfer=transfer))


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def run_colocated(core: EngineCore, prompts: list[list[int]], params: SamplingParams) -> dict[str, list[int]]:
    for i, ids in enumerate(prompts):
        core.add_request(Request(f"r{i}", ids, params))
    tokens: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}
    while core.has_unfinished_requests():
        for out in core.step():
            tokens[out.request_id].extend(out.new_token_ids)
    return tokens


def submit(prefill: EngineCore, decode: EngineCore, request_id: str, ids: list[int], params: SamplingParams) -> None:
    """What the router does: the prompt to the prefill instance (one token), the whole request to
    the decode instance, which pulls the KV from the prefill instance."""
    first_only = params.model_copy(update={"max_tokens": 1})
    prefill.add_request(Request(request_id, ids, first_only, kv_transfer=KVTransferParams(request_id)))
    source = prefill.connector.address
    decode.add_request(Request(request_id, ids, params, kv_transfer=KVTransferParams(request_id, source)))


def drive(prefill: EngineCore, decode: EngineCore, timeout: float = 60.0,
          tokens: dict[str, list[int]] | None = None, first_token_times: dict[str, float] | None = None,
          outputs: list[EngineCoreOutput] | None = None) -> dict[str, list[int]]:
    """Step both instances until every request is done and the prefill side has freed its blocks
    (the decode side's outputs go to `outputs` too, when given)."""
    tokens = {} if tokens is None else tokens
    deadline = time.monotonic() + timeout
    while (decode.has_unfinished_requests() or prefill.has_unfinished_requests()
           or prefill.transfers_pending or decode.transfers_pending):
        assert time.monotonic() < deadline, "disaggregated requests did not finish"
        # Decode first: it admits requests and starts their pulls before the prefill step computes
        # them, as two concurrent instances would.
        for out in decode.step():
            if first_token_times is not None and out.request_id not in first_token_times:
                first_token_times[out.request_id] = time.monotonic()
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
            if outputs is not None:
                outputs.append(out)
        prefill.step()
        time.sleep(0.0005)
    return tokens
