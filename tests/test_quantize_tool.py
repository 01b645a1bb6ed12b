"""tools/quantize.py: bad inputs give `error: ...` and exit status 2 (no traceback), and each
recipe runs end to end on a tiny Qwen3 (with a tiny local tokenizer and chat template) into a
compressed-tensors directory that Quasar and transformers both load, with matching logits."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tiny import load_quasar, make_tiny

from quasar.engine import ModelRunner

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "quantize.py"
SPECBENCH = [
    {"question_id": 81, "category": "writing", "turns": ["Compose an engaging travel blog post about Hawaii.",
                                                          "Rewrite it, every sentence starting with A."]},
    {"question_id": 101, "category": "reasoning", "turns": ["You overtake the second person in a race. What is your position?"]},
    {"question_id": 121, "category": "coding", "turns": ["Write a python function that reverses a list in place."]},
    {"question_id": 131, "category": "math", "turns": ["What is 17 * 23? Show the steps."]},
    {"question_id": 141, "category": "summarization", "turns": ["Summarize: the quick brown fox jumps over the lazy dog."]},
]


def make_tokenizer(path: Path, vocab_size: int = 256):
    """A character-level tokenizer (ids < vocab_size) with a chat template, built offline."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    special = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>"]
    vocab = {t: i for i, t in enumerate(special + [chr(c) for c in range(33, 127)])}
    assert len(vocab) <= vocab_size
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                pre_tokenizers.Split(Regex("."), "isolated")])
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="</s>",
                                   additional_special_tokens=["<|user|>", "<|assistant|>"])
    fast.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
                          "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    fast.save_pretrained(str(path))
    return fast


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("qtool")
    path = make_tiny(root, "qwen3", hidden_size=64, intermediate_size=128, head_dim=16, seed=3)
    make_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    f = tmp_path_factory.mktemp("calib") / "question.jsonl"
    f.write_text("".join(json.dumps(q) + "\n" for q in SPECBENCH) + "\n")
    return f


def run_tool(*args, env_extra=None, timeout=300):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.pop("TRITON_INTERPRET", None)     # set in-process by the Triton kernel tests
    env.update(env_extra or {})
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=str(REPO), timeout=timeout)


def assert_usage_error(r, *fragments):
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout, r.stderr
    last = [ln for ln in r.stderr.strip().splitlines() if ln.startswith("error: ")]
    assert last, r.stderr
    for frag in fragments:
        assert frag in last[-1], (frag, last[-1])


# ------------------------------------------------------------------ bad inputs

def test_missing_model_dir(tmp_path, calib):
    r = run_tool("--model", tmp_path / "nope", "--recipe", "w4a16-gptq", "--calib", calib)
    assert_usage_error(r, "model directory", "nope", "does not exist")


def test_model_dir_without_config(tmp_path, calib):
    r = run_tool("--model", tmp_path, "--recipe", "w4a16-gptq", "--calib", calib)
    assert_usage_error(r, "no config.json")


def test_missing_calib_file(model_dir, tmp_path):
    r = run_tool("--model", model_dir, "--recipe", "w4a16-gptq", "--calib", tmp_path / "missing.jsonl")
    assert_usage_error(r, "calibration file", "missing.jsonl", "does not exist")


def test_bad_jsonl_line(model_dir, tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps(SPECBENCH[0]) + "\n{\"turns\": [\"unterminated\"\n")
    r = run_tool("--model", model_dir, "--recipe", "w4a16-gptq", "--calib", f, "--group-size", "32")
    assert_usage_error(r, f"{f}:2:", "not valid JSON")


def test_jsonl_line_without_a_prompt(model_dir, tmp_path):
    f = tmp_path / "noprompt.jsonl"
    f.write_text('{"prompt": "fine"}\n{"question": "where is the text?"}\n')
    r = run_tool("--model", model_dir, "--recipe", "w4a16-gptq", "--calib", f, "--group-size", "32")
    assert_usage_error(r, f"{f}:2:", "no 'turns', 'prompt' or 'text'")


def test_unknown_recipe(model_dir, calib):
    r = run_tool("--model", model_dir, "--recipe", "w3a16-magic", "--calib", calib)
    assert_usage_error(r, "unknown recipe 'w3a16-magic'", "w8a8-smoothquant-gptq", "w4a16-gptq", "w4a16-awq-asym")


def test_group_size_that_does_not_divide(model_dir, calib):
    r = run_tool("--model", model_dir, "--recipe", "w4a16-gptq", "--calib", calib)   # default 128 > K = 64
    assert_usage_error(r, "--group-size 128 does not divide", "hidden_size = 64")


