"""Discrete-event simulation of a deployment serving a request stream.

Events are arrivals, iteration ends and KV loads landing. Each instance runs kvflow's own
scheduler and KV cache manager (kvflow/sim/instance.py) and takes as long per iteration as its
latency model says. A
disaggregated deployment routes each request, as the router does, to the prefill and the decode
instance with the fewest requests in flight; the KV transfer is modelled — the term DistServe's
own simulator leaves out — as bytes over the prefill instance's link, serialised per link:
whole-request transfer starts once the prompt is done, layer-wise streaming sends layer `i` as
soon as the last prompt iteration has computed it (layers spread evenly over that iteration). The
decode instance admits a request only when it has blocks for it, as the engine does, so the
prefill side's memory is the queue.

Results are the same `RequestResult` records `kvflow bench serve` measures, so the same summary
(percentiles, SLO attainment, goodput) is computed from both.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from kvflow.bench.serve.client import RequestResult
from kvflow.sim.instance import InstanceSim, InstanceSpec, Iteration, Seq
from kvflow.sim.workload import SimRequest

KV_TRANSFER_MODES = ("whole", "layerwise")


@dataclass(frozen=True)
class TransferSpec:
    kv_bytes_per_token: int
    bandwidth: float  # bytes/s of one prefill instance's link
    num_layers: int
    mode: str = "layerwise"
    latency_s: float = 0.0  # per transfer: connection, control messages, acknowledgement

    def __post_init__(self) -> None:
        if self.mode not in KV_TRANSFER_MODES:
            raise ValueError(f"transfer mode must be one of {KV_TRANSFER_MODES}, got {self.mode!r}")
        if self.bandwidth <= 0 or self.num_layers < 1 or self.kv_bytes_per_token < 0:
            raise ValueError("a transfer needs bandwidth > 0, >= 1 layer and kv bytes >= 0")


@dataclass(frozen=True)
class Deployment:
    """Colocated instances, or prefill and decode pools with a transfer between them."""

    colocated: tuple[InstanceSpec, ...] = ()
    prefill: tuple[InstanceSpec, ...] = ()
    decode: tuple[InstanceSpec, ...] = ()
    transfer: TransferSpec | None = None
    frontend_s: float = 0.0  # added to every token's delivery (HTTP, tokenisation, IPC)

    def __post_init__(self) -> None:
        disaggregated = bool(self.prefill or self.decode)
        if disaggregated == bool(self.colocated):
            raise ValueError("a deployment is either colocated instances or prefill + decode pools")
        if disaggregated and (not self.prefill or not self.decode or self.transfer is None):
            raise ValueError("a disaggregated deployment needs prefill and decode instances and a transfer")

    @property
    def disaggregated(self) -> bool:
        return bool(self.prefill)

    @property
    def num_instances(self) -> int:
        return len(self.colocated) + len(self.prefill) + len(self.decode)


@dataclass
class SimResult:
    results: list[RequestResult]
    duration_s: float
    busy_share: dict[str, float] = field(default_factory=dict)  # per instance: time spent computing
    preemptions: int = 0
    transfer_exposed_s: list[float] = field(default_factory=list)  # per transfer: after the prompt was done


def _lanes(name: str, role: str, spec: InstanceSpec, rng: np.random.Generator,
           on_load_start: Callable[[InstanceSim, Seq, float], None] | None = None) -> list[InstanceSim]:
    """An instance, or with pipeline parallelism one lane per micro-batch in flight."""
    if spec.lanes == 1:
        return [InstanceSim(name, role, spec, on_load_start, rng)]
    lane = dataclasses.replace(spec, num_blocks=spec.num_blocks // spec.lanes, lanes=1)
    return [InstanceSim(f"{name}/{i}", role, lane, on_load_start, rng) for i in range(spec.lanes)]


class Simulator:
    def __init__(self, deployment: Deployment, seed: int = 0) -> None:
        """`seed`: of the iteration jitter drawn when the latency models have a noise spread."""
        self.deployment = deployment
        d, rng = deployment, np.random.default_rng(seed)
        self.colocated = [x for i, s in enumerate(d.colocated) for x in _lanes(f"colocated-{i}", "colocated", s, rng)]
        self.prefill = [x for i, s in enumerate(d.prefill) for x in _lanes(f"prefill-{i}", "prefill", s, rng)]
        self.decode = [x for i, s in enumerate(d.decode)
                       for x in _lanes(f"decode-{i}", "decode", s, rng, self._on_pull)]
        self._events: list[tuple[float, int, str, object]] = []
        self._order = itertools.count()
        self._now = 0.0
        # Per request index: the prefill side's last iteration (start, end) and the decode pull time.
        self._prompt_done: dict[int, tuple[InstanceSim, float, float]] = {}
        self._pulls: dict[int, tuple[InstanceSim, Seq, float]] = {}
        self._link_free: dict[str, float] = {}
        self._exposed: list[float] = []

    # ------------------------------------------------------------------ run
    def run(self, requests: Sequence[SimRequest]) -> SimResult:
        out_seqs: dict[int, Seq] = {}
        for index, request in enumerate(requests):
            self._push(request.arrival_s, "arrive", (index, request))
        while self._events:
            self._now, _, kind, payload = heapq.heappop(self._events)
            if kind == "arrive":
                index, request = payload  # type: ignore[misc]
                out_seqs[index] = self._route(index, request)
            elif kind == "end":
                instance, iteration = payload  # type: ignore[misc]
                self._finish_iteration(instance, iteration)
            elif kind == "wake":
                self._kick(payload)  # type: ignore[arg-type]
        results = [self._result(out_seqs[i]) for i in range(len(requests))]
        last = max((r.arrival_s + r.e2e_s for r in results if r.success), default=0.0)
        everyone = self.colocated + self.prefill + self.decode
        return SimResult(
            results, last,
            {i.name: i.busy_seconds / last if last else 0.0 for i in everyone},
            sum(i.num_preemptions for i in everyone), list(self._exposed))

    def _push(self, when: float, kind: str, payload: object) -> None:
        heapq.heappush(self._events, (when, next(self._order), kind, payload))

    def _route(self, index: int, request: SimRequest) -> Seq:
        if not self.deployment.disaggregated:
            instance = min(self.colocated, key=lambda i: i.num_in_flight)
            seq = Seq(request, index, request.output_len)
            instance.add(seq)
            self._kick(instance)
            return seq
        prefill = min(self.prefill, key=lambda i: i.num_in_flight)
        prefill.add(Seq(request, index, 1))
        decode = min(self.decode, key=lambda i: i.num_in_flight)
        seq = Seq(request, index, request.output_len, needs_load=True)
        decode.add(seq)
        self._kick(prefill)
        self._kick(decode)
        return seq

    def _kick(self, instance: InstanceSim) -> None:
        """Start the instance's next iteration now if it is idle and has something to compute."""
        if instance.iteration is not None:
            return
        iteration = instance.schedule(self._now)
        if iteration is not None:
            instance.iteration = iteration
            self._push(iteration.end_s, "end", (instance, iteration))

    def _finish_iteration(self, instance: InstanceSim, iteration: Iteration) -> None:
        instance.iteration = None
        finished = instance.complete(iteration)
        if instance.role == "prefill":
            for seq in finished:
                self._prompt_done[seq.index] = (instance, iteration.start_s, iteration.end_s)
                self._try_transfer(seq.index)
        self._kick(instance)

    # ------------------------------------------------------------- transfers
    def _on_pull(self, decode: InstanceSim, seq: Seq, now: float) -> None:
        self._pulls[seq.index] = (decode, seq, now)
        self._try_transfer(seq.index)

    def _try_transfer(self, index: int) -> None:
        """Both sides ready (prompt computed, decode blocks allocated): time the transfer."""
        if index not in self._prompt_done or index not in self._pulls:
            return
        prefill, start, end = self._prompt_done.pop(index)
        decode, seq, pulled = self._pulls.pop(index)
        transfer = self.deployment.transfer
        assert transfer is not None
        nbytes = transfer.kv_bytes_per_token * seq.request.prompt_len
        link = max(pulled, self._link_free.get(prefill.name, 0.0))
        if transfer.mode == "whole":
            done = max(link, end) + nbytes / transfer.bandwidth
        else:
            per_layer = nbytes / transfer.num_layers / transfer.bandwidth
            t = link
            for layer in range(transfer.num_layers):
                t = max(t, start + (end - start) * (layer + 1) / transfer.num_layers) + per_layer
            done = max(t, end)
        self._link_free[prefill.name] = done
        done += transfer.latency_s
        self._exposed.append(done - max(end, pulled))
        prefill.release_held(index)
        decode.land_load(index, done)
        self._push(done, "wake", decode)
        self._push(done, "wake", prefill)  # its blocks came back: it may admit more

    # --------------------------------------------------------------- results
    def _result(self, seq: Seq) -> RequestResult:
        request = seq.request
        times = [t + self.deployment.frontend_s for t in seq.token_times[:request.output_len]]
        result = RequestResult(request.prompt_len, request.output_len, prompt_tokens=request.prompt_len,
                               arrival_s=request.arrival_s, start_s=request.arrival_s)
        if len(times) < request.output_len:
            result.error = "not finished when the simulation ended"
            return result
        result.success = True
        result.output_tokens = len(times)
        result.ttft_s = times[0] - request.arrival_s
        result.e2e_s = times[-1] - request.arrival_s
        result.itl_s = [b - a for a, b in zip(times, times[1:])]
        return result
