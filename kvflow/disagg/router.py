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
import functools
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
    """One engine-core process of the deployment, and the ids it is working on (core ids on a
    decode instance, transfer ids on a prefill instance)."""

    name: str
    role: str
    client: CoreClient = field(init=False)
    in_flight: set[str] = field(default_factory=set)
    stats: CoreStats | None = None

    @property
    def alive(self) -> bool:
        return self.client.alive


@dataclass
class Placement:
    """Where one core request went: its decode instance, and the prefill instance computing its
    prompt under `transfer_id` (None when the decode instance prefills it itself)."""

    spec: CoreRequestSpec
    decode: Instance
    prefill: Instance | None
    transfer_id: str
    attempt: int = 0  # resubmissions after a decode instance died


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
            instance = Instance(f"{role}-{index}", role)
            instance.client = CoreClient(instance_config, functools.partial(self._on_instance_outputs, instance),
                                         functools.partial(self._on_instance_death, instance))
            self.instances.append(instance)
        self._placements: dict[str, Placement] = {}  # core id -> where it runs

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

    def _route(self, spec: CoreRequestSpec, attempt: int = 0) -> None:
        """Send one sequence to a prefill and a decode instance (least in flight first)."""
        decodes = self._live("decode")
        if not decodes:
            raise EngineDeadError(self.dead_reason or "no decode instance")
        decode = min(decodes, key=lambda i: len(i.in_flight))
        prefills = self._live("prefill")
        prefill = min(prefills, key=lambda i: len(i.in_flight)) if prefills else None
        transfer_id = spec.request_id if attempt == 0 else f"{spec.request_id}#{attempt}"
        if prefill is not None:
            first_only = spec.params.model_copy(update={"max_tokens": 1})
            prefill.in_flight.add(transfer_id)
            prefill.client.add([msgspec.structs.replace(spec, request_id=transfer_id, params=first_only,
                                                        kv_transfer=KVTransferParams(transfer_id))])
            decode_spec = msgspec.structs.replace(
                spec, kv_transfer=KVTransferParams(transfer_id, prefill.client.kv_address))
        else:
            decode_spec = msgspec.structs.replace(spec, kv_transfer=None)  # the decode instance prefills
        self._placements[spec.request_id] = Placement(spec, decode, prefill, transfer_id, attempt)
        decode.in_flight.add(spec.request_id)
        decode.client.add([decode_spec])

    def _finish_core(self, items: list[tuple[str, str, str | None]]) -> None:
        """Abort / stop core ids on their decode instance, and their prompts on the prefill one."""
        orders: dict[str, list[tuple[str, str, str | None]]] = {}
        for core_id, status, reason in items:
            placement = self._placements.pop(core_id, None)
            if placement is None:
                continue
            placement.decode.in_flight.discard(core_id)
            orders.setdefault(placement.decode.name, []).append((core_id, status, reason))
            if placement.prefill is not None:
                placement.prefill.in_flight.discard(placement.transfer_id)
                orders.setdefault(placement.prefill.name, []).append((placement.transfer_id, status, reason))
        for instance in self.instances:
            if instance.name in orders and instance.alive:
                try:
                    instance.client.finish(orders[instance.name])
                except EngineDeadError:
                    pass

    # ---------------------------------------------------------------- output
    def _on_instance_outputs(self, instance: Instance, message: StepOutputs) -> None:
        instance.stats = message.stats
        self.metrics.update_core(self._combined_stats())
        finished = [output.request_id for output in message.outputs if output.finished]
        instance.in_flight.difference_update(finished)
        if instance.role == "prefill":
            return  # the client's tokens come from the decode instance
        for core_id in finished:
            self._placements.pop(core_id, None)
        for _, payload, wire, seconds in message.kv_transfers:
            self.metrics.kv_transferred(payload, wire, seconds)
        self._process_outputs(message)

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
    def _on_instance_death(self, instance: Instance, reason: str) -> None:
        logger.error("%s died: %s; routing around it", instance.name, reason)
        orphans, instance.in_flight = instance.in_flight, set()
        self.metrics.update_core(self._combined_stats())  # the gauges now leave it out
        if instance.role == "prefill":
            return  # its decode instances find the KV gone and compute the prompts themselves
        for core_id in orphans:
            placement = self._placements.get(core_id)
            if placement is not None:
                self._recover(placement, f"{instance.name} died: {reason}")
        if not self._live("decode"):
            self.metrics.engine_healthy.set(0)

    def _recover(self, placement: Placement, reason: str) -> None:
        """Resubmit a dead decode instance's request if the client has seen none of its tokens."""
        core_id = placement.spec.request_id
        # The KV its prefill instance holds for it will never be pulled now: free it there.
        self._finish_core([(core_id, RequestStatus.FINISHED_ABORTED.value, None)])
        request_id = self.outputs.request_id_of(core_id) or ""
        stream, timing = self._streams.get(request_id), self._timing.get(request_id)
        if stream is None:
            return
        if timing is not None and timing.first_token is None and self._live("decode"):
            logger.warning("resubmitting %s (%s)", core_id, reason)
            try:
                self._route(placement.spec, placement.attempt + 1)
                return
            except EngineDeadError:
                pass
        stream.fail(EngineDeadError(f"the decode instance serving this request died ({reason})"))
        self.outputs.abort_request(request_id)
        self._forget(request_id, "abort")
