"""kvflow: an LLM inference and serving engine (paged KV cache, continuous batching, prefix caching)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kvflow.version import __version__

__all__ = ["LLM", "SamplingParams", "EngineConfig", "RequestOutput", "CompletionOutput", "LoRARequest", "__version__"]

if TYPE_CHECKING:
    from kvflow.config import EngineConfig
    from kvflow.llm import LLM
    from kvflow.lora_request import LoRARequest
    from kvflow.outputs import CompletionOutput, RequestOutput
    from kvflow.sampling_params import SamplingParams

_LAZY = {
    "LLM": "kvflow.llm",
    "SamplingParams": "kvflow.sampling_params",
    "EngineConfig": "kvflow.config",
    "RequestOutput": "kvflow.outputs",
    "CompletionOutput": "kvflow.outputs",
    "LoRARequest": "kvflow.lora_request",
}


def __getattr__(name: str) -> Any:
    """Import lazily so `kvflow --help` does not pay for torch and transformers."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kvflow' has no attribute {name!r}")
