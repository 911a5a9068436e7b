"""Tokenizers <-> GGUF tokenizer metadata (`tokenizer.ggml.*`), both ways, as llama.cpp reads it.

A byte-level BPE tokenizer (GPT-2's byte alphabet; kvflow's own trained tokenizers are these) is
written as `tokenizer.ggml.model = "gpt2"`: the vocabulary in id order, the merges, a type per
token, and `tokenizer.ggml.pre`, the name under which llama.cpp keeps the regular expressions that
split text before BPE. A Hugging Face tokenizer states those expressions in its pre-tokenizer; the
table below names the combinations llama.cpp knows. A SentencePiece model (`tokenizer.model`) is
written as `tokenizer.ggml.model = "llama"` with its scores, through gguf's SentencePiece reader.

Reading builds the same byte-level tokenizer back from the metadata (the split expressions, the BPE,
the special tokens, BOS/EOS insertion, the chat template). Other tokenizers in GGUF files
(SentencePiece, pre-tokenizers missing from the table) go through transformers' GGUF converter.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvflow.gguf_config import read_gguf

logger = logging.getLogger(__name__)

# llama.cpp's token types (tokenizer.ggml.token_type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# tokenizer.ggml.pre -> the splits llama.cpp applies in turn (llama-vocab.cpp), in Hugging Face's
# spelling. The first name of each group is the one written.
PRE_TOKENIZERS: dict[tuple[str, ...], tuple[str, ...]] = {
    ("gpt-2", "mpt", "olmo", "jais"): (GPT2_SPLIT,),
    ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"): (r"\p{N}", GPT2_SPLIT),
    ("llama-bpe", "llama3", "llama-v3", "dbrx", "smaug-bpe", "falcon3", "pixtral"): (LLAMA3_SPLIT,),
    ("qwen2", "deepseek-r1-qwen", "stablelm2", "megrez"): (QWEN2_SPLIT,),
}
_SPLITS_BY_NAME = {name: splits for names, splits in PRE_TOKENIZERS.items() for name in names}
_NAME_BY_SPLITS = {splits: names[0] for names, splits in PRE_TOKENIZERS.items()}
# Llama 3's BPE looks a whole pre-token up in the vocabulary before merging (llama.cpp does too).
_IGNORE_MERGES = set(next(names for names in PRE_TOKENIZERS if "llama-bpe" in names))


@dataclass
class TokenizerMetadata:
    """What a GGUF file says about its tokenizer (the `tokenizer.*` keys, by their gguf names)."""

    model: str  # "gpt2" (byte-level BPE) or "llama" (SentencePiece)
    pre: str | None
    tokens: list[str]
    token_types: list[int]
    merges: list[str] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    special_ids: dict[str, int] = field(default_factory=dict)  # bos, eos, eot, unk, pad
    add_special: dict[str, bool] = field(default_factory=dict)  # bos, eos
    chat_template: str | None = None

    def add_to(self, writer: Any) -> None:
        writer.add_tokenizer_model(self.model)
        if self.pre is not None:
            writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.token_types)
        if self.scores:
            writer.add_token_scores(self.scores)
        if self.merges:
            writer.add_token_merges(self.merges)
        for kind, token_id in self.special_ids.items():
            getattr(writer, f"add_{kind}_token_id")(token_id)
        for kind, value in self.add_special.items():
            getattr(writer, f"add_add_{kind}_token")(value)
        if self.chat_template is not None:
            writer.add_chat_template(self.chat_template)


# ------------------------------------------------------------------ writing
def tokenizer_metadata(tokenizer: str | os.PathLike | Any, vocab_size: int,
                       eos_token_ids: tuple[int, ...] = ()) -> TokenizerMetadata:
    """The GGUF tokenizer metadata of a tokenizer directory or a transformers tokenizer object,
    padded to the model's `vocab_size` rows. `eos_token_ids` beyond the tokenizer's EOS (a chat
    model's end-of-turn) become the end-of-turn id."""
    if not isinstance(tokenizer, (str, os.PathLike)):
        with tempfile.TemporaryDirectory() as tmp:
            tokenizer.save_pretrained(tmp)
            return tokenizer_metadata(tmp, vocab_size, eos_token_ids)
    root = Path(tokenizer)
    from gguf.vocab import SpecialVocab

    if (root / "tokenizer.json").is_file() and _is_byte_level(json.loads((root / "tokenizer.json").read_text())):
        meta = _byte_level_metadata(root)
        special = SpecialVocab(root, load_merges=True, n_vocab=vocab_size)
        meta.merges = special.merges
    elif (root / "tokenizer.model").is_file():
        meta = _sentencepiece_metadata(root)
        special = SpecialVocab(root, load_merges=False, n_vocab=vocab_size)
    else:
        raise ValueError(f"{root}: kvflow writes byte-level BPE (tokenizer.json) and SentencePiece "
                         "(tokenizer.model) tokenizers to GGUF; this directory has neither")
    if len(meta.tokens) > vocab_size:
        raise ValueError(f"{root}: the tokenizer has {len(meta.tokens)} tokens, more than the model's {vocab_size}")
    for i in range(len(meta.tokens), vocab_size):  # rows the model has and the tokenizer never emits
        meta.tokens.append(f"[PAD{i}]")
        meta.token_types.append(UNUSED)
        if meta.scores:
            meta.scores.append(-1000.0)
    meta.special_ids = dict(special.special_token_ids)
    extra_eos = sorted(set(eos_token_ids) - {meta.special_ids.get("eos")})
    if extra_eos:
        meta.special_ids["eot"] = extra_eos[0]
    meta.add_special = _adds_special_tokens(root, meta.special_ids)
    template = special.chat_template
    meta.chat_template = template if isinstance(template, str) else None
    return meta


def _adds_special_tokens(root: Path, special_ids: dict[str, int]) -> dict[str, bool]:
    """Whether encoding a text adds BOS / EOS, as the tokenizer itself does it (configs disagree on
    where to say so, and llama.cpp assumes BOS for SentencePiece when the file is silent)."""
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(str(root)).encode("a")
    return {kind: bool(ids) and kind in special_ids and ids[0 if kind == "bos" else -1] == special_ids[kind]
            for kind in ("bos", "eos")}


def _is_byte_level(tokenizer_json: dict[str, Any]) -> bool:
    return (tokenizer_json.get("model", {}).get("type") == "BPE"
            and (tokenizer_json.get("decoder") or {}).get("type") == "ByteLevel")


def _pre_tokenizer_splits(pre: dict[str, Any] | None, where: Path) -> tuple[str, ...]:
    """The regular expressions a Hugging Face byte-level pre-tokenizer splits by, in order."""
    steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else [pre] if pre else []
    splits: list[str] = []
    for step in steps:
        kind = step.get("type")
        if kind == "ByteLevel" and not step.get("add_prefix_space", False):
            if step.get("use_regex", True):
                splits.append(GPT2_SPLIT)
        elif kind == "Digits":
            splits.append(r"\p{N}" if step.get("individual_digits") else r"\p{N}+")
        elif kind == "Split" and step.get("behavior") == "Isolated" and "Regex" in step.get("pattern", {}):
            splits.append(step["pattern"]["Regex"])
        else:
            raise ValueError(f"{where}: pre-tokenizer step {json.dumps(step)} has no llama.cpp equivalent")
    return tuple(splits)


def _byte_level_metadata(root: Path) -> TokenizerMetadata:
    tj = json.loads((root / "tokenizer.json").read_text())
    splits = _pre_tokenizer_splits(tj.get("pre_tokenizer"), root)
    pre = _NAME_BY_SPLITS.get(splits)
    if pre is None:
        raise ValueError(f"{root}: llama.cpp knows no pre-tokenizer that splits by {list(splits)}; "
                         f"known: {', '.join(_NAME_BY_SPLITS.values())}")
    vocab: dict[str, int] = dict(tj["model"]["vocab"])
    added = {t["id"]: t for t in tj.get("added_tokens", [])}
    vocab.update({t["content"]: i for i, t in added.items()})
    by_id = {i: t for t, i in vocab.items()}
    if sorted(by_id) != list(range(len(by_id))):
        raise ValueError(f"{root}: token ids are not contiguous from 0")
    tokens = [by_id[i] for i in range(len(by_id))]
    types = [NORMAL if i not in added else CONTROL if added[i].get("special") else USER_DEFINED
             for i in range(len(tokens))]
    return TokenizerMetadata(model="gpt2", pre=pre, tokens=tokens, token_types=types)


def _sentencepiece_metadata(root: Path) -> TokenizerMetadata:
    try:
        from gguf.vocab import SentencePieceVocab

        vocab = SentencePieceVocab(root)
    except ImportError as exc:
        raise ImportError(f"{root}: writing a SentencePiece tokenizer to GGUF needs sentencepiece "
                          "(pip install 'kvflow[bench]')") from exc
    tokens, scores, types = [], [], []
    for text, score, kind in vocab.all_tokens():
        tokens.append(text.decode("utf-8"))
        scores.append(float(score))
        types.append(int(kind))
    return TokenizerMetadata(model="llama", pre="default", tokens=tokens, token_types=types, scores=scores)


# ------------------------------------------------------------------ reading
_TOKENIZER_ARRAYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges")


def tokenizer_from_gguf(path: str | os.PathLike) -> Any | None:
    """The transformers tokenizer a GGUF file's metadata describes; None when it holds none."""
    meta = read_gguf(path).metadata
    model, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre")
    if model is None or "tokenizer.ggml.tokens" not in meta:
        return None
    if model == "gpt2" and pre in _SPLITS_BY_NAME:
        return _byte_level_tokenizer(meta, pre)
    logger.info("%s: tokenizer %s (pre-tokenizer %s) built by transformers' GGUF converter", path, model, pre)
    from transformers import PreTrainedTokenizerFast

    # The class AutoTokenizer picks for a llama-architecture file, named here: AutoTokenizer first builds the
    # model's config with gguf's reader, which makes numpy views of every token and merge (~3.5 s of a 3.9 s
    # tokenizer on a 49k vocabulary, ~8 s on 152k).
    file = Path(path)
    return PreTrainedTokenizerFast.from_pretrained(str(file.parent), gguf_file=file.name)


def _byte_level_tokenizer(meta: dict[str, Any], pre: str) -> Any:
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    types: list[int] = meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    vocab = {t: i for i, t in enumerate(tokens)}
    bpe = models.BPE(vocab=vocab, merges=merges, ignore_merges=pre in _IGNORE_MERGES, byte_fallback=False)
    backend = Tokenizer(bpe)
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(s), behavior="isolated") for s in _SPLITS_BY_NAME[pre]]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, k in zip(tokens, types) if k == CONTROL])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types)
                        if k == USER_DEFINED])

    def token(kind: str) -> str | None:
        token_id = meta.get(f"tokenizer.ggml.{kind}_token_id")
        return tokens[token_id] if token_id is not None and 0 <= token_id < len(tokens) else None

    bos, eos = token("bos"), token("eos")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False)) and bos is not None
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and eos is not None
    if add_bos or add_eos:
        head, tail = (f"{bos} " if add_bos else ""), (f" {eos}" if add_eos else "")
        backend.post_processor = processors.TemplateProcessing(
            single=f"{head}$A{tail}", pair=f"{head}$A $B{tail}",
            special_tokens=[(t, vocab[t]) for t, on in ((bos, add_bos), (eos, add_eos)) if on])
    context = next((v for k, v in meta.items() if k.endswith(".context_length")), None)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=bos, eos_token=eos, unk_token=token("unknown"),
        pad_token=token("padding"), chat_template=meta.get("tokenizer.chat_template"),
        clean_up_tokenization_spaces=False, **({"model_max_length": int(context)} if context else {}),
    )
