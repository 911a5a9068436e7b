"""BlockLLM's block zoo: variants served from one engine equal each variant loaded alone (and Hugging Face
on the variant's directory), token for token, in batches mixing the base and several variants; the layers a
variant did not change are stored once (bytes checked, the base's very tensors); KV is never shared
across variants; variants that do not fit the base are refused with the reason."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from kvflow import LLM, SamplingParams
from kvflow.model.block_zoo import module_digest
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
