"""The engine on GGUF files: kvflow's greedy tokens from a GGUF file equal those from the directory,
and llama.cpp (llama-cpp-python) loads the files kvflow writes and greedily decodes the same tokens."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from kvflow import LLM, SamplingParams
from kvflow.model.gguf import iter_gguf_weights, tokenizer_from_gguf, write_gguf

PROMPTS = ["def fibonacci(n):\n", "import os\nimport sys\n\n\nclass ", "The pass key is 40217. Remember it."]
STEPS = 16
GREEDY = SamplingParams(temperature=0.0, max_tokens=STEPS, ignore_eos=True)


def greedy(model: str | Path, **kwargs) -> list[list[int]]:
    llm = LLM(model=str(model), num_blocks=64, **kwargs)
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]


@pytest.fixture(scope="module")
def tiny_greedy(tiny_dir) -> list[list[int]]:
    return greedy(tiny_dir)


def test_greedy_tokens_from_gguf_equal_the_directorys(tiny_f32_gguf, tiny_greedy):
    assert greedy(tiny_f32_gguf) == tiny_greedy


def test_cli_generate_and_tokenizer_flag(tiny_f32_gguf, tiny_dir, capsys):
    from kvflow.cli import main

    args = ["generate", "--model", str(tiny_f32_gguf), "--prompt", PROMPTS[0], "--max-tokens", "8",
            "--temperature", "0", "--ignore-eos", "--json"]
    assert main(args) == 0
    from_metadata = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(args + ["--tokenizer", str(tiny_dir)]) == 0
    from_dir = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert from_metadata["token_ids"] == from_dir["token_ids"] and from_metadata["text"] == from_dir["text"]


def test_tokenizer_argument_replaces_the_models_own(tiny_f32_gguf, llama_dir):
    llm = LLM(model=str(tiny_f32_gguf), tokenizer=str(llama_dir), num_blocks=16)
    assert llm.get_tokenizer().vocab_size < 1000  # the 512-token tokenizer of the parity tests' model
    with pytest.raises(ValueError, match="neither a directory nor a .gguf file"):
        LLM(model=str(tiny_f32_gguf), tokenizer=str(llama_dir / "config.json"))


# ------------------------------------------------------------------ llama.cpp
def llamacpp_greedy(path: Path, prompt: list[int], steps: int) -> tuple[list[int], list[np.ndarray]]:
    """llama.cpp's greedy tokens and the logits each was chosen from."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python (the bench peer) is not installed")
    model = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=2, seed=0, logits_all=True, verbose=False)
    model.eval(prompt)
    tokens, logits = [], []
    for _ in range(steps):
        row = np.array(model.scores[model.n_tokens - 1], dtype=np.float64)
        tokens.append(int(row.argmax()))
        logits.append(row)
        model.eval([tokens[-1]])
    return tokens, logits


def assert_same_greedy(ours: list[int], theirs: list[int], logits: list[np.ndarray], tie: float) -> None:
    """Equal up to the first step where llama.cpp's top two logits are within `tie` (a near-tie that
    summation order may flip); nothing is compared after it."""
    for step, (a, b) in enumerate(zip(ours, theirs)):
        if a != b:
            gap = logits[step][b] - logits[step][a]
            assert gap < tie, f"step {step}: llama.cpp picks {b}, kvflow {a}, logit gap {gap:.4f} >= {tie}"
            return


@pytest.mark.parametrize("fixture", ["tiny_f32_gguf", "llama_gguf"])
def test_llama_cpp_loads_the_f32_file_and_decodes_the_same_tokens(fixture, request, tiny_greedy):
    path = request.getfixturevalue(fixture)
    tokenizer = tokenizer_from_gguf(path)
    ours = tiny_greedy if fixture == "tiny_f32_gguf" else greedy(path)
    matched = 0
    for prompt, our_tokens in zip(PROMPTS, ours):
        theirs, logits = llamacpp_greedy(path, tokenizer.encode(prompt), STEPS)
        assert_same_greedy(our_tokens, theirs, logits, tie=1e-3)
        matched += our_tokens == theirs
    assert matched >= 2


