"""LoRA slots on their own: a slot's delta equals the adapter merged into the weight (fp64 reference), in
both ways a step computes it (a pair of matmuls per run, and every slot at once masked by a one-hot row
matrix); rows outside every run keep the base output exactly; padding to max rank changes nothing."""

from __future__ import annotations

import pytest
import torch

from kvflow.model.linear import Linear
from kvflow.model.lora import LoRAAdapter, LoRASlots


class _Model(torch.nn.Module):
    """The attributes LoRASlots reads: config, layers (with self_attn / mlp projections), norm."""

    def __init__(self, cfg) -> None:
        super().__init__()
        self.config = cfg
        layer = torch.nn.Module()
        layer.self_attn, layer.mlp = torch.nn.Module(), torch.nn.Module()
        q, kv, h, i = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.hidden_size, \
            cfg.intermediate_size
        for parent, name, k, n in ((layer.self_attn, "qkv_proj", h, q + 2 * kv), (layer.self_attn, "o_proj", q, h),
                                   (layer.mlp, "gate_up_proj", h, 2 * i), (layer.mlp, "down_proj", i, h)):
            lin = Linear(k, n)
            torch.nn.init.normal_(lin.weight, std=0.1)
            setattr(parent, name, lin)
        self.layers = torch.nn.ModuleList([layer])
        self.norm = torch.nn.LayerNorm(h).float()


def _cfg():
    from types import SimpleNamespace

    return SimpleNamespace(num_heads=2, num_kv_heads=1, head_dim=8, hidden_size=16, intermediate_size=24,
                           num_layers=1)


def _adapter(cfg, seed: int, rank: int) -> LoRAAdapter:
    g = torch.Generator().manual_seed(seed)
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    shards = [(0, torch.randn(rank, 16, generator=g), torch.randn(q, rank, generator=g)),
              (2, torch.randn(rank, 16, generator=g), torch.randn(kv, rank, generator=g))]  # q and v, not k
    down = [(0, torch.randn(rank, 24, generator=g), torch.randn(16, rank, generator=g))]
    return LoRAAdapter(f"a{seed}", "", "", rank, ("q_proj", "v_proj", "down_proj"),
                       {(0, "qkv_proj"): shards, (0, "down_proj"): down})


def _merged(weight: torch.Tensor, cfg, adapter: LoRAAdapter, projection: str) -> torch.Tensor:
    from kvflow.model.lora import shard_shapes

    w = weight.double().clone()
    for shard, a, b in adapter.weights.get((0, projection), []):
        offset, rows, _ = shard_shapes(cfg, projection)[shard]
        w[offset:offset + rows] += b.double() @ a.double()
    return w


@pytest.mark.parametrize("onehot", [False, True])
def test_slot_deltas_equal_merged_weights(onehot):
    cfg = _cfg()
    model = _Model(cfg)
    slots = LoRASlots(model, num_slots=5, max_rank=6)  # ranks 4 and 2 padded to 6; 2 of 5 slots used
    adapters = {0: _adapter(cfg, 1, 4), 2: _adapter(cfg, 2, 2)}
    for slot, adapter in adapters.items():
        slots.load(slot, adapter)
    runs = [(2, 0, 3), (0, 5, 9), (2, 9, 10)]  # rows 3-4 and 10-11 run the base
    if onehot:
        runs = runs + [(0, 10, 11), (2, 11, 12)]  # more runs than BATCHED_RUNS: every slot at once
    tokens = 12
    assert (slots.set_runs(runs, tokens) is not None) == onehot
    g = torch.Generator().manual_seed(9)
    for projection, width in (("qkv_proj", 16), ("down_proj", 24)):
        layer = getattr(model.layers[0].self_attn if projection == "qkv_proj" else model.layers[0].mlp, projection)
        x = torch.randn(tokens, width, generator=g)
        out = layer(x)
        expected = x.double() @ layer.weight.double().t()
        for slot, start, end in runs:
            merged = _merged(layer.weight.detach(), cfg, adapters[slot], projection)
            expected[start:end] = x[start:end].double() @ merged.t()
        torch.testing.assert_close(out.double(), expected, atol=1e-4, rtol=1e-5)
        covered = torch.zeros(tokens, dtype=torch.bool)
        for _, start, end in runs:
            covered[start:end] = True
        base = torch.nn.functional.linear(x, layer.weight)
        assert torch.equal(out[~covered], base[~covered])


def test_clearing_a_slot_restores_the_base():
    cfg = _cfg()
    model = _Model(cfg)
    slots = LoRASlots(model, num_slots=2, max_rank=4)
    slots.load(1, _adapter(cfg, 3, 4))
    slots.clear(1)
    slots.set_runs([(1, 0, 4)], 4)
    layer = model.layers[0].self_attn.qkv_proj
    x = torch.randn(4, 16)
    assert torch.equal(layer(x), torch.nn.functional.linear(x, layer.weight))
