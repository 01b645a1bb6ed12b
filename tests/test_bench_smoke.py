"""The speed benchmark harness in its CPU smoke mode (issue 6: "CI keeps it working"): every mode
(ops under the Triton interpreter, step, e2e with the transformers peers, project) on tiny
models, through the real command line. The timings mean nothing here; what is checked is that
each mode produces complete, well-formed results and plots."""
import json
import subprocess
import sys
from pathlib import Path


def test_speed_benchmark_smoke_runs_every_mode(tmp_path):
    out = tmp_path / "bench"
    r = subprocess.run([sys.executable, "-m", "quasar.bench", "speed", "--mode", "ops,step,e2e,project", "--smoke",
                        "--out", str(out), "--per-category", "1", "--max-new-tokens", "8"],
                       capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    d = json.loads((out / "speed.json").read_text())
    # step: every case at both smoke contexts, each with a time and a floor
    rows = d["step"]["rows"]
    assert not [x for x in rows if "error" in x], rows
    cases = {x["case"] for x in rows}
    from quasar import quant
    assert len(cases) == len(quant.SCHEMES) + 3 and {x["ctx"] for x in rows} == {16, 48}
    assert all(x["ms"] > 0 and x["floor_ms"] > 0 and x["ratio_to_floor"] > 0 for x in rows)
    # e2e: the five shipped SmolLM2 deployments and the two transformers peers on the same prompts
    names = {x["config"] for x in d["e2e"]["rows"]}
    assert {"ar-bf16-smollm2: AR unquantized", "quasar-smollm2: ngram k=5 + w8a8-int8",
            "qspec-smollm2: quantized_self w4a4 k=3 -> w4a16",
            "transformers generate (greedy)", "transformers prompt-lookup (k=5)"} <= names, names
    assert all(x["tok_s"] > 0 for x in d["e2e"]["rows"])
    # project: labelled, with the formula
    assert d["project"]["rows"] and all("formula" in x for x in d["project"]["rows"])
    # ops: interpreter kernels checked against the reference, every scheme but FP8
    # (the interpreter backend refuses it: it needs FP8 tensor cores)
    ops = d["ops"]
    assert ops["copy"]["GBps"] > 0
    timed = {x["scheme"] for s in ops["gemm"].values() for x in s.get("rows", [])}
    assert {"unquantized", "w8a8-int8", "w4a16", "w4a4", "w8a16"} <= timed, timed
    assert all(e.startswith("w8a8-fp8: skipped") for e in ops["errors"]), ops["errors"]
    for s in ("w8a8-int8", "w4a16", "w4a4"):
        assert ops["gemm"][s]["check"]["max_rel"] < 1e-3
    assert list(out.glob("*.png"))


def test_batch_benchmarks_smoke(tmp_path):
    """--mode batch (paged steps per batch size vs the floor) and --mode e2e --in-flight N
    (continuous batching vs transformers' batched generate) through the command line."""
    out = tmp_path / "bench"
    r = subprocess.run([sys.executable, "-m", "quasar.bench", "speed", "--mode", "batch,e2e", "--smoke",
                        "--in-flight", "4", "--configs", "ar-bf16,quasar", "--out", str(out)],
                       capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    d = json.loads((out / "speed.json").read_text())
    rows = d["batch"]["rows"]
    assert not [x for x in rows if "error" in x], rows
    assert {x["B"] for x in rows} == {1, 2, 4} and all(x["ms"] > 0 and x["ratio_to_floor"] > 0 for x in rows)
    assert any(x["case"].startswith("QSpec draft") for x in rows)
    e2e = d["e2e_batch"]["rows"]
    assert [x["config"] for x in e2e][:2] == ["ar-bf16-smollm2: AR unquantized", "quasar-smollm2: ngram k=5 + w8a8-int8"]
    assert e2e[-1]["peer"] and all(x["tok_s"] > 0 for x in e2e)
    assert all(0 < x["peak_kv_blocks"] <= x["kv_blocks"] for x in e2e[:-1])


def test_step_cases_filter(tmp_path):
    """--cases picks step cases by label; a filter that matches nothing is refused, naming the
    cases there are."""
    out = tmp_path / "bench"
    base = [sys.executable, "-m", "quasar.bench", "speed", "--mode", "step", "--smoke", "--out", str(out)]
    r = subprocess.run(base + ["--cases", "w4a16,decode unquantized"], capture_output=True, text=True, timeout=600,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    cases = {x["case"] for x in json.loads((out / "speed.json").read_text())["step"]["rows"]}
    assert cases == {"decode unquantized (T=1)", "verify w4a16 g-auto", "QSpec verify w4a16 per-channel hadamard (k=3)"}, cases
    r = subprocess.run(base + ["--cases", "w9a9"], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode != 0 and "matches no step case" in r.stderr and "verify w8a8-int8" in r.stderr


def test_quantspec_step_benchmark_smoke(tmp_path):
    """python -m quasar.bench quantspec on the tiny shape (CPU): every step and attention of every
    config and context, each with its byte floor, and the projection from a given tau."""
    from pathlib import Path
    root = Path(__file__).parent.parent
    out = tmp_path / "qs"
    r = subprocess.run([sys.executable, "-m", "quasar.bench", "quantspec", "--shape", "tiny", "--contexts", "300,700",
                        "--device", "cpu", "--iters", "2", "--tau", "paper=5.2", "--out", str(out),
                        "--config", str(root / "configs/quantspec-smollm2.yaml"),
                        "--config", str(root / "configs/quasar-quantspec-smollm2.yaml")],
                       capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    d = json.loads((out / "quantspec.json").read_text())
    rows = d["rows"]
    assert {(x["config"], x["context"]) for x in rows} == {(c, n) for c in ("quantspec-smollm2", "quasar-quantspec-smollm2")
                                                          for n in (300, 700)}
    for x in rows:
        assert x["draft_ms"] > 0 and x["verify_ms"] > 0 and x["ar_ms"] > 0 and x["speedup_paper"] > 0
        assert x["draft_floor_ms"] < x["verify_floor_ms"] <= x["ar_floor_ms"] * 1.01
    kb = d["kv_bytes_per_token"]
    assert kb["hierarchical upper"] < kb["hierarchical both"] < kb["dense"]
    assert "speedup" in (out / "quantspec.md").read_text()


def test_longctx_benchmark_builds_prompts_of_the_asked_length(smollm2_dir):
    """The long-context prompts are real articles cut to the context length (within a few tokens
    of re-encoding), ending with the instruction, in the chat template."""
    from pathlib import Path

    from quasar.bench.longctx import INSTRUCTION, articles, long_prompt
    from quasar.engine.llm import load_tokenizer
    from quasar.fetch import resolve_model

    class L:
        tokenizer = load_tokenizer(resolve_model("smollm2-135m-instruct"))
        has_chat_template = True

        def encode_chat(self, messages):
            t = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            return self.tokenizer(t, add_special_tokens=False)["input_ids"]
    docs = articles(Path(__file__).parent.parent / "benchmarks/data/specbench/question.jsonl")
    assert len(docs) == 80
    for n in (1024, 4096):
        ids = long_prompt(L(), docs, n, 0)
        assert abs(len(ids) - n) <= 8, len(ids)
        text = L.tokenizer.decode(ids)
        assert "Article 2:" in text and INSTRUCTION.strip() in text


def test_specmquant_step_benchmark_smoke(tmp_path):
    """python -m quasar.bench specmquant on the tiny shape (CPU): chain, tree and the hierarchical
    stages per config, their floors and the projection, as JSON and markdown."""
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "sm"
    r = subprocess.run([sys.executable, "-m", "quasar.bench", "specmquant", "--shape", "tiny", "--context", "40",
                        "--trees", "8,16", "--iters", "1", "--device", "cpu", "--out", str(out),
                        "--tau", "chain=2", "--tau", "tree=2.5", "--tau", "hierarchical=3",
                        "--config", str(root / "configs/ar-bf16-smollm2.yaml"),
                        "--config", str(root / "configs/specmquant-smollm2.yaml")],
                       capture_output=True, text=True, timeout=600, cwd=root)
    assert r.returncode == 0, r.stderr[-3000:]
    d = json.loads((out / "specmquant.json").read_text())
    rows = {x["config"]: x for x in d["rows"]}
    assert set(rows) == {"ar-bf16-smollm2", "specmquant-smollm2"}
    for x in rows.values():
        assert all(x[key] > 0 for key in ("decode_ms", "chain_ms", "tree8_ms", "tree16_ms", "floor_ms"))
    h = rows["specmquant-smollm2"]
    assert h["intermediate"] and h["inter_tree_ms"] > 0 and h["hier_chain_ms"] > 0
    proj = {p["config"]: p for p in d["projection"]["rows"]}
    assert proj["specmquant-smollm2"]["hierarchical"] > 0
    assert "Projected speed-up" in (out / "specmquant.md").read_text()
