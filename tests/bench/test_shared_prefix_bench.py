"""`kvflow bench attention --shared-prefix`: the case's groups and both timed kernels' accuracy."""

from __future__ import annotations

import pytest
import torch

from kvflow.bench.attention import SharedPrefixCase, run_shared_prefix_case
from kvflow.cli import main
from kvflow.model.cpu_kernels import load_extension


def _case(batch: int = 6) -> SharedPrefixCase:
    return SharedPrefixCase(batch, 3, 64, 5, 40, 4, 2, 32, 16, torch.float32, torch.device("cpu"))


def test_case_groups_its_sequences_by_the_shared_blocks():
    """Groups of 3 share the 4 prefix blocks; own lengths spread from 5 to 40 within each group."""
    case = _case(7)  # the last group has one sequence: no group
    assert case.groups.groups.tolist() == [[0, 3, 4], [3, 6, 4]]
    assert case.seq_lens[:3] == [69, 86, 104]


@pytest.mark.skipif(load_extension() is None, reason="no C++ compiler")
def test_run_times_the_kernel_with_and_without_groups(capsys):
    results = run_shared_prefix_case(_case(), repeats=1)
    assert [r.implementation for r in results] == ["kvflow-cpu", "kvflow-cpu-shared"]
    assert all(r.max_abs_err < 1e-5 for r in results)
    assert main(["bench", "attention", "--device", "cpu", "--shared-prefix", "32", "--group-size", "2",
                 "--own-tokens", "1", "20", "--batch", "4", "--heads", "4/2", "--head-dim", "32",
                 "--dtype", "float32", "--repeats", "1"]) == 0
    assert "kvflow-cpu-shared" in capsys.readouterr().out
