"""First-run fixes (issue 16 item 8): what a new user meets when trying the README and the tools'
help. Each test names the item it covers."""
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tiny import make_tiny

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONUNBUFFERED="1")


def cli(*args, env=None, cwd=None, timeout=600):
    r = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True,
                       env=env or ENV, cwd=cwd, timeout=timeout)
    return r.returncode, r.stdout, r.stderr


def no_module_env(tmp_path, module: str) -> dict:
    """An environment in which `import module` fails (sitecustomize sets sys.modules[module] = None)."""
    d = tmp_path / f"no_{module}"
    d.mkdir(exist_ok=True)
    (d / "sitecustomize.py").write_text(f"import sys\nsys.modules[{module!r}] = None\n")
    pp = os.pathsep.join([str(d)] + ([ENV["PYTHONPATH"]] if ENV.get("PYTHONPATH") else []))
    return dict(ENV, PYTHONPATH=pp)


def assert_one_line_error(rc, err, needle):
    assert rc == 2, err
    lines = [x for x in err.splitlines() if x.strip()]
    errs = [x for x in lines if x.startswith("error: ")]
    assert len(errs) == 1 and needle in errs[0], err
    assert "Traceback" not in err, err


# ---------------------------------------------------------------- 1. threads

def test_threads_flag_sets_runtime_threads_and_default():
    from quasar import run, threads
    a = run.parse_args(["--threads", "3"])
    assert run.build_config(a).runtime.threads == 3
    assert run.build_config(run.parse_args([])).runtime.threads is None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert threads.default_threads() == max(1, cores // 2)
    threads.set_default(5)
    try:
        assert threads.default_threads() == 5
    finally:
        threads.set_default(None)


def test_threads_flag_reaches_torch(smollm2_dir):
    code = ("import torch, sys; from quasar.run import main; rc = main(['--device', 'cpu', "
            "'--prompt', 'a b', '--max-new-tokens', '2', '--json', '--threads', '1']); "
            "print('THREADS', torch.get_num_threads()); sys.exit(rc)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "THREADS 1" in r.stdout


# ---------------------------------------------------------------- 2. one-line errors, missing extras

@pytest.mark.parametrize("module,extra", [("triton", "cuda"), ("gguf", "gguf"), ("matplotlib", "plot"),
                                          ("llmcompressor", "quant"), ("torch_npu", "npu")])
def test_missing_optional_module_is_one_line(module, extra, capsys):
    from quasar.run import cli_call

    def body():
        raise ModuleNotFoundError(f"No module named '{module}'", name=module)
    assert cli_call(body) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and f".[{extra}]" in err


def test_unknown_missing_module_still_raises():
    from quasar.run import cli_call

    def body():
        raise ModuleNotFoundError("No module named 'nosuchthing'", name="nosuchthing")
    with pytest.raises(ModuleNotFoundError):
        cli_call(body)


def test_run_cuda_without_triton_is_one_line(tmp_path, tiny_root):
    path = make_tiny(tiny_root, "llama")
    env = dict(no_module_env(tmp_path, "triton"), TRITON_INTERPRET="1")
    rc, _, err = cli("quasar.run", "--device", "cuda", "--model", str(path), "--prompt", "hi",
                     "--max-new-tokens", "2", env=env)
    assert_one_line_error(rc, err, ".[cuda]")


def test_fidelity_and_acceptance_cuda_without_triton_are_one_line(tmp_path, tiny_root):
    path = make_tiny(tiny_root, "llama")
    env = dict(no_module_env(tmp_path, "triton"), TRITON_INTERPRET="1")
    rc, _, err = cli("quasar.fidelity", "--device", "cuda", "--model", str(path), "--per-category", "1",
                     "--tokens", "2", "--schemes", "w8a16", "--prune-layers", "1", env=env)
    assert_one_line_error(rc, err, ".[cuda]")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {path}\nchat: false\n")
    rc, _, err = cli("quasar.bench", "acceptance", "--config", str(cfg), "--device", "cuda",
                     "--per-category", "1", "--max-new-tokens", "2", env=env)
    assert_one_line_error(rc, err, ".[cuda]")


def test_every_cli_prints_quasar_errors_as_one_line(tmp_path):
    missing = str(tmp_path / "none.jsonl")
    for args in (["quasar.run", "--prompts-file", missing],
                 ["quasar.bench", "acceptance", "--config", str(tmp_path / "none.yaml")],
                 ["quasar.bench", "speed", "--mode", "e2e", "--prompts-file", missing, "--out", str(tmp_path / "s")],
                 ["quasar.bench.ops", "--smoke", "--schemes", "w9a9"],
                 ["quasar.fidelity", "--prompts-file", missing]):
        rc, _, err = cli(*args)
        assert_one_line_error(rc, err, "")


# ---------------------------------------------------------------- 3. --limit and friends below 1

@pytest.mark.parametrize("args", [["quasar.run", "--limit", "0"], ["quasar.run", "--limit", "-1"],
                                  ["quasar.run", "--threads", "0"],
                                  ["quasar.bench", "acceptance", "--config", "x.yaml", "--per-category", "0"],
                                  ["quasar.fidelity", "--per-category", "0"]])
def test_counts_below_one_are_usage_errors(args):
    rc, _, err = cli(*args)
    assert rc == 2 and "must be at least 1" in err and "Traceback" not in err, err


# ---------------------------------------------------------------- 4. fidelity

def test_fidelity_rejects_bad_variants_before_running(tiny_root, monkeypatch, capsys):
    from quasar import fidelity
    path = make_tiny(tiny_root, "llama")
    built = []
    monkeypatch.setattr(fidelity, "build_model", lambda *a, **k: built.append(a) or (_ for _ in ()).throw(
        AssertionError("a model was built before validation")))
    for extra, needle in ((["--schemes", "w8a16,w3a16"], "unknown quantization scheme 'w3a16'"),
                          (["--schemes", "w4a16", "--group-size", "48"], "does not divide the in-features"),
                          (["--checkpoint", f"x={path}/nope"], "not a Hugging Face model directory"),
                          (["--prune-layers", "99"], "out of range")):
        rc = fidelity.main(["--model", str(path), "--device", "cpu", "--per-category", "1",
                            "--prune-layers", "1"] + extra)
        err = capsys.readouterr().err
        assert rc == 2 and needle in err, err
    assert not built


def test_fidelity_auto_group_size_fits_the_default_model(smollm2_dir):
    from quasar.fidelity import auto_group_size, check_variants
    from quasar.model.args import ModelArgs
    args = ModelArgs.from_dir(smollm2_dir)
    g = auto_group_size(args)
    assert g in (64, 32) and args.hidden_size % g == 0          # K = 576: 128 does not divide it
    check_variants({"schemes": ["w4a16"], "group_size": g}, args, "smollm2")
    with pytest.raises(Exception, match="does not divide"):
        check_variants({"schemes": ["w4a16"], "group_size": 128}, args, "smollm2")


def test_fidelity_writes_each_variant_as_it_finishes(smollm2_dir, tmp_path, monkeypatch):
    from quasar import fidelity
    real = fidelity.build_model
    calls = []

    def build(*a, **k):
        calls.append(a[4].quant)
        if len(calls) == 3:                 # reference, first variant, then Ctrl-C on the second
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(fidelity, "build_model", build)
    out = tmp_path / "f.json"
    rc = fidelity.main(["--device", "cpu", "--per-category", "1", "--tokens", "3",
                        "--schemes", "w8a16,w8a8-int8", "--prune-layers", "1", "--no-chat", "--out", str(out)])
    assert rc == 130
    rows = json.loads(out.read_text())
    assert [r["variant"] for r in rows] == ["w8a16"]


# ---------------------------------------------------------------- 5. failing benchmark cases

def test_bench_ops_failures_exit_nonzero(tmp_path):
    env = no_module_env(tmp_path, "triton")
    rc, out, err = cli("quasar.bench.ops", "--smoke", "--schemes", "w4a16", "--no-attention", "--no-tune",
                       "--ms", "1", "--budget", "20", "--out", str(tmp_path / "o.json"), env=env)
    assert rc == 1, out + err
    failed = [x for x in err.splitlines() if x.startswith("FAILED ")]
    assert failed and any("w4a16" in x for x in failed), err
    assert "error: " in err


def test_bench_speed_ops_failures_exit_nonzero(tmp_path, monkeypatch, capsys):
    from quasar.bench import __main__ as bench
    from quasar.bench import ops

    def fake(argv, summary=True):
        out = Path(argv[argv.index("--out") + 1])
        out.write_text(json.dumps({"errors": ["w4a16: worker exited with 1: ImportError\nboom",
                                              "w8a8-fp8: skipped: no FP8 here"]}))
        return 1
    monkeypatch.setattr(ops, "main", fake)
    monkeypatch.setattr("quasar.bench.speed.plots", lambda out, res: [])
    rc = bench.main(["speed", "--mode", "ops", "--smoke", "--out", str(tmp_path / "s")])
    err = capsys.readouterr().err
    failed = [x for x in err.splitlines() if x.startswith("FAILED ")]
    assert rc == 1 and len(failed) == 1 and "w4a16" in failed[0] and "boom" in failed[0], err


# ---------------------------------------------------------------- 6. --out

def test_out_means_one_thing_per_command(tmp_path):
    rc, _, err = cli("quasar.bench", "speed", "--mode", "step", "--smoke", "--out", str(tmp_path / "speed.json"))
    assert_one_line_error(rc, err, "give a directory")
    assert not (tmp_path / "speed.json").exists()
    d = tmp_path / "adir"
    d.mkdir()
    for args in (["quasar.bench", "acceptance", "--config", "configs/quasar-smollm2.yaml", "--out", str(d)],
                 ["quasar.bench.ops", "--smoke", "--out", str(d)],
                 ["quasar.fidelity", "--out", str(d)]):
        rc, _, err = cli(*args, cwd=REPO)
        assert_one_line_error(rc, err, "ending in .json")
    for args in (["quasar.bench", "speed", "--help"], ["quasar.bench", "acceptance", "--help"],
                 ["quasar.bench.ops", "--help"], ["quasar.fidelity", "--help"]):
        rc, out, _ = cli(*args)
        assert rc == 0 and ("--out DIR" in out or "--out FILE.json" in out), out


# ---------------------------------------------------------------- 7. shipped prompts

def test_shipped_specbench_prompts_are_the_default(monkeypatch, tmp_path):
    from quasar.bench import __main__ as bench
    from quasar.bench import acceptance as acc
    from quasar.run import default_prompts_file, read_prompts_file
    f = default_prompts_file()
    assert f == REPO / "benchmarks/data/specbench/question.jsonl" and f.is_file()
    assert (f.parent / "README.md").is_file() and "Apache-2.0" in (f.parent / "README.md").read_text()
    assert len(read_prompts_file(f)) == 480
    seen = {}

    def fake(configs, recs, overrides, out=None):
        seen["recs"] = recs
        return {}
    monkeypatch.setattr(acc, "acceptance", fake)
    monkeypatch.setattr(acc, "acceptance_markdown", lambda res: "")
    assert bench.main(["acceptance", "--config", "configs/quasar-smollm2.yaml", "--per-category", "1"]) == 0
    assert len(seen["recs"]) == 6                       # one per Spec-Bench task
    assert seen["recs"][0]["prompt"] == read_prompts_file(f, 1)[0]["prompt"]


def test_docs_do_not_cite_shared_data():
    texts = [(REPO / "README.md").read_text()] + [
        (REPO / p).read_text() for p in ("quasar/run.py", "quasar/fidelity.py", "quasar/bench/__main__.py",
                                         "quasar/bench/speed.py", "quasar/bench/acceptance.py")]
    assert not any("../shared/data" in t for t in texts)


# ---------------------------------------------------------------- 8. streaming

def test_token_stream_never_splits_characters(smollm2_dir):
    from quasar.engine import load_tokenizer
    from quasar.run import TokenStream
    tok = load_tokenizer(smollm2_dir)
    text = "Grüße, 世界! こんにちは 🚀 done."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    buf = io.StringIO()
    s = TokenStream(tok, buf)
    writes = []
    buf.write = lambda x, w=buf.write: (writes.append(x), w(x))[1]
    for i in range(0, len(ids), 2):
        s(ids[i:i + 2])
    final = tok.decode(ids, skip_special_tokens=True)
    s.finish(final)
    assert buf.getvalue() == final + "\n"
    assert not any("\ufffd" in w for w in writes)


def test_run_streams_a_single_prompt(smollm2_dir):
    rc, out, err = cli("quasar.run", "--device", "cpu", "--prompt", "Say hi.", "--max-new-tokens", "12")
    assert rc == 0, err
    rc2, out2, _ = cli("quasar.run", "--device", "cpu", "--prompt", "Say hi.", "--max-new-tokens", "12", "--json")
    obj = json.loads(out2.strip().splitlines()[-1])
    assert f"[1/1] Say hi.\n{obj['text']}\n-- " in out


# ---------------------------------------------------------------- 9. corrupt cached model

def test_corrupt_cached_model_names_the_fetch_command(smollm2_dir, tmp_path):
    dest = tmp_path / "cache" / "models" / "smollm2-135m-instruct"
    shutil.copytree(smollm2_dir, dest, ignore=shutil.ignore_patterns("*.safetensors"))
    (dest / "model.safetensors").write_bytes(b"\x00" * 100)
    env = dict(ENV, QUASAR_CACHE=str(tmp_path / "cache"))
    rc, _, err = cli("quasar.run", "--device", "cpu", "--prompt", "hi", env=env)
    assert_one_line_error(rc, err, "python -m quasar.fetch smollm2-135m-instruct --force")


# ---------------------------------------------------------------- 10. smaller messages

def test_device_gpu_suggests_cuda():
    from quasar import config as qc
    from quasar.errors import ConfigError
    with pytest.raises(ConfigError, match="did you mean 'cuda'"):
        qc.from_dict({"device": "gpu"})


def test_unknown_key_wording():
    from quasar import config as qc
    from quasar.errors import ConfigError
    with pytest.raises(ConfigError) as e:
        qc.from_dict({"drafter": {"num_tokenz": 5}})
    assert str(e.value).startswith("unknown key 'num_tokenz' in drafter; valid keys: ")
    assert str(e.value).endswith("did you mean drafter.num_tokens?")


def test_bench_ops_help_is_complete():
    rc, out, _ = cli("quasar.bench.ops", "--help")
    assert rc == 0 and "Each scheme runs in its own worker process" in out


def test_npu_message_starts_with_a_short_line():
    rc, _, err = cli("quasar.run", "--device", "npu", "--prompt", "hi")
    assert rc == 2, err
    first = err.splitlines()[0]
    assert first.startswith("error: --device npu needs torch_npu") and "--device cpu" in first
    assert len(first) < 250 and "docs/ascend.md" in err
