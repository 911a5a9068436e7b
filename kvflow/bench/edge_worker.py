"""``python -m kvflow.bench.edge_worker JOB RESULT``: kvflow's side of `kvflow bench edge`, run under the
limits by the parent. It times the plan with the peers' own loop (``kvflow.bench.peers.worker.run_job``:
warm-up, TTFT probes of one token, timed repeats; process-tree CPU time and peak RSS), so kvflow and
llama.cpp are measured by the very same code; only the engine differs."""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path
from typing import Any

from kvflow.bench.peers import worker as peer_worker


class KVFlowEngine:
    """``kvflow.LLM`` on token ids: greedy, ``ignore_eos``, one generate call per batch."""

    def __init__(self, job: dict[str, Any]) -> None:
        import torch

        torch.set_num_threads(job["threads"])
        from kvflow.llm import LLM
        from kvflow.sampling_params import SamplingParams

        self._params = SamplingParams
        self.llm = LLM(model=job["model"], dtype=job["dtype"], **job["engine_kwargs"])
        from kvflow.model import cpu_kernels

        runner = getattr(getattr(self.llm.engine, "core", None), "runner", None)
        self._info = {"cpu_isa": cpu_kernels.cpu_isa(), "kernel_march": cpu_kernels.CFLAGS[1]}
        if runner is not None:
            self._info["cpu_kernels"] = getattr(runner, "cpu_forward", None) is not None

    def generate(self, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
        params = self._params(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        outs = self.llm.generate([list(p) for p in prompts], params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]

    def info(self) -> dict[str, Any]:
        return dict(self._info)

    def close(self) -> None:
        del self.llm


def main(argv: list[str]) -> int:
    job_path, result_path = Path(argv[0]), Path(argv[1])
    job = json.loads(job_path.read_text())
    peer_worker.ENGINES["kvflow"] = KVFlowEngine
    try:
        result = peer_worker.run_job(job)
    except BaseException as e:
        result_path.write_text(json.dumps({"error": "".join(traceback.format_exception(e))}))
        return 1
    from kvflow.version import __version__

    result["version"] = __version__
    result_path.write_text(json.dumps({"ok": result}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
