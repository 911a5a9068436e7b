"""The Triton kernels compiled for NVIDIA GPUs (sm_80, sm_90) on a machine without one: every
launch the wrappers make (dense, int8, fp8 and KIVI KV caches) must compile to a cubin without
register spills and within the architecture's shared memory (`kvflow.attention.triton.compile_check`).
The interpreter tests run the kernels' Python; this is the part they cannot check."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")


def _ptxas_available() -> bool:
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        return os.path.exists(get_ptxas(90).path)
    except Exception:  # noqa: BLE001 - no NVIDIA backend in this triton build
        return False


# Every dense scenario; of the int8 ones (each about as slow to compile) the store and the windowed
# prefill and split decode, which hold the others' code paths and use the most registers; of the fp8
# ones the store (its encoding) and the windowed prefill (the most registers; decode shares its
# code conversion), compiled with the integer conversions on sm_80 and the native ones on sm_90; of the
# KIVI ones (kivi4 and kivi2 differ only in how codes unpack) a windowed prefill and split decode.
VARIANTS = ("store", "causal", "window", "nosplit", "split", "split-window",
            "store-int8", "window-int8", "split-window-int8", "store-fp8", "window-fp8",
            "window-kivi4", "split-window-kivi2", "shared-gqa8")


@pytest.mark.skipif(not _ptxas_available(), reason="triton's NVIDIA backend (ptxas) is not installed")
def test_kernels_compile_for_ampere_and_hopper(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile, do not interpret
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    report = tmp_path / "compile.json"
    result = subprocess.run(
        [sys.executable, "-m", "kvflow.attention.triton.compile_check", "--arch", "80", "90",
         "--dtype", "bfloat16", "float32", "--head-dim", "128", "--json", str(report), "--variant", *VARIANTS],
        env=env, capture_output=True, text=True, timeout=600,
    )
    reports = json.loads(report.read_text())
    failed = [r for r in reports if not r["ok"]]
    assert result.returncode == 0 and not failed, result.stdout[-3000:] + result.stderr[-2000:]
    launched = {(r["kernel"], r["variant"]) for r in reports}
    assert launched == {
        ("store_kv_kernel", "store"), ("prefill_kernel", "causal"), ("prefill_kernel", "window"),
        ("decode_split_kernel", "nosplit"), ("decode_split_kernel", "split"), ("decode_merge_kernel", "split"),
        ("decode_split_kernel", "split-window"), ("decode_merge_kernel", "split-window"),
        ("store_kv_kernel", "store-int8"), ("prefill_kernel", "window-int8"),
        ("decode_split_kernel", "split-window-int8"), ("decode_merge_kernel", "split-window-int8"),
        ("store_kv_kernel", "store-fp8"), ("prefill_kernel", "window-fp8"),
        ("kivi_prefill_kernel", "window-kivi4"), ("kivi_decode_kernel", "split-window-kivi2"),
        ("decode_merge_kernel", "split-window-kivi2"),
        # shared-prefix groups at the tallest tile detection allows (8 query heads per kv head)
        ("decode_split_kernel", "shared-gqa8"), ("decode_shared_kernel", "shared-gqa8"),
        ("decode_merge_kernel", "shared-gqa8"),
    }
    assert len(reports) == 2 * 2 * 20  # arches x dtypes x launches
    for r in reports:
        if "INT8" in r["constexprs"]:
            fp8 = r["variant"].endswith("fp8")
            assert r["constexprs"]["INT8"] == r["variant"].endswith("int8") and r["constexprs"]["FP8"] == fp8
            assert r["constexprs"]["FP8_NATIVE"] == (fp8 and r["arch"] == 90)
    hopper_bf16 = next(r for r in reports if r["arch"] == 90 and r["dtype"] == "bfloat16" and r["variant"] == "causal")
    assert hopper_bf16["constexprs"]["BLOCK_M"] == 128 and hopper_bf16["registers"] > 0
