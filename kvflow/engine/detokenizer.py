"""Incremental detokenization: output token ids -> streamed text, with stop strings.

Decoding the whole output again at every step costs O(n) per token (O(n^2) per
request), and decoding each token on its own is wrong: byte-level tokens can hold
a fragment of a multi-byte UTF-8 character, and SentencePiece-style decoders
treat a token's leading space differently at the start of a text than in the
middle. So this module drives ``tokenizers.decoders.DecodeStream`` (Rust), which
keeps a short window of recent ids: it decodes ``window + new`` and returns the
part after ``decode(window)``, and holds output back while the text ends in an
incomplete character (U+FFFD).

Leading-space rule: the stream is seeded with a short tail of the prompt, so the
first output token is decoded as it would be mid-text. For Metaspace /
SentencePiece tokenizers, if the first output token is a word start ("▁Hello")
and the prompt tail decodes to non-empty text, the output text starts with
" Hello". ``tokenizer.decode(output_ids)`` would strip that space. In general
``output_text == decode(seed + output_ids)[len(decode(seed)):]``, where ``seed``
is the chosen prompt tail. For byte-level BPE tokenizers (GPT-2, Llama-3, Qwen)
this is exactly ``decode(output_ids)``. vLLM and TGI behave the same way.

Known limits (vLLM shares them):
* Tokenizers whose decode is not prefix-stable, e.g. a ByteFallback run that turns
  invalid after part of it was already emitted, make ``DecodeStream`` raise
  "Invalid prefix". We then re-seed the stream and go on. Text already streamed is
  kept, so the output can differ from ``decode()`` there.
* ``clean_up_tokenization_spaces`` from transformers' ``decode`` is not applied.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

__all__ = ["IncrementalDetokenizer"]

_REPLACEMENT_CHAR = "\ufffd"
_INVALID_PREFIX_MSG = "Invalid prefix encountered"
# Prompt-tail seed lengths to try (vLLM tries 4..23): long enough to hold a whole
# multi-byte character and the word before the first output token.
_MIN_PROMPT_SEED = 4
_MAX_SEED = 24


def _backend_tokenizer(tokenizer: Any) -> Tokenizer:
    """Return the Rust ``tokenizers.Tokenizer`` behind a HF fast tokenizer (or the Tokenizer itself)."""
    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if isinstance(backend, Tokenizer):
        return backend
    raise TypeError(
        f"IncrementalDetokenizer needs a fast tokenizer (with .backend_tokenizer) or a tokenizers.Tokenizer, "
        f"got {type(tokenizer).__name__}"
    )


def _is_invalid_prefix_error(exc: Exception) -> bool:
    """DecodeStream reports a broken prefix as a bare ``Exception``; only its message identifies it."""
    return str(exc).startswith(_INVALID_PREFIX_MSG)


class IncrementalDetokenizer:
    """Turns a growing list of output token ids into text, one step at a time.

    Per-step cost depends only on the number of new tokens and the stop strings'
    lengths, not on the output length. Usage per engine step::

        stop = detok.update(new_ids)          # stop string found, or None
        delta = detok.get_delta(finished)     # text to stream to the client

    ``output_text`` leaves out a trailing incomplete character (and skipped special
    tokens that have no text after them) until the detokenizer is finalized:
    ``finalize()`` is called by ``get_delta(finished=True)``. After that, with no
    stop string hit, ``output_text`` equals the decode of the output ids, as
    described in the module docstring.
    """

    def __init__(
        self,
        tokenizer: Any,
        prompt_token_ids: Sequence[int],
        *,
        skip_special_tokens: bool = True,
        stop: Sequence[str] = (),
        include_stop_str_in_output: bool = False,
    ) -> None:
        if isinstance(stop, str):
            raise TypeError("stop must be a sequence of strings, not a single string")
        self._backend = _backend_tokenizer(tokenizer)
        self.skip_special_tokens = skip_special_tokens
        # An empty stop string would match everywhere; OpenAI-style APIs treat it as no stop.
        self.stop: tuple[str, ...] = tuple(dict.fromkeys(s for s in stop if s))
        self.include_stop_str_in_output = include_stop_str_in_output
        self._max_stop_len = max((len(s) for s in self.stop), default=0)

        self._output_ids: list[int] = []
        # Mirror of DecodeStream's window, needed to flush held-back text at the end and
        # to re-seed after an invalid-prefix error: `_group` holds the ids that produced
        # the last emitted text (or the seed), `_pending` the ids stepped since then.
        self._group: list[int] = []
        self._pending: list[int] = []

        # Text: a list of chunks (appending costs O(1)) plus what get_delta has not returned yet.
        self._chunks: list[str] = []
        self._unsent: list[str] = []
        self._unsent_len = 0
        # Last (max_stop_len - 1) characters: all that stop matching and withholding look at.
        self._tail = ""

        self._stop_string: str | None = None
        self._finalized = False

        prompt_tail = [int(t) for t in prompt_token_ids[-_MAX_SEED:]]
        seed = self._choose_seed(prompt_tail, min_len=_MIN_PROMPT_SEED)
        self._stream = self._new_stream(seed)

    # ------------------------------------------------------------------ public API

    @property
    def output_text(self) -> str:
        """All text so far, cut at a stop string. O(length) the first time after text was added."""
        if len(self._chunks) > 1:
            self._chunks[:] = ["".join(self._chunks)]
        return self._chunks[0] if self._chunks else ""

    @property
    def output_token_ids(self) -> list[int]:
        """Every id update() consumed (none after the one that completed a stop string). Do not mutate."""
        return self._output_ids

    @property
    def stop_string(self) -> str | None:
        """The stop string that ended the output, or None if none was hit."""
        return self._stop_string

    @property
    def finished(self) -> bool:
        """True once a stop string was hit or finalize() ran: update() then raises."""
        return self._stop_string is not None or self._finalized

    def update(self, new_token_ids: Sequence[int]) -> str | None:
        """Append tokens; returns the stop string if one now appears in the output (the output text is
        then truncated just before it, or just after it when include_stop_str_in_output).

        If several stop strings appear in the new text, the one that ends first wins
        (ties go to the one that starts first). Streaming char by char would have
        found that same one, so the result does not depend on how tokens are grouped
        into update() calls. Tokens after the one that completed a stop string are not
        consumed (a step that produced several tokens ends at the stop, as one token at a
        time would have): `output_token_ids` ends with that token.
        """
        if self.finished:
            raise RuntimeError("update() called on a finished IncrementalDetokenizer")
        for token_id in new_token_ids:
            token_id = int(token_id)
            self._output_ids.append(token_id)
            piece = self._step(token_id)
            if piece:
                stop = self._append_text(piece)
                if stop is not None:
                    return stop
        return None

    def get_delta(self, finished: bool) -> str:
        """Text not yet returned by an earlier call. While not finished, withhold the trailing characters
        that could be the beginning of a stop string (at most len(longest stop) - 1), so a stream never
        emits text that a stop string later removes.

        ``finished=True`` finalizes the detokenizer first (see finalize()), so the last
        delta also holds a trailing incomplete character, as U+FFFD, just as decode() shows it.
        """
        if finished:
            self.finalize()
        withhold = 0 if self.finished else self._withheld_len()
        if self._unsent_len <= withhold:
            return ""
        unsent = "".join(self._unsent)
        cut = len(unsent) - withhold
        delta, rest = unsent[:cut], unsent[cut:]
        self._unsent = [rest] if rest else []
        self._unsent_len = len(rest)
        return delta

    def finalize(self) -> None:
        """Flush held-back text (trailing incomplete bytes decode to U+FFFD, as in decode()). Idempotent.

        Runs once per request and costs only the size of the held-back window. The
        flushed text is stop-checked too; it can still set ``stop_string``.
        """
        if self.finished:
            return
        if self._pending:
            flushed = self._decode_diff(self._group, self._pending)
            self._group, self._pending = self._group + self._pending, []
            if flushed:
                self._append_text(flushed)
        self._finalized = True

    # ------------------------------------------------------------------ decoding

    def _decode(self, ids: list[int]) -> str:
        return self._backend.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _decode_diff(self, context: list[int], new_ids: list[int]) -> str:
        """Text that ``new_ids`` add after ``context``, i.e. decode(context + new) minus decode(context)."""
        base = self._decode(context)
        full = self._decode(context + new_ids)
        if full.startswith(base):
            return full[len(base) :]
        # Non-prefix-stable decoder (see module docstring): keep the new ids' own text.
        return self._decode(new_ids)

    def _choose_seed(self, history: list[int], min_len: int, extension: list[int] | None = None) -> list[int]:
        """Pick the shortest usable suffix of ``history`` (at least ``min_len`` ids if possible) as context.

        Usable means that its text has no U+FFFD: the seed must not end inside a
        character (DecodeStream would otherwise emit the whole seed's text), and a
        seed that starts inside one is cut shorter or longer until it doesn't.
        With ``extension``, decode(seed + extension) must also start with decode(seed).
        """
        if not history:
            return []
        lengths = list(range(min(min_len, len(history)), len(history) + 1))
        lengths += list(range(min(min_len, len(history)) - 1, 0, -1))
        for n in lengths:
            seed = history[-n:]
            text = self._decode(seed)
            if _REPLACEMENT_CHAR in text:
                continue
            if extension is not None and not self._decode(seed + extension).startswith(text):
                continue
            return seed
        return []

    def _new_stream(self, seed: list[int]) -> DecodeStream:
        """Create a DecodeStream whose prefix is ``seed`` and point the mirrored window at it."""
        self._group, self._pending = list(seed), []
        try:
            return DecodeStream(ids=list(seed), skip_special_tokens=self.skip_special_tokens)
        except TypeError:
            # tokenizers < 0.22 has no prefill: prime the stream by stepping the seed and
            # drop its text (vLLM does the same).
            stream = DecodeStream(skip_special_tokens=self.skip_special_tokens)
            self._group = []
            for token_id in seed:
                self._raw_step(stream, token_id)
            return stream

    def _raw_step(self, stream: DecodeStream, token_id: int) -> str | None:
        """Step ``stream`` and keep the mirrored window (``_group``/``_pending``) in sync."""
        piece = stream.step(self._backend, token_id)
        if piece is None:
            self._pending.append(token_id)
        else:
            self._group = self._pending + [token_id]
            self._pending = []
        return piece

    def _step(self, token_id: int) -> str | None:
        """One DecodeStream step, recovering from its invalid-prefix error by re-seeding."""
        try:
            return self._raw_step(self._stream, token_id)
        except Exception as exc:
            if not _is_invalid_prefix_error(exc):
                raise
        # The window's decode no longer extends the text emitted so far (e.g. a
        # ByteFallback run turned invalid). Text already emitted stays. Restart from a
        # context that is consistent with the held-back ids and replay them.
        replay = self._pending + [token_id]
        seed = self._choose_seed(self._group[-_MAX_SEED:], min_len=1, extension=replay)
        self._stream = self._new_stream(seed)
        pieces: list[str] = []
        for tid in replay:
            try:
                piece = self._raw_step(self._stream, tid)
            except Exception as exc:  # still inconsistent: give up on context for this token
                if not _is_invalid_prefix_error(exc):
                    raise
                self._stream = self._new_stream([])
                piece = self._raw_step(self._stream, tid)
            if piece:
                pieces.append(piece)
        return "".join(pieces) or None

    # ------------------------------------------------------------------ text + stop strings

    def _append_text(self, new_text: str) -> str | None:
        """Add decoded text, then look for a stop string in it. Returns the stop string if found."""
        tail_before = self._tail
        self._chunks.append(new_text)
        self._unsent.append(new_text)
        self._unsent_len += len(new_text)
        if not self.stop:
            return None
        window = tail_before + new_text
        self._tail = window[-(self._max_stop_len - 1) :] if self._max_stop_len > 1 else ""

        best: tuple[int, int, str] | None = None  # (end, start, stop) in window coordinates
        for s in self.stop:
            # Only matches that end inside new_text are new; they start at most len(s)-1 chars earlier.
            lo = max(0, len(tail_before) - (len(s) - 1))
            start = window.find(s, lo)
            if start < 0:
                continue
            key = (start + len(s), start, s)
            if best is None or key[:2] < best[:2]:
                best = key
        if best is None:
            return None
        end, start, stop_str = best
        keep = end if self.include_stop_str_in_output else start
        self._truncate(len(window) - keep)
        self._stop_string = stop_str
        return stop_str

    def _truncate(self, n_chars: int) -> None:
        """Drop the last ``n_chars`` characters of the output (they always lie in the unsent text)."""
        if n_chars <= 0:
            return
        assert n_chars <= self._unsent_len, "withholding let text that a stop string removes escape"
        _drop_suffix(self._chunks, n_chars)
        _drop_suffix(self._unsent, n_chars)
        self._unsent_len -= n_chars

    def _withheld_len(self) -> int:
        """Length of the longest end of the text that is a proper prefix of some stop string."""
        if self.include_stop_str_in_output or not self.stop:
            # A match is cut after its end, so no text before it is ever removed.
            return 0
        tail = self._tail
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(tail)), best, -1):
                if tail.endswith(s[:k]):
                    best = k
                    break
        return best


def _drop_suffix(chunks: list[str], n_chars: int) -> None:
    """Remove the last ``n_chars`` characters from a list of string chunks, in place."""
    while n_chars > 0:
        last = chunks[-1]
        if len(last) <= n_chars:
            chunks.pop()
            n_chars -= len(last)
        else:
            chunks[-1] = last[: len(last) - n_chars]
            n_chars = 0
