"""LoRA adapters over HTTP: the OpenAI `model` field selects an adapter (outputs equal the offline engine's
and PEFT's merged model), /v1/models lists adapters with their parent, unknown names are 404s, and the
runtime load/unload routes exist only behind an API key."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.lora_utils import hf_greedy, make_peft_adapter, merged_hf_model

KEY = "lora-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
PROMPT_IDS = [5, 17, 99, 300, 12, 8, 41]


@pytest.fixture(scope="module")
def adapters(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("server_adapters")
    return {"sql": make_peft_adapter(model_dir, root / "sql", seed=3, rank=8, scale=0.2),
            "chat": make_peft_adapter(model_dir, root / "chat", seed=4, rank=4, scale=0.3,
                                      targets=("q_proj", "v_proj", "down_proj")),
            "big": make_peft_adapter(model_dir, root / "big", seed=5, rank=32, scale=0.1)}


def complete(url: str, model: str | None, headers: dict | None = None) -> httpx.Response:
    body = {"prompt": PROMPT_IDS, "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    if model is not None:
        body["model"] = model
    return httpx.post(f"{url}/v1/completions", json=body, headers=headers, timeout=60)


def tokens(response: httpx.Response, model_dir: Path) -> list[int]:
    from transformers import AutoTokenizer

    assert response.status_code == 200, response.text
    tok = AutoTokenizer.from_pretrained(model_dir)
    return tok.encode(response.json()["choices"][0]["text"], add_special_tokens=False)


def test_model_field_selects_the_adapter(start_server, model_dir, adapters, tmp_path):
    from tests.engine.test_block_zoo import make_variant

    variant = make_variant(model_dir, tmp_path / "variant", (1,), seed=5, final_norm=True)
    server = start_server("--enable-lora", "--max-loras", "1", "--lora-modules", f"sql={adapters['sql']}",
                          f"chat={adapters['chat']}", "--variant", f"top={variant}")
    models = httpx.get(f"{server.url}/v1/models", timeout=10).json()["data"]
    base = models[0]["id"]
    assert [(m["id"], m["parent"]) for m in models] == [(base, None), ("top", base), ("sql", base), ("chat", base)]
    top = complete(server.url, "top")
    assert top.status_code == 200 and top.json()["model"] == "top", top.text
    assert all(str(adapters["sql"]) not in str(m) for m in models)  # never the server's disk paths
    texts = {}
    for name in ("sql", "chat", None, base):
        r = complete(server.url, name)
        assert r.status_code == 200, r.text
        assert r.json()["model"] == (name if name in ("sql", "chat") else base)
        texts[name] = r.json()["choices"][0]["text"]
    assert texts[None] == texts[base] and texts["sql"] != texts[None] and texts["chat"] != texts["sql"]
    from kvflow import LLM, SamplingParams

    llm = LLM(model=str(model_dir), dtype="float32", enable_lora=True,
              lora_modules={k: str(v) for k, v in adapters.items() if k != "big"})
    offline = llm.generate([PROMPT_IDS] * 2, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
                           lora_request=["sql", "chat"], use_tqdm=False)
    assert [o.outputs[0].text for o in offline] == [texts["sql"], texts["chat"]]
    alone = LLM(model=str(variant), dtype="float32").generate([PROMPT_IDS], SamplingParams(
        temperature=0, max_tokens=6, ignore_eos=True), use_tqdm=False)[0].outputs[0].text
    assert top.json()["choices"][0]["text"] == alone != texts[None]
    ref = merged_hf_model(model_dir, adapters["sql"])
    assert offline[0].outputs[0].token_ids == hf_greedy(ref, PROMPT_IDS, 6)

    metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
    info = next(line for line in metrics.splitlines() if line.startswith("kvflow:lora_requests_info{"))
    assert 'max_lora="1"' in info
    slot_loads = next(line for line in metrics.splitlines() if line.startswith("kvflow:lora_slot_loads_total{"))
    assert float(slot_loads.split()[-1]) >= 2  # one slot, two adapters: each written into it at least once
    r = complete(server.url, "nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found", r.text
    assert "`sql`" in r.json()["error"]["message"]
    chat = httpx.post(f"{server.url}/v1/chat/completions", timeout=60,
                      json={"model": "chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
    assert chat.status_code == 200 and chat.json()["model"] == "chat", chat.text
    # The variant shares its lower layers' KV with the base (layer groups), which KV policies cannot read: a
    # request asking for one is refused with the way out, and the server goes on.
    r = httpx.post(f"{server.url}/v1/completions", timeout=60, json={
        "model": "top", "prompt": PROMPT_IDS, "max_tokens": 2, "kv_policy": "streaming", "kv_budget": 64})
    assert r.status_code == 400 and "--no-zoo-share-kv" in r.json()["error"]["message"], r.text
    assert complete(server.url, "top").json()["choices"][0]["text"] == top.json()["choices"][0]["text"]
    # Runtime loading is off by default: the routes do not exist.
    r = httpx.post(f"{server.url}/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(adapters["sql"])},
                   timeout=10)
    assert r.status_code == 404


def test_runtime_load_and_unload_behind_the_api_key(start_server, model_dir, adapters):
    server = start_server("--enable-lora", "--allow-runtime-lora", "--api-key", KEY)
    load = f"{server.url}/v1/load_lora_adapter"
    unload = f"{server.url}/v1/unload_lora_adapter"
    body = {"lora_name": "sql", "lora_path": str(adapters["sql"])}
    assert httpx.post(load, json=body, timeout=10).status_code == 401
    assert complete(server.url, "sql", AUTH).status_code == 404
    r = httpx.post(load, json=body, headers=AUTH, timeout=30)
    assert r.status_code == 200, r.text
    first = complete(server.url, "sql", AUTH)
    assert first.status_code == 200
    again = httpx.post(load, json=body, headers=AUTH, timeout=30)
    assert again.status_code == 400 and "already loaded" in again.json()["error"]["message"]
    bad = httpx.post(load, json={"lora_name": "big", "lora_path": str(adapters["big"])}, headers=AUTH, timeout=30)
    assert bad.status_code == 400 and "max_lora_rank" in bad.json()["error"]["message"], bad.text
    missing = httpx.post(load, json={"lora_name": "m", "lora_path": "/nonexistent"}, headers=AUTH, timeout=30)
    assert missing.status_code == 400
    ids = [m["id"] for m in httpx.get(f"{server.url}/v1/models", headers=AUTH, timeout=10).json()["data"]]
    assert ids[1:] == ["sql"]
    assert httpx.post(unload, json={"lora_name": "sql"}, headers=AUTH, timeout=10).status_code == 200
    assert complete(server.url, "sql", AUTH).status_code == 404
    assert httpx.post(unload, json={"lora_name": "sql"}, headers=AUTH, timeout=10).status_code == 404
    # Loaded again (same files): the same completion as before.
    assert httpx.post(load, json=body, headers=AUTH, timeout=30).status_code == 200
    assert complete(server.url, "sql", AUTH).json()["choices"][0]["text"] == first.json()["choices"][0]["text"]
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200


def test_runtime_lora_without_an_api_key_refuses_to_start(model_dir, tmp_path):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "kvflow.cli", "serve", "--model", str(model_dir), "--port", "0",
                        "--enable-lora", "--allow-runtime-lora"], capture_output=True, text=True, timeout=120,
                       env={**__import__("os").environ, "KVFLOW_API_KEY": ""})
    assert r.returncode != 0 and "--api-key" in r.stderr, r.stderr[-2000:]