def test_existing_output_is_not_overwritten(model_dir, calib, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    r = run_tool("--model", model_dir, "--recipe", "w4a16-gptq", "--calib", calib, "--group-size", "32",
                 "--out", tmp_path / "out")
    assert_usage_error(r, "already exists", "--force")


def test_llmcompressor_not_installed(model_dir, calib, tmp_path):
    fake = tmp_path / "site"
    (fake / "llmcompressor").mkdir(parents=True)
    (fake / "llmcompressor" / "__init__.py").write_text(
        "raise ImportError(\"No module named 'llmcompressor'\")\n")
    r = run_tool("--model", model_dir, "--recipe", "w4a16-gptq", "--calib", calib, "--group-size", "32",
                 "--out", tmp_path / "o", env_extra={"PYTHONPATH": f"{fake}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"})
    assert_usage_error(r, "llmcompressor is not installed", "pip install 'quasar[quant]'")


def test_already_quantized_model(model_dir, calib, tmp_path):
    import shutil
    d = tmp_path / "quantized"
    shutil.copytree(model_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "compressed-tensors", "format": "pack-quantized"}
    (d / "config.json").write_text(json.dumps(cfg))
    r = run_tool("--model", d, "--recipe", "w4a16-gptq", "--calib", calib, "--group-size", "32")
    assert_usage_error(r, "is already quantized (compressed-tensors)")


def test_model_without_tokenizer(calib, tmp_path):
    path = make_tiny(tmp_path, "qwen3", hidden_size=64, intermediate_size=128, head_dim=16, seed=4)
    r = run_tool("--model", path, "--recipe", "w4a16-gptq", "--calib", calib, "--group-size", "32",
                 "--out", tmp_path / "o")
    assert_usage_error(r, "cannot load a tokenizer", "tokenizer files")


# ------------------------------------------------------------------ calibration prompts (in process)

def _tool_module():
    spec = importlib.util.spec_from_file_location("quasar_tools_quantize", TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_prompt_formats_and_choice(tmp_path, calib):
    q = _tool_module()
    assert q.read_prompts(calib) == [s["turns"][0] for s in SPECBENCH]   # first turn only
    f = tmp_path / "mixed.jsonl"
    f.write_text('{"prompt": "a"}\n\n{"text": "b"}\n{"text": "   "}\n')
    assert q.read_prompts(f) == ["a", "b"]
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(q.UsageError, match="holds no prompts"):
        q.read_prompts(empty)
    picked = q.choose(list("abcdefghij"), 4, seed=0)
    assert len(picked) == 4 and picked == q.choose(list("abcdefghij"), 4, seed=0)
    assert q.choose(list("abc"), 10, seed=0) == list("abc")


# ------------------------------------------------------------------ end to end

RECIPES = {"w8a8-smoothquant-gptq": "w8a8-int8", "w4a16-gptq": "w4a16", "w4a16-awq-asym": "w4a16"}


@pytest.mark.slow
@pytest.mark.parametrize("recipe", list(RECIPES))
def test_recipe_end_to_end(model_dir, calib, tmp_path, recipe):
    out = tmp_path / recipe
    r = run_tool("--model", model_dir, "--recipe", recipe, "--calib", calib, "--num-samples", 3,
                 "--max-seq-len", 48, "--group-size", 32, "--awq-grid", 3, "--out", out)
    assert r.returncode == 0, r.stderr[-4000:]
    assert f"Quasar scheme {RECIPES[recipe]}" in r.stdout
    assert "3 samples" in r.stdout and "chat template applied" in r.stdout

    cfg = json.loads((out / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["ignore"] == ["lm_head"]
    w = qc["config_groups"]["group_0"]["weights"]
    if recipe.startswith("w4"):
        assert (w["num_bits"], w["group_size"], w["symmetric"]) == (4, 32, recipe == "w4a16-gptq")
        assert w.get("actorder") in (None, "static", "weight")        # no g_idx
    else:
        assert (w["num_bits"], w["strategy"]) == (8, "channel")
    assert (out / "tokenizer.json").is_file()
    from safetensors import safe_open
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("lm_head.weight").dtype == torch.float32   # lm_head stays float
    assert not any(k.endswith("weight_g_idx") for k in keys)

    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(out))
    ids = torch.tensor([tok("what is 2 + 2? explain the steps.")["input_ids"]])
    n = ids.shape[1]
    hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    ref = hf(ids).logits
    q = ModelRunner(load_quasar(out))
    assert q.model.scheme == RECIPES[recipe]
    got = q(ids, torch.arange(n).view(1, -1), kv_len=n)
    err = ((got - ref).norm() / ref.norm()).item()
    if recipe.startswith("w4"):
        assert err <= 1e-5
    else:   # int8 activation rounding on another grid (see test_compressed_tensors.py)
        for m in hf.modules():
            if hasattr(m, "quantization_scheme"):
                m.quantization_enabled = False
        act = ((hf(ids).logits - ref).norm() / ref.norm()).item()
        assert err <= 2.5 * act
