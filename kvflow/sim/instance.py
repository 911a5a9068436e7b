"""One simulated engine instance: kvflow's own scheduler and KV cache manager, with a latency model
in place of the model runner.

Each iteration is the real `Scheduler.schedule()`: running sequences first, the token budget
shared in order, the newest running sequence preempted when blocks run out, then waiting
sequences admitted while budget, sequence slots and blocks last; prefill-first steps when the
instance's policy is vLLM v0's. Its time is the latency model's for that step's shape, and its
end is `Scheduler.update()` with a token for every sequence whose chunk reached its end. Roles:

* colocated: prompts and decodes in the same iterations;
* prefill: a sequence ends with its first token, and its blocks stay with the instance's KV
  connector until the simulator has sent its KV;
* decode: a sequence is admitted only when blocks for its prompt and first token are free, then
  waits for its KV (`receiving`), then decodes; its first token goes out at the end of the first
  iteration after the KV landed, as the engine emits it.

The KV transfer itself is the simulator's (kvflow/sim/simulator.py): the instance's connector
(`SimConnector`) reports a pull when the scheduler starts a load, and lands it or gives held
blocks back when the simulator says so, through the same protocol the engine's connectors use.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from kvflow.config import SchedulerConfig
from kvflow.core.kv_cache_manager import KVCacheManager
from kvflow.core.request import Request
from kvflow.core.scheduler import Scheduler, SchedulerOutput
from kvflow.kv_transfer.base import ConnectorEvents, ConnectorRequest, KVConnector, LoadResult
from kvflow.kv_transfer.wire import KVTransferParams
from kvflow.sampling_params import SamplingParams
from kvflow.sim.latency import LatencyModel
from kvflow.sim.noise import JitterProcess
from kvflow.sim.workload import SimRequest
from kvflow.worker.step import RunnerOutput

SCHEDULING_POLICIES = ("mixed", "prefill-first")
_TOKEN = 0  # the token every simulated step samples (no model, no prefix caching: its value is never read)


@dataclass(frozen=True)
class InstanceSpec:
    """What the simulator needs to know about one instance."""

    latency: LatencyModel
    num_blocks: int
    block_size: int = 16
    max_num_seqs: int = 128
    max_num_batched_tokens: int = 2048
    chunked_prefill: bool = True
    # "mixed": prompt chunks and decodes share iterations (kvflow, vLLM v1, Sarathi). "prefill-first":
    # an iteration that can admit a prompt computes prompts only and every decode waits for it
    # (vLLM v0's default scheduler, the colocated baseline DistServe measured against).
    policy: str = "mixed"
    # Pipeline parallelism over `lanes` stages: that many micro-batches in flight, each taking the
    # whole pass; the simulator runs them as lanes that split the instance's blocks.
    lanes: int = 1

    def __post_init__(self) -> None:
        if self.num_blocks < 1 or self.block_size < 1:
            raise ValueError(f"an instance needs >= 1 block of >= 1 token, got {self.num_blocks} x {self.block_size}")
        if self.lanes < 1 or self.num_blocks < self.lanes:
            raise ValueError(f"lanes must be in [1, num_blocks], got {self.lanes}")
        if self.policy not in SCHEDULING_POLICIES:
            raise ValueError(f"policy must be one of {SCHEDULING_POLICIES}, got {self.policy!r}")

    def scheduler_config(self) -> SchedulerConfig:
        return SchedulerConfig(max_num_seqs=self.max_num_seqs, max_num_batched_tokens=self.max_num_batched_tokens,
                               enable_chunked_prefill=self.chunked_prefill, mixed_batching=self.policy == "mixed")


@dataclass(eq=False)
class Seq:
    """A request on one instance, and when its tokens came out."""

    request: SimRequest
    index: int  # position in the stream
    target: int  # tokens to generate here (1 on a prefill instance)
    needs_load: bool = False  # decode instance: the prompt's KV comes from a prefill instance
    token_times: list[float] = field(default_factory=list)


@dataclass
class Iteration:
    sched: SchedulerOutput
    start_s: float
    end_s: float


@functools.cache
def _params(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


class SimConnector(KVConnector):
    """A prefill or decode instance's KV connector, timed by the simulator instead of moving bytes."""

    def __init__(self, instance: InstanceSim) -> None:
        self.instance = instance
        self.held: dict[int, list[int]] = {}  # prefill: finished sequences' blocks until their KV is sent
        self._release: list[list[int]] = []
        self._landing: dict[str, float] = {}  # decode: request id -> when its KV lands

    def register_kv_caches(self, spec, caches) -> None:  # noqa: ANN001 - a simulated instance has no caches
        raise NotImplementedError("a simulated instance holds no KV tensors")

    def num_tokens_to_load(self, request: ConnectorRequest) -> int:
        params = request.kv_transfer
        return request.num_prompt_tokens if params is not None and params.source is not None else 0

    def start_load(self, request: ConnectorRequest, start: int = 0) -> None:
        seq = self.instance.seqs[request.request_id]
        if self.instance.on_load_start is not None:
            self.instance.on_load_start(self.instance, seq, self.instance.now)

    def land(self, index: int, done_s: float) -> None:
        """The simulator has timed this sequence's KV: it is in the blocks from `done_s` on."""
        self._landing[str(index)] = done_s

    def finish_load(self, request: ConnectorRequest, result: LoadResult) -> bool:
        request.append_token(_TOKEN)  # the first token, sampled on the prefill instance
        return True

    def request_finished(self, request: ConnectorRequest) -> bool:
        if self.instance.role != "prefill":
            return False
        self.held[int(request.request_id)] = list(request.block_ids)
        return True

    def release(self, index: int) -> None:
        """The sequence's KV has been sent: its blocks come back at the next schedule."""
        blocks = self.held.pop(index, None)
        if blocks is not None:
            self._release.append(blocks)

    def collect(self) -> ConnectorEvents:
        now = self.instance.now
        landed = [rid for rid, done in self._landing.items() if done <= now]
        loaded = []
        for rid in landed:
            del self._landing[rid]
            request = self.instance.scheduler.receiving[rid]
            loaded.append(LoadResult(rid, num_tokens=request.num_prompt_tokens))
        events = ConnectorEvents(loaded=loaded, release=self._release)
        self._release = []
        return events


