"""The official openai client against a live `kvflow serve`: answers equal the offline engine's."""

from __future__ import annotations

import asyncio

import openai
import pytest

from kvflow import SamplingParams

PROMPTS = ["The quick brown fox", "Hello world! How are", "def add(a, b):", "Le café est très"]
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello, how are you?"}]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def model(client) -> str:
    (card,) = client.models.list().data
    return card.id


def greedy(offline, prompt, **kw):
    params = SamplingParams(temperature=0, max_tokens=kw.pop("max_tokens", 12), **kw)
    return offline.generate([prompt], params, use_tqdm=False)[0]


@pytest.mark.parametrize("prompt", PROMPTS[:2])
def test_completion_equals_offline_greedy(client, model, offline, prompt):
    want = greedy(offline, prompt, ignore_eos=True)
    got = client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0,
                                    extra_body={"ignore_eos": True})
    (choice,) = got.choices
    assert choice.text == want.outputs[0].text
    assert choice.finish_reason == "length"
    assert got.usage.prompt_tokens == len(want.prompt_token_ids)
    assert got.usage.completion_tokens == 12


def test_completion_stream_equals_offline_greedy(client, model, offline):
    want = greedy(offline, PROMPTS[2], ignore_eos=True)
    stream = client.completions.create(model=model, prompt=PROMPTS[2], max_tokens=12, temperature=0,
                                       stream=True, stream_options={"include_usage": True},
                                       extra_body={"ignore_eos": True})
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == want.outputs[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12


def test_batched_prompts_token_ids_and_echo(client, model, offline):
    tok = offline.get_tokenizer()
    batch = [PROMPTS[0], PROMPTS[3]]
    got = client.completions.create(model=model, prompt=batch, max_tokens=6, temperature=0, echo=True,
                                    extra_body={"ignore_eos": True})
    want = [greedy(offline, p, max_tokens=6, ignore_eos=True).outputs[0].text for p in batch]
    assert [c.text for c in sorted(got.choices, key=lambda c: c.index)] == [p + w for p, w in zip(batch, want)]
    ids = tok.encode(PROMPTS[1])
    got = client.completions.create(model=model, prompt=ids, max_tokens=6, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert got.choices[0].text == greedy(offline, ids, max_tokens=6, ignore_eos=True).outputs[0].text


def test_chat_equals_offline_greedy(client, model, offline):
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    want = offline.chat(MESSAGES, params, use_tqdm=False)[0].outputs[0].text
    got = client.chat.completions.create(model=model, messages=MESSAGES, max_completion_tokens=10,
                                         temperature=0, extra_body={"ignore_eos": True})
    assert got.choices[0].message.content == want
    assert got.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=10, temperature=0,
                                            stream=True, extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == "length"


def test_n_seeded_sampling_equals_offline(client, model, offline):
    params = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=8, ignore_eos=True)
    want = [c.text for c in offline.generate([PROMPTS[1]], params, use_tqdm=False)[0].outputs]
    got = client.completions.create(model=model, prompt=PROMPTS[1], n=3, temperature=1.0, seed=7, max_tokens=8,
                                    extra_body={"ignore_eos": True})
    assert [c.text for c in sorted(got.choices, key=lambda c: c.index)] == want
    assert len(set(want)) > 1  # seeds differ per choice
    stream = client.completions.create(model=model, prompt=PROMPTS[1], n=3, temperature=1.0, seed=7,
                                       max_tokens=8, stream=True, extra_body={"ignore_eos": True})
    texts = ["", "", ""]
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.text
    assert texts == want


def test_logprobs_match_offline(client, model, offline):
    want = greedy(offline, PROMPTS[0], max_tokens=5, logprobs=3, ignore_eos=True).outputs[0]
    got = client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=5, temperature=0, logprobs=3,
                                    extra_body={"ignore_eos": True}).choices[0].logprobs
    want_lps = [pos[tid].logprob for tid, pos in zip(want.token_ids, want.logprobs)]
    assert got.token_logprobs == pytest.approx(want_lps, abs=1e-4)
    # Top-3 plus the chosen token, keyed by text (tokens that decode alike share a key, as in OpenAI's format).
    assert all(1 <= len(top) <= 4 for top in got.top_logprobs)
    assert [max(top.values()) for top in got.top_logprobs] == pytest.approx(want_lps, abs=1e-4)  # greedy
    assert got.text_offset[0] == 0
    chat = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=4, temperature=0,
                                          logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    content = chat.choices[0].logprobs.content
    assert len(content) == 4 and all(len(entry.top_logprobs) == 2 for entry in content)
    # Greedy: the chosen token is the top-ranked one.
    assert all(entry.logprob == pytest.approx(entry.top_logprobs[0].logprob) for entry in content)


def test_stop_string_matches_offline(client, model, offline):
    full = greedy(offline, PROMPTS[0], max_tokens=16, ignore_eos=True).outputs[0].text
    stop = full[5:8]
    want = greedy(offline, PROMPTS[0], max_tokens=16, ignore_eos=True, stop=[stop]).outputs[0]
    got = client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=16, temperature=0, stop=stop,
                                    extra_body={"ignore_eos": True}).choices[0]
    assert got.text == want.text and stop not in got.text
    assert got.finish_reason == "stop"
    stream = client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=16, temperature=0, stop=[stop],
                                       stream=True, extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].text for c in stream) == want.text


def test_64_concurrent_streams_each_get_their_offline_output(server, model, offline):
    prompts = [f"{PROMPTS[i % 4]} {i}" for i in range(64)]
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    want = [o.outputs[0].text for o in offline.generate(prompts, params, use_tqdm=False)]

    async def one(client: openai.AsyncOpenAI, prompt: str) -> str:
        stream = await client.completions.create(model=model, prompt=prompt, max_tokens=10, temperature=0,
                                                 stream=True, extra_body={"ignore_eos": True})
        return "".join([c.choices[0].text async for c in stream if c.choices])

    async def run() -> list[str]:
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=120) as c:
            return await asyncio.gather(*(one(c, p) for p in prompts))

    assert asyncio.run(run()) == want


def test_models_version_tokenize_detokenize(client, model, server, offline):
    import httpx

    assert model == str(offline.engine.config.model.path)
    tok = offline.get_tokenizer()
    r = httpx.post(f"{server.url}/tokenize", json={"prompt": PROMPTS[0]}).json()
    assert r["tokens"] == tok.encode(PROMPTS[0]) and r["count"] == len(r["tokens"]) and r["max_model_len"] == 128
    r = httpx.post(f"{server.url}/detokenize", json={"tokens": tok.encode(PROMPTS[3])}).json()
    assert r["prompt"] == PROMPTS[3]
    chat = httpx.post(f"{server.url}/tokenize", json={"messages": MESSAGES}).json()
    assert tok.decode(chat["tokens"]).endswith("<|im_start|>assistant\n")
    assert httpx.get(f"{server.url}/version").json()["version"]
