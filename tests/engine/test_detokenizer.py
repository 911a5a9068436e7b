"""Tests for kvflow.engine.detokenizer.IncrementalDetokenizer.

Three tokenizers, all trained in-process: the shared byte-level BPE (GPT-2/Llama-3
style), a Metaspace BPE (SentencePiece style: the decoder strips the first token's
leading space), and a Llama-2-style BPE with byte fallback (<0xNN> tokens and a
Replace/ByteFallback/Fuse/Strip decoder).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import pytest
import transformers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

import kvflow.engine.detokenizer as detok_mod
from kvflow.engine.detokenizer import IncrementalDetokenizer
from tests.tokenizer_utils import TRAINING_TEXT, make_tokenizer

REPLACEMENT = "\ufffd"
HYPOTHESIS = settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# --------------------------------------------------------------------------- tokenizers


def _train_metaspace_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """SentencePiece-style BPE: Metaspace pre-tokenizer and decoder ('▁' marks a word start)."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tok.train_from_iterator(TRAINING_TEXT, trainer=trainer)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", clean_up_tokenization_spaces=False
    )


def _train_byte_fallback_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """Llama-2-style BPE: a small alphabet, so rare characters become <0xNN> byte tokens."""
    base = Tokenizer(models.BPE(unk_token="<unk>"))
    base.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    base.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], limit_alphabet=60, show_progress=False
    )
    base.train_from_iterator(TRAINING_TEXT, trainer=trainer)
    data = json.loads(base.to_str())
    vocab: dict[str, int] = data["model"]["vocab"]
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    data["model"]["byte_fallback"] = True
    tok = Tokenizer.from_str(json.dumps(data))
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", clean_up_tokenization_spaces=False
    )


@pytest.fixture(scope="module")
def bl_tok(tmp_path_factory: pytest.TempPathFactory) -> transformers.PreTrainedTokenizerFast:
    """The shared byte-level tokenizer, loaded back the way the engine loads it."""
    path = tmp_path_factory.mktemp("bytelevel_tok")
    make_tokenizer(path)
    return transformers.AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def ms_tok() -> transformers.PreTrainedTokenizerFast:
    return _train_metaspace_tokenizer()


@pytest.fixture(scope="module")
def bf_tok() -> transformers.PreTrainedTokenizerFast:
    return _train_byte_fallback_tokenizer()


def _partial_utf8_ids(tok: transformers.PreTrainedTokenizerFast) -> list[int]:
    """Ids whose text on its own is not valid UTF-8 (a fragment of a multi-byte character)."""
    backend = tok.backend_tokenizer
    return [i for i in range(len(tok)) if REPLACEMENT in backend.decode([i], skip_special_tokens=False)]


def _chunks(ids: Sequence[int], sizes: Sequence[int]) -> list[list[int]]:
    """Split ids into consecutive chunks with the given sizes (cycled), so tests cover multi-token updates."""
    out: list[list[int]] = []
    pos, k = 0, 0
    while pos < len(ids):
        size = sizes[k % len(sizes)] if sizes else 1
        out.append(list(ids[pos : pos + size]))
        pos += size
        k += 1
    return out


def _stream(
    tok: transformers.PreTrainedTokenizerFast,
    prompt: Sequence[int],
    chunks: Sequence[Sequence[int]],
    **kwargs: object,
) -> tuple[IncrementalDetokenizer, list[str], str | None]:
    """Feed chunks through a detokenizer as an engine would; returns it, the deltas and the stop hit."""
    d = IncrementalDetokenizer(tok, list(prompt), **kwargs)  # type: ignore[arg-type]
    deltas: list[str] = []
    stop_hit = None
    for chunk in chunks:
        stop_hit = d.update(chunk)
        deltas.append(d.get_delta(finished=stop_hit is not None))
        if stop_hit is not None:
            break
    else:
        deltas.append(d.get_delta(finished=True))
    return d, deltas, stop_hit


# --------------------------------------------------------------------------- tokenizer helper


