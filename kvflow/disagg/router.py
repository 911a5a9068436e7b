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
from itertools import zip_longest
from typing import Any

import msgspec

from kvflow.config import EngineConfig, KVTransferConfig
from kvflow.core.kv_cache_manager import PrefixCacheStats
from kvflow.core.request import RequestStatus
from kvflow.disagg.deployment import DeploymentSpec
from kvflow.disagg.ray_launcher import RayCluster
from kvflow.engine.core import EngineStats
from kvflow.engine.core_client import CoreClient, CoreUnreachableError, EngineDeadError
from kvflow.engine.input_processor import CoreRequestSpec, InputProcessor
from kvflow.engine.messages import CoreStats, StepOutputs
from kvflow.kv_transfer.wire import KVTransferParams
from kvflow.server.async_engine import AsyncEngine
from kvflow.server.metrics import ServerMetrics

logger = logging.getLogger(__name__)


@dataclass
class Instance:
    """One engine-core process of the deployment, and the ids it is working on (core ids on a
    decode instance, transfer ids on a prefill instance)."""

    name: str
    role: str
    config: EngineConfig = field(init=False)
    client: CoreClient | None = None  # made at start, with the launcher the deployment needs
    in_flight: set[str] = field(default_factory=set)
    stats: CoreStats | None = None

    @property
    def alive(self) -> bool:
        return self.client is not None and self.client.alive


@dataclass
class Placement:
    """Where one core request went: its decode instance, and the prefill instance computing its
    prompt under `transfer_id` (None when the decode instance prefills it itself)."""

    spec: CoreRequestSpec
    decode: Instance
    prefill: Instance | None
    attempt: int = 0  # resubmissions after a decode instance died

    @property
    def transfer_id(self) -> str:
        return transfer_id_of(self.spec.request_id, self.attempt)


def split_cores(num_instances: int, cores: list[int] | None = None) -> list[tuple[int, ...]]:
    """Disjoint core sets, one per instance (round-robin single cores when there are too few)."""
    cores = sorted(os.sched_getaffinity(0)) if cores is None else cores
    if num_instances <= len(cores):
        per = len(cores) // num_instances
        return [tuple(cores[i * per:(i + 1) * per]) for i in range(num_instances)]
    return [(cores[i % len(cores)],) for i in range(num_instances)]


def transfer_id_of(core_id: str, attempt: int) -> str:
    """A sequence's KV goes out under its core id, and a fresh id for each resubmission."""
    return core_id if attempt == 0 else f"{core_id}#{attempt}"


def instance_specs(specs: list[CoreRequestSpec], attempt: int = 0, source: str | None = None,
                   ) -> tuple[list[CoreRequestSpec], list[CoreRequestSpec]]:
    """One request's sequences as its prefill instance gets them (the prompt and first token,
    under transfer ids) and as its decode instance does (the whole request, pulling its KV from
    `source`; None: no prefill instance, the decode instance prefills). Siblings keep their leader
    where it is in the same batch, and their own seeds: each first token is sampled as colocated."""
    if source is None:
        return [], [msgspec.structs.replace(spec, kv_transfer=None) for spec in specs]
    ids = {spec.request_id: transfer_id_of(spec.request_id, attempt) for spec in specs}
    prefill_specs, decode_specs = [], []
    for spec in specs:
        transfer_id = ids[spec.request_id]
        prefill_specs.append(msgspec.structs.replace(
            spec, request_id=transfer_id, params=spec.params.model_copy(update={"max_tokens": 1}),
            leader_id=ids.get(spec.leader_id) if spec.leader_id is not None else None,
            kv_transfer=KVTransferParams(transfer_id)))
        decode_specs.append(msgspec.structs.replace(spec, kv_transfer=KVTransferParams(transfer_id, source)))
    return prefill_specs, decode_specs


