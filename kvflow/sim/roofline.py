"""Roofline time of one engine iteration on an instance of tp × pp devices we cannot measure.

A stage of a pipeline runs its layers on `tp` devices; each device does 1/tp of the FLOPs and
reads 1/tp of the weights and KV, so a stage takes `max(compute, memory)` at achievable fractions
of the datasheet peaks, plus two ring all-reduces per layer (after attention and after the MLP,
Megatron-style) and a fixed per-iteration overhead. Stages hand activations on over NVLink within
a node and over the network between nodes. A full forward pass is every stage plus every send;
with pp micro-batches in flight, throughput is limited by the slowest stage (or send) alone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from kvflow.sim.hardware import Hardware
from kvflow.sim.model_shape import ModelShape


@dataclass(frozen=True)
class Efficiency:
    """Achievable fractions of datasheet peaks, and the fixed costs a roofline leaves out.

    The defaults are typical of published serving measurements, not of one kernel library:
    prefill GEMMs and FlashAttention reach 50-70 % of dense bf16 peak (DistServe, Sarathi-Serve,
    vLLM on A100/H100); decode kernels (skinny GEMMs, paged attention) read memory at 70-85 % of
    HBM bandwidth; NCCL's all-reduce bus bandwidth on NVLink reaches about 80 % of per-direction
    peak for large messages, with ~10 µs of latency for small ones.
    """

    prefill_mfu: float = 0.5  # fraction of peak FLOP/s in iterations that carry prompt chunks
    decode_mfu: float = 0.5  # fraction of peak FLOP/s in decode-only iterations (large batches)
    bandwidth: float = 0.7  # fraction of memory bandwidth when reading weights and KV
    link: float = 0.8  # fraction of NVLink / network bandwidth a collective or send achieves
    collective_latency_s: float = 10e-6  # fixed cost of one all-reduce or one stage-to-stage send
    overhead_s: float = 0.5e-3  # per stage and iteration: scheduling, sampling, kernel launches

    def __post_init__(self) -> None:
        for name in ("prefill_mfu", "decode_mfu", "bandwidth", "link"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {getattr(self, name)}")
        if self.collective_latency_s < 0 or self.overhead_s < 0:
            raise ValueError("collective_latency_s and overhead_s must not be negative")

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass(frozen=True)
class Cost:
    """One iteration, by part. The parts are those of the slowest stage (per device)."""

    compute_s: float
    memory_s: float
    allreduce_s: float
    send_s: float  # slowest stage-to-stage send (0 without pipeline parallelism)
    overhead_s: float
    stage_s: float  # pipeline bottleneck: the slowest stage or the slowest send
    pass_s: float  # a full forward pass: every stage and every send, one after the other


class Roofline:
    """Iteration times of `shape` on `tp × pp` devices of `hw`, checked to be a valid layout."""

    def __init__(self, shape: ModelShape, hw: Hardware, tp: int = 1, pp: int = 1,
                 efficiency: Efficiency | None = None) -> None:
        self.shape, self.hw, self.tp, self.pp = shape, hw, tp, pp
        self.eff = efficiency or Efficiency()
        self._check_layout()
        base, extra = divmod(shape.num_layers, pp)  # earlier stages take the extra layers: the last has lm_head
        self.stage_layers = [base + (1 if s < extra else 0) for s in range(pp)]
        # KV heads are split over tp; with fewer KV heads than tp each device keeps a copy of one.
        self.kv_replication = tp * math.ceil(shape.num_kv_heads / tp) / shape.num_kv_heads

    def _check_layout(self) -> None:
        shape, hw, tp, pp = self.shape, self.hw, self.tp, self.pp
        if tp < 1 or pp < 1:
            raise ValueError(f"tp and pp must be at least 1, got tp={tp} pp={pp}")
        if shape.num_heads % tp:
            raise ValueError(f"tp={tp} must divide the {shape.num_heads} attention heads of {shape.name}")
        kv = shape.num_kv_heads
        if (kv % tp) if tp <= kv else (tp % kv):
            raise ValueError(f"tp={tp} and the {kv} KV heads of {shape.name} must divide one another")
        if pp > shape.num_layers:
            raise ValueError(f"pp={pp} exceeds the {shape.num_layers} layers of {shape.name}")
        if tp > 1 and (tp > hw.devices_per_node or hw.devices_per_node % tp or hw.intra_node_bandwidth <= 0):
            raise ValueError(f"tp={tp} needs tp devices linked within one node; {hw.name} has "
                             f"{hw.devices_per_node} per node, link {hw.intra_node_bandwidth:.3g} B/s")
        if pp > 1 and any(self._link_bandwidth(s) <= 0 for s in range(pp - 1)):
            raise ValueError(f"pp={pp} with tp={tp} needs a link between devices; {hw.name} has none")

    def _link_bandwidth(self, boundary: int) -> float:
        """Bytes/s per device from stage `boundary` to the next: NVLink within a node, else network."""
        per_node = self.hw.devices_per_node
        same_node = (boundary * self.tp) // per_node == ((boundary + 1) * self.tp) // per_node
        return self.hw.intra_node_bandwidth if same_node else self.hw.inter_node_bandwidth

    @property
    def num_devices(self) -> int:
        return self.tp * self.pp

    def stage_weight_params(self, stage: int) -> int:
        """Parameters a stage stores: its layers, the embedding on the first, norm and lm_head on the last."""
        shape, last = self.shape, stage == self.pp - 1
        params = self.stage_layers[stage] * shape.params_per_layer
        if stage == 0:
            params += shape.embedding_params
        if last:  # a tied lm_head is the embedding itself only when both live on the same stage
            params += shape.hidden_size + (shape.embedding_params if not shape.tied_embeddings or self.pp > 1 else 0)
        return params

    def _stage_read_params(self, stage: int) -> int:
        """Parameters a stage reads every iteration: the embedding only row by row, so not counted."""
        params = self.stage_layers[stage] * self.shape.params_per_layer
        if stage == self.pp - 1:
            params += self.shape.hidden_size + self.shape.embedding_params
        return params

    def kv_capacity_tokens(self, reserve: float = 0.1) -> int:
        """Tokens whose KV fits beside the weights, `reserve` of memory kept for activations.

        Each stage holds its layers' KV of every token: the tightest stage sets the capacity.
        Raises ValueError when a stage's weights alone do not fit.
        """
        if not 0.0 <= reserve < 1.0:
            raise ValueError(f"reserve must be in [0, 1), got {reserve}")
        shape, usable = self.shape, self.tp * self.hw.memory_bytes * (1.0 - reserve)
        capacity = math.inf
        for stage, layers in enumerate(self.stage_layers):
            weights = self.stage_weight_params(stage) * shape.param_bytes
            if weights >= usable:
                raise ValueError(
                    f"{shape.name} does not fit on {self.hw.name} with tp={self.tp} pp={self.pp}: stage {stage} "
                    f"holds {weights / 1e9:.1f} GB of weights, its {self.tp} device(s) {usable / 1e9:.1f} GB usable")
            per_token = layers * shape.kv_bytes_per_token_per_layer * self.kv_replication
            capacity = min(capacity, (usable - weights) / per_token)
        return int(capacity)

    def cost(self, chunks: Sequence[tuple[int, int]], contexts: Sequence[int]) -> Cost:
        """One iteration of prompt chunks `(new, cached)` and decodes of these context lengths."""
        shape, hw, eff, tp = self.shape, self.hw, self.eff, self.tp
        tokens = sum(new for new, _ in chunks) + len(contexts)
        if tokens == 0:
            return Cost(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
        sampled = len(chunks) + len(contexts)  # one logits row per sequence
        attention = (sum(shape.attention_flops_per_layer(new, p) for new, p in chunks)
                     + sum(shape.attention_flops_per_layer(1, c) for c in contexts))
        kv_tokens = sum(p for _, p in chunks) + sum(contexts) + tokens  # cached KV read, new KV written
        flop_rate = hw.peak_flops * (eff.prefill_mfu if chunks else eff.decode_mfu)
        byte_rate = hw.mem_bandwidth * eff.bandwidth
        activations = tokens * shape.activation_bytes_per_token
        ring = 2.0 * (tp - 1) / tp * activations / (hw.intra_node_bandwidth * eff.link) if tp > 1 else 0.0

        stages: list[tuple[float, float, float, float]] = []
        for stage, layers in enumerate(self.stage_layers):
            flops = layers * (2.0 * shape.linear_params_per_layer * tokens + attention)
            if stage == self.pp - 1:
                flops += shape.logits_flops * sampled
            read = (self._stage_read_params(stage) * shape.param_bytes
                    + layers * shape.kv_bytes_per_token_per_layer * kv_tokens * self.kv_replication)
            allreduce = 2 * layers * (ring + eff.collective_latency_s) if tp > 1 else 0.0
            compute, memory = flops / tp / flop_rate, read / tp / byte_rate
            stages.append((max(compute, memory) + allreduce + eff.overhead_s, compute, memory, allreduce))
        sends = [activations / tp / (self._link_bandwidth(b) * eff.link) + eff.collective_latency_s
                 for b in range(self.pp - 1)]
        slowest = max(stages)
        send = max(sends, default=0.0)
        return Cost(compute_s=slowest[1], memory_s=slowest[2], allreduce_s=slowest[3], send_s=send,
                    overhead_s=eff.overhead_s, stage_s=max(slowest[0], send),
                    pass_s=sum(s[0] for s in stages) + sum(sends))

    def prefill_s(self, lengths: Sequence[int]) -> float:
        """Full-pass seconds of one iteration computing these whole prompts."""
        return self.cost([(n, 0) for n in lengths], ()).pass_s

    def decode_s(self, contexts: Sequence[int]) -> float:
        """Full-pass seconds of one decode iteration over these context lengths."""
        return self.cost((), contexts).pass_s
