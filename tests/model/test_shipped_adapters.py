"""The LoRA adapters shipped for `tiny`: PEFT loads them and its merge generates what the engine generates
with them (all three models in one batch), they differ from the base and from each other, and their
reports show each was specialised on its slice."""

from __future__ import annotations

import json

from kvflow import LLM, SamplingParams
from kvflow.assets import default_model_path, shipped_adapter_paths
from tests.lora_utils import hf_greedy, merged_hf_model
from tests.model_utils import load_hf


def test_shipped_adapters_serve_equal_to_peft_and_differ():
    base = default_model_path()
    adapters = shipped_adapter_paths()
    llm = LLM(model=str(base), dtype="float32", enable_lora=True, max_loras=2,
              lora_modules={k: str(v) for k, v in adapters.items()})
    tokenizer = llm.get_tokenizer()
    prompt = tokenizer.encode("The list type supports")
    models = [None, "code", "prose"]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    outs = [o.outputs[0].token_ids for o in llm.generate([prompt] * 3, params, lora_request=models, use_tqdm=False)]
    assert outs[0] == hf_greedy(load_hf(base), prompt, 24)
    for name, out in zip(models[1:], outs[1:]):
        assert out == hf_greedy(merged_hf_model(base, adapters[name]), prompt, 24), name
    assert len({tuple(o) for o in outs}) == 3


def test_shipped_adapter_reports_show_each_slice_learned():
    reports = {name: json.loads((path / "finetune_report.json").read_text())
               for name, path in shipped_adapter_paths().items()}
    for name, report in reports.items():
        assert report["settings"]["slice"] == name and report["settings"]["method"] == "lora"
    prose = reports["prose"]
    assert prose["heldout_perplexity_after"]["prose"] < 0.95 * prose["heldout_perplexity_before"]["prose"]
    code = reports["code"]
    assert code["heldout_perplexity_after"]["code"] < code["heldout_perplexity_before"]["code"]
