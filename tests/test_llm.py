"""Offline API: bad input, seeds, stop conditions, logprobs, chat, the CLI."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from kvflow import LLM, SamplingParams
from kvflow.cli import main as cli_main
from tests.model_utils import load_hf


@pytest.fixture(scope="module")
def llm(llama_dir):
    return LLM(model=str(llama_dir), dtype="float32", block_size=4, num_blocks=128)


def assert_idle(llm: LLM) -> None:
    kv = llm.engine.core.kv
    assert kv.num_free_blocks == kv.num_blocks
    assert not llm.engine.has_unfinished_requests()


VALID = "a valid prompt"
# (prompts passed to generate, sampling params as a dict, expected message). Each batch leads
# with a valid prompt, which must not have started when the bad one is refused.
BAD_INPUTS = [
    ("", {}, "prompt must not be empty"),
    ([], {}, "non-empty"),
    ([VALID, []], {}, "prompt must not be empty"),
    ([VALID, [1, 2, 512]], {}, "outside the vocabulary [0, 512)"),
    ([VALID, [1, -1]], {}, "outside the vocabulary"),
    ([VALID, [5] * 512], {}, "max_model_len"),  # context is 512: no room to generate
    ([VALID, "hello"], {"max_tokens": 0}, "max_tokens"),
    ([VALID, "hello"], {"temperature": -0.5}, "temperature"),
    ([VALID, "hello"], {"top_p": 0.0}, "top_p"),
    ([VALID, "hello"], {"top_p": 1.5}, "top_p"),
    ([VALID, "hello"], {"n": 0}, "n"),
    ([VALID, "hello"], {"bogus_key": 1}, "bogus_key"),
    ([VALID, {"prompt_token_ids": [1], "extra": 1}], {}, "unknown prompt keys"),
]


@pytest.mark.parametrize("prompts,params,message", BAD_INPUTS)
def test_bad_input_raises_before_any_work(llm, prompts, params, message):
    greedy = SamplingParams(temperature=0, max_tokens=4)
    good = llm.generate(["hello world"], greedy, use_tqdm=False)
    with pytest.raises(ValueError) as info:
        llm.generate(prompts, {"max_tokens": 4, **params}, use_tqdm=False)
    assert message in str(info.value)
    assert_idle(llm)  # the valid prompt in the same call was never started
    again = llm.generate(["hello world"], greedy, use_tqdm=False)
    assert again[0].outputs[0].token_ids == good[0].outputs[0].token_ids


def test_sampling_param_errors_name_field_and_range():
    with pytest.raises(ValueError, match=r"top_p.*\(0, 1\]"):
        SamplingParams(top_p=2)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)


def test_seeded_sampling_reproduces_regardless_of_batch(llm):
    prompt = [5, 6, 7, 8, 9]
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=12, ignore_eos=True)
    alone = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids
    others = [[11 + i, 12, 13 + i] for i in range(5)]
    batch = others[:2] + [prompt] + others[2:]
    unseeded = SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True)
    mixed = llm.generate(batch, [unseeded, unseeded, params, unseeded, unseeded, unseeded], use_tqdm=False)
    assert mixed[2].outputs[0].token_ids == alone
    other_seed = llm.generate([prompt], params.model_copy(update={"seed": 99}), use_tqdm=False)
    assert other_seed[0].outputs[0].token_ids != alone
    assert_idle(llm)


def test_stop_token_ids_min_tokens_and_max_tokens(llm):
    greedy = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    full = llm.generate([[40, 41, 42]], greedy, use_tqdm=False)[0].outputs[0].token_ids
    stop_id = full[5]
    first = full.index(stop_id)
    out = llm.generate([[40, 41, 42]], greedy.model_copy(update={"stop_token_ids": [stop_id]}), use_tqdm=False)
    completion = out[0].outputs[0]
    assert completion.token_ids == full[: first + 1]
    assert completion.finish_reason == "stop" and completion.stop_reason == stop_id
    # min_tokens forbids the stop id until enough tokens were generated.
    out = llm.generate([[40, 41, 42]], greedy.model_copy(update={"stop_token_ids": [stop_id], "min_tokens": 8}),
                       use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) >= 8
    assert stop_id not in out[0].outputs[0].token_ids[:7]
    out = llm.generate([[40, 41, 42]], greedy.model_copy(update={"max_tokens": 3}), use_tqdm=False)
    assert out[0].outputs[0].token_ids == full[:3] and out[0].outputs[0].finish_reason == "length"
    assert_idle(llm)


def test_eos_stops_unless_ignored(llama_dir):
    llm = LLM(model=str(llama_dir), dtype="float32", block_size=4, num_blocks=64)
    greedy = SamplingParams(temperature=0, max_tokens=15, ignore_eos=True)
    full = llm.generate([[40, 41, 42]], greedy, use_tqdm=False)[0].outputs[0].token_ids
    # Pretend the 4th generated token is the model's EOS.
    llm.engine.eos_token_ids = (full[3],)
    out = llm.generate([[40, 41, 42]], greedy.model_copy(update={"ignore_eos": False}), use_tqdm=False)
    assert out[0].outputs[0].token_ids == full[: full.index(full[3]) + 1]
    assert out[0].outputs[0].finish_reason == "stop" and out[0].outputs[0].stop_reason is None
    out = llm.generate([[40, 41, 42]], greedy, use_tqdm=False)
    assert out[0].outputs[0].token_ids == full


def test_stop_strings_are_not_emitted(llm):
    greedy = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    text = llm.generate(["def main():"], greedy, use_tqdm=False)[0].outputs[0].text
    stop = text[4:7]
    assert len(stop) == 3
    out = llm.generate(["def main():"], greedy.model_copy(update={"stop": [stop]}), use_tqdm=False)[0].outputs[0]
    assert out.text == text[: text.index(stop)]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert_idle(llm)


def test_logprobs_and_prompt_logprobs_match_hf(llm, llama_dir):
    hf = load_hf(llama_dir)
    prompt = [9, 8, 7, 6, 5, 4, 3]
    params = SamplingParams(temperature=0, max_tokens=4, logprobs=3, prompt_logprobs=2, ignore_eos=True)
    out = llm.generate([prompt], params, use_tqdm=False)[0]
    ids = prompt + out.outputs[0].token_ids
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), -1)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for pos in range(1, len(prompt)):
        entry = out.prompt_logprobs[pos]
        assert entry[prompt[pos]].logprob == pytest.approx(ref[pos - 1, prompt[pos]].item(), abs=1e-4)
        top = torch.topk(ref[pos - 1], 2).indices.tolist()
        assert [t for t, lp in entry.items() if lp.rank is not None] == top
    completion = out.outputs[0]
    assert len(completion.logprobs) == 4
    total = 0.0
    for step, (token, entry) in enumerate(zip(completion.token_ids, completion.logprobs)):
        row = ref[len(prompt) - 1 + step]
        assert entry[token].logprob == pytest.approx(row[token].item(), abs=1e-4)
        assert entry[token].rank == 1  # greedy picks the top token
        assert len([lp for lp in entry.values() if lp.rank]) == 3
        total += row[token].item()
    assert completion.cumulative_logprob == pytest.approx(total, abs=1e-3)


def test_prompt_logprobs_survive_preemption(llama_dir):
    llm = LLM(model=str(llama_dir), dtype="float32", block_size=4, num_blocks=14, enable_prefix_caching=False)
    prompts = [[3 + (i * 7 + j) % 300 for j in range(20)] for i in range(3)]
    params = SamplingParams(temperature=0, max_tokens=12, prompt_logprobs=0, ignore_eos=True)
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert llm.engine.core.scheduler.num_preemptions > 0
    for prompt, out in zip(prompts, outs):
        assert len(out.prompt_logprobs) == len(prompt)
        assert [list(e)[0] for e in out.prompt_logprobs[1:]] == prompt[1:]


def test_a_sequence_that_outgrows_the_whole_cache_finishes_instead_of_looping(llama_dir):
    """Alone in a cache too small for its context, a request used to be preempted, recomputed and preempted
    again forever; it now ends with finish reason "length" once its next token has no block, and its
    blocks come back; the next request is served as usual."""
    llm = LLM(model=str(llama_dir), dtype="float32", block_size=4, num_blocks=10)  # 40 tokens in all
    params = SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True)
    out = llm.generate([[5, 6, 7, 8, 9, 10]], params, use_tqdm=False)[0].outputs[0]
    assert (len(out.token_ids), out.finish_reason) == (35, "length")  # 6 + 34 tokens fill it; the 35th is sampled
    kv = llm.engine.core.kv
    assert kv.num_free_blocks == kv.num_blocks
    short = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
    assert len(llm.generate([[5, 6, 7]], short, use_tqdm=False)[0].outputs[0].token_ids) == 5


def test_chat_applies_the_template(llm):
    messages = [{"role": "user", "content": "hi there"}]
    out = llm.chat(messages, SamplingParams(temperature=0, max_tokens=5), use_tqdm=False)[0]
    expected = llm.get_tokenizer().apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert out.prompt == expected
    assert out.prompt.endswith("<|im_start|>assistant\n")
    with pytest.raises(ValueError, match="messages must not be empty"):
        llm.chat([], use_tqdm=False)


def test_outputs_in_input_order_and_text_matches_tokens(llm):
    prompts = ["a", "longer prompt with several words in it", "x = 1"]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), use_tqdm=False)
    tok = llm.get_tokenizer()
    for prompt, out in zip(prompts, outs):
        assert out.prompt == prompt
        assert out.prompt_token_ids == tok.encode(prompt)
        assert out.outputs[0].text == tok.decode(out.outputs[0].token_ids, skip_special_tokens=True)


def test_refuses_pickle_only_and_unknown_architecture(tmp_path, llama_dir):
    pickled = tmp_path / "pickled"
    shutil.copytree(llama_dir, pickled)
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    with pytest.raises(ValueError, match="only pickle weights"):
        LLM(model=str(pickled))
    alien = tmp_path / "alien"
    shutil.copytree(llama_dir, alien)
    config = json.loads((alien / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (alien / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="supported: LlamaForCausalLM, MistralForCausalLM"):
        LLM(model=str(alien))


def test_sharded_checkpoint_with_index(tmp_path, llama_dir, llm):
    from transformers import AutoModelForCausalLM

    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(llama_dir).save_pretrained(sharded, max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").exists()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(llama_dir / name, sharded / name)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    a = LLM(model=str(sharded), dtype="float32").generate([[5, 6, 7]], params, use_tqdm=False)
    b = llm.generate([[5, 6, 7]], params, use_tqdm=False)
    assert a[0].outputs[0].token_ids == b[0].outputs[0].token_ids


def test_cli_generate(llama_dir, capsys):
    code = cli_main(["generate", "--model", str(llama_dir), "--dtype", "float32", "--prompt", "hello",
                     "--max-tokens", "5", "--temperature", "0", "--json", "--block-size", "8"])
    assert code == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["prompt"] == "hello" and len(record["token_ids"]) <= 5
    assert cli_main(["generate", "--model", str(llama_dir), "--prompt", "hi", "--top-p", "3"]) == 2
    assert "--top-p: must be in (0, 1], got 3.0" in capsys.readouterr().err


def test_cache_salt_separates_prefix_cache_hits(llama_dir):
    llm = LLM(model=str(llama_dir), dtype="float32", block_size=4, num_blocks=256)
    prompt = list(range(3, 40))
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)

    def run(**salt: str):
        out = llm.generate([{"prompt_token_ids": prompt, **salt}], params, use_tqdm=False)[0]
        return out.num_cached_tokens, out.outputs[0].token_ids

    cold, tokens = run(cache_salt="a")
    assert cold == 0
    assert run(cache_salt="b")[0] == 0 and run()[0] == 0  # other salts, and no salt, see none of it
    warm, again = run(cache_salt="a")
    assert warm == 36 and again == tokens  # 9 full blocks of the salt's own; the same greedy tokens
    with pytest.raises(ValueError, match="cache_salt must be a non-empty string"):
        llm.generate([{"prompt_token_ids": prompt, "cache_salt": ""}], params, use_tqdm=False)
    assert llm.engine.core.kv.num_free_blocks == llm.engine.core.kv.num_blocks
