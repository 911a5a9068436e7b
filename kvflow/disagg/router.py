"""The disaggregated front: one OpenAI server over prefill and decode engine-core processes.

`DisaggEngine` is the server's `AsyncEngine` with a router inside. Each request goes, at once,
to the least-loaded live prefill instance (prompt → first token, KV kept there) and the
least-loaded live decode instance (admits it when it has blocks, pulls the KV, decodes); the
client's stream comes from the decode instance. Intake, detokenisation, stop strings and metrics
are the colocated server's own code.

Faults: a dead prefill instance is routed around (its requests' decode instances find the KV gone
and compute the prompt themselves; with no prefill instance left, decode instances prefill
everything). A dead decode instance's requests are resubmitted to another one if none of their
tokens reached the client yet, else they fail with a clear error; /health is 503 only when no
decode instance is left.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import msgspec

from kvflow.config import EngineConfig, KVTransferConfig
from kvflow.disagg.wire import KVTransferParams
from kvflow.engine.core import EngineStats
from kvflow.engine.core_client import CoreClient, CoreStats, EngineDeadError, StepOutputs
from kvflow.engine.input_processor import CoreRequestSpec, InputProcessor
from kvflow.engine.request import RequestStatus
from kvflow.sampling import SamplingParams
from kvflow.server.async_engine import AsyncEngine
from kvflow.server.metrics import ServerMetrics

logger = logging.getLogger(__name__)


@dataclass
class Instance:
    """One engine-core process of the deployment, and the core ids it is working on."""

    name: str
    role: str
    client: CoreClient
    in_flight: dict[str, CoreRequestSpec] = field(default_factory=dict)
    stats: CoreStats | None = None

    @property
    def alive(self) -> bool:
        return self.client.alive


def split_cores(num_instances: int, cores: list[int] | None = None) -> list[tuple[int, ...]]:
    """Disjoint core sets, one per instance (round-robin single cores when there are too few)."""
    cores = sorted(os.sched_getaffinity(0)) if cores is None else cores
    if num_instances <= len(cores):
        per = len(cores) // num_instances
        return [tuple(cores[i * per:(i + 1) * per]) for i in range(num_instances)]
    return [(cores[i % len(cores)],) for i in range(num_instances)]


class DisaggEngine(AsyncEngine):
    def __init__(self, config: EngineConfig, tokenizer: Any | None, metrics: ServerMetrics,
                 max_waiting_requests: int, num_prefill: int, num_decode: int,
                 transfer: KVTransferConfig | None = None, pin_cores: bool = False) -> None:
        if num_prefill < 1 or num_decode < 1:
            raise ValueError(f"a disaggregated deployment needs >= 1 prefill and >= 1 decode instance, "
                             f"got {num_prefill} and {num_decode}")
        transfer = transfer or KVTransferConfig()
        cores = split_cores(num_prefill + num_decode) if pin_cores else [None] * (num_prefill + num_decode)
        super().__init__(config, tokenizer, metrics, max_waiting_requests)
        self.instances: list[Instance] = []
        for i in range(num_prefill + num_decode):
            role, index = ("prefill", i) if i < num_prefill else ("decode", i - num_prefill)
            instance_config = dataclasses.replace(
                config, kv_transfer=dataclasses.replace(transfer, role=role), cpu_cores=cores[i])
            name = f"{role}-{index}"
            client = CoreClient(instance_config, self._outputs_handler(name), self._death_handler(name))
            self.instances.append(Instance(name, role, client))
        self._attempts: dict[str, int] = {}  # core id -> resubmissions after a decode instance died

    # -------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        try:
            await asyncio.gather(*(i.client.start() for i in self.instances))
        except BaseException:
            await asyncio.gather(*(i.client.shutdown() for i in self.instances), return_exceptions=True)
            raise
        smallest = min(i.client.num_blocks for i in self.instances)
        self.inputs = InputProcessor(self.config, self.tokenizer, smallest)

    async def shutdown(self) -> None:
        for request_id in list(self._streams):
            self.abort(request_id)
        await asyncio.gather(*(i.client.shutdown() for i in self.instances))

    def describe(self) -> str:
        return ", ".join(f"{i.name} pid {i.client.pid} ({i.client.num_blocks} KV blocks"
                         + (f", KV at {i.client.kv_address})" if i.client.kv_address else ")")
                         for i in self.instances)

    def _live(self, role: str) -> list[Instance]:
        return [i for i in self.instances if i.role == role and i.alive]

    @property
    def dead_reason(self) -> str | None:
        if self._live("decode"):
            return None
        reasons = "; ".join(f"{i.name}: {i.client.dead_reason}" for i in self.instances if i.role == "decode")
        return f"no decode instance is alive ({reasons})"

    def health(self) -> dict[str, Any]:
        return {i.name: {"role": i.role, "pid": i.client.pid, "alive": i.alive, "in_flight": len(i.in_flight),
                         "kv_address": i.client.kv_address, "error": i.client.dead_reason}
                for i in self.instances}

    # ---------------------------------------------------------------- intake
    def _check_supported(self, params: SamplingParams) -> None:
        if params.n > 1:
            raise ValueError("n > 1 is not supported by disaggregated serving")
        if params.prompt_logprobs is not None:
            raise ValueError("prompt_logprobs is not supported by disaggregated serving")

    def _send_specs(self, specs: list[CoreRequestSpec]) -> None:
        for spec in specs:
            self._route(spec)

    def _route(self, spec: CoreRequestSpec) -> None:
        """Send one sequence to a prefill and a decode instance (least in flight first)."""
        decodes = self._live("decode")
        if not decodes:
            raise EngineDeadError(self.dead_reason or "no decode instance")
        decode = min(decodes, key=lambda i: len(i.in_flight))
        prefills = self._live("prefill")
        attempt = self._attempts.get(spec.request_id, 0)
        if prefills:
            prefill = min(prefills, key=lambda i: len(i.in_flight))
            transfer_id = spec.request_id if attempt == 0 else f"{spec.request_id}#{attempt}"
            first_only = spec.params.model_copy(update={"max_tokens": 1})
            prefill_spec = msgspec.structs.replace(spec, request_id=transfer_id, params=first_only,
                                                   kv_transfer=KVTransferParams(transfer_id))
            decode_spec = msgspec.structs.replace(
                spec, kv_transfer=KVTransferParams(transfer_id, prefill.client.kv_address))
            prefill.in_flight[transfer_id] = prefill_spec
            prefill.client.add([prefill_spec])
        else:
            decode_spec = msgspec.structs.replace(spec, kv_transfer=None)  # the decode instance prefills
        decode.in_flight[spec.request_id] = spec
        decode.client.add([decode_spec])

    def _finish_core(self, items: list[tuple[str, str, str | None]]) -> None:
        """Abort / stop core ids wherever they are (their decode instance and any prefill copy)."""
        for instance in self.instances:
            mine = [item for item in items if self._owns(instance, item[0])]
            for core_id, _, _ in mine:
                instance.in_flight.pop(core_id, None)
                if instance.role == "prefill":
                    instance.in_flight.pop(self._transfer_id(core_id), None)
            if mine and instance.alive:
                try:
                    instance.client.finish(mine if instance.role == "decode" else
                                           [(self._transfer_id(c), s, r) for c, s, r in mine])
                except EngineDeadError:
                    pass

    def _transfer_id(self, core_id: str) -> str:
        attempt = self._attempts.get(core_id, 0)
        return core_id if attempt == 0 else f"{core_id}#{attempt}"

    def _owns(self, instance: Instance, core_id: str) -> bool:
        return core_id in instance.in_flight or self._transfer_id(core_id) in instance.in_flight

    # ---------------------------------------------------------------- output
    def _outputs_handler(self, name: str):
        def handle(message: StepOutputs) -> None:
            instance = next(i for i in self.instances if i.name == name)
            instance.stats = message.stats
            self.metrics.update_core(self._combined_stats())
            if instance.role == "prefill":
                for output in message.outputs:
                    if output.finished:
                        instance.in_flight.pop(output.request_id, None)
                return
            for _, payload, wire, seconds in message.kv_transfers:
                self.metrics.kv_transferred(payload, wire, seconds)
            for output in message.outputs:
                if output.finished:
                    instance.in_flight.pop(output.request_id, None)
                    self._attempts.pop(output.request_id, None)
            self._process_outputs(message)

        return handle

    def _combined_stats(self) -> CoreStats:
        """Scheduler stats summed over the instances (the gauges describe the deployment)."""
        live = [i.stats for i in self.instances if i.stats is not None and i.alive]
        engines = [s.engine for s in live]
        blocks = sum(e.num_blocks for e in engines) or 1
        free = sum(e.num_free_blocks for e in engines)
        queried = sum(s.prefix_queried_tokens for s in live)
        hits = sum(s.prefix_hit_tokens for s in live)
        engine = EngineStats(
            num_running=sum(e.num_running for e in engines), num_waiting=sum(e.num_waiting for e in engines),
            kv_cache_usage=1 - free / blocks, prefix_cache_hit_rate=hits / queried if queried else 0.0,
            num_preemptions=sum(e.num_preemptions for e in engines), num_free_blocks=free, num_blocks=blocks,
            num_receiving=sum(e.num_receiving for e in engines),
            num_kv_load_failures=sum(e.num_kv_load_failures for e in engines),
        )
        return CoreStats(engine, queried, hits)

    # ---------------------------------------------------------------- faults
    def _death_handler(self, name: str):
        def died(reason: str) -> None:
            instance = next(i for i in self.instances if i.name == name)
            logger.error("%s died: %s; routing around it", name, reason)
            orphans, instance.in_flight = instance.in_flight, {}
            self.metrics.update_core(self._combined_stats())  # the gauges now leave it out
            if instance.role == "prefill":
                return  # its decode instances find the KV gone and compute the prompts themselves
            for core_id, spec in orphans.items():
                self._recover(core_id, spec, f"{name} died: {reason}")
            if not self._live("decode"):
                self.metrics.engine_healthy.set(0)

        return died

    def _recover(self, core_id: str, spec: CoreRequestSpec, reason: str) -> None:
        """Resubmit a dead decode instance's request if the client has seen none of its tokens."""
        request_id = self.outputs.request_id_of(core_id)
        timing = self._timing.get(request_id or "")
        stream = self._streams.get(request_id or "")
        # The KV its prefill instance holds for it will never be pulled now: free it there.
        self._finish_core([(core_id, RequestStatus.FINISHED_ABORTED.value, None)])
        if stream is None:
            return
        if timing is not None and timing.first_token is None and self._live("decode"):
            self._attempts[core_id] = self._attempts.get(core_id, 0) + 1
            logger.warning("resubmitting %s (%s)", core_id, reason)
            try:
                self._route(spec)
                return
            except EngineDeadError:
                pass
        stream.fail(EngineDeadError(f"the decode instance serving this request died ({reason})"))
        self.outputs.abort_request(request_id)
        self._forget(request_id, "abort")
