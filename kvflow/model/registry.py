"""Architecture name (config.json `architectures`) -> model class."""

from __future__ import annotations

import torch.nn as nn

from kvflow.config import LONGCONV_ARCHITECTURE, SUPPORTED_ARCHITECTURES, ModelConfig
from kvflow.model.llama import LlamaForCausalLM
from kvflow.model.longconv.model import LongConvForCausalLM

# The attention models share one implementation; their differences are switches in ModelConfig.
MODEL_CLASSES: dict[str, type[nn.Module]] = {arch: LlamaForCausalLM for arch in SUPPORTED_ARCHITECTURES}
MODEL_CLASSES[LONGCONV_ARCHITECTURE] = LongConvForCausalLM


def model_class(cfg: ModelConfig) -> type[nn.Module]:
    try:
        return MODEL_CLASSES[cfg.architecture]
    except KeyError:
        raise ValueError(
            f"unsupported architecture {cfg.architecture!r}; supported: {', '.join(MODEL_CLASSES)}"
        ) from None
