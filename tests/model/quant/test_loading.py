"""Loading quantised weights: a kvflow-quantised directory of the shipped tiny model, in every format,
gives the logits of the same model loaded densely from its dequantised weights (its own reference);
`--quantization` at load builds the same layers; fused layers take quantised shards; quantisation
configs kvflow cannot run are refused with what it supports."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from kvflow import LLM, SamplingParams
from kvflow.assets import default_model_path
from kvflow.config import EngineConfig, LoadConfig, ModelConfig, QuantizationConfig
from kvflow.model import loader
from kvflow.model.linear import linear_layers
from kvflow.model.quant import int8
from kvflow.model.quant.checkpoint import COPIED_FILES, save_quantized
from kvflow.model.quant.formats import dequantize, quantize, quantize_fitting
from kvflow.model.quant.linear_methods import is_quantized

TINY = default_model_path()
PROMPT = [1, 450, 3012, 77, 1400, 23, 9, 310, 2048, 600, 5, 17]
#: (format, QuantizationConfig fields): bipolar at 3 bits in groups of 32, run with float activations.
FORMATS = [("q8_0", {}), ("q4_0", {}), ("q4_k", {}), ("int8", {}), ("bipolar", {"bits": 3, "group_size": 32})]


def is_linear_weight(name: str) -> bool:
    return name.endswith("_proj.weight")


def quantised_dirs(root: Path, fmt: str, fields: dict) -> tuple[Path, Path]:
    """The shipped model quantised (kvflow's layout) and its dequantised weights as a dense directory."""
    qcfg = QuantizationConfig(fmt, **fields)
    config = json.loads((TINY / "config.json").read_text())
    dense = load_file(str(TINY / "model.safetensors"))
    weights = {name: quantize_fitting(w, fmt, **qcfg.params) if is_linear_weight(name) else w
               for name, w in dense.items()}
    qdir = save_quantized(root / fmt, {**config, "quantization_config": qcfg.to_hf()}, weights, copy_from=TINY)
    ref = root / f"{fmt}-dequantised"
    ref.mkdir()
    for name in COPIED_FILES:
        if (TINY / name).is_file():
            shutil.copyfile(TINY / name, ref / name)
    (ref / "config.json").write_text(json.dumps(config))  # dense: no quantization_config
    save_file({name: dequantize(w).to(dense[name].dtype) if not isinstance(w, torch.Tensor) else w
               for name, w in weights.items()}, str(ref / "model.safetensors"))
    return qdir, ref


def run(path: Path, **kwargs) -> tuple[LLM, list[float], list[int], list[float]]:
    """Prompt logprobs of the prompt's own tokens, and a greedy continuation with its logprobs."""
    llm = LLM(model=str(path), dtype="float32", num_blocks=32, cpu_kernels=False, **kwargs)
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=1, prompt_logprobs=1)
    out = llm.generate([{"prompt_token_ids": PROMPT}], params, use_tqdm=False)[0]
    prompt_lps = [pos[t].logprob for pos, t in zip(out.prompt_logprobs[1:], PROMPT[1:])]
    completion = out.outputs[0]
    return llm, prompt_lps, completion.token_ids, [pos[t].logprob for pos, t in zip(completion.logprobs,
                                                                                     completion.token_ids)]


@pytest.mark.parametrize(("fmt", "fields"), FORMATS, ids=[f for f, _ in FORMATS])
def test_quantised_model_matches_its_dequantised_weights(tmp_path, fmt, fields):
    qdir, ref = quantised_dirs(tmp_path, fmt, fields)
    llm, lps, tokens, token_lps = run(qdir)
    model = llm.engine.core.runner.model
    assert model.config.quantization == QuantizationConfig(fmt, **fields)
    quantised = [layer for layer in linear_layers(model) if is_quantized(layer)]
    assert len(quantised) == 4 * model.config.num_layers  # qkv, o, gate_up, down; the tied head stays dense
    expected = {"q4_k": {"q4_k", "q4_0"}}.get(fmt, {fmt})  # q4_k's down_proj (K = 704) falls back to q4_0
    assert {layer.method.format for layer in quantised} == expected
    assert not any(p.is_meta for p in model.parameters())
    _, ref_lps, ref_tokens, ref_token_lps = run(ref)
    assert tokens == ref_tokens
    assert torch.allclose(torch.tensor(lps), torch.tensor(ref_lps), atol=2e-4, rtol=0)
    assert torch.allclose(torch.tensor(token_lps), torch.tensor(ref_token_lps), atol=2e-4, rtol=0)


