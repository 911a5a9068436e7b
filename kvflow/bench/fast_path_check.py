"""Before kvflow's speed is reported, its optimised path must give the outputs of its plain path.

The optimised path (oneDNN-prepacked weights, the C++ CPU forward) computes the same model as
the plain PyTorch modules, but the C++ kernels sum in a different order. Two checks follow:

- **fp32, strict**: greedy outputs of the C++ forward equal the plain path's token for token.
  At fp32 a changed summation order moves logits by about 1e-6, far below any real margin, so
  any difference here is a bug.
  Not where a layer rounds its activations to int8 (W8A8, llama.cpp's q8 blocks): a 1e-6 change
  of an input can cross a rounding boundary and move an output by a quantisation step (measured:
  0.01-0.02 nats on a random-weight `135m`), so that check is near-ties only too.
- **the bench's dtype (bf16), near-ties only**: every sequence is equal up to its first
  difference, and there the plain path itself was undecided: the optimised path's token is
  among the plain path's top 5 with a log-probability within `NEAR_TIE_NATS` of the best.
  Random-weight bench models have flat next-token distributions in which bf16 logits often tie
  exactly (measured: ties of 0 to 0.016 nats at every difference), so a one-ulp change flips the
  argmax; a real bug moves the chosen token far down the list.
"""

from __future__ import annotations

import gc
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

#: Log-probability gap (nats) under which two tokens count as tied for the plain path.
NEAR_TIE_NATS = 0.05
_TOP = 5
_PLAIN = {"prepack_weights": False, "cpu_kernels": False}


@dataclass
class Divergence:
    prompt: int
    position: int
    gap_nats: float | None  # None: the optimised token was not in the plain path's top 5


@dataclass
class FastPathCheck:
    dtype: str
    prompts: int
    tokens: int
    identical: int
    near_ties: list[Divergence] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def fast_path_active(llm: Any) -> bool:
    """Whether an engine runs any optimised path the plain one has to vouch for."""
    runner = llm.engine.core.runner
    return runner.cpu_forward is not None or runner.model.lm_head.method.name != "dense"


def rounds_activations(llm: Any) -> bool:
    """Whether any linear layer of the engine's model rounds its activations (see the module doc)."""
    from kvflow.model.linear import linear_layers

    return any(layer.method.rounds_activations for layer in linear_layers(llm.engine.core.runner.model))


def _greedy(llm: Any, prompts: list[list[int]], max_tokens: int, top: int | None) -> list[Any]:
    from kvflow.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, logprobs=top)
    return [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]


def _engine(model_dir: Path, dtype: str, engine_kwargs: dict[str, Any], **overrides: Any) -> Any:
    from kvflow.llm import LLM

    return LLM(model=str(model_dir), dtype=dtype, **{**engine_kwargs, "num_blocks": 64, **overrides})


def compare_with_plain(
    model_dir: Path, dtype: str, engine_kwargs: dict[str, Any], prompts: list[list[int]],
    fast: list[list[int]], strict: bool,
) -> FastPathCheck:  # fmt: skip
    """Greedy-decode `prompts` on the plain path and compare with `fast` (see the module doc);
    raises RuntimeError naming the prompts whose outputs differ beyond what is allowed. `strict` is
    dropped for a model whose layers round their activations."""
    llm = _engine(model_dir, dtype, engine_kwargs, **_PLAIN)
    strict = strict and not rounds_activations(llm)
    reference = _greedy(llm, prompts, len(fast[0]), None if strict else _TOP)
    del llm
    gc.collect()
    check = FastPathCheck(dtype, len(prompts), len(fast[0]), 0)
    bad: list[Divergence] = []
    for i, (ours, ref) in enumerate(zip(fast, reference)):
        position = next((p for p, (a, b) in enumerate(zip(ours, ref.token_ids)) if a != b), None)
        if position is None:
            check.identical += 1
            continue
        gap = None
        if not strict:
            candidates = ref.logprobs[position]
            best = max(lp.logprob for lp in candidates.values())
            mine = candidates.get(ours[position])
            gap = None if mine is None else best - mine.logprob
        divergence = Divergence(i, position, gap)
        (check.near_ties if gap is not None and gap <= NEAR_TIE_NATS else bad).append(divergence)
    if bad:
        allowed = "strict" if strict else f"beyond near-ties of {NEAR_TIE_NATS} nats"
        raise RuntimeError(
            f"kvflow's optimised path changed greedy outputs on this model ({dtype}, {allowed}): {bad}; "
            "refusing to report its speed"
        )
    return check


def check_fast_path(model_dir: Path, dtype: str, engine_kwargs: dict[str, Any], prompts: list[list[int]],
                    fast: list[list[int]]) -> list[FastPathCheck]:
    """Both checks: `fast` (the bench engine's outputs, in `dtype`) against the plain path in that
    dtype, and, when the C++ forward is on, a strict fp32 comparison of the two paths."""
    checks = []
    if dtype != "float32" and engine_kwargs.get("cpu_kernels", True):
        llm = _engine(model_dir, "float32", engine_kwargs)
        active = llm.engine.core.runner.cpu_forward is not None
        fast32 = [list(o.token_ids) for o in _greedy(llm, prompts, len(fast[0]), None)] if active else None
        del llm
        gc.collect()
        if fast32 is not None:
            checks.append(compare_with_plain(model_dir, "float32", engine_kwargs, prompts, fast32, strict=True))
    checks.append(compare_with_plain(model_dir, dtype, engine_kwargs, prompts, fast, strict=dtype == "float32"))
    return checks
