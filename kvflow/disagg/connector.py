"""KVConnector: what the engine sees of disaggregation, with a scheduler side and a worker side.

Scheduler side (engine thread, between steps): `start_load` for a decode instance's request that
has just been given blocks, `request_finished` when a prefill instance's request ends (the
connector may keep its blocks until they are pulled), `collect` for finished loads and blocks to
free. Worker side (inside a step): `begin_step`, `layer_done` after each layer, `end_step`, so a
layer-wise prefill instance serves each layer while later ones still compute.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from kvflow.config import KVTransferConfig
from kvflow.disagg.kv_layout import PagedKV
from kvflow.disagg.receiver import KVReceiver, LoadResult
from kvflow.disagg.sender import KVSender, SentRecord
from kvflow.disagg.wire import Done, KVTransferParams
from kvflow.engine.request import Request, RequestStatus, TokenLogprobs

logger = logging.getLogger(__name__)


@dataclass
class ConnectorEvents:
    loaded: list[LoadResult] = field(default_factory=list)  # successes and failures
    release: list[list[int]] = field(default_factory=list)  # a prefill instance's pulled blocks


class KVConnector:
    def __init__(self, config: KVTransferConfig, kv_caches: list[torch.Tensor]) -> None:
        kv = PagedKV(kv_caches)
        self.sender = KVSender(kv, config) if config.role == "prefill" else None
        self.receiver = KVReceiver(kv, config) if config.role == "decode" else None
        self.layer_wise = config.mode == "layerwise"
        self._step_transfers = False

    @property
    def address(self) -> str | None:
        """Where decode instances pull from (prefill instances only)."""
        return self.sender.address if self.sender else None

    @property
    def streams_layers(self) -> bool:
        """A layer-wise prefill instance: the model must report each finished layer (worker side)."""
        return self.layer_wise and self.sender is not None

    @property
    def busy(self) -> bool:
        """Transfers in flight: the engine loop should keep polling `collect` even when idle."""
        if self.sender is not None:
            return self.sender.num_held > 0
        return self.receiver is not None and self.receiver.num_loading > 0

    # ---------------------------------------------------------- scheduler side
    def wants_load(self, params: KVTransferParams | None) -> bool:
        return self.receiver is not None and params is not None and params.source is not None

    def start_load(self, request_id: str, params: KVTransferParams, block_ids: list[int], num_tokens: int,
                   start: int = 0) -> None:
        """Pull prompt tokens [start, num_tokens) into `block_ids` (an n > 1 sibling shares the rest)."""
        assert self.receiver is not None and params.source is not None
        self.receiver.start(request_id, params.transfer_id, params.source, block_ids, num_tokens, start)

    def cancel_load(self, request_id: str) -> None:
        if self.receiver is not None:
            self.receiver.cancel(request_id)

    def request_finished(self, request: Request) -> bool:
        """A prefill instance's request ended. True: the connector now owns its blocks (it frees them
        through `collect` once pulled); False: the engine frees them as usual."""
        params = request.kv_transfer
        if self.sender is None or params is None:
            return False
        done = done_message(request)
        if done is None:
            self.sender.fail(params.transfer_id, "the request was aborted on the prefill instance")
            return False
        return self.sender.complete(params.transfer_id, request.block_ids, request.num_prompt_tokens, done)

    @staticmethod
    def apply_done(request: Request, done: Done) -> bool:
        """Decode instance: give a loaded request its first token and the logprobs computed with it.
        False when the message lacks prompt logprobs the request asked for (it must compute them itself)."""
        prompt_lps: list[TokenLogprobs | None] = []
        if request.params.prompt_logprobs is not None:
            if done.prompt_logprobs is None:
                return False
            prompt_lps = [None if lp is None else TokenLogprobs(*lp) for lp in done.prompt_logprobs]
        request.append_token(done.first_token)
        if done.logprobs is not None:
            request.output_logprobs.append(TokenLogprobs(done.first_token, *done.logprobs))
        request.prompt_logprobs = prompt_lps
        return True

    def drop_transfer(self, transfer_id: str) -> None:
        """Prefill instance: a finished request was aborted before its KV was pulled; free it now."""
        if self.sender is not None:
            self.sender.drop(transfer_id)

    def collect_sent(self) -> list[SentRecord]:
        """Prefill instance: transfers the decode side acknowledged since the last call (for metrics)."""
        return self.sender.collect_sent() if self.sender is not None else []

    def collect(self) -> ConnectorEvents:
        events = ConnectorEvents()
        if self.sender is not None:
            events.release = self.sender.collect()
        if self.receiver is not None:
            events.loaded = self.receiver.collect()
        return events

    # ------------------------------------------------------------- worker side
    def begin_step(self, producers: list[tuple[KVTransferParams, list[int], int]]) -> bool:
        """Producers whose prompts complete this step; True if the model should report each layer."""
        self._step_transfers = bool(producers) and self.streams_layers
        if self._step_transfers:
            assert self.sender is not None
            for params, block_ids, num_tokens in producers:
                self.sender.expect(params.transfer_id, block_ids, num_tokens)
        return self._step_transfers

    def layer_done(self, layer: int) -> None:
        if self._step_transfers and self.sender is not None:
            self.sender.layer_done(layer)

    def end_step(self) -> None:
        if self._step_transfers and self.sender is not None:
            self.sender.end_step()
        self._step_transfers = False

    def close(self) -> None:
        if self.sender is not None:
            self.sender.close()


# ------------------------------------------------------- what the KV travels with
def done_message(request: Request) -> Done | None:
    """Prefill instance: what follows a finished request's KV — everything the colocated engine
    would have emitted with its first token (None: it was aborted before one)."""
    finished = request.status in (RequestStatus.FINISHED_LENGTH, RequestStatus.FINISHED_STOPPED)
    if not finished or not request.output_token_ids:  # aborted, or stopped by the front before a token
        return None
    first = request.output_token_ids[0]
    lps = request.output_logprobs[:1]
    logprobs = (lps[0].logprob, lps[0].top_ids, lps[0].top_logprobs) if lps else None
    prompt = None
    if request.params.prompt_logprobs is not None:
        prompt = [None if lp is None else (lp.token_id, lp.logprob, lp.top_ids, lp.top_logprobs)
                  for lp in request.prompt_logprobs]
    return Done(first, logprobs, prompt)
