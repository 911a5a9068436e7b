"""The models that ship inside the package, so kvflow runs with nothing downloaded.

`tiny` is a ~4M-parameter Llama trained by `kvflow train --preset tiny` on CPython's own docs and
standard library (see docs/models.md); `tiny-draft` is its distilled draft model, and
`tiny-retrieval` the retrieval head SpeContext selects `tiny`'s context with (distilled from its
attention by `kvflow train --preset tiny-retrieval`). `tiny-lora-code` and `tiny-lora-prose` are LoRA
adapters of `tiny` in PEFT's format (`kvflow train --finetune`, on the standard library's code and on the
pydoc topics), for multi-LoRA serving (docs/lora.md).
"""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).resolve().parent
DEFAULT_MODEL = "tiny"
DEFAULT_DRAFT = "tiny-draft"
DEFAULT_RETRIEVAL = "tiny-retrieval"
#: The shipped LoRA adapters of `tiny`, name -> directory under assets/.
SHIPPED_ADAPTERS = {"code": "tiny-lora-code", "prose": "tiny-lora-prose"}


def shipped_model_path(name: str) -> Path:
    path = ASSETS / name
    if not (path / "config.json").exists():
        raise FileNotFoundError(
            f"the shipped model {name!r} is missing from {ASSETS} (a broken install?); "
            f"pass --model DIR, or rebuild it with `kvflow train --preset tiny`")
    return path


def default_model_path() -> Path:
    """The model `kvflow generate`, `chat`, `serve` and `eval` use when no --model is given."""
    return shipped_model_path(DEFAULT_MODEL)


def default_draft_path() -> Path:
    return shipped_model_path(DEFAULT_DRAFT)


def default_retrieval_path() -> Path:
    """The retrieval head `--kv-policy specontext` uses for the shipped model."""
    return shipped_model_path(DEFAULT_RETRIEVAL)


def shipped_adapter_paths() -> dict[str, Path]:
    """The shipped LoRA adapters of `tiny` (name -> directory), as `--lora-modules` takes them."""
    return {name: ASSETS / folder for name, folder in SHIPPED_ADAPTERS.items()}
