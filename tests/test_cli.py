"""python -m quasar.run: flags over YAML, --json output, Spec-Bench prompts, and clean errors
(non-zero exit, a message naming the problem, no Python traceback)."""
import json
import os
import subprocess
import sys

import pytest

from tiny import make_tiny

ENV = dict(os.environ, PYTHONUNBUFFERED="1")


def run(*args, cwd=None):
    r = subprocess.run([sys.executable, "-m", "quasar.run", *args], capture_output=True, text=True,
                       env=ENV, cwd=cwd, timeout=600)
    return r.returncode, r.stdout, r.stderr


def assert_clean_error(rc, err, needle):
    assert rc == 2, err
    assert needle in err, err
    assert "Traceback" not in err, err


@pytest.mark.parametrize("yaml_text,needle", [
    ("drafter:\n  num_token: 5\n", "unknown key 'num_token' in drafter"),
    ("drafter:\n  num_tokens: five\n", "drafter.num_tokens must be an integer >= 1, got 'five'"),
    ("verifier:\n  quant: int3\n", "verifier.quant must be one of"),
])
def test_bad_yaml_is_a_clean_error(tmp_path, yaml_text, needle):
    f = tmp_path / "bad.yaml"
    f.write_text(yaml_text)
    rc, _, err = run("--config", str(f))
    assert_clean_error(rc, err, needle)


def test_bad_flag_value_is_a_clean_error():
    rc, _, err = run("--num-draft-tokens", "0", "--drafter", "ngram")
    assert_clean_error(rc, err, "drafter.num_tokens must be an integer >= 1, got 0")


def test_missing_model_is_a_clean_error(tmp_path):
    rc, _, err = run("--model", str(tmp_path / "nope"), "--device", "cpu")
    assert_clean_error(rc, err, "not found")


def test_missing_prompts_file_and_bad_line(tmp_path, tiny_root):
    path = make_tiny(tiny_root, "llama")
    rc, _, err = run("--model", str(path), "--prompts-file", str(tmp_path / "none.jsonl"))
    assert_clean_error(rc, err, "does not exist")
    f = tmp_path / "bad.jsonl"
    f.write_text('{"turns": ["ok"]}\n{not json\n')
    rc, _, err = run("--model", str(path), "--prompts-file", str(f))
    assert_clean_error(rc, err, "bad.jsonl:2: not valid JSON")


def test_prompt_longer_than_cache_is_a_clean_error(smollm2_dir):
    rc, _, err = run("--device", "cpu", "--max-seq-len", "16", "--prompt", "word " * 40, "--no-chat")
    assert_clean_error(rc, err, "max_seq_len is 16")


def test_json_output_and_flags_override_yaml(tmp_path, smollm2_dir):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("device: cpu\nsampling:\n  max_new_tokens: 9\n")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"question_id": 7, "category": "qa", "turns": ["Name a colour.", "x"]}) + "\n"
                       + json.dumps({"question_id": 8, "category": "math", "turns": ["What is 2+2?"]}) + "\n")
    rc, out, err = run("--config", str(cfg), "--prompts-file", str(prompts), "--max-new-tokens", "4", "--json")
    assert rc == 0, err
    lines = [json.loads(x) for x in out.strip().splitlines()]
    assert [x["question_id"] for x in lines] == [7, 8]
    for x in lines:
        assert set(x) >= {"prompt_token_ids", "token_ids", "text", "stats"}
        assert 1 <= len(x["token_ids"]) <= 4            # the flag (4) beat the YAML (9)
        assert x["stats"]["new_tokens"] == len(x["token_ids"])
        assert x["stats"]["finish_reason"] in ("eos", "length")
    assert lines[0]["prompt"] == "Name a colour."


def test_demo_runs_with_no_arguments_on_cpu(smollm2_dir):
    r = subprocess.run([sys.executable, "-m", "quasar.run", "--max-new-tokens", "6"],
                       capture_output=True, text=True, env=dict(ENV, CUDA_VISIBLE_DEVICES=""), timeout=600)
    assert r.returncode == 0, r.stderr
    assert "smollm2-135m-instruct on cpu" in r.stdout
    assert r.stdout.count("\n-- ") == 3 and "decode" in r.stdout and "tau" in r.stdout


def test_quasar_command_dispatches_serve(capsys):
    """`quasar serve ...` (the console script, quasar.cli:main) is python -m quasar.serve ...;
    anything else is the run CLI."""
    from quasar.cli import main
    with pytest.raises(SystemExit) as e:
        main(["serve", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--served-model-name" in out and "--api-key" in out
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "--prompts-file" in capsys.readouterr().out
