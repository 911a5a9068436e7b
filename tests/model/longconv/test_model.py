"""The long-conv model: its config, its directory, and its cached (engine) forward against the reference."""

from __future__ import annotations

import json
import random

import pytest
import torch

from kvflow.attention.conv_history import history_slots, read_history, write_history
from kvflow.attention.kv_spec import KVCacheSpec
from kvflow.config import CacheConfig, EngineConfig, LongConvConfig, ModelConfig
from kvflow.model.longconv.checkpoint import longconv_hf_config
from kvflow.model.longconv.model import LongConvForCausalLM
from kvflow.model.registry import model_class
from kvflow.worker.step_inputs import paged_step_inputs
from tests.model.longconv.longconv_utils import load_reference, make_longconv_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_longconv_model(tmp_path_factory.mktemp("longconv") / "m", tokenizer=False)


@pytest.fixture(scope="module")
def model(model_dir) -> LongConvForCausalLM:
    return load_reference(model_dir)


def test_config_from_directory(model_dir):
    cfg = ModelConfig.from_pretrained(model_dir)
    assert cfg.architecture == "LongConvForCausalLM" and model_class(cfg) is LongConvForCausalLM
    assert cfg.longconv == LongConvConfig(kernel_length=300, squash_lambda=0.01, smooth_width=3)
    # The KV-cache spec's view of a layer's history: one kv head of H/2 values in each plane.
    assert (cfg.num_kv_heads, cfg.head_dim) == (1, cfg.hidden_size // 2)
    spec = KVCacheSpec.for_format("auto", cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, 16, cfg.dtype)
    assert spec.bytes_per_token == cfg.num_layers * cfg.hidden_size * 4


def test_config_errors():
    with pytest.raises(ValueError, match="kernel_length must be >= 1"):
        LongConvConfig(kernel_length=0)
    with pytest.raises(ValueError, match="smooth_width must be an odd"):
        LongConvConfig(kernel_length=8, smooth_width=2)
    with pytest.raises(ValueError, match="squash_lambda must be >= 0"):
        LongConvConfig(kernel_length=8, squash_lambda=-1)
    with pytest.raises(ValueError, match="hidden_size must be even"):
        ModelConfig.from_hf_dict(longconv_hf_config(32, 15, 1, 8, 64))


def test_engine_refuses_what_drops_history(model_dir):
    cfg = ModelConfig.from_pretrained(model_dir)
    with pytest.raises(ValueError, match="none may be dropped"):
        EngineConfig(model=cfg, cache=CacheConfig(kv_policy="streaming", kv_budget=64))
    with pytest.raises(ValueError, match="kv_cache_dtype=int8: a long-conv model"):
        EngineConfig(model=cfg, cache=CacheConfig(kv_cache_dtype="int8"))
    EngineConfig(model=cfg, cache=CacheConfig(kv_cache_dtype="bfloat16"))


def test_directory_round_trip(model_dir, tmp_path):
    config = json.loads((model_dir / "config.json").read_text())
    assert config["architectures"] == ["LongConvForCausalLM"]
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(model_dir / "model.safetensors"))
    assert "layers.0.conv.kernel" in tensors and tensors["layers.0.conv.kernel"].shape == (64, 300)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps(config))
    save_file({k: v for k, v in tensors.items() if k != "layers.1.conv.D"}, str(broken / "model.safetensors"))
    with pytest.raises(ValueError, match="missing weights: layers.1.conv.D"):
        load_reference(broken)
    save_file({**tensors, "layers.0.conv.kernel": tensors["layers.0.conv.kernel"][:, :10].contiguous()},
              str(broken / "model.safetensors"))
    with pytest.raises(ValueError, match=r"has shape \(64, 10\), expected \(64, 300\)"):
        load_reference(broken)


def test_reference_methods_agree_in_fp64(model):
    """The reference forward by FFT equals the direct convolution (and FlashButterfly), model in fp64."""
    m64 = load_reference(model.config.path).double()
    for layer in m64.layers:
        layer.conv.freeze_kernel()
    ids = torch.randint(3, 500, (2, 130), generator=torch.Generator().manual_seed(0))
    ref = m64.full_forward(ids, "direct")
    for method in ("fft", "butterfly"):
        torch.testing.assert_close(m64.full_forward(ids, method), ref, rtol=1e-10, atol=1e-10)


