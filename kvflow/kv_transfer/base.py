"""The KV connector protocol: how KV gets into and out of an engine's paged cache other than by the
model computing it (from a prefill instance, to a decode instance; from a host or SSD tier).

The engine core receives at most one connector and calls it from two places:

* the **scheduler side**, between steps, on the engine thread: which waiting requests load KV
  before they run (`num_tokens_to_load`, `start_load`), which finished requests' blocks the
  connector keeps for a while (`request_finished`), and, once per step, what happened since
  (`collect`: loads finished or failed, held blocks to give back, transfers acknowledged);
* the **worker side**, inside a step, around the forward pass (`begin_step`, `layer_done`,
  `end_step`: the runner's step hooks), so a connector can move each layer's KV as soon as it is
  computed.

A connector reads requests through `ConnectorRequest` (the core's `Request` provides it) and the
cache through the KV-cache spec it is registered with, so it imports nothing above this layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from kvflow.attention.kv_spec import KVCacheSpec, LayerKV
from kvflow.config import EngineConfig
from kvflow.kv_transfer.wire import KVTransferParams
from kvflow.sampling_params import SamplingParams
from kvflow.worker.step import ScheduledChunk, TokenLogprobs


class ConnectorRequest(Protocol):
    """What a connector reads of a request (and, for a finished load, writes into it)."""

    request_id: str
    kv_transfer: KVTransferParams | None  # the transfer the request's KV goes out under or comes in from
    block_ids: list[int]
    block_hashes: list[int]  # its full blocks' prefix-cache hashes, as far as computed (kv_cache_manager.py)
    all_token_ids: list[int]
    num_computed_tokens: int
    num_cached_tokens: int  # prompt tokens not computed here (prefix hits, loads): reported as cached
    skip_prefix_cache: bool
    kv_residual_slot: int | None  # KIVI: the ring slot holding its newest tokens (kvflow/attention/kivi.py)
    params: SamplingParams
    output_logprobs: list[TokenLogprobs]
    prompt_logprobs: list[TokenLogprobs | None]

    @property
    def num_prompt_tokens(self) -> int: ...

    @property
    def num_tokens(self) -> int: ...

    @property
    def output_token_ids(self) -> list[int]: ...

    @property
    def finish_reason(self) -> str | None: ...

    def append_token(self, token_id: int, logprobs: TokenLogprobs | None = None) -> None: ...


@dataclass
class LoadResult:
    """A load that ended: on success, the KV of the request's first `num_tokens` tokens is in its blocks."""

    request_id: str
    num_tokens: int = 0
    error: str | None = None  # why it failed (or "cancelled")
    payload_bytes: int = 0  # KV bytes installed
    wire_bytes: int = 0  # everything received, control messages included
    seconds: float = 0.0
    extra: Any = None  # what came with the KV, for the connector's `finish_load` (e.g. a first token)

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class SentRecord:
    """One finished outgoing transfer. `exposed_seconds` runs from the moment both the prompt was
    done and the peer had asked for its KV, to the peer's acknowledgement: the time the transfer
    adds to the request's TTFT beyond prefill."""

    transfer_id: str
    exposed_seconds: float


@dataclass
class ConnectorEvents:
    """What happened since the last `collect`."""

    loaded: list[LoadResult] = field(default_factory=list)  # successes and failures
    release: list[list[int]] = field(default_factory=list)  # held blocks the connector is done with
    sent: list[SentRecord] = field(default_factory=list)  # outgoing transfers acknowledged


class KVConnector:
    """Base of every connector; each default is what a connector that does nothing there does."""

    def register_kv_caches(self, spec: KVCacheSpec, caches: list[LayerKV]) -> None:
        """The engine's caches, once allocated (before the first request)."""
        raise NotImplementedError(f"{type(self).__name__} must take the engine's KV caches")

    @property
    def address(self) -> str | None:
        """Where peers reach this connector (a prefill instance's pull address), if anywhere."""
        return None

    @property
    def busy(self) -> bool:
        """Work in flight without a step: the engine loop must keep calling `collect` even when idle."""
        return False

    # ---------------------------------------------------------- scheduler side
    def num_tokens_to_load(self, request: ConnectorRequest) -> int:
        """How many of a waiting request's first tokens will have KV once this connector has loaded what
        it holds (0, or at most `request.num_computed_tokens`: nothing to load; it computes them). The
        scheduler asks after attaching the working pool's prefix hit, and then gives the request blocks
        for those tokens plus one more."""
        return 0

    def start_load(self, request: ConnectorRequest, start: int = 0) -> None:
        """Load tokens [start, num_tokens_to_load) into the request's blocks (the ones before `start`
        are there already: a prefix hit, or shared with an n > 1 sibling); the result comes back
        through `collect`."""
        raise NotImplementedError(f"{type(self).__name__} loads no KV")

    def cancel_load(self, request_id: str) -> None:
        """Stop a load; its result (a failure) still comes back through `collect`, and only then may
        its blocks be freed."""

    def finish_load(self, request: ConnectorRequest, result: LoadResult) -> bool:
        """Apply what came with a successful load (e.g. the first token computed elsewhere). False: the
        request must compute its KV itself after all."""
        return True

    def request_finished(self, request: ConnectorRequest) -> bool:
        """A request ended. True: the connector keeps its blocks (and gives them back through
        `collect`); False: the engine frees them as usual."""
        return False

    def forget(self, request_id: str) -> None:
        """A request finished earlier was aborted: free what the connector still holds for it now."""

    def collect(self) -> ConnectorEvents:
        return ConnectorEvents()

    # ------------------------------------------------------------- worker side
    def begin_step(self, chunks: Sequence[ScheduledChunk]) -> bool:
        """Before the forward pass; True if the model should report each finished layer."""
        return False

    def layer_done(self, layer: int) -> None:
        """Layer `layer` has written this step's KV."""

    def end_step(self) -> None:
        """After the forward pass (also when it failed)."""

    def stats_snapshot(self) -> Any:
        """The connector's own counters for the engine's stats (None: it keeps none)."""
        return None

    def close(self) -> None:
        """Stop threads and listeners."""


def make_connector(config: EngineConfig) -> KVConnector | None:
    """The connector an engine config asks for (None: none): prefill/decode transfer for an instance of
    a disaggregated deployment, else the offload tiers when they are on."""
    if config.kv_transfer is not None:
        from kvflow.kv_transfer.pd_connector import PDConnector

        return PDConnector(config.kv_transfer)
    if config.cache.kv_offload:
        from kvflow.kv_transfer.offload.connector import OffloadConnector
        from kvflow.model.fingerprint import model_fingerprint

        return OffloadConnector(config.cache, model_fingerprint(config), str(config.model.path))
    return None
