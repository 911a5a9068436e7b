"""Byte-level BPE tokenizer trained on text every CPython installation carries.

No tokenizer can be downloaded here, so kvflow trains its own from CPython's bundled
documentation (`pydoc_data.topics`) and, for more variety, a slice of the standard library's
source. Training takes a few seconds; the result is a transformers-loadable directory with a
chat template.
"""

from __future__ import annotations

import sysconfig
from collections.abc import Iterator
from pathlib import Path

SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def cpython_corpus(max_source_files: int = 1500) -> Iterator[str]:
    """pydoc topics plus the first `max_source_files` stdlib modules (no site-packages), in a stable order."""
    from pydoc_data.topics import topics

    for key in sorted(topics):
        yield topics[key]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    sources = sorted(p for p in stdlib.rglob("*.py") if "site-packages" not in p.relative_to(stdlib).parts)
    for path in sources[:max_source_files]:
        try:
            yield path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue


def train_tokenizer(out_dir: Path, vocab_size: int = 8192, texts: Iterator[str] | None = None,
                    model_max_length: int = 2048):
    """Train, save to `out_dir` (tokenizer.json + config with chat template), return the HF tokenizer.

    Digits are split one per token, so a number of any length is copyable digit by digit (what
    passkey and key-value retrieval need), and encoding a text prepends `<|bos|>`, which the
    model uses as its attention sink; the chat template starts with it too.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts if texts is not None else cpython_corpus(), trainer=trainer)
    bos_id = tokenizer.token_to_id("<|bos|>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<|bos|> $A", pair="<|bos|> $A $B", special_tokens=[("<|bos|>", bos_id)],
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<|pad|>",
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out_dir)
    return fast
