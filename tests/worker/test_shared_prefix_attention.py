"""Shared-prefix attention in the engine: decodes of prompts with a prefix-cached common prefix read
it once per group (C++ forward), and generate the very tokens they generate without it."""

from __future__ import annotations

import pytest

from kvflow import LLM, SamplingParams
from kvflow.assets import default_model_path
from kvflow.model import cpu_kernels

pytestmark = pytest.mark.skipif(cpu_kernels.load_extension() is None, reason="no C++ compiler: no C++ forward")

PREFIX = ("The standard library provides modules for file and directory access, data persistence, text "
          "processing, binary data, networking, concurrency, and much more; each module documents its "
          "functions, classes and exceptions with examples. ")
SUFFIXES = ["def read_file(path):", "class Stack:", "import os\n", "The json module", "for i in range(",
            "Exceptions are"]


def _generate(shared: bool, monkeypatch: pytest.MonkeyPatch) -> tuple[list[list[int]], list[int]]:
    """Greedy outputs of the six prompts (after one has put the prefix in the cache, so that the six
    share its blocks), and the shared-prefix members of each C++ forward call that had groups."""
    grouped: list[int] = []
    honest = cpu_kernels.CpuForward.__call__

    def recording(self, *args, **kwargs):
        groups = kwargs.get("shared_prefix")
        if groups is not None:
            grouped.append(groups.members.numel())
        return honest(self, *args, **kwargs)

    monkeypatch.setattr(cpu_kernels.CpuForward, "__call__", recording)
    llm = LLM(model=str(default_model_path()), dtype="float32", enable_prefix_caching=True, num_blocks=256,
              shared_prefix_attention=shared)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    llm.generate([PREFIX], SamplingParams(temperature=0.0, max_tokens=1), use_tqdm=False)
    outs = llm.generate([PREFIX + s for s in SUFFIXES], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs], grouped


def test_shared_prefix_attention_gives_the_same_greedy_tokens(monkeypatch):
    on, grouped = _generate(True, monkeypatch)
    off, none = _generate(False, monkeypatch)
    assert on == off
    assert none == []
    assert grouped and max(grouped) == len(SUFFIXES)  # all six decoded as one group
