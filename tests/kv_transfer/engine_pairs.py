"""A prefill and a decode EngineCore in one process, driven step by step: the connector's
behaviour without processes or HTTP in the way."""

from __future__ import annotations

import dataclasses
import random
import time
from pathlib import Path

from kvflow.config import EngineConfig, KVTransferConfig
from kvflow.core.request import Request
from kvflow.disagg.router import instance_specs
from kvflow.engine.core import EngineCore, EngineCoreOutput
from kvflow.engine.input_processor import CoreRequestSpec, build_core_requests
from kvflow.kv_transfer.base import make_connector
from kvflow.sampling_params import SamplingParams


def make_core(model: Path, transfer: KVTransferConfig | None = None, **engine: object) -> EngineCore:
    args = dict(dtype="float32", block_size=4, num_blocks=96, max_model_len=128)
    args.update(engine)
    config = EngineConfig.create(str(model), **args)
    config = dataclasses.replace(config, kv_transfer=transfer)
    return EngineCore(config, make_connector(config))


def prompts(lengths: list[int], seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 500) for _ in range(n)] for n in lengths]


def assert_all_blocks_free(*cores: EngineCore) -> None:
    """No KV block, and no KIVI ring slot, is still held."""
    for core in cores:
        leaked = core.kv.num_blocks - core.kv.num_free_blocks
        assert leaked == 0, f"{leaked} blocks leaked"
        assert core.kv.num_free_residual_slots == core.runner.kv_spec.residual_slots


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


def submit_group(prefill: EngineCore, decode: EngineCore, group: list[CoreRequestSpec]) -> None:
    """What the router does (its own `instance_specs`): the prompt to the prefill instance (one
    token), the whole request to the decode instance, which pulls the KV from the prefill instance."""
    prefill_specs, decode_specs = instance_specs(group, source=prefill.connector.address)
    for request in build_core_requests(prefill_specs):
        prefill.add_request(request)
    for request in build_core_requests(decode_specs):
        decode.add_request(request)


def submit(prefill: EngineCore, decode: EngineCore, request_id: str, ids: list[int], params: SamplingParams) -> None:
    """One sequence, as `submit_group` sends it."""
    spec = CoreRequestSpec(request_id, ids, params, (), time.monotonic(), decode.config.model.max_model_len)
    submit_group(prefill, decode, [spec])


def drive(prefill: EngineCore, decode: EngineCore, timeout: float = 60.0,
          first_token_times: dict[str, float] | None = None,
          outputs: list[EngineCoreOutput] | None = None) -> dict[str, list[int]]:
    """Step both instances until every request is done and the prefill side has freed its blocks
    (the decode side's outputs go to `outputs` too, when given)."""
    tokens: dict[str, list[int]] = {}
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