class DisaggEngine(AsyncEngine):
    def __init__(self, config: EngineConfig, tokenizer: Any | None, metrics: ServerMetrics,
                 max_waiting_requests: int, deployment: DeploymentSpec,
                 transfer: KVTransferConfig | None = None, pin_cores: bool = False,
                 ray_address: str | None = None, ray_placement_timeout: float = 120.0) -> None:
        """`ray_address`: place the instances as actors of that Ray cluster; else child processes here."""
        transfer = transfer or KVTransferConfig()
        if ray_address is None and deployment.needs_nodes:
            raise ValueError("instances with a 'node' need a Ray cluster (--ray-address)")
        if ray_address is not None and pin_cores:
            raise ValueError("--pin-cores applies to local instances; on Ray, size instances with CPUs per instance")
        if ray_address is not None and transfer.transport == "shm" and deployment.placement_strategy != "STRICT_PACK":
            raise ValueError("the shm KV transport needs every instance on one node: use the tcp transport, "
                             "or placement strategy STRICT_PACK")
        super().__init__(config, tokenizer, metrics, max_waiting_requests)
        self.deployment = deployment
        self.ray = RayCluster(ray_address, deployment, ray_placement_timeout) if ray_address is not None else None
        count = len(deployment.instances)
        cores = split_cores(count) if pin_cores else [None] * count
        self.instances: list[Instance] = []
        for index, (spec, name) in enumerate(zip(deployment.instances, deployment.names)):
            instance = Instance(name, spec.role)
            instance.config = dataclasses.replace(
                config, kv_transfer=dataclasses.replace(transfer, role=spec.role), cpu_cores=cores[index],
                step_log=f"{config.step_log}.{name}.jsonl" if config.step_log else None)
            self.instances.append(instance)
        self._placements: dict[str, Placement] = {}  # core id -> where it runs

    # -------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        if self.ray is not None:
            await self.ray.connect()
        for index, instance in enumerate(self.instances):
            launcher = self.ray.launcher(index) if self.ray is not None else None
            instance.client = CoreClient(instance.config, functools.partial(self._on_instance_outputs, instance),
                                         functools.partial(self._on_instance_death, instance), launcher)
        try:
            await asyncio.gather(*(i.client.start() for i in self.instances))
            formats = {i.client.kv_format for i in self.instances}
            if len(formats) > 1:
                raise ValueError("prefill and decode instances must store KV alike to exchange it (--kv-cache-dtype); "
                                 "they report " + ", ".join(f"{i.name}: {i.client.kv_format}" for i in self.instances))
        except BaseException:
            await self._stop_instances()
            raise
        smallest = min(i.client.num_blocks for i in self.instances)
        self.inputs = InputProcessor(self.config, self.tokenizer, smallest)

    async def shutdown(self) -> None:
        for request_id in list(self._streams):
            self.abort(request_id)
        await self._stop_instances()

    async def _stop_instances(self) -> None:
        await asyncio.gather(*(i.client.shutdown() for i in self.instances if i.client is not None),
                             return_exceptions=True)
        if self.ray is not None:
            await self.ray.close()

    def describe(self) -> str:
        where = f" on Ray at {self.ray.address}" if self.ray is not None else ""
        return f"{len(self.instances)} instances{where}: " + ", ".join(
            f"{i.name} pid {i.client.pid} on {i.client.host} ({i.client.num_blocks} KV blocks"
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
        return {i.name: {"role": i.role, "pid": i.client.pid, "host": i.client.host, "alive": i.alive,
                         "in_flight": len(i.in_flight), "kv_address": i.client.kv_address,
                         "error": i.client.dead_reason}
                for i in self.instances if i.client is not None}

    # ---------------------------------------------------------------- intake
    def _send_specs(self, specs: list[CoreRequestSpec]) -> None:
        self._route(specs)

    def _route(self, specs: list[CoreRequestSpec], attempt: int = 0) -> None:
        """Send one request's sequences (an n > 1 group, leader first) to one prefill and one decode
        instance, least in flight first: siblings share the leader's prompt blocks only on the
        instance that holds the leader. An instance whose socket has lost its connection (dead,
        not yet reported) is passed over for the next one."""
        decodes = sorted(self._live("decode"), key=lambda i: len(i.in_flight))
        if not decodes:
            raise EngineDeadError(self.dead_reason or "no decode instance")
        prefill: Instance | None = None
        # A prompt-only request (max_tokens 0: prompt logprobs) has no decode phase: its decode instance
        # scores the prompt itself, and no KV is handed over.
        prefills = [] if specs[0].params.prompt_only else sorted(self._live("prefill"), key=lambda i: len(i.in_flight))
        for candidate in prefills:
            assert candidate.client is not None
            prefill_specs, decode_specs = instance_specs(specs, attempt, candidate.client.kv_address)
            try:
                candidate.client.add(prefill_specs)
            except CoreUnreachableError:
                continue
            prefill = candidate
            break
        if prefill is None:  # no prefill instance reachable: the decode instance computes the prompt
            prefill_specs, decode_specs = instance_specs(specs, attempt, None)
        decode = self._send_to_decode(decodes, decode_specs)
        if decode is None:
            if prefill is not None:
                assert prefill.client is not None
                prefill.client.finish([(s.request_id, RequestStatus.FINISHED_ABORTED.value, None)
                                       for s in prefill_specs])
            raise EngineDeadError("no decode instance is reachable")
        if prefill is not None:
            prefill.in_flight.update(s.request_id for s in prefill_specs)
        for spec in specs:
            self._placements[spec.request_id] = Placement(
                spec, decode, prefill, attempt)
            decode.in_flight.add(spec.request_id)

    @staticmethod
    def _send_to_decode(decodes: list[Instance], specs: list[CoreRequestSpec]) -> Instance | None:
        for decode in decodes:
            assert decode.client is not None
            try:
                decode.client.add(specs)
            except CoreUnreachableError:
                continue
            return decode
        return None

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
        combined = self._combined_stats()
        self.metrics.update_core(combined)
        self.metrics.cache_config(self.config.cache, combined.engine.num_blocks)  # blocks of all live instances
        self.metrics.steps(message.step_tokens)  # prefill instances' steps too
        finished = [output.request_id for output in message.outputs if output.finished]
        instance.in_flight.difference_update(finished)
        if instance.role == "prefill":
            for _, exposed in message.kv_sent:
                self.metrics.kv_transfer_exposed(exposed)
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
        blocks = sum(e.num_blocks for e in engines)
        free = sum(e.num_free_blocks for e in engines)
        prefix = PrefixCacheStats(sum(s.prefix_queried_tokens for s in live), sum(s.prefix_hit_tokens for s in live))
        queried, hits = prefix.queried_tokens, prefix.hit_tokens
        engine = EngineStats(
            num_running=sum(e.num_running for e in engines), num_waiting=sum(e.num_waiting for e in engines),
            kv_cache_usage=1 - free / blocks if blocks else 0.0, prefix_cache_hit_rate=prefix.hit_rate,
            num_preemptions=sum(e.num_preemptions for e in engines), num_free_blocks=free, num_blocks=blocks,
            num_kv_load_failures=sum(e.num_kv_load_failures for e in engines),
            spec_num_drafts=sum(e.spec_num_drafts for e in engines),
            spec_num_draft_tokens=sum(e.spec_num_draft_tokens for e in engines),
            spec_num_accepted_tokens=sum(e.spec_num_accepted_tokens for e in engines),
            spec_accepted_per_position=[sum(column) for column in zip_longest(
                *(e.spec_accepted_per_position for e in engines), fillvalue=0)],
            peak_used_blocks=sum(e.peak_used_blocks for e in engines),
            specontext_steps=sum(e.specontext_steps for e in engines),
            specontext_moved_tokens=sum(e.specontext_moved_tokens for e in engines),
            specontext_kept_tokens=sum(e.specontext_kept_tokens for e in engines),
            specontext_moved_bytes=sum(e.specontext_moved_bytes for e in engines),
            specontext_recomputed_keys=sum(e.specontext_recomputed_keys for e in engines),
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
                self._route([placement.spec], placement.attempt + 1)
                return
            except EngineDeadError:
                pass
        stream.fail(EngineDeadError(f"the decode instance serving this request died ({reason})"))
        self.outputs.abort_request(request_id)
        self._forget(request_id, "abort")
