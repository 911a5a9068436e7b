"""BlockLLM's block zoo: variants served from one engine equal each variant loaded alone (and Hugging Face
on the variant's directory), token for token, in batches mixing the base and several variants; the layers a
variant did not change are stored once (bytes checked, the base's very tensors); the KV of a variant's
leading layers that equal the base's is stored once for both (the same pages), the KV of the rest never
shared across models; variants that do not fit the base are refused with the reason."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from kvflow import LLM, SamplingParams
from kvflow.model.block_zoo import BlockZoo, VariantInfo, module_digest
from kvflow.model.layers import RMSNorm
from kvflow.model.linear import Linear
from tests.model.test_parity import cpu_kernels  # noqa: F401 - a fixture
from tests.model_utils import hf_greedy, load_hf

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
PROMPTS = [[5, 17, 99, 300, 12], [7, 8, 9, 10, 11, 12, 13], [5, 17, 99, 300, 12], [40, 41], list(range(60, 90))]


def make_variant(base: Path, out: Path, layers: tuple[int, ...], seed: int, final_norm: bool = False,
                 embedding: bool = False) -> Path:
    """A copy of `base` with the given decoder layers (and optionally the final norm or embedding) changed."""
    shutil.copytree(base, out)
    tensors = load_file(out / "model.safetensors")
    gen = torch.Generator().manual_seed(seed)
    for name in tensors:
        if (any(name.startswith(f"model.layers.{i}.") for i in layers) or (final_norm and name == "model.norm.weight")
                or (embedding and name == "model.embed_tokens.weight")):
            tensors[name] = tensors[name] + 0.05 * torch.randn(tensors[name].shape, generator=gen)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def variants(llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("variants")
    return {"top": make_variant(llama_dir, root / "top", (1,), seed=1, final_norm=True),
            "all": make_variant(llama_dir, root / "all", (0, 1), seed=2)}


def test_mixed_batch_equals_each_variant_alone(llama_dir, variants, cpu_kernels):  # noqa: F811
    """The C++ forward (per-span weights in each layer) and the PyTorch modules (RowRoutes) alike."""
    zoo = LLM(model=str(llama_dir), dtype="float32", cpu_kernels=cpu_kernels,
              variant={k: str(v) for k, v in variants.items()})
    assert (zoo.engine.core.runner.cpu_forward is not None) == cpu_kernels
    names = ["top", None, "all", "top", "all"]
    outs = zoo.generate(PROMPTS, GREEDY, variant=names, use_tqdm=False)
    for prompt, name, out in zip(PROMPTS, names, outs):
        directory = llama_dir if name is None else variants[name]
        alone = LLM(model=str(directory), dtype="float32").generate([prompt], GREEDY, use_tqdm=False)[0]
        assert out.outputs[0].token_ids == alone.outputs[0].token_ids == hf_greedy(load_hf(directory), prompt, 8)
    base_out = zoo.generate(PROMPTS[:1], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    assert base_out != outs[0].outputs[0].token_ids  # the variant really differs: the comparison could fail
    kv = zoo.engine.core.kv
    zoo.reset_prefix_cache()
    assert kv.num_free_blocks == kv.num_blocks


def test_unchanged_layers_are_stored_once(llama_dir, variants):
    zoo = LLM(model=str(llama_dir), dtype="float32", variant={k: str(v) for k, v in variants.items()})
    runner = zoo.engine.core.runner
    info = runner.zoo.variants
    assert info["top"].own_layers == (1,) and info["top"].own_final_norm
    assert info["all"].own_layers == (0, 1) and not info["all"].own_final_norm
    layer_bytes = [sum(t.numel() * t.element_size() for t in layer.state_dict().values())
                   for layer in LLM(model=str(variants["top"]), dtype="float32").engine.core.runner.model.layers]
    norm_bytes = runner.model.norm.weight.numel() * 4
    assert info["top"].unique_bytes == layer_bytes[1] + norm_bytes
    assert info["all"].unique_bytes == layer_bytes[0] + layer_bytes[1]
    # What the engine holds beyond the base: exactly the variants' own blocks.
    held = {id(m): m for layer in [*runner.model.layers, runner.model.norm] for m in layer.modules()
            if isinstance(m, Linear | RMSNorm) and m.routes is not None for m in m.routes.alternatives.values()}
    held_bytes = sum(t.numel() * t.element_size() for m in held.values() for t in m.state_dict().values())
    assert held_bytes == info["top"].unique_bytes + info["all"].unique_bytes
    assert runner.model.layers[0].self_attn.qkv_proj.routes.alternatives.keys() == {runner.zoo.key("all")}


def test_kv_is_salted_by_variant(llama_dir, variants):
    zoo = LLM(model=str(llama_dir), dtype="float32", block_size=4, variant={"top": str(variants["top"])})
    prompt = list(range(100, 125))
    assert zoo.generate([prompt], GREEDY, variant="top", use_tqdm=False)[0].num_cached_tokens == 0
    assert zoo.generate([prompt], GREEDY, use_tqdm=False)[0].num_cached_tokens == 0
    assert zoo.generate([prompt], GREEDY, variant="top", use_tqdm=False)[0].num_cached_tokens == 24


def _run_until_done(engine, outputs: dict[str, list[int]]) -> None:
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                outputs[out.request_id] = out.outputs[0].token_ids


@pytest.mark.parametrize("share", [True, False])
def test_variants_share_the_kv_of_the_base_layers_below_their_own(llama_dir, variants, cpu_kernels,  # noqa: F811
                                                                   share):
    """`top` changes layer 1 of 2, `all` layer 0: the cache splits into two groups of one layer. A `top` request
    arriving while the base decodes the same prompt reads the base's layer-0 pages for the prompt (the very
    pages, two holders) and keeps its own layer-1 pages; `all` shares nothing. Each still equals its model
    alone, and every page comes back. With zoo_share_kv off, the cache is one group and nothing is shared."""
    zoo = LLM(model=str(llama_dir), dtype="float32", block_size=4, cpu_kernels=cpu_kernels, zoo_share_kv=share,
              variant={k: str(v) for k, v in variants.items()})
    engine, kv = zoo.engine, zoo.engine.core.kv
    top_key = engine.registry.variant("top").key
    assert (kv.layer_groups, kv.shared_groups) == ((2, {top_key: 1}) if share else (1, {}))
    prompt = list(range(100, 127))  # 6 full blocks of 4, and 3 tokens
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    outputs: dict[str, list[int]] = {}
    engine.add_request("base", prompt, params)
    while not engine.core.scheduler.running or engine.core.scheduler.running[0].num_output_tokens < 2:
        engine.step()
    engine.add_request("top", prompt, params, variant="top")
    engine.add_request("all", prompt, params, variant="all")
    engine.step()  # admits both (prefix lookups) and computes their prompts
    running = {r.variant.name if r.variant else "base": r for r in engine.core.scheduler.running}
    base, top, other = running["base"], running["top"], running["all"]
    if share:
        assert top.block_ids[:6] == base.block_ids[:6]  # layer 0: the base's pages, held by both
        assert all(kv.pool.blocks[b].ref_cnt == 2 for b in base.block_ids[:6])
        assert not set(top.kv_groups[0].block_ids) & set(base.kv_groups[0].block_ids)  # layer 1: its own
        assert top.num_computed_tokens == len(prompt)  # (it computed every token: layer 1 needs layer 0's output)
    assert not set(other.block_ids) & set(base.block_ids)
    _run_until_done(engine, outputs)
    for name in ("base", "top", "all"):
        directory = llama_dir if name == "base" else variants[name]
        alone = LLM(model=str(directory), dtype="float32").generate([prompt], params, use_tqdm=False)[0]
        assert outputs[name] == alone.outputs[0].token_ids, name
    assert outputs["top"] != outputs["base"]
    zoo.reset_prefix_cache()
    assert kv.num_free_blocks == kv.num_blocks


def test_bad_variants_are_refused(llama_dir, tiny_models, tmp_path, variants):
    with pytest.raises(ValueError, match="head_dim"):
        LLM(model=str(llama_dir), dtype="float32", variant={"q": str(tiny_models["qwen3"])})
    embed = make_variant(llama_dir, tmp_path / "embed", (), seed=3, embedding=True)
    with pytest.raises(ValueError, match="embedding"):
        LLM(model=str(llama_dir), dtype="float32", variant={"e": str(embed)})
    with pytest.raises(ValueError, match="no config.json"):
        LLM(model=str(llama_dir), dtype="float32", variant={"x": str(tmp_path)})
    with pytest.raises(ValueError, match="NAME=DIR"):
        LLM(model=str(llama_dir), dtype="float32", variant=("nodir",))
    zoo = LLM(model=str(llama_dir), dtype="float32", variant={"top": str(variants["top"])})
    with pytest.raises(LookupError, match="no model variant named 'nope'"):
        zoo.generate(PROMPTS[:1], GREEDY, variant="nope", use_tqdm=False)
    assert not zoo.engine.has_unfinished_requests()


def test_module_digest_sees_every_tensor():
    a = torch.nn.Linear(4, 3)
    b = torch.nn.Linear(4, 3)
    b.load_state_dict(a.state_dict())
    assert module_digest(a) == module_digest(b)
    with torch.no_grad():
        b.bias[2] += 1e-7
    assert module_digest(a) != module_digest(b)


def test_layer_groups_are_the_gcd_of_the_layers_and_each_variants_first_own_layer():
    def groups(num_layers: int, own: dict[str, tuple[int, ...]]) -> tuple[int, dict[str, int]]:
        zoo = BlockZoo(SimpleNamespace(layers=[None] * num_layers))
        for name, layers in own.items():
            zoo.variants[name] = VariantInfo(name, "/", "d", layers, False, 0, 0)
            zoo._keys[name] = f"{name}@d"
        return zoo.kv_layer_groups()

    assert groups(30, {"top2": (28, 29)}) == (15, {"top2@d": 14})  # pages of 2 layers, 14 groups shared
    assert groups(30, {"a": (28, 29), "b": (20,)}) == (15, {"a@d": 14, "b@d": 10})
    assert groups(4, {"top": (3,)}) == (4, {"top@d": 3})
    assert groups(4, {"top": (3,), "first": (0, 3)}) == (4, {"top@d": 3})  # "first" shares nothing
    assert groups(4, {"first": (0,)}) == (1, {})  # nothing to share: one group
    assert groups(4, {"norm": ()}) == (1, {"norm@d": 1})  # only its final norm differs: every layer is the base's


def test_a_variant_that_changed_no_layer_reads_all_the_base_kv(llama_dir, tmp_path):
    """Only its final norm differs: its KV is the base's in every layer, so it hits the base's prefix whole."""
    norm = make_variant(llama_dir, tmp_path / "norm", (), seed=4, final_norm=True)
    zoo = LLM(model=str(llama_dir), dtype="float32", block_size=4, variant={"norm": str(norm)})
    assert zoo.engine.core.kv.layer_groups == 1
    prompt = list(range(100, 125))
    zoo.generate([prompt], GREEDY, use_tqdm=False)
    out = zoo.generate([prompt], GREEDY, variant="norm", use_tqdm=False)[0]
    assert out.num_cached_tokens == 24
    alone = LLM(model=str(norm), dtype="float32").generate([prompt], GREEDY, use_tqdm=False)[0]
    assert out.outputs[0].token_ids == alone.outputs[0].token_ids


def test_what_cannot_read_layer_groups_keeps_one_or_is_refused(llama_dir, variants):
    """An engine with a KV policy keeps one group (the variant's KV its own); one with groups refuses a
    request's own KV policy, naming the way out, and stays usable."""
    policy = LLM(model=str(llama_dir), dtype="float32", kv_policy="streaming", kv_budget=32,
                 variant={"top": str(variants["top"])})
    assert (policy.engine.core.kv.layer_groups, policy.engine.core.kv.shared_groups) == (1, {})
    zoo = LLM(model=str(llama_dir), dtype="float32", variant={"top": str(variants["top"])})
    assert zoo.engine.core.kv.layer_groups == 2
    with pytest.raises(ValueError, match="no-zoo-share-kv"):
        zoo.generate(PROMPTS[:1], SamplingParams(max_tokens=4, kv_policy="streaming", kv_budget=32), use_tqdm=False)
    assert not zoo.engine.has_unfinished_requests()
    assert len(zoo.generate(PROMPTS[:1], GREEDY, variant="top", use_tqdm=False)[0].outputs[0].token_ids) == 8


def test_preemption_with_layer_groups_gives_every_page_back(llama_dir, variants):
    """A cache of 16 blocks (32 pages of one layer) for requests of 10 blocks each: requests are preempted
    and recomputed, re-finding their pages in each group, and each output still equals its model alone."""
    zoo = LLM(model=str(llama_dir), dtype="float32", block_size=4, num_blocks=16,
              variant={k: str(v) for k, v in variants.items()})
    kv = zoo.engine.core.kv
    assert kv.layer_groups == 2 and kv.num_blocks == 32 and kv.num_token_blocks == 16
    prompt = list(range(100, 127))
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    names = [None, "top", "top", "all", None]
    outs = zoo.generate([prompt] * len(names), params, variant=names, use_tqdm=False)
    assert zoo.engine.stats().num_preemptions > 0
    for name, out in zip(names, outs):
        directory = llama_dir if name is None else variants[name]
        alone = LLM(model=str(directory), dtype="float32").generate([prompt], params, use_tqdm=False)[0]
        assert out.outputs[0].token_ids == alone.outputs[0].token_ids, name
    zoo.reset_prefix_cache()
    assert kv.num_free_blocks == kv.num_blocks and all(b.ref_cnt == 0 for b in kv.pool.blocks)


def test_prefix_tree_batching_pins_a_groups_prefix_in_every_layer_group(llama_dir, variants):
    """BatchLLM's prefix-tree policy over a zoo in layer groups: each prefix group's shared blocks are pinned in
    both groups (pages of layer 0 and of layer 1), outputs equal FCFS's, and every page comes back."""
    shared = list(range(200, 232))  # 8 blocks of 4
    prompts = [shared + [i, i + 1, i + 2] for i in range(6)]
    names = [None, "top", "top", None, "all", "top"]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    outs = {}
    for policy in ("fcfs", "prefix-tree"):
        zoo = LLM(model=str(llama_dir), dtype="float32", block_size=4, batch_policy=policy,
                  variant={k: str(v) for k, v in variants.items()})
        kv = zoo.engine.core.kv
        assert kv.layer_groups == 2
        pins: list[list[int]] = []
        original = kv.pin_prefix

        def pin(request, num_blocks, original=original, pins=pins):
            pinned = original(request, num_blocks)
            if pinned is not None:
                pins.append(pinned)
            return pinned

        kv.pin_prefix = pin
        outs[policy] = [o.outputs[0].token_ids for o in zoo.generate(prompts, params, variant=names,
                                                                      use_tqdm=False)]
        if policy == "prefix-tree":
            assert pins and all(len(p) % 2 == 0 and len(p) >= 2 for p in pins)  # the same blocks in each group
        zoo.reset_prefix_cache()
        assert kv.num_free_blocks == kv.num_blocks and all(b.ref_cnt == 0 for b in kv.pool.blocks)
    assert outs["prefix-tree"] == outs["fcfs"]