@pytest.mark.parametrize("fmt", ["q4_k", "bipolar"])
def test_quantising_at_load_builds_the_layers_a_quantised_directory_holds(tmp_path, fmt):
    fields = dict(FORMATS)[fmt]
    qdir, _ = quantised_dirs(tmp_path, fmt, fields)
    at_load = EngineConfig.create(str(TINY), dtype="float32", quantization=fmt,
                                  **{f"quantization_{k}": v for k, v in fields.items()}).model
    assert at_load.quantization.on_load
    stored = ModelConfig.from_pretrained(qdir, dtype="float32")
    a, b = loader.load_model(at_load), loader.load_model(stored)
    buffers_a, buffers_b = dict(a.named_buffers()), dict(b.named_buffers())
    assert {n for n in buffers_a if "quant_" in n} == {n for n in buffers_b if "quant_" in n}
    assert all(torch.equal(buffers_a[n], buffers_b[n]) for n in buffers_a if "quant_" in n)
    assert all(torch.equal(p, dict(b.named_parameters())[n]) for n, p in a.named_parameters())


def test_bf16_keeps_quantised_layers_and_prepacks_the_dense_head():
    llm = LLM(model=str(TINY), dtype="bfloat16", num_blocks=32, quantization="int8", quantization_activation_bits=8)
    model = llm.engine.core.runner.model
    methods = {layer.method.name for layer in linear_layers(model)}
    w8a8 = {"int8-w8a8", "int8-w8a8-vnni"}  # the codes VNNI-packed where the CPU has it
    assert methods & w8a8 and methods <= w8a8 | {"onednn-prepacked", "dense"}
    assert model.lm_head.method.name not in w8a8
    # The C++ forward runs only where every quantised layer gives it kernel weights; else the PyTorch modules.
    declined = any(layer.method.cpu_kernel_weights(layer) is None for layer in linear_layers(model))
    assert (llm.engine.core.runner.cpu_forward is None) == declined
    out = llm.generate([{"prompt_token_ids": PROMPT}], SamplingParams(temperature=0.0, max_tokens=4),
                       use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 4


def test_fused_layers_take_quantised_shards_and_fall_back_to_dense_for_mixed_ones(monkeypatch):
    """q, k, v in one format fuse quantised; a layer whose shards differ (a GGUF file with attn_v in a
    format kvflow dequantises) holds them all dequantised."""
    dense = load_file(str(TINY / "model.safetensors"))

    def pairs(path, dtype):
        for name, w in dense.items():
            if ".layers.0.self_attn." in name and name[-13:-7] in ("q_proj", "k_proj"):
                yield name, quantize(w, "q8_0" if "q_proj" in name else "q4_0")  # mixed: layer 0 dense
            elif ".layers.1.self_attn." in name and name[-13:-7] in ("q_proj", "k_proj", "v_proj"):
                yield name, quantize(w, "q8_0")  # one format: layer 1 quantised
            else:
                yield name, w.to(dtype)

    monkeypatch.setattr(loader, "iter_weights", pairs)
    model = loader.load_model(ModelConfig.from_pretrained(TINY, dtype="float32"))
    mixed, fused = model.layers[0].self_attn.qkv_proj, model.layers[1].self_attn.qkv_proj
    q, kv = 256, 128
    layer0 = [dequantize(quantize(dense["model.layers.0.self_attn.q_proj.weight"], "q8_0")),
              dequantize(quantize(dense["model.layers.0.self_attn.k_proj.weight"], "q4_0")),
              dense["model.layers.0.self_attn.v_proj.weight"]]
    assert not is_quantized(mixed) and torch.equal(mixed.weight, torch.cat(layer0))
    assert is_quantized(fused) and fused.method.shape == (q + 2 * kv, 256)
    layer1 = torch.cat([dense[f"model.layers.1.self_attn.{p}_proj.weight"] for p in "qkv"])
    assert torch.equal(dequantize(fused.method.weight(fused)), dequantize(quantize(layer1, "q8_0")))


@pytest.mark.parametrize(("qc", "message"), [
    ({"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": True}, "GPTQ with act-order"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False}, "quant_method 'gptq'"),
    ({"quant_method": "awq", "bits": 4, "version": "gemm"}, "quant_method 'awq'"),
    ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "quant_method 'bitsandbytes'"),
    ({"quant_method": "kvflow", "format": "q5_k"}, "format must be one of q8_0, q4_0, q4_k, int8, bipolar"),
    ({"quant_method": "kvflow", "format": "q4_0", "bits": 3}, "q4_0 stores 4-bit codes"),
    ({"quant_method": "kvflow", "format": "bipolar", "bits": 9}, r"bits must be in \[2, 8\]"),
    ({"quant_method": "kvflow", "format": "q8_0", "sym": True}, "keys kvflow does not write: sym"),
])
def test_unsupported_quantisation_configs_are_refused(qc, message):
    hf = {**json.loads((TINY / "config.json").read_text()), "quantization_config": qc}
    with pytest.raises(ValueError, match=message) as info:
        ModelConfig.from_hf_dict(hf, "some/dir")
    if qc["quant_method"] != "kvflow":  # the refusal says what kvflow does load
        assert "quant_method 'kvflow'" in str(info.value) and "--quantization" in str(info.value)


