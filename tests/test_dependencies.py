"""What kvflow imports is what pyproject.toml declares, and each command imports only what it needs.

A runtime install is `pip install kvflow` without extras: every module imported at the top of a
file in kvflow/ must come from a runtime dependency, and an extra's module may be imported only
inside the function that needs it (or inside a subpackage that is itself imported that way).
"""

from __future__ import annotations

import ast
import functools
import json
import re
import subprocess
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

import httpx
import pytest

from tests.server.server_utils import ServerProcess

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "kvflow"
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

# Subpackages that are one optional feature each: their own files import the extra at the top; the
# rest of kvflow imports them only lazily, where the feature is chosen (with a message naming the extra).
OPTIONAL_SUBPACKAGES = {"kvflow.attention.triton": "gpu", "kvflow.model.quant.triton": "gpu",
                        "kvflow.model.triton": "gpu", "kvflow.model.longconv.triton": "gpu"}
# Peers benchmarked in their own virtualenvs (kvflow bench throughput --python ...): never kvflow's dependencies.
PEER_MODULES = {"vllm", "llama_cpp"}
# What only the tools (bench, profile, simulate, plan, eval, train) and the tests use: `kvflow serve` must not
# import it. (Not sentencepiece: transformers imports it to load tokenizers whenever it is installed.)
NOT_FOR_SERVING = ("kvflow.bench", "kvflow.sim", "kvflow.eval", "kvflow.train", "aiohttp", "httpx", "scipy",
                   "matplotlib", "pytest", "hypothesis", "schemathesis", "openai", "ray")


def tool_modules(modules: set[str]) -> set[str]:
    """The modules of `modules` that serving must not need (NOT_FOR_SERVING or inside one of them)."""
    return {m for m in modules if any(m == t or m.startswith(t + ".") for t in NOT_FOR_SERVING)}


def _name(requirement: str) -> str:
    return re.sub(r"[-_.]+", "-", re.split(r"[ <>=!~;\[]", requirement, maxsplit=1)[0]).lower()


RUNTIME = {_name(r) for r in PROJECT["dependencies"]}
EXTRAS = {extra: {_name(r) for r in reqs} for extra, reqs in PROJECT["optional-dependencies"].items()}


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(top-level module, imported at module level) for each absolute third-party import in a file."""
    tree = ast.parse(path.read_text())
    module_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found += [(name, id(node) in module_level) for name in names]
    return found


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def _files() -> list[tuple[str, Path]]:
    return [(_module_name(path), path) for path in sorted(PACKAGE.rglob("*.py"))]


@functools.cache
def _distributions(top: str) -> frozenset[str]:
    """The installed distributions that provide the top-level module `top`."""
    return frozenset(_name(d) for d in packages_distributions().get(top, []))


def _optional_home(module: str) -> str | None:
    return next((pkg for pkg in OPTIONAL_SUBPACKAGES if module == pkg or module.startswith(pkg + ".")), None)


def test_module_level_imports_are_runtime_dependencies():
    wrong = []
    for module, path in _files():
        home = _optional_home(module)
        allowed = RUNTIME | (EXTRAS[OPTIONAL_SUBPACKAGES[home]] if home else set())
        for name, at_top in _imports(path):
            top = name.split(".")[0]
            if not at_top or top in sys.stdlib_module_names or top in ("kvflow", "__future__"):
                continue
            if not _distributions(top) & allowed:
                source = ", ".join(sorted(_distributions(top))) or "no installed distribution"
                wrong.append(f"{module} imports {name} at module level (from {source})")
    assert not wrong, "declare these runtime dependencies, or import them where they are used:\n" + "\n".join(wrong)


def test_lazy_imports_are_declared_somewhere():
    declared = RUNTIME.union(*EXTRAS.values())
    wrong = []
    for module, path in _files():
        for name, _ in _imports(path):
            top = name.split(".")[0]
            if top in sys.stdlib_module_names or top in ("kvflow", "__future__") or top in PEER_MODULES:
                continue
            if not _distributions(top) & declared:
                wrong.append(f"{module} imports {name}, which no runtime dependency or extra provides")
    assert not wrong, "\n".join(wrong)


def test_optional_subpackages_are_imported_lazily():
    wrong = []
    for module, path in _files():
        for name, at_top in _imports(path):
            home = _optional_home(name)
            own = _optional_home(module)  # a subpackage of the same extra may import it at the top
            if at_top and home and OPTIONAL_SUBPACKAGES.get(own or "") != OPTIONAL_SUBPACKAGES[home]:
                wrong.append(f"{module} imports {name} at module level; it needs kvflow[{OPTIONAL_SUBPACKAGES[home]}]")
    assert not wrong, "\n".join(wrong)


def test_extras_name_only_what_they_add():
    for extra, names in EXTRAS.items():
        assert not names & RUNTIME, f"extra {extra!r} repeats runtime dependencies {names & RUNTIME}"


def _modules_after(argv: list[str]) -> set[str]:
    """Modules loaded by `kvflow ARGV` (a --help, so it exits after building its parser)."""
    code = ("import json, sys\nfrom kvflow.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n"
            "    pass\nprint(json.dumps(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, check=True, cwd=ROOT)
    return set(json.loads(out.stdout.splitlines()[-1]))


def _third_party(modules: set[str]) -> set[str]:
    tops = {m.split(".")[0] for m in modules}
    return {t for t in tops if t not in sys.stdlib_module_names and not t.startswith("_") and t != "kvflow"}


def test_kvflow_help_imports_no_third_party_module():
    modules = _modules_after(["--help"])
    assert not _third_party(modules)
    assert {m for m in modules if m.startswith("kvflow.")} <= {"kvflow.cli", "kvflow.version"}


@pytest.mark.parametrize("command", ["serve", "generate", "chat"])
def test_engine_commands_do_not_import_the_tools(command: str):
    modules = _modules_after([command, "--help"])
    assert "kvflow.config" in modules  # the engine flags were built
    assert not tool_modules(modules)


def test_a_serving_server_loads_no_tool_code(llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The API process of `kvflow serve`, after serving completions and chat, streamed and not."""
    modules_log = tmp_path / "modules.json"
    monkeypatch.setenv("KVFLOW_IMPORTS_LOG", str(modules_log))
    server = ServerProcess(llama_dir, tmp_path / "serve.log", entry=(str(ROOT / "tests" / "record_imports.py"),))
    try:
        server.wait_ready()
        for stream in (False, True):
            completion = {"prompt": "hi", "max_tokens": 2, "stream": stream}
            chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "stream": stream}
            assert httpx.post(f"{server.url}/v1/completions", json=completion, timeout=60).status_code == 200
            assert httpx.post(f"{server.url}/v1/chat/completions", json=chat, timeout=60).status_code == 200
        assert httpx.get(f"{server.url}/metrics").status_code == 200
    finally:
        assert server.stop() == 0, server.log()
    modules = set(json.loads(modules_log.read_text()))
    assert {"kvflow.server.app", "kvflow.engine.core_client", "uvicorn"} <= modules
    assert not tool_modules(modules)
