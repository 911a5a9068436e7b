"""One simulated engine instance: kvflow's scheduler, step for step, with a latency model for time.

The scheduling mirrors kvflow/engine/scheduler.py so the simulator predicts the engine it is
validated against: running sequences first (a decode is one token, an unfinished prompt its next
chunk), the token budget shared in order, the newest running sequence preempted (its KV dropped,
to be recomputed) when blocks run out, then waiting sequences admitted first come first served
while budget, sequence slots and blocks last. Roles:

* colocated: prompts and decodes in the same iterations (chunked prefill);
* prefill: a sequence ends with its first token, and its blocks stay held until its KV is sent;
* decode: a sequence is admitted only when blocks for its prompt and first token are free, then
  waits for its KV (`receiving`), then decodes; its first token goes out at the end of the first
  iteration after the KV landed, as the engine emits it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from kvflow.sim.latency import LatencyModel
from kvflow.sim.noise import JitterProcess
from kvflow.sim.workload import SimRequest

SCHEDULING_POLICIES = ("mixed", "prefill-first")


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


@dataclass(eq=False)
class Seq:
    """A request on one instance."""

    request: SimRequest
    index: int  # position in the stream
    target: int  # tokens to generate here (1 on a prefill instance)
    computed: int = 0  # tokens whose KV is in the cache
    generated: int = 0
    blocks: int = 0
    needs_load: bool = False  # decode instance: the prompt's KV comes from a prefill instance
    load_done_s: float | None = None  # decode instance: when the KV landed (None: not yet)
    token_times: list[float] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return self.request.prompt_len + self.generated


@dataclass
class Iteration:
    chunks: list[tuple[Seq, int]]  # (sequence, tokens computed this iteration)
    loaded: list[Seq]  # decode instance: sequences whose first token goes out with this iteration
    start_s: float
    end_s: float


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
        self.free_blocks = spec.num_blocks
        self.waiting: deque[Seq] = deque()
        self.running: list[Seq] = []
        self.receiving: list[Seq] = []
        self.held: dict[int, Seq] = {}  # prefill instance: finished sequences whose KV is not sent yet
        self.iteration: Iteration | None = None  # the one in progress
        self.num_preemptions = 0
        self.busy_seconds = 0.0

    @property
    def num_in_flight(self) -> int:
        return len(self.waiting) + len(self.running) + len(self.receiving)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.spec.block_size)

    def _allocate(self, seq: Seq, tokens: int) -> bool:
        need = self.blocks_for(tokens) - seq.blocks
        if need > self.free_blocks:
            return False
        if need > 0:
            self.free_blocks -= need
            seq.blocks += need
        return True

    def free(self, seq: Seq) -> None:
        self.free_blocks += seq.blocks
        seq.blocks = 0

    def release_held(self, index: int) -> None:
        """Prefill instance: the KV of this sequence has been sent; its blocks come back."""
        seq = self.held.pop(index, None)
        if seq is not None:
            self.free(seq)

    # ------------------------------------------------------------ scheduling
    def schedule(self, now: float) -> Iteration | None:
        """Build the next iteration at `now` (None when there is nothing to compute)."""
        loaded = [s for s in self.receiving if s.load_done_s is not None and s.load_done_s <= now]
        for seq in loaded:
            self.receiving.remove(seq)
            seq.computed, seq.generated = seq.request.prompt_len, 1
            self.running.append(seq)
        budget = self.spec.max_num_batched_tokens
        chunks: list[tuple[Seq, int]] = []
        if self.spec.policy == "prefill-first" and self.waiting and not loaded:
            self._admit(chunks, budget, now)  # prompts alone, if any can start
            if chunks:
                return self._iteration(chunks, loaded, now)
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            remaining = seq.num_tokens - seq.computed
            n = min(remaining, budget)
            if n < remaining and not self.spec.chunked_prefill:
                i += 1
                continue
            while not self._allocate(seq, seq.computed + n):
                victim = self.running.pop()
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if seq not in self.running:
                break
            chunks.append((seq, n))
            budget -= n
            i += 1
        if not preempted:
            budget = self._admit(chunks, budget, now)
        if not chunks:
            return None
        return self._iteration(chunks, loaded, now)

    def _iteration(self, chunks: list[tuple[Seq, int]], loaded: list[Seq], now: float) -> Iteration:
        seconds = self.spec.latency.iteration_time(
            [(n, s.computed) for s, n in chunks if s.computed < s.request.prompt_len],
            [s.num_tokens for s, n in chunks if s.computed >= s.request.prompt_len])
        if self.jitter is not None:
            seconds *= self.jitter.factor(now)
        self.busy_seconds += seconds
        return Iteration(chunks, loaded, now, now + seconds)

    def _preempt(self, seq: Seq) -> None:
        self.free(seq)
        seq.computed = 0  # recomputed from scratch (its generated tokens stay, as the engine keeps them)
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def _admit(self, chunks: list[tuple[Seq, int]], budget: int, now: float) -> int:
        while self.waiting and budget > 0 and len(self.running) + len(self.receiving) < self.spec.max_num_seqs:
            seq = self.waiting[0]
            if seq.needs_load:  # decode instance: blocks for the prompt and first token, then pull
                if not self._allocate(seq, seq.request.prompt_len + 1):
                    break
                self.waiting.popleft()
                seq.needs_load = False
                self.receiving.append(seq)
                if self.on_load_start is not None:
                    self.on_load_start(self, seq, now)
                continue
            remaining = seq.num_tokens - seq.computed
            n = min(remaining, budget)
            if (n < remaining and not self.spec.chunked_prefill) or not self._allocate(seq, seq.computed + n):
                self.free(seq)
                break
            self.waiting.popleft()
            self.running.append(seq)
            chunks.append((seq, n))
            budget -= n
        return budget

    # ------------------------------------------------------------ completion
    def complete(self, it: Iteration) -> list[Seq]:
        """Apply an iteration's results at its end; return the sequences that finished here."""
        finished: list[Seq] = []
        for seq in it.loaded:
            seq.token_times.append(it.end_s)  # the first token, computed on the prefill instance
        for seq, n in it.chunks:
            seq.computed += n
            if seq.computed >= seq.num_tokens:  # the last prompt chunk, or a decode: a new token
                seq.generated += 1
                seq.token_times.append(it.end_s)
                if seq.generated >= seq.target:
                    self.running.remove(seq)
                    finished.append(seq)
                    if self.role == "prefill":
                        self.held[seq.index] = seq  # freed once its KV is sent
                    else:
                        self.free(seq)
        return finished