def test_quantisation_arguments_are_checked(tmp_path):
    with pytest.raises(ValueError, match="need a quantization format"):
        LoadConfig(quantization_bits=3)
    with pytest.raises(ValueError, match="activation_bits 8 .W8A8"):
        LoadConfig(quantization="int8", quantization_activation_bits=4)
    qdir, _ = quantised_dirs(tmp_path, "q8_0", {})
    with pytest.raises(ValueError, match=r"already quantised \(q8_0\)"):
        EngineConfig.create(str(qdir), quantization="q4_0")
    same = EngineConfig.create(str(qdir), quantization="q8_0").model.quantization
    assert same is not None and not same.on_load  # its own format: loads as stored
    w8a8 = QuantizationConfig("int8", activation_bits=8)  # activation bits go with weights of its format only
    assert (w8a8.activation_bits_for("int8"), w8a8.activation_bits_for("q8_0")) == (8, None)


def test_quantising_the_lm_head_at_load_leaves_the_tied_embedding_dense():
    """--quantization-lm-head: the tied head runs int8 W8A8 like the projections (its logits are the int8
    reference's on its own quantised matrix), the lookup keeps the checkpoint's dense embedding, and the
    C++ forward and the PyTorch modules pick the same tokens through it."""
    kwargs = dict(dtype="float32", num_blocks=32, quantization="int8", quantization_activation_bits=8,
                  quantization_lm_head=True)
    llm = LLM(model=str(TINY), **kwargs)
    model = llm.engine.core.runner.model
    assert model.config.quantization.lm_head
    assert model.lm_head.method.name in ("int8-w8a8", "int8-w8a8-vnni")
    embedding = load_file(str(TINY / "model.safetensors"))["model.embed_tokens.weight"].float()
    assert torch.equal(model.embed_tokens.weight, embedding)
    hidden = torch.randn(5, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    expected = int8.linear_w8a8(hidden, quantize_fitting(embedding, "int8"), None)
    assert torch.allclose(model.compute_logits(hidden), expected, atol=1e-4, rtol=1e-5)
    dense = (hidden @ embedding.t())
    assert not torch.allclose(model.compute_logits(hidden), dense, atol=1e-3)  # the head did change: lossy

    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    fast = llm.generate([{"prompt_token_ids": PROMPT}], params, use_tqdm=False)[0].outputs[0].token_ids
    assert llm.engine.core.runner.cpu_forward is not None
    plain = LLM(model=str(TINY), cpu_kernels=False, **kwargs)
    assert plain.generate([{"prompt_token_ids": PROMPT}], params, use_tqdm=False)[0].outputs[0].token_ids == fast


def test_quantising_an_untied_lm_head_at_load(tmp_path):
    """An untied checkpoint's `lm_head.weight` is quantised as it loads, like any projection."""
    untied = tmp_path / "untied"
    untied.mkdir()
    for name in COPIED_FILES:
        if (TINY / name).is_file():
            shutil.copyfile(TINY / name, untied / name)
    config = {**json.loads((TINY / "config.json").read_text()), "tie_word_embeddings": False}
    (untied / "config.json").write_text(json.dumps(config))
    weights = load_file(str(TINY / "model.safetensors"))
    head = weights["model.embed_tokens.weight"].flip(0).contiguous()  # a head of its own
    save_file({**weights, "lm_head.weight": head}, str(untied / "model.safetensors"))
    model = loader.load_model(EngineConfig.create(str(untied), dtype="float32", quantization="q8_0",
                                                  quantization_lm_head=True).model)
    assert model.lm_head.method.name == "q8_0"
    assert torch.equal(dequantize(model.lm_head.method.weight(model.lm_head)),
                       dequantize(quantize(head.float(), "q8_0")))
    assert torch.equal(model.embed_tokens.weight, weights["model.embed_tokens.weight"].float())
    dense_head = loader.load_model(EngineConfig.create(str(untied), dtype="float32", quantization="q8_0").model)
    assert not is_quantized(dense_head.lm_head)


def test_lm_head_quantisation_needs_a_quantisation_and_a_head_to_quantise(tmp_path):
    with pytest.raises(ValueError, match="need a quantization format"):
        LoadConfig(quantization_lm_head=True)
    with pytest.raises(ValueError, match="lm_head must be true or false"):
        QuantizationConfig.from_hf({"quant_method": "kvflow", "format": "int8", "lm_head": "yes"})
    assert QuantizationConfig.from_hf({"quant_method": "kvflow", "format": "int8", "lm_head": True}).lm_head
    qdir, _ = quantised_dirs(tmp_path, "int8", {})  # stored with a dense head
    with pytest.raises(ValueError, match="with a dense LM head"):
        EngineConfig.create(str(qdir), quantization="int8", quantization_lm_head=True)
    # A stored int8 checkpoint takes the activations asked for (W8A8 is a runtime choice).
    w8a8 = EngineConfig.create(str(qdir), quantization="int8", quantization_activation_bits=8).model.quantization
    assert w8a8.activation_bits == 8 and not w8a8.on_load
