"""Quality harness (`kvflow eval`): held-out perplexity vs a unigram baseline, passkey retrieval
over context length x needle depth, and multi-key associative recall, all run through our engine.

    from kvflow.llm import LLM
    from kvflow.eval import EvalConfig, run_eval, save_results, format_report

    result = run_eval(LLM(model="models/train/tiny"), EvalConfig(lengths=(256, 512)))
    print(format_report(result)); save_results(result, "eval_results/tiny")
"""

from __future__ import annotations

from kvflow.eval.report import format_report, save_results
from kvflow.eval.runner import TASKS, EvalConfig, EvalResult, engine_settings, run_eval

__all__ = ["TASKS", "EvalConfig", "EvalResult", "engine_settings", "format_report", "run_eval", "save_results"]