def test_make_tokenizer_roundtrip_and_chat_template(tmp_path: Path) -> None:
    tok = make_tokenizer(tmp_path / "a", vocab_size=512)
    loaded = transformers.AutoTokenizer.from_pretrained(tmp_path / "a")
    assert len(loaded) <= 512 and loaded.vocab_size <= 512
    assert loaded.bos_token == "<|bos|>" and loaded.eos_token == "<|eos|>" and loaded.pad_token == "<|pad|>"
    assert (loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id) == (0, 1, 2)
    text = "Héllo 世界 😀 def f(x):\n    return x"
    assert loaded.decode(loaded.encode(text)) == text
    assert loaded.encode(text) == tok.encode(text)
    # Multi-byte characters really are split over several tokens.
    assert _partial_utf8_ids(loaded)
    assert any(REPLACEMENT in loaded.decode([i]) for i in loaded.encode("🦀 👾"))
    rendered = loaded.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    im_start = loaded.convert_tokens_to_ids("<|im_start|>")
    assert im_start in loaded.all_special_ids
    assert loaded.encode(rendered)[0] == im_start
    # Cached: the second build yields the same vocabulary.
    assert make_tokenizer(tmp_path / "b").get_vocab() == tok.get_vocab()


def test_make_tokenizer_rejects_too_small_vocab(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        make_tokenizer(tmp_path, vocab_size=100)


# --------------------------------------------------------------------------- core invariant


def _without_special_tokens(tok: transformers.PreTrainedTokenizerFast, text: str) -> str:
    """`text` with every special-token string removed, matched left to right like the tokenizer does."""
    pattern = "|".join(re.escape(s) for s in sorted(tok.all_special_tokens, key=len, reverse=True))
    return re.sub(pattern, "", text)


def test_special_token_strings_in_text_are_skipped(bl_tok: transformers.PreTrainedTokenizerFast) -> None:
    """Regression (found by hypothesis in CI): text spelling '<|bos|>' streams as decode() does."""
    text = "a<|bos|>b <|im_end|>"
    ids = bl_tok.encode(text, add_special_tokens=False)
    assert bl_tok.convert_tokens_to_ids("<|bos|>") in ids
    d, deltas, _ = _stream(bl_tok, [], _chunks(ids, [1, 2]))
    assert d.output_text == "".join(deltas) == bl_tok.decode(ids, skip_special_tokens=True)
    assert d.output_text == _without_special_tokens(bl_tok, text) == "ab "


@HYPOTHESIS
@given(data=st.data())
def test_random_ids_match_full_decode_bytelevel(
    bl_tok: transformers.PreTrainedTokenizerFast, data: st.DataObject
) -> None:
    """Random ids (many of them UTF-8 fragments), random chunking: streamed text == decode(ids)."""
    vocab = len(bl_tok)
    partial = _partial_utf8_ids(bl_tok)
    ids_st = st.one_of(st.integers(0, vocab - 1), st.sampled_from(partial))
    prompt = data.draw(st.lists(ids_st, max_size=30), label="prompt")
    out = data.draw(st.lists(ids_st, max_size=40), label="out")
    sizes = data.draw(st.lists(st.integers(1, 5), min_size=1, max_size=5), label="sizes")
    skip = data.draw(st.booleans(), label="skip")

    d = IncrementalDetokenizer(bl_tok, prompt, skip_special_tokens=skip)
    deltas: list[str] = []
    seen: list[int] = []
    for chunk in _chunks(out, sizes):
        assert d.update(chunk) is None
        seen += chunk
        deltas.append(d.get_delta(finished=False))
        full = bl_tok.decode(seen, skip_special_tokens=skip)
        # Never ahead of decode(); equal to it unless decode() ends in an incomplete character.
        assert full.startswith(d.output_text)
        if not full.endswith(REPLACEMENT):
            assert d.output_text == full
        assert "".join(deltas) == d.output_text
    deltas.append(d.get_delta(finished=True))
    expected = bl_tok.decode(out, skip_special_tokens=skip)
    assert d.output_text == expected
    assert "".join(deltas) == expected
    assert d.output_token_ids == out
    if REPLACEMENT not in expected:
        assert not any(REPLACEMENT in delta for delta in deltas)


@HYPOTHESIS
@given(data=st.data())
def test_random_text_roundtrip_all_tokenizers(
    bl_tok: transformers.PreTrainedTokenizerFast,
    ms_tok: transformers.PreTrainedTokenizerFast,
    bf_tok: transformers.PreTrainedTokenizerFast,
    data: st.DataObject,
) -> None:
    """Encoded text streamed in random chunks reproduces decode() exactly; no U+FFFD ever appears."""
    alphabet = st.sampled_from(sorted(set("".join(TRAINING_TEXT)) | set("🦀👾ŵǅ߷ꙮ𝄞")))
    text = data.draw(st.text(alphabet, max_size=40), label="text")
    tok = data.draw(st.sampled_from([bl_tok, ms_tok, bf_tok]), label="tok")
    sizes = data.draw(st.lists(st.integers(1, 4), min_size=1, max_size=4), label="sizes")
    ids = tok.encode(text, add_special_tokens=False)
    expected = tok.decode(ids, skip_special_tokens=True)  # the detokenizer's default; unseen chars may be <unk>
    d, deltas, _ = _stream(tok, [], _chunks(ids, sizes))
    assert d.output_text == expected
    assert "".join(deltas) == expected
    if REPLACEMENT not in expected:
        assert not any(REPLACEMENT in delta for delta in deltas)
    if tok is bl_tok:
        # Byte-level BPE is lossless except for special-token strings typed as text: the tokenizer
        # maps them to their special ids, which the default decode skips.
        assert expected == _without_special_tokens(tok, text)


@pytest.mark.parametrize(
    "text",
    [
        "Hello 😀 world",
        "你好，世界！今天天气很好。",
        "Ça va très bien, Ångström œuvre",
        "🦀🦀 👨‍👩‍👧 🇫🇷 ✨",
        "mixed: naïve 😀 café 你好 🚀 Straße 世界 🎉 end.",
        "한국어 テスト Ελληνικά 𝄞",
    ],
)
def test_multibyte_strings_stream_exactly(bl_tok: transformers.PreTrainedTokenizerFast, text: str) -> None:
    ids = bl_tok.encode(text)
    prompt = bl_tok.encode("Tell me something:")
    d = IncrementalDetokenizer(bl_tok, prompt)
    deltas = []
    for token_id in ids:
        d.update([token_id])
        delta = d.get_delta(finished=False)
        assert REPLACEMENT not in delta
        deltas.append(delta)
        # Text only ever grows by whole characters, each once.
        assert text.startswith(d.output_text)
    deltas.append(d.get_delta(finished=True))
    assert d.output_text == text
    assert "".join(deltas) == text
    # At least one token was a fragment, so some step emitted nothing (the test covers the hold-back path).
    assert any(REPLACEMENT in bl_tok.decode([i]) for i in ids) == ("" in deltas[:-1])


def test_incomplete_character_at_end_is_flushed_as_decode_shows_it(
    bl_tok: transformers.PreTrainedTokenizerFast,
) -> None:
    ids = bl_tok.encode("ok 🦀")
    cut = ids[:-1]  # last byte(s) of the crab missing
    assert bl_tok.decode(cut).endswith(REPLACEMENT)
    full = bl_tok.decode(cut)
    d = IncrementalDetokenizer(bl_tok, [])
    d.update(cut)
    streamed = d.get_delta(finished=False)
    # The token holding the crab's first bytes may also hold the space before it.
    assert streamed in ("ok", "ok ") and d.output_text == streamed
    assert d.get_delta(finished=True) == full[len(streamed) :]
    assert d.output_text == full
    assert d.finished
    with pytest.raises(RuntimeError):
        d.update([ids[-1]])


def test_prompt_ending_inside_a_character_does_not_leak_prompt(bl_tok: transformers.PreTrainedTokenizerFast) -> None:
    """A seed whose text ends in U+FFFD would make DecodeStream emit the whole seed; it must be avoided."""
    crab = bl_tok.encode("🦀")
    assert len(crab) >= 2
    prompt = bl_tok.encode("Some prompt text ") + crab[:-1]
    out = crab[-1:] + bl_tok.encode(" done")
    d, deltas, _ = _stream(bl_tok, prompt, [[t] for t in out])
    assert d.output_text == bl_tok.decode(out)
    assert "prompt" not in d.output_text
    assert "".join(deltas) == d.output_text


def test_window_stays_bounded(bl_tok: transformers.PreTrainedTokenizerFast) -> None:
    """O(1) per step: the decode window must not grow with the output length."""
    ids = bl_tok.encode(" ".join(TRAINING_TEXT) * 3)
    assert len(ids) > 1000
    d = IncrementalDetokenizer(bl_tok, [], stop=["never appears in the text"])
    max_window = 0
    for token_id in ids:
        d.update([token_id])
        d.get_delta(finished=False)
        max_window = max(max_window, len(d._group) + len(d._pending))
        assert len(d._tail) <= len("never appears in the text") - 1
    assert max_window <= 8
    d.get_delta(finished=True)
    assert d.output_text == bl_tok.decode(ids)


# --------------------------------------------------------------------------- special tokens


@pytest.mark.parametrize("skip", [True, False])
def test_skip_special_tokens(bl_tok: transformers.PreTrainedTokenizerFast, skip: bool) -> None:
    eos, im_end = bl_tok.eos_token_id, bl_tok.convert_tokens_to_ids("<|im_end|>")
    crab = bl_tok.encode("🦀")
    out = bl_tok.encode("Hi") + [im_end] + crab[:1] + [eos] + crab[1:] + bl_tok.encode(" there") + [eos]
    prompt = bl_tok.apply_chat_template([{"role": "user", "content": "yo"}], tokenize=True, add_generation_prompt=True)[
        "input_ids"
    ]
    d, deltas, _ = _stream(bl_tok, prompt, [[t] for t in out], skip_special_tokens=skip)
    expected = bl_tok.decode(out, skip_special_tokens=skip)
    assert d.output_text == expected
    assert "".join(deltas) == expected
    if skip:
        assert "<|" not in expected and expected == "Hi🦀 there"
    else:
        assert expected.startswith("Hi<|im_end|>") and expected.endswith(" there<|eos|>")


# --------------------------------------------------------------------------- SentencePiece-style decoders


def _expected_with_leading_space(tok: transformers.PreTrainedTokenizerFast, out: list[int], skip: bool) -> str:
    """The documented rule: with prompt context, a word-start first token keeps its space."""
    plain = tok.decode(out, skip_special_tokens=skip)
    special = set(tok.all_special_ids)
    visible = [t for t in out if not (skip and t in special)]
    if visible and tok.convert_ids_to_tokens(visible[0]).startswith("▁"):
        return " " + plain
    return plain


def test_metaspace_leading_space_rule(ms_tok: transformers.PreTrainedTokenizerFast) -> None:
    out = ms_tok.encode("world is big", add_special_tokens=False)
    assert ms_tok.convert_ids_to_tokens(out[0]).startswith("▁")
    assert ms_tok.decode(out) == "world is big"
    # No prompt context: exactly decode().
    d, _, _ = _stream(ms_tok, [], [[t] for t in out])
    assert d.output_text == "world is big"
    # Only special tokens as context (skipped): nothing precedes, so no space either.
    d, _, _ = _stream(ms_tok, [ms_tok.bos_token_id], [[t] for t in out])
    assert d.output_text == "world is big"
    # Mid-sentence: the space between prompt and output is part of the output.
    prompt = ms_tok.encode("Hello there", add_special_tokens=False)
    d, deltas, _ = _stream(ms_tok, prompt, [[t] for t in out])
    assert d.output_text == " world is big"
    assert "".join(deltas) == " world is big"
    # Same text decoded as a continuation of the prompt.
    assert ms_tok.decode(prompt + out) == "Hello there world is big"


@HYPOTHESIS
@given(data=st.data())
def test_random_ids_metaspace(ms_tok: transformers.PreTrainedTokenizerFast, data: st.DataObject) -> None:
    out = data.draw(st.lists(st.integers(0, len(ms_tok) - 1), max_size=30), label="out")
    with_prompt = data.draw(st.booleans(), label="with_prompt")
    skip = data.draw(st.booleans(), label="skip")
    sizes = data.draw(st.lists(st.integers(1, 4), min_size=1, max_size=4), label="sizes")
    prompt = ms_tok.encode("The quick brown fox", add_special_tokens=False) if with_prompt else []
    d, deltas, _ = _stream(ms_tok, prompt, _chunks(out, sizes), skip_special_tokens=skip)
    if with_prompt:
        expected = _expected_with_leading_space(ms_tok, out, skip)
    else:
        expected = ms_tok.decode(out, skip_special_tokens=skip)
    assert d.output_text == expected
    assert "".join(deltas) == expected


def test_byte_fallback_streams_partial_characters(bf_tok: transformers.PreTrainedTokenizerFast) -> None:
    text = "Le café 🦀 世界 ok"
    ids = bf_tok.encode(text, add_special_tokens=False)
    tokens = bf_tok.convert_ids_to_tokens(ids)
    assert any(t.startswith("<0x") for t in tokens), tokens
    prompt = bf_tok.encode("Hello there", add_special_tokens=False)
    d, deltas, _ = _stream(bf_tok, prompt, [[t] for t in ids])
    assert d.output_text == " " + text  # first token "▁Le" mid-sentence keeps its space
    assert not any(REPLACEMENT in x for x in deltas)


def test_byte_fallback_invalid_prefix_recovers(bf_tok: transformers.PreTrainedTokenizerFast) -> None:
    """A byte run that turns invalid after '»' was emitted breaks DecodeStream's prefix; we go on."""
    v = bf_tok.get_vocab()
    a = bf_tok.encode("a", add_special_tokens=False)
    x = bf_tok.encode("x", add_special_tokens=False)  # "▁x": the normalizer prepends "▁"
    ids = a + [v["<0xC2>"], v["<0xBB>"], v["<0x80>"]] + x
    d, deltas, _ = _stream(bf_tok, [], [[t] for t in ids])
    # decode() says "a��� x" (ByteFallback drops the whole run); "»" was already streamed and stays.
    assert bf_tok.decode(ids) == "a" + REPLACEMENT * 3 + " x"
    assert d.output_text == "a»" + REPLACEMENT + " x"
    assert "".join(deltas) == d.output_text


# --------------------------------------------------------------------------- stop strings


def _reference_stop(text: str, stops: Sequence[str], include: bool) -> tuple[str, str | None]:
    """The match that ends first (ties: starts first) cuts the text; brute force over all positions."""
    best: tuple[int, int, str] | None = None
    for s in stops:
        if not s:
            continue
        start = text.find(s)
        if start >= 0 and (best is None or (start + len(s), start) < best[:2]):
            best = (start + len(s), start, s)
    if best is None:
        return text, None
    end, start, s = best
    return text[: end if include else start], s


def test_stop_string_split_across_tokens(bl_tok: transformers.PreTrainedTokenizerFast) -> None:
    text = "Hello world, goodbye world"
    ids = bl_tok.encode(text)
    # "o wor" spans several tokens.
    pieces = [bl_tok.decode([i]) for i in ids]
    assert "o wor" not in pieces
    d, deltas, stop = _stream(bl_tok, [], [[t] for t in ids], stop=["o wor"])
    assert stop == "o wor"
    assert d.output_text == "Hell"
    assert "".join(deltas) == "Hell"
    assert d.stop_string == "o wor"
    with pytest.raises(RuntimeError):
        d.update(ids[:1])


def test_stop_string_inside_multibyte_tokens(bl_tok: transformers.PreTrainedTokenizerFast) -> None:
    text = "go 🦀 ok 世界 fin"
    ids = bl_tok.encode(text)
    d, deltas, stop = _stream(bl_tok, [], [[t] for t in ids], stop=["🦀 ok 世"])
    assert stop == "🦀 ok 世"
    assert d.output_text == "go "
    assert "".join(deltas) == "go "


def test_stop_string_at_very_start(bl_tok: transformers.PreTrainedTokenizerFast) -> None:
    ids = bl_tok.encode("Hello world")
    d, deltas, stop = _stream(bl_tok, [], [[t] for t in ids], stop=["Hel"])
    assert stop == "Hel" and d.output_text == "" and "".join(deltas) == ""
    d, deltas, stop = _stream(bl_tok, [], [ids], stop=["Hello world"], include_stop_str_in_output=True)
    assert stop == "Hello world" and d.output_text == "Hello world" and "".join(deltas) == "Hello world"


@pytest.mark.parametrize("chunked", [False, True])
def test_multiple_stop_strings_earliest_wins(bl_tok: transformers.PreTrainedTokenizerFast, chunked: bool) -> None:
    ids = bl_tok.encode("Hello world and more")
    chunks = [ids] if chunked else [[t] for t in ids]
    # "lo w" completes before "world" and before "more", whatever the list order.
    d, _, stop = _stream(bl_tok, [], chunks, stop=["more", "world", "lo w"])
    assert stop == "lo w" and d.output_text == "Hel"
    # Both end at the same character: the one starting first ("ld" ⊂ "world") wins.
    d, _, stop = _stream(bl_tok, [], chunks, stop=["ld", "world"])
    assert stop == "world" and d.output_text == "Hello "
    # Ends first even though it starts later than the other match.
    d, _, stop = _stream(bl_tok, [], chunks, stop=["o world and", "wor"])
    assert stop == "wor" and d.output_text == "Hello "


def test_include_stop_str_in_output(bl_tok: transformers.PreTrainedTokenizerFast) -> None:
    ids = bl_tok.encode("Hello world and more")
    d, deltas, stop = _stream(bl_tok, [], [ids[:2], ids[2:]], stop=["wor"], include_stop_str_in_output=True)
    assert stop == "wor" and d.output_text == "Hello wor" and "".join(deltas) == "Hello wor"


def test_withholding_is_minimal(bl_tok: transformers.PreTrainedTokenizerFast) -> None:
    """Only an end of text that could start a stop string is held back, and only while unfinished."""
    d = IncrementalDetokenizer(bl_tok, [], stop=["STOP!", "xyz"])
    d.update(bl_tok.encode("abc"))
    assert d.get_delta(finished=False) == "abc"  # no suffix of "abc" starts a stop string
    d.update(bl_tok.encode(" ST"))
    assert d.get_delta(finished=False) == " "  # "ST" may become "STOP!"
    d.update(bl_tok.encode("x"))
    assert d.get_delta(finished=False) == "ST"  # "STx" cannot; "x" may start "xyz"
    d.update(bl_tok.encode("y"))
    assert d.get_delta(finished=False) == ""
    assert d.get_delta(finished=True) == "xy"
    assert d.output_text == "abc STxy"
    # With include_stop_str_in_output nothing is ever cut, so nothing is held back.
    d = IncrementalDetokenizer(bl_tok, [], stop=["STOP!"], include_stop_str_in_output=True)
    d.update(bl_tok.encode("abc ST"))
    assert d.get_delta(finished=False) == "abc ST"


@HYPOTHESIS
@given(data=st.data())
def test_stop_strings_property(bl_tok: transformers.PreTrainedTokenizerFast, data: st.DataObject) -> None:
    """Streamed deltas are always a prefix of the final text; stop handling matches a brute-force reference."""
    alphabet = st.sampled_from(list("ab \n") + ["é", "世", "🦀"])
    text = data.draw(st.text(alphabet, min_size=1, max_size=30), label="text")
    n_stops = data.draw(st.integers(1, 3), label="n_stops")
    stops = []
    for _ in range(n_stops):
        if data.draw(st.booleans(), label="substring"):
            i = data.draw(st.integers(0, len(text) - 1))
            j = data.draw(st.integers(i + 1, min(len(text), i + 6)))
            stops.append(text[i:j])
        else:
            stops.append(data.draw(st.text(alphabet, min_size=1, max_size=4), label="stop"))
    include = data.draw(st.booleans(), label="include")
    sizes = data.draw(st.lists(st.integers(1, 4), min_size=1, max_size=4), label="sizes")
    ids = bl_tok.encode(text)

    d = IncrementalDetokenizer(bl_tok, [], stop=stops, include_stop_str_in_output=include)
    streamed = ""
    stop_hit = None
    max_withhold = max(len(s) for s in stops) - 1
    for chunk in _chunks(ids, sizes):
        stop_hit = d.update(chunk)
        streamed += d.get_delta(finished=stop_hit is not None)
        if stop_hit is not None:
            break
        assert len(d.output_text) - len(streamed) <= max_withhold
    else:
        streamed += d.get_delta(finished=True)
    expected_text, expected_stop = _reference_stop(text, stops, include)
    assert stop_hit == expected_stop
    assert d.stop_string == expected_stop
    assert d.output_text == expected_text
    assert streamed == expected_text


# --------------------------------------------------------------------------- misc


def test_tokenizers_without_prefill_support(
    bl_tok: transformers.PreTrainedTokenizerFast,
    ms_tok: transformers.PreTrainedTokenizerFast,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """tokenizers < 0.22 lacks DecodeStream(ids=...): priming by stepping must give the same text."""
    real = detok_mod.DecodeStream

    def old_decode_stream(*args: object, **kwargs: object) -> object:
        if args or "ids" in kwargs:
            raise TypeError("DecodeStream() got an unexpected keyword argument 'ids'")
        return real(**kwargs)

    cases = [
        (bl_tok, bl_tok.encode("Hi 🦀 there"), bl_tok.encode(" 世界 😀 ok")),
        (
            ms_tok,
            ms_tok.encode("Hello there", add_special_tokens=False),
            ms_tok.encode("world 😀", add_special_tokens=False),
        ),
    ]
    expected = [_stream(tok, p, [[t] for t in o])[0].output_text for tok, p, o in cases]
    monkeypatch.setattr(detok_mod, "DecodeStream", old_decode_stream)
    got = [_stream(tok, p, [[t] for t in o])[0].output_text for tok, p, o in cases]
    assert got == expected
    assert expected[0] == bl_tok.decode(cases[0][2]) and expected[1] == " world 😀"


def test_accepts_raw_tokenizers_tokenizer_and_rejects_others(bl_tok: transformers.PreTrainedTokenizerFast) -> None:
    ids = bl_tok.encode("plain 🦀")
    d, _, _ = _stream(bl_tok.backend_tokenizer, [], [ids])  # type: ignore[arg-type]
    assert d.output_text == "plain 🦀"
    with pytest.raises(TypeError):
        IncrementalDetokenizer(object(), [])
    with pytest.raises(TypeError):
        IncrementalDetokenizer(bl_tok, [], stop="abc")  # type: ignore[arg-type]


def test_empty_updates_and_empty_stop_strings(bl_tok: transformers.PreTrainedTokenizerFast) -> None:
    d = IncrementalDetokenizer(bl_tok, [], stop=["", "zz"])
    assert d.update([]) is None
    assert d.get_delta(finished=False) == ""
    assert d.update(bl_tok.encode("abc")) is None
    assert d.get_delta(finished=True) == "abc"
    assert d.get_delta(finished=True) == ""
