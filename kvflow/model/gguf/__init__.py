"""GGUF files (llama.cpp's format): read a llama-architecture file's weights and tokenizer, write one.

The config side (metadata -> `ModelConfig`) lives in `kvflow/gguf_config.py`, below `kvflow.config`.
"""

from kvflow.model.gguf.reader import iter_gguf_weights
from kvflow.model.gguf.tokenizer import tokenizer_from_gguf, tokenizer_metadata
from kvflow.model.gguf.writer import write_gguf

__all__ = ["iter_gguf_weights", "tokenizer_from_gguf", "tokenizer_metadata", "write_gguf"]
