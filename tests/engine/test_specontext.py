"""SpeContext end to end (--kv-policy specontext): greedy outputs equal Hugging Face's when each
decode query of each KV head sees exactly what a reference selection (the retrieval head's
attention computed in full over the context, then top-K) plus the window blocks allows; a budget
above the context changes nothing; prefix hits, preemption and per-request choice compose; keys
that went stale are recomputed; bad settings are refused; no block leaks."""

from __future__ import annotations

import functools

import pytest
import torch

from kvflow import LLM, SamplingParams
from kvflow.model.retrieval_head import RetrievalHead, RetrievalHeadConfig, save_retrieval_head, token_windows
from tests.model.test_parity import cpu_kernels, mixed_prompts  # noqa: F401 - cpu_kernels is a fixture
from tests.model_utils import load_hf_with_attention

BS = 4
MAX_TOKENS = 12
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)


@pytest.fixture(scope="module")
def head_dir(tmp_path_factory, llama_dir) -> str:
    """A random retrieval head for the test model (vocabulary 512, hidden size 64, 2 KV heads)."""
    torch.manual_seed(3)
    head = RetrievalHead(RetrievalHeadConfig(vocab_size=512, hidden_size=64, num_kv_heads=2, embed_dim=8, window=3,
                                             head_dim=16))
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(0.0, 0.5)  # scores far from uniform, so top-K has no near-ties
    path = tmp_path_factory.mktemp("retrieval") / "head"
    save_retrieval_head(head, path)
    return str(path)


# What the reference attention applies: the head, the budget's shape and the sequence being scored.
_REF: dict = {}


