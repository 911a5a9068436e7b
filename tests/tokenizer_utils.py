"""Test helper: a tiny byte-level BPE tokenizer trained on the fly.

Tests must not download anything, yet they need a real Hugging Face fast tokenizer
whose behaviour matches production ones (byte-level BPE like GPT-2/Llama-3/Qwen,
multi-byte UTF-8 characters split over several tokens, special tokens, a chat
template). Training one on a small built-in multilingual text takes a few
milliseconds; the resulting JSON is cached per vocabulary size so repeated calls
only pay for ``save_pretrained``.
"""

from __future__ import annotations

from pathlib import Path

import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|eos|>"
PAD_TOKEN = "<|pad|>"
IM_START_TOKEN = "<|im_start|>"
IM_END_TOKEN = "<|im_end|>"
# Ids 0..4 in this order: pad=0, bos=1, eos=2 match the usual Llama-style model configs
# (tests/model_utils.py builds tiny models with exactly these ids).
SPECIAL_TOKENS: list[str] = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, IM_START_TOKEN, IM_END_TOKEN]

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Deliberately mixed: ASCII prose and code (so common merges exist), accented Latin
# (2-byte UTF-8), CJK (3-byte) and emoji (4-byte). With a 512-entry vocabulary most
# non-ASCII characters stay split across several byte-level tokens.
TRAINING_TEXT: list[str] = [
    "The quick brown fox jumps over the lazy dog. The dog sleeps in the sun.",
    "Once upon a time, there was a small engine that served many requests at once.",
    "It kept its memory in pages, and it shared the pages between similar prompts.",
    "Hello world! How are you today? I am fine, thank you, and you?",
    "def add(a: int, b: int) -> int:\n    return a + b\n",
    "for i in range(10):\n    print(i * i)\n",
    "class Cache:\n    def __init__(self):\n        self.blocks = {}\n",
    "import torch\nx = torch.zeros(4, 8)\ny = x.sum(dim=-1)\n",
    "Le café est très bon à Paris. Où est la bibliothèque? Ça va très bien, merci.",
    "Über den Wolken muss die Freiheit wohl grenzenlos sein. Straße, Mädchen, schön.",
    "El niño comió piña en la mañana. ¿Dónde está el baño? ¡Qué día más bonito!",
    "Ångström, Øresund, ætt, œuvre, naïve façade, coöperate, jalapeño, São Paulo.",
    "你好，世界！今天天气很好。我们一起去公园散步吧。",
    "机器学习模型需要大量的数据和计算资源。缓存可以提高推理速度。",
    "こんにちは、世界。東京は大きな都市です。ありがとうございます。",
    "안녕하세요, 세계! 오늘 날씨가 좋네요.",
    "Привет, мир! Как дела? Всё хорошо, спасибо.",
    "Γειά σου κόσμε! Αυτό είναι ένα τεστ.",
    "Emoji time: 😀 😃 🚀 🎉 👍 🔥 ❤️ 🌍 🤖 ✨ 👨‍👩‍👧 🇫🇷",
    "Mixed: naïve 😀 café 你好 🚀 Straße 世界 🎉 end.",
    "Numbers 0123456789, symbols ~!@#$%^&*()_+-=[]{}|;':\",./<>?",
]


_TOKENIZER_JSON_CACHE: dict[int, str] = {}


def _train_tokenizer_json(vocab_size: int) -> str:
    """Train the byte-level BPE once per vocab size and return its JSON serialization."""
    cached = _TOKENIZER_JSON_CACHE.get(vocab_size)
    if cached is not None:
        return cached
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        # All 256 byte symbols, so that any text (any language, any emoji) is encodable.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # min_frequency=2: characters seen once stay split into their UTF-8 bytes.
    tokenizer.train_from_iterator(TRAINING_TEXT, trainer=trainer)
    serialized = tokenizer.to_str()
    _TOKENIZER_JSON_CACHE[vocab_size] = serialized
    return serialized


def make_tokenizer(save_dir: Path, vocab_size: int = 512) -> transformers.PreTrainedTokenizerFast:
    """Build (cheaply, cached) a byte-level BPE tokenizer and save it to ``save_dir``.

    ``transformers.AutoTokenizer.from_pretrained(save_dir)`` loads the saved copy, so
    tests can build tiny model checkpoints that sit next to a real tokenizer.
    Its vocabulary size is at most ``vocab_size``.
    """
    min_size = len(SPECIAL_TOKENS) + 256
    if vocab_size < min_size:
        raise ValueError(f"vocab_size must be >= {min_size} (256 bytes + special tokens), got {vocab_size}")
    backend = Tokenizer.from_str(_train_tokenizer_json(vocab_size))
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=[IM_START_TOKEN, IM_END_TOKEN],
        clean_up_tokenization_spaces=False,
        model_max_length=4096,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(save_dir)
    assert len(tokenizer) <= vocab_size, (len(tokenizer), vocab_size)
    return tokenizer
