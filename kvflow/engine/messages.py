"""What crosses between the API process and the engine-core process: msgspec messages over ZMQ.

To the core: requests to add (`CoreRequestSpec`s, already validated), finish orders (aborts and
stop strings found on the API side), shutdown. From the core: READY once the model is loaded, each
step's outputs with the scheduler's stats and the KV-transfer events, or the error that killed it.
Tensors never cross: only token ids, logprobs and counts.
"""

from __future__ import annotations

from typing import Any

import msgspec

from kvflow.engine.core import EngineCoreOutput, EngineStats
from kvflow.engine.input_processor import CoreRequestSpec
from kvflow.sampling_params import SamplingParams


class AddRequests(msgspec.Struct, tag="add"):
    specs: list[CoreRequestSpec]


class FinishRequests(msgspec.Struct, tag="finish"):
    """(core id, finish status value, stop reason): aborts, or stop strings found by the API side."""

    items: list[tuple[str, str, str | None]]


class Shutdown(msgspec.Struct, tag="shutdown"):
    pass


class CoreStats(msgspec.Struct):
    engine: EngineStats
    prefix_queried_tokens: int
    prefix_hit_tokens: int


class Ready(msgspec.Struct, tag="ready"):
    num_blocks: int
    pid: int
    kv_address: str | None = None  # a prefill instance: where decode instances pull KV from
    host: str | None = None
    kv_format: str = ""  # what its KV blocks hold (KVCacheSpec.wire_format): instances exchanging KV must agree
    kv_layer_groups: int = 1  # a cache split into layer groups (a block zoo sharing KV): KV policies are refused


class StepOutputs(msgspec.Struct, tag="outputs"):
    outputs: list[EngineCoreOutput]
    # Core ids first scheduled since the last message -> monotonic time (queue-time metric).
    scheduled_times: dict[str, float]
    stats: CoreStats
    # Decode instance: KV loads finished since the last message (core id, KV bytes, wire bytes, seconds).
    kv_transfers: list[tuple[str, int, int, float]] = []
    # Prefill instance: transfers acknowledged since the last message (transfer id, exposed seconds).
    kv_sent: list[tuple[str, float]] = []
    # Tokens each engine step computed since the last message (prompt chunks, decodes, speculative
    # proposals verified), for kvflow:iteration_tokens_total; a step without outputs sends none, so its
    # count rides with the next message.
    step_tokens: list[int] = []


class CoreFailed(msgspec.Struct, tag="error"):
    message: str


ToCore = AddRequests | FinishRequests | Shutdown
FromCore = Ready | StepOutputs | CoreFailed


def enc_hook(obj: Any) -> Any:
    if isinstance(obj, SamplingParams):
        return obj.model_dump()
    raise NotImplementedError(f"cannot encode {type(obj).__name__}")


def dec_hook(typ: type, obj: Any) -> Any:
    if typ is SamplingParams:
        return SamplingParams.model_construct(**obj)  # validated on the API side already
    raise NotImplementedError(f"cannot decode {typ}")
