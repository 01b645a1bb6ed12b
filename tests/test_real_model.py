"""The real embedded model (SmolLM2-135M-Instruct) on the CPU: Quasar's greedy tokens equal
transformers' generate(do_sample=False) tokens."""
import pytest
import torch

from quasar.config import DeployConfig
from quasar.engine import LLM

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.",
           "List three prime numbers and explain why they are prime.",
           "Translate 'good morning' into German and Spanish."]


@pytest.fixture(scope="module")
def llm(smollm2_dir):
    return LLM(DeployConfig(device="cpu", dtype="float32"))


def test_greedy_equals_transformers_generate(llm):
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(str(llm.path), dtype=torch.float32).eval()
    compared = 0
    for p in PROMPTS:
        ids = llm.encode(p)
        out, st = llm.generate_ids(ids, 32)
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False)[0, len(ids):].tolist()
        assert out == ref, p
        compared += len(out)
    assert compared >= 3 * 8


def test_chat_template_is_applied(llm):
    ids = llm.encode("hi")
    text = llm.tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system") and text.rstrip().endswith("<|im_start|>assistant")
    raw = llm.encode("hi", chat=False)
    assert llm.tokenizer.decode(raw) == "hi"


def test_eos_stops_generation(llm):
    r = llm.generate("What is the capital of France? Answer in one word.", max_new_tokens=64)
    assert r.stats.finish_reason == "eos" and r.token_ids[-1] in llm.eos
    assert "Paris" in r.text


def test_fetch_prints_a_transformers_loadable_dir_as_last_line(smollm2_dir):
    import subprocess
    import sys
    from transformers import AutoConfig
    r = subprocess.run([sys.executable, "-m", "quasar.fetch", "smollm2-135m-instruct"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    last = r.stdout.strip().splitlines()[-1]
    assert last == str(smollm2_dir)
    assert AutoConfig.from_pretrained(last).model_type == "llama"