def reference_selection(head: RetrievalHead, ids: list[int], p: int, k: int, sinks: int,
                        window_blocks: int) -> list[set[int]] | None:
    """Per KV head, the entries query position p reads besides its window blocks: the retrieval
    head's softmax over every candidate (max over its query heads), the sinks and then the best
    scores, K in all. None: the decode reads everything."""
    nb = -(-(p + 1) // BS)
    candidates = (nb - window_blocks) * BS
    if candidates <= k:
        return None
    with torch.no_grad():
        windows = token_windows(torch.tensor(ids[: p + 1]), head.config.window)
        keys = head.keys(windows[:candidates], torch.arange(candidates)).double()
        q = head.queries(windows[p : p + 1], torch.tensor([p]))[0].double()
    chosen = []
    for h in range(head.config.num_kv_heads):
        probs = torch.softmax(torch.einsum("gd,ld->gl", q[h], keys[:, h]) * head.scale, dim=-1).amax(0)
        order = sorted(range(candidates), key=lambda j: (j >= sinks, -probs[j].item()))
        chosen.append(set(order[:k]))
    return chosen


def _visible(q_len: int, k_len: int) -> torch.Tensor:
    """[heads, q, k]: causal, except that decode queries (positions past the prompt) of a sparse step
    see their KV head's selection and window blocks only."""
    ids, prompt, head = _REF["ids"], _REF["prompt"], _REF["head"]
    k, sinks, window_blocks, heads = _REF["k"], _REF["sinks"], _REF["window_blocks"], _REF["heads"]
    mask = torch.ones(q_len, k_len).tril(k_len - q_len).bool()[None].repeat(heads, 1, 1)
    group = heads // head.config.num_kv_heads
    for row in range(q_len):
        p = row + k_len - q_len
        if p < prompt:
            continue
        chosen = reference_selection(head, ids, p, k, sinks, window_blocks)
        if chosen is None:
            continue
        window_from = (-(-(p + 1) // BS) - window_blocks) * BS
        for h, entries in enumerate(chosen):
            seen = torch.zeros(k_len, dtype=torch.bool)
            seen[sorted(entries)] = True
            seen[window_from : p + 1] = True
            mask[h * group : (h + 1) * group, row] = seen
    return mask


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    mask = _visible(query.shape[2], key.shape[2])
    group = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask[None], scale=scaling)
    return out.transpose(1, 2).contiguous(), None


@functools.cache
def _hf(path: str):
    return load_hf_with_attention(path, "kvflow_specontext", _attention)


def _reference_greedy(llama_dir, head_dir: str, prompt: list[int], budget: int, sinks: int, window: int) -> list[int]:
    from kvflow.model.retrieval_head import load_retrieval_head

    model = _hf(str(llama_dir))
    ids = list(prompt)
    window_blocks = 1 + -(-window // BS)  # the query's block and the window's
    _REF.update(head=load_retrieval_head(head_dir, model.get_input_embeddings().weight), prompt=len(prompt),
                k=(budget // BS - window_blocks) * BS, sinks=sinks, window_blocks=window_blocks,
                heads=model.config.num_attention_heads, ids=ids)
    with torch.no_grad():
        for _ in range(MAX_TOKENS):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def _llm(llama_dir, head_dir, cpu_kernels=True, **kwargs) -> LLM:  # noqa: F811
    args = dict(model=str(llama_dir), dtype="float32", cpu_kernels=cpu_kernels, block_size=BS, num_blocks=160,
                max_num_batched_tokens=512, kv_policy="specontext", kv_budget=12, kv_window=0, retrieval_model=head_dir)
    return LLM(**{**args, **kwargs})


@pytest.mark.parametrize("budget,sinks,window", [(12, 4, 0), (16, 0, 0), (24, 2, 6)])
def test_greedy_matches_hf_reading_the_reference_selection(llama_dir, head_dir, cpu_kernels, budget,  # noqa: F811
                                                           sinks, window):
    """The C++ forward and the PyTorch modules both generate exactly what HF does when each decode
    query of each KV head sees only the reference selection and the newest blocks."""
    llm = _llm(llama_dir, head_dir, cpu_kernels, kv_budget=budget, kv_sink_tokens=sinks, kv_window=window)
    prompts = [p for p in mixed_prompts(5, count=6) if len(p) > 16] + [mixed_prompts(9, count=6)[5] * 2]
    for prompt in prompts:
        out = llm.generate([prompt], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
        want = _reference_greedy(llama_dir, head_dir, prompt, budget, sinks, window)
        assert out == want, f"{len(prompt)}-token prompt"
    kv = llm.engine.core.kv
    assert kv.num_free_blocks == kv.num_blocks


def test_a_budget_above_the_context_changes_nothing(llama_dir, head_dir):
    prompts = mixed_prompts(7, count=6)
    plain = LLM(model=str(llama_dir), dtype="float32", block_size=BS, num_blocks=160)
    sparse = _llm(llama_dir, head_dir, kv_budget=512)
    want = [o.outputs[0].token_ids for o in plain.generate(prompts, GREEDY, use_tqdm=False)]
    assert [o.outputs[0].token_ids for o in sparse.generate(prompts, GREEDY, use_tqdm=False)] == want


def test_batches_prefix_hits_and_preemption_give_each_request_its_own_selection(llama_dir, head_dir):
    """A batch (sparse decodes of different lengths in one step) and the same prompts again (their
    blocks now from the prefix cache, keys included): every request generates what it generates
    alone. A cache so small that requests are preempted: they start over (a recomputed token's KV
    comes from full attention, so outputs may differ from the uninterrupted run) and leak nothing."""
    prompts = [p * 3 for p in mixed_prompts(11, count=6) if len(p) > 8]
    alone = [_llm(llama_dir, head_dir).generate([p], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
             for p in prompts]
    llm = _llm(llama_dir, head_dir)
    for _ in range(2):
        outs = llm.generate(prompts, GREEDY, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == alone
    assert all(o.num_cached_tokens >= BS * (len(p) // BS - 1) for o, p in zip(outs, prompts))  # prefix hits
    # Long decodes of similar prompts: all start, then their growth (and their buffers) no longer fits.
    prompts = [p[:30] * 2 for p in prompts]
    long = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    alone = [_llm(llama_dir, head_dir).generate([p], long, use_tqdm=False)[0].outputs[0].token_ids for p in prompts]
    tight = _llm(llama_dir, head_dir, num_blocks=48, enable_prefix_caching=False)
    outs = tight.generate(prompts, long, use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [40] * len(prompts)
    assert tight.engine.core.scheduler.num_preemptions > 0
    assert [o.outputs[0].token_ids[:1] for o in outs] == [a[:1] for a in alone]  # from the dense prefill
    for engine in (llm, tight):
        kv = engine.engine.core.kv
        assert kv.num_free_blocks == kv.num_blocks


def test_stale_retrieval_keys_are_recomputed_from_the_tokens(llama_dir, head_dir):
    """Keys that no longer match their slots' tokens (KV that arrived by another path) are found and
    recomputed before they are scored: the output is unchanged."""
    prompt = mixed_prompts(13, count=6)[5]
    llm = _llm(llama_dir, head_dir)
    want = llm.generate([prompt], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    keys = llm.engine.core.runner.retrieval_keys
    keys.keys.normal_()  # every cached key is now wrong, but its recorded window still says it is right...
    keys.windows.fill_(-2)  # ...unless the record is gone too, as for a block whose KV was loaded
    before = llm.engine.core.stats().specontext_recomputed_keys
    assert llm.generate([prompt], GREEDY, use_tqdm=False)[0].outputs[0].token_ids == want
    assert llm.engine.core.stats().specontext_recomputed_keys > before


def test_requests_choose_specontext_on_an_engine_with_a_retrieval_head(llama_dir, head_dir):
    prompt = mixed_prompts(5, count=6)[5]
    engine_wide = _llm(llama_dir, head_dir).generate([prompt], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    llm = _llm(llama_dir, head_dir, kv_policy="none", kv_budget=None)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, kv_policy="specontext",
                            kv_budget=12)  # (the engine's window, 0, applies)
    assert llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids == engine_wide
    plain = LLM(model=str(llama_dir), dtype="float32", block_size=BS, num_blocks=64)
    with pytest.raises(ValueError, match="needs the engine started with --kv-policy specontext or --retrieval-model"):
        plain.generate([prompt], params, use_tqdm=False)


def test_a_retrieval_head_that_does_not_fit_the_model_is_refused(llama_dir, tmp_path):
    other = RetrievalHead(RetrievalHeadConfig(vocab_size=512, hidden_size=64, num_kv_heads=1))
    save_retrieval_head(other, tmp_path / "one-head")
    with pytest.raises(ValueError, match="scores 1 KV heads; the model has 2"):
        _llm(llama_dir, str(tmp_path / "one-head"))
    wider = RetrievalHead(RetrievalHeadConfig(vocab_size=512, hidden_size=128, num_kv_heads=2))
    save_retrieval_head(wider, tmp_path / "wider")
    with pytest.raises(ValueError, match="reads a 512 x 128 embedding; the model's is 512 x 64"):
        _llm(llama_dir, str(tmp_path / "wider"))
    with pytest.raises(ValueError, match="is not a retrieval head"):
        _llm(llama_dir, str(llama_dir))
    with pytest.raises(ValueError, match="needs --retrieval-model DIR"):
        _llm(llama_dir, None)


@pytest.mark.slow
def test_a_long_generation_keeps_its_buffer_and_leaks_nothing(tmp_path, head_dir):
    """Thousands of generated tokens: the buffer stays the same blocks, each step moves only a
    fraction of them, and every block comes back."""
    from tests.model_utils import make_tiny_model

    model = make_tiny_model("llama", tmp_path / "long", max_position_embeddings=4096, tokenizer=False)
    from tests.tokenizer_utils import make_tokenizer

    make_tokenizer(model, vocab_size=512)
    llm = LLM(model=str(model), dtype="float32", block_size=16, num_blocks=300, kv_policy="specontext",
              kv_budget=256, kv_window=0, retrieval_model=head_dir)
    params = SamplingParams(temperature=0.8, seed=1, max_tokens=3000, ignore_eos=True)
    out = llm.generate([mixed_prompts(1, count=6)[5]], params, use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 3000
    kv = llm.engine.core.kv
    assert kv.num_free_blocks == kv.num_blocks
    stats = llm.engine.core.stats()
    assert stats.specontext_steps > 2500
    # Each sparse step selects K = 240 entries (15 blocks) per KV head: those already in the buffer stay,
    # only the others move (the first step fills it).
    assert stats.specontext_moved_tokens + stats.specontext_kept_tokens == stats.specontext_steps * 2 * 240
    assert 2 * 240 <= stats.specontext_moved_tokens < stats.specontext_steps * 2 * 240
    assert stats.specontext_moved_bytes == stats.specontext_moved_tokens * 2 * 2 * 16 * 4  # K and V, layers, fp32
