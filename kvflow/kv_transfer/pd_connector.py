"""PDConnector: prefill/decode disaggregation as a KV connector (kvflow/kv_transfer/base.py).

A prefill instance computes a prompt and its first token, keeps the request's blocks when it
finishes (`request_finished`), and serves their KV to the decode instance that pulls it
(`sender.py`); a layer-wise prefill instance lets pullers start on each layer as soon as the step
computing the prompt's last chunk has written it (the worker-side hooks). A decode instance gives
a request blocks for its prompt and first token, pulls the KV into them (`receiver.py`), and takes
over the request with the first token that came with it (`finish_load`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import cast

from kvflow.attention.kv_spec import KVCacheSpec, LayerKV
from kvflow.config import KVTransferConfig
from kvflow.kv_transfer.base import ConnectorEvents, ConnectorRequest, KVConnector, LoadResult
from kvflow.kv_transfer.receiver import KVReceiver
from kvflow.kv_transfer.sender import KVSender
from kvflow.kv_transfer.wire import Done
from kvflow.worker.step import ScheduledChunk, TokenLogprobs

logger = logging.getLogger(__name__)


class PDConnector(KVConnector):
    def __init__(self, config: KVTransferConfig) -> None:
        self.config = config
        self.layer_wise = config.mode == "layerwise"
        self.sender: KVSender | None = None
        self.receiver: KVReceiver | None = None
        self._step_transfers = False

    def register_kv_caches(self, spec: KVCacheSpec, caches: list[LayerKV]) -> None:
        if self.config.role == "prefill":
            self.sender = KVSender(spec, caches, self.config)
        else:
            self.receiver = KVReceiver(spec, caches, self.config)

    @property
    def address(self) -> str | None:
        """Where decode instances pull from (prefill instances only)."""
        return self.sender.address if self.sender else None

    @property
    def busy(self) -> bool:
        if self.sender is not None:
            return self.sender.num_held > 0
        return self.receiver is not None and self.receiver.num_loading > 0

    # ---------------------------------------------------------- scheduler side
    def num_tokens_to_load(self, request: ConnectorRequest) -> int:
        params = request.kv_transfer
        if self.receiver is None or params is None or params.source is None:
            return 0
        return request.num_prompt_tokens

    def start_load(self, request: ConnectorRequest, start: int = 0) -> None:
        """Pull prompt tokens [start, prompt) into the request's blocks (an n > 1 sibling shares the rest)."""
        params = request.kv_transfer
        assert self.receiver is not None and params is not None and params.source is not None
        self.receiver.start(request.request_id, params.transfer_id, params.source, request.block_ids,
                            request.num_prompt_tokens, start, request.kv_residual_slot)

    def cancel_load(self, request_id: str) -> None:
        if self.receiver is not None:
            self.receiver.cancel(request_id)

    def finish_load(self, request: ConnectorRequest, result: LoadResult) -> bool:
        """Give a loaded request its first token and the logprobs computed with it. False when the
        transfer lacks prompt logprobs the request asked for (it must compute them itself)."""
        done: Done = result.extra
        prompt_lps: list[TokenLogprobs | None] = []
        if request.params.prompt_logprobs is not None:
            if done.prompt_logprobs is None:
                return False
            prompt_lps = [None if lp is None else TokenLogprobs(*lp) for lp in done.prompt_logprobs]
        logprobs = TokenLogprobs(done.first_token, *done.logprobs) if done.logprobs is not None else None
        request.append_token(done.first_token, logprobs)
        request.prompt_logprobs = prompt_lps
        return True

    def request_finished(self, request: ConnectorRequest) -> bool:
        """A prefill instance keeps a finished request's blocks until its KV is pulled."""
        params = request.kv_transfer
        if self.sender is None or params is None:
            return False
        done = done_message(request)
        if done is None:
            self.sender.fail(params.transfer_id, "the request was aborted on the prefill instance")
            return False
        return self.sender.complete(params.transfer_id, request.block_ids, request.num_prompt_tokens, done,
                                    request.kv_residual_slot)

    def forget(self, request_id: str) -> None:
        """Prefill instance: a finished request was aborted before its KV was pulled; free it now."""
        if self.sender is not None:
            self.sender.drop(request_id)

    def collect(self) -> ConnectorEvents:
        events = ConnectorEvents()
        if self.sender is not None:
            events.release = self.sender.collect()
            events.sent = self.sender.collect_sent()
        if self.receiver is not None:
            events.loaded = self.receiver.collect()
        return events

    # ------------------------------------------------------------- worker side
    def begin_step(self, chunks: Sequence[ScheduledChunk]) -> bool:
        """Layer-wise prefill instance: prompts whose last chunk this step computes may be pulled layer
        by layer as the step goes; True if so (the model then reports each finished layer)."""
        if self.sender is None or not self.layer_wise:
            return False
        for chunk in chunks:
            request = cast(ConnectorRequest, chunk.request)  # the engine's requests are both
            params = request.kv_transfer
            if params is not None and chunk.start + chunk.num_tokens == request.num_prompt_tokens:
                self.sender.expect(params.transfer_id, request.block_ids, request.num_prompt_tokens,
                                   request.kv_residual_slot)
                self._step_transfers = True
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
def done_message(request: ConnectorRequest) -> Done | None:
    """Prefill instance: what follows a finished request's KV — everything the colocated engine
    would have emitted with its first token (None: it was aborted before one)."""
    if request.finish_reason not in ("length", "stop") or not request.output_token_ids:
        return None  # aborted, or stopped by the front before a token
    first = request.output_token_ids[0]
    lps = request.output_logprobs[:1]
    logprobs = (lps[0].logprob, lps[0].top_ids, lps[0].top_logprobs) if lps else None
    prompt = None
    if request.params.prompt_logprobs is not None:
        prompt = [None if lp is None else (lp.token_id, lp.logprob, lp.top_ids, lp.top_logprobs)
                  for lp in request.prompt_logprobs]
    return Done(first, logprobs, prompt)