@pytest.fixture(scope="module")
def llama_gguf(llama_dir, tmp_path_factory) -> Path:
    """The parity tests' tiny random Llama: untied head, llama3 rope (rope_freqs), GPT-2 pre-tokenizer."""
    from safetensors.torch import load_file

    return write_gguf(tmp_path_factory.mktemp("llama") / "llama.gguf", llama_dir,
                      load_file(str(llama_dir / "model.safetensors")))


@pytest.fixture(scope="module")
def q8_dense_gguf(tiny_q8_gguf, tiny_dir, tmp_path_factory) -> Path:
    """The dense model the Q8_0 file stands for: its blocks dequantised by gguf's reference code."""
    return write_gguf(tmp_path_factory.mktemp("q8dense") / "q8-dense.gguf", tiny_dir,
                      dict(iter_gguf_weights(tiny_q8_gguf, dequantize=True)))


@pytest.fixture(scope="module")
def q8_dense_greedy(q8_dense_gguf) -> list[list[int]]:
    return greedy(q8_dense_gguf)


def test_q8_0_file_runs_quantised_and_matches_its_dequantised_weights(tiny_q8_gguf, q8_dense_greedy):
    """The blocks stay blocks (QuantizedLinear on every projection) and decode like the dense model
    they stand for."""
    from kvflow.model.linear import linear_layers
    from kvflow.model.quant.linear_methods import is_quantized

    llm = LLM(model=str(tiny_q8_gguf), num_blocks=64)
    layers = linear_layers(llm.engine.core.runner.model)
    assert sum(is_quantized(layer) for layer in layers) == 4 * 4  # qkv, o, gate_up, down in each of 4 layers
    ours = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
    assert ours == q8_dense_greedy


def assert_llama_cpp_follows(path: Path, ours: list[list[int]]) -> None:
    """llama.cpp's greedy tokens on `path` equal `ours` up to near-ties (it rounds activations to 8 bits for
    its quantised dot products, so ties are looser than F32's), and exactly on most prompts."""
    tokenizer = tokenizer_from_gguf(path)
    matched = 0
    for prompt, our_tokens in zip(PROMPTS, ours):
        theirs, logits = llamacpp_greedy(path, tokenizer.encode(prompt), STEPS)
        assert_same_greedy(our_tokens, theirs, logits, tie=0.1)
        matched += our_tokens == theirs
    assert matched >= 2


def test_llama_cpp_on_the_q8_0_file_matches_kvflow_on_its_dequantised_weights(tiny_q8_gguf, q8_dense_greedy):
    """llama.cpp reads our Q8_0 blocks (and the q/k permutation of quantised rows) as we mean them."""
    assert_llama_cpp_follows(tiny_q8_gguf, q8_dense_greedy)


@pytest.fixture(scope="module")
def q8_head_files(tiny_dir, tmp_path_factory) -> tuple[Path, Path]:
    """`kvflow quantize --lm-head` on tiny: a directory and a GGUF file whose tied head is a Q8_0 copy."""
    from kvflow.model.quant.quantize_model import quantize_checkpoint

    root = tmp_path_factory.mktemp("q8head")
    quantize_checkpoint(tiny_dir, "q8_0", out_dir=root / "dir", gguf_path=root / "head.gguf", lm_head=True)
    return root / "dir", root / "head.gguf"


def test_a_quantised_head_travels_in_the_gguf_file_as_output_weight(q8_head_files):
    """The GGUF file keeps the embedding and adds output.weight in Q8_0: kvflow reads it back as an untied
    quantised head and decodes as from the directory."""
    directory, path = q8_head_files
    names = {name for name, _ in iter_gguf_weights(path)}
    assert {"model.embed_tokens.weight", "lm_head.weight"} <= names
    llm = LLM(model=str(path), num_blocks=64)
    assert llm.engine.core.runner.model.lm_head.method.name == "q8_0"
    ours = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
    assert ours == greedy(directory)


def test_llama_cpp_reads_the_quantised_head(q8_head_files):
    """llama.cpp takes output.weight over the embedding for the logits; its greedy tokens follow kvflow's
    on the same file."""
    _, path = q8_head_files
    pytest.importorskip("llama_cpp", reason="llama-cpp-python (the bench peer) is not installed")
    assert_llama_cpp_follows(path, greedy(path))