def cached_run(model: LongConvForCausalLM, ids: list[int], chunks: list[int], block_size: int = 8) -> torch.Tensor:
    """Hidden states of `ids` fed to the engine's forward in `chunks`, over shuffled paged blocks."""
    cfg = model.config
    spec = KVCacheSpec.for_format("auto", cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, block_size, cfg.dtype)
    num_blocks = -(-len(ids) // block_size) + 3
    caches = spec.allocate(num_blocks, "cpu")
    blocks = list(range(1, num_blocks))
    random.Random(len(ids)).shuffle(blocks)
    out, done = [], 0
    with torch.no_grad():
        for n in chunks:
            _, _, meta, _ = paged_step_inputs([done + n], [n], [blocks], block_size, torch.device("cpu"))
            step = torch.tensor(ids[done:done + n])
            out.append(model(step, torch.arange(done, done + n), caches, meta, None))
            done += n
    return torch.cat(out)


@pytest.mark.parametrize("chunks", [[1] * 40, [40], [7, 1, 1, 13, 1, 18], [25, 1, 1, 1, 1, 1, 10]])
def test_incremental_decode_equals_full_recompute_at_every_position(model, chunks):
    ids = torch.randint(3, 500, (sum(chunks),), generator=torch.Generator().manual_seed(1)).tolist()
    full = model.full_forward(torch.tensor([ids]))[0]
    torch.testing.assert_close(cached_run(model, ids, chunks), full, rtol=1e-5, atol=1e-5)


def test_decode_beyond_the_kernel_forgets(model_dir):
    """Tokens further back than kernel_length taps contribute nothing, cached or not."""
    model = load_reference(make_longconv_model(model_dir.parent / "short", tokenizer=False, kernel_length=5))
    ids = torch.randint(3, 500, (30,), generator=torch.Generator().manual_seed(2)).tolist()
    full = model.full_forward(torch.tensor([ids]))[0]
    torch.testing.assert_close(cached_run(model, ids, [12] + [1] * 18), full, rtol=1e-5, atol=1e-5)


def test_batched_decodes_of_different_lengths(model):
    """Decodes of several sequences in one step each read their own history."""
    cfg = model.config
    bs = 4
    spec = KVCacheSpec.for_format("auto", cfg.num_layers, 1, cfg.head_dim, bs, cfg.dtype)
    caches = spec.allocate(40, "cpu")
    seqs = [torch.randint(3, 500, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (1, 9, 23)]
    tables, free = [], list(range(39, 0, -1))
    for s in seqs:
        tables.append([free.pop() for _ in range(-(-len(s) // bs))])
    with torch.no_grad():  # prompts but their last token as one step of prefills (the 1-token one has none)
        lens = [len(s) - 1 for s in seqs]
        prefill = [i for i, n in enumerate(lens) if n > 1]
        _, _, meta, _ = paged_step_inputs([lens[i] for i in prefill], [lens[i] for i in prefill],
                                          [tables[i] for i in prefill], bs, torch.device("cpu"))
        model(torch.tensor([t for i in prefill for t in seqs[i][:-1]]), None, caches, meta)
        _, _, meta, _ = paged_step_inputs([len(s) for s in seqs], [1, 1, 1], tables, bs, torch.device("cpu"))
        hidden = model(torch.tensor([s[-1] for s in seqs]), None, caches, meta)
    for row, s in enumerate(seqs):
        full = model.full_forward(torch.tensor([s]))[0, -1]
        torch.testing.assert_close(hidden[row], full, rtol=1e-5, atol=1e-5)


def test_history_layout(model):
    """conv_history's slots: the first H/2 channels in the keys plane, the rest in the values plane."""
    cache = torch.zeros(2, 3, 1, 4, 5)
    u = torch.arange(20.0).view(2, 10)
    write_history(cache, torch.tensor([5, 11]), u)
    assert cache[0, 1, 0, 1].tolist() == u[0, :5].tolist() and cache[1, 2, 0, 3].tolist() == u[1, 5:].tolist()
    slots = history_slots(torch.tensor([1, 2]), torch.tensor([1, 7]), 4)
    assert slots.tolist() == [5, 11]
    torch.testing.assert_close(read_history(cache, slots, 10), u)
    with pytest.raises(ValueError, match="needs a dense cache"):
        write_history((cache, cache), torch.tensor([0]), u[:1])


def test_history_moves_with_the_spec_transfer(model):
    """KV transfer's gather/scatter (P/D, offload) move a long-conv history like any KV: a sequence prefilled in
    one cache and moved to other blocks of another cache (another block size too) decodes as if never moved."""
    cfg = model.config
    ids = torch.randint(3, 500, (30,), generator=torch.Generator().manual_seed(4)).tolist()
    src = KVCacheSpec.for_format("auto", cfg.num_layers, 1, cfg.head_dim, 8, cfg.dtype)
    dst = KVCacheSpec.for_format("auto", cfg.num_layers, 1, cfg.head_dim, 4, cfg.dtype)
    assert src.wire_format == dst.wire_format
    a, b = src.allocate(6, "cpu"), dst.allocate(12, "cpu")
    table_a, table_b = [5, 2, 4, 1], [11, 3, 9, 1, 7, 2, 10, 4]
    with torch.no_grad():
        _, _, meta, _ = paged_step_inputs([24], [24], [table_a], 8, torch.device("cpu"))
        model(torch.tensor(ids[:24]), None, a, meta)
        for layer_a, layer_b in zip(a, b):
            dst.scatter(layer_b, table_b, src.gather(layer_a, table_a, 24))
        out = []
        for t in range(24, 30):
            _, _, meta, _ = paged_step_inputs([t + 1], [1], [table_b], 4, torch.device("cpu"))
            out.append(model(torch.tensor([ids[t]]), None, b, meta))
    full = model.full_forward(torch.tensor([ids]))[0, 24:]
    torch.testing.assert_close(torch.cat(out), full, rtol=1e-5, atol=1e-5)
