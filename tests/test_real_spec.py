"""SmolLM2-135M-Instruct (real weights) on the CPU in fp32: speculative greedy output equals the
verifier's own autoregressive greedy output, for every drafter x verifier scheme."""
import pytest

from quasar.config import from_dict
from quasar.engine import LLM

PROMPTS = ["Repeat this list exactly twice: apples, pears, plums, figs.",
           "Write a Python function that adds two numbers, then write it again with type hints."]
N = 32


@pytest.fixture(scope="module")
def ar_outputs(smollm2_dir):
    out = {}
    for quant, extra in (("bf16", {}), ("w8a8-int8", {}), ("w4a16", {"group_size": -1})):
        llm = LLM(from_dict({"device": "cpu", "dtype": "float32", "verifier": {"quant": quant, **extra}}))
        out[quant] = [llm.generate_ids(llm.encode(p), N)[0] for p in PROMPTS]
    return out


@pytest.mark.parametrize("quant,extra,drafter", [
    ("bf16", {}, {"method": "ngram"}),
    ("w8a8-int8", {}, {"method": "ngram"}),
    ("w4a16", {"group_size": -1}, {"method": "ngram"}),
    ("w4a16", {"group_size": -1}, {"method": "quantized_self", "scheme": "w4a4", "num_tokens": 3}),
    ("w8a8-int8", {}, {"method": "quantized_self", "scheme": "w4a4", "num_tokens": 3}),
    ("bf16", {}, {"method": "draft_model", "model": "smollm2-135m-instruct", "num_tokens": 4}),
])
def test_real_model_speculative_equals_autoregressive(ar_outputs, quant, extra, drafter):
    llm = LLM(from_dict({"device": "cpu", "dtype": "float32", "verifier": {"quant": quant, **extra},
                         "drafter": {**drafter, "adaptive": False}}))
    taus = []
    for p, ref in zip(PROMPTS, ar_outputs[quant]):
        out, st = llm.generate_ids(llm.encode(p), N)
        assert out == ref
        taus.append(st.tau)
    assert max(taus) > 1.0      # drafts were accepted, so a wrong acceptance would show


def test_acceptance_bench_writes_json(smollm2_dir, tmp_path):
    """`python -m quasar.bench acceptance --out FILE.json` writes the JSON (after every config, so
    an interrupted run keeps its results), with tau per Spec-Bench task."""
    import json
    from pathlib import Path

    from quasar.bench.__main__ import main
    root = Path(__file__).resolve().parents[1]
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"question_id": i, "category": c, "turns": [t]}) for i, (c, t) in
                                 enumerate([("qa", "What is 2+2? Answer: 2+2 is"), ("rag", "Repeat: a b c a b c a b c")])))
    rc = main(["acceptance", "--config", str(root / "configs/ngram-bf16-smollm2.yaml"), "--prompts-file",
               str(prompts), "--max-new-tokens", "12", "--device", "cpu", "--out", str(tmp_path / "res" / "acceptance.json")])
    assert rc in (0, None)
    res = json.loads((tmp_path / "res" / "acceptance.json").read_text())
    tasks = res["ngram-bf16-smollm2"]["tasks"]
    assert set(tasks) == {"qa", "rag", "all"} and tasks["all"]["prompts"] == 2 and tasks["all"]["tau"] >= 1.0
