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
    # issue 20: tree drafts and SpecMQuant's hierarchy
    ("w8a8-int8", {}, {"method": "ngram", "tree": {"depth": 5, "topk": 4, "max_nodes": 16}}),
    ("w4a16", {"group_size": -1}, {"method": "quantized_self", "scheme": "w4a4", "tree": {"depth": 3, "topk": 4, "max_nodes": 16}}),
    ("w8a8-int8", {}, {"method": "hierarchical", "scheme": "w4a16", "min_chain": 4,
                       "tree": {"depth": 4, "topk": 4, "max_nodes": 16}}),
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


NB = 12          # new tokens per prompt in the batch tests


def _specbench(n):
    from quasar.run import REPO_ROOT, read_prompts_file
    recs = read_prompts_file(REPO_ROOT / "benchmarks/data/specbench/question.jsonl")
    # mixed lengths: every 30th question (all Spec-Bench tasks)
    return [r["prompt"] for r in recs[::30][:n]]


@pytest.fixture(scope="module")
def batch_refs(smollm2_dir):
    """Each of 16 Spec-Bench prompts alone: transformers' greedy `generate` (bf16 scheme = the
    unquantized model), and our W4A16 verifier's own AR decode one prompt at a time."""
    import torch
    from transformers import AutoModelForCausalLM
    prompts = _specbench(16)
    llm = LLM(from_dict({"device": "cpu", "dtype": "float32", "runtime": {"max_batch_size": 1}}))
    ids = [llm.encode(p) for p in prompts]
    hf = AutoModelForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.float32).eval()
    want = []
    for x in ids:
        t = torch.tensor([x])
        out = hf.generate(t, attention_mask=torch.ones_like(t), max_new_tokens=NB, do_sample=False)[0, len(x):]
        toks = out.tolist()
        for j, tok in enumerate(toks):                       # transformers pads after EOS
            if tok in llm.eos:
                toks = toks[:j + 1]
                break
        want.append(toks)
    w4 = LLM(from_dict({"device": "cpu", "dtype": "float32", "verifier": {"quant": "w4a16", "group_size": -1},
                        "runtime": {"max_batch_size": 1}}))
    return ids, {"bf16": want, "w4a16": [w4.generate_ids(x, NB)[0] for x in ids]}


@pytest.mark.parametrize("quant,extra,drafter", [
    ("bf16", {}, {"method": "ngram"}),
    ("w4a16", {"group_size": -1}, {"method": "quantized_self", "scheme": "w4a4", "num_tokens": 3}),
    ("bf16", {}, {"method": "draft_model", "model": "smollm2-135m-instruct", "num_tokens": 3}),
])
def test_real_model_batch_equals_each_prompt_alone(batch_refs, quant, extra, drafter):
    """16 Spec-Bench prompts of mixed lengths in flight together (8 at a time, chunked prefill,
    so sequences join and leave), each equal to its greedy output alone."""
    ids, refs = batch_refs
    llm = LLM(from_dict({"device": "cpu", "dtype": "float32", "verifier": {"quant": quant, **extra},
                         "drafter": {**drafter, "adaptive": False},
                         "runtime": {"max_batch_size": 8, "max_prefill_tokens": 256}}))
    got = llm.generate(ids, max_new_tokens=NB)
    assert [r.token_ids for r in got] == refs[quant]
    llm.engine.check()