class InstanceSim:
    def __init__(self, name: str, role: str, spec: InstanceSpec,
                 on_load_start: Callable[[InstanceSim, Seq, float], None] | None = None,
                 rng: np.random.Generator | None = None) -> None:
        """`on_load_start(instance, seq, now)`: a decode instance has allocated a sequence's blocks
        and starts pulling its KV (the simulator decides when it lands). `rng` draws each
        iteration's jitter (kvflow/sim/noise.py) when the latency model has a noise spread."""
        self.name, self.role, self.spec = name, role, spec
        lat = spec.latency
        self.jitter = (JitterProcess(lat.noise_sigma, lat.noise_memory, lat.noise_tau_s, rng)
                       if rng is not None and lat.noise_sigma > 0 else None)
        self.on_load_start = on_load_start
        self.connector = SimConnector(self) if role != "colocated" else None
        kv = KVCacheManager(spec.num_blocks, spec.block_size, enable_prefix_caching=False)
        self.scheduler = Scheduler(spec.scheduler_config(), kv, max_model_len=2**31, connector=self.connector)
        self.seqs: dict[str, Seq] = {}
        self.now = 0.0
        self.iteration: Iteration | None = None  # the one in progress
        self.busy_seconds = 0.0

    @property
    def num_in_flight(self) -> int:
        return self.scheduler.num_unfinished

    @property
    def num_preemptions(self) -> int:
        return self.scheduler.num_preemptions

    @property
    def free_blocks(self) -> int:
        return self.scheduler.kv.num_free_blocks

    @property
    def held(self) -> dict[int, list[int]]:
        return self.connector.held if self.connector is not None else {}

    def add(self, seq: Seq) -> None:
        """A sequence arrives: its prompt (token values never matter: no prefix caching here)."""
        rid = str(seq.index)
        transfer = None
        if self.role == "prefill":
            transfer = KVTransferParams(rid)
        elif seq.needs_load:
            transfer = KVTransferParams(rid, source="simulated")
        self.seqs[rid] = seq
        self.scheduler.add_request(Request(rid, [_TOKEN] * seq.request.prompt_len, _params(seq.target),
                                           arrival_time=seq.request.arrival_s, kv_transfer=transfer))

    def release_held(self, index: int) -> None:
        """Prefill instance: the KV of this sequence has been sent; its blocks come back."""
        if self.connector is not None:
            self.connector.release(index)

    def land_load(self, index: int, done_s: float) -> None:
        """Decode instance: this sequence's KV lands at `done_s`."""
        assert self.connector is not None
        self.connector.land(index, done_s)

    # ------------------------------------------------------------ scheduling
    def schedule(self, now: float) -> Iteration | None:
        """Build the next iteration at `now` (None when there is nothing to compute)."""
        self.now = now
        sched = self.scheduler.schedule()
        self.scheduler.drain_events()  # the simulator keeps its own account of transfers
        if sched.is_empty:
            if sched.loaded:  # a first token can only go out with an iteration: an empty one of no time
                return Iteration(sched, now, now)
            return None
        prompts, decodes = [], []
        for chunk in sched.chunks:
            request = chunk.request
            if chunk.start < request.num_prompt_tokens:
                prompts.append((chunk.num_tokens, chunk.start))
            else:
                decodes.append(request.num_tokens)
        seconds = self.spec.latency.iteration_time(prompts, decodes)
        if self.jitter is not None:
            seconds *= self.jitter.factor(now)
        self.busy_seconds += seconds
        return Iteration(sched, now, now + seconds)

    # ------------------------------------------------------------ completion
    def complete(self, it: Iteration) -> list[Seq]:
        """Apply an iteration's results at its end; return the sequences that finished here."""
        for request in it.sched.loaded:
            self.seqs[request.request_id].token_times.append(it.end_s)  # computed on the prefill instance
        self.now = it.end_s
        sampled = {c.request.request_id: [_TOKEN] for c in it.sched.chunks if c.samples}
        kept = self.scheduler.update(it.sched, RunnerOutput(sampled=sampled))
        for rid in kept:
            self.seqs[rid].token_times.append(it.end_s)
        finished = [self.seqs.pop(rid) for rid in kept if rid not in self.scheduler.requests]
        finished += [self.seqs.pop(r.request_id) for r in it.sched.loaded
                     if r.request_id in self.seqs and r.request_id not in self.scheduler.requests]
        return finished
