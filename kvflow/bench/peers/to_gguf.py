"""Convert a model directory to GGUF for llama.cpp, with llama.cpp's own converter.

llama.cpp reads only GGUF. The converter (``convert_hf_to_gguf.py``) ships in llama-cpp-python's
source distribution, not its wheel, and needs gguf, sentencepiece, torch and transformers, so it
runs with the llama.cpp peer's interpreter. Converted files are cached next to the model
directory and remade when the model is newer.
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys
from pathlib import Path

from kvflow.bench.throughput import BackendUnavailable

#: GGUF ``--outtype`` of each benchmark dtype (weights keep the dtype the other backends run).
OUTTYPES = {"bfloat16": "bf16", "float16": "f16", "float32": "f32"}
CONVERTER_ENV = "KVFLOW_GGUF_CONVERTER"
#: Where ../shared/peers/setup.sh unpacks the sdist; newest version first.
SEARCH_GLOBS = ("/tmp/lcpp/*/vendor/llama.cpp/convert_hf_to_gguf.py",)
CONVERTER_HINT = (
    "convert_hf_to_gguf.py comes with llama-cpp-python's source distribution:\n"
    "  mkdir -p /tmp/lcpp && cd /tmp/lcpp && pip download -q --no-deps --no-binary :all: "
    "llama-cpp-python==0.3.36 -d . && tar xzf llama_cpp_python-0.3.36.tar.gz\n"
    f"kvflow looks for it under /tmp/lcpp/*/vendor/llama.cpp/; or pass --convert-script PATH "
    f"(throughput: --backend-arg llamacpp:convert_script=PATH) or set {CONVERTER_ENV}."
)
#: Files whose change makes a cached GGUF stale.
_SOURCES = ("config.json", "model.safetensors", "tokenizer.model", "tokenizer.json")


def find_convert_script(explicit: str | Path | None = None) -> Path:
    """The converter: ``explicit``, else $KVFLOW_GGUF_CONVERTER, else the newest under /tmp/lcpp."""
    given = explicit or os.environ.get(CONVERTER_ENV)
    if given:
        path = Path(given)
        if not path.is_file():
            raise BackendUnavailable(f"GGUF converter {path} does not exist.\n{CONVERTER_HINT}")
        return path
    found = sorted((p for pattern in SEARCH_GLOBS for p in glob.glob(pattern)), reverse=True)
    if not found:
        raise BackendUnavailable(f"llama.cpp's GGUF converter was not found.\n{CONVERTER_HINT}")
    return Path(found[0])


def gguf_cache_path(model_dir: Path | str, dtype: str = "bfloat16") -> Path:
    """``models/135m`` -> ``models/135m.bf16.gguf``: beside the directory, not in it, where loaders look."""
    model_dir = Path(model_dir).resolve()
    return model_dir.with_name(f"{model_dir.name}.{_outtype(dtype)}.gguf")


def _outtype(dtype: str) -> str:
    try:
        return OUTTYPES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(OUTTYPES)}") from None


def convert_to_gguf(
    model_dir: Path | str, out: Path | str, dtype: str = "bfloat16", python: str | None = None,
    convert_script: str | Path | None = None, timeout_s: float = 1800,
) -> Path:  # fmt: skip
    """Run the converter on ``model_dir`` with ``python`` (default this interpreter) into ``out``.

    Writes to a temporary name and renames, so an interrupted run never leaves a file that looks
    converted. Raises BackendUnavailable (with the converter's output) when it fails.
    """
    model_dir, out = Path(model_dir), Path(out)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} has no config.json; make one with `kvflow bench make-model`")
    script = find_convert_script(convert_script)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    cmd = [python or sys.executable, str(script), str(model_dir), "--outfile", str(partial),
           "--outtype", _outtype(dtype)]  # fmt: skip
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired) as e:
        partial.unlink(missing_ok=True)
        raise BackendUnavailable(f"GGUF conversion could not run ({' '.join(cmd)}): {e}") from e
    if proc.returncode != 0 or not partial.is_file():
        partial.unlink(missing_ok=True)
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
        hint = ""
        if "No module named" in tail:
            hint += "\nthe converter's interpreter needs gguf, sentencepiece, torch and transformers."
        if not (model_dir / "tokenizer.model").is_file():
            hint += ("\nthe model has no SentencePiece tokenizer.model, which the converter accepts for a "
                     "custom vocabulary: remake it with `kvflow bench make-model --tokenizer sentencepiece`.")
        raise BackendUnavailable(f"GGUF conversion failed ({' '.join(cmd)}):\n{tail}{hint}")
    partial.replace(out)
    return out


def ensure_gguf(
    model_dir: Path | str, dtype: str = "bfloat16", python: str | None = None,
    convert_script: str | Path | None = None,
) -> Path:  # fmt: skip
    """The cached GGUF of ``model_dir`` in ``dtype``, converted first when missing or stale."""
    out = gguf_cache_path(model_dir, dtype)
    sources = [Path(model_dir, name) for name in _SOURCES if Path(model_dir, name).is_file()]
    if out.is_file() and all(s.stat().st_mtime <= out.stat().st_mtime for s in sources):
        return out
    print(f"converting {model_dir} to {out} ...", flush=True)
    return convert_to_gguf(model_dir, out, dtype, python, convert_script)
