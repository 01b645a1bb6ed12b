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
                         "drafter": drafter}))
    taus = []
    for p, ref in zip(PROMPTS, ar_outputs[quant]):
        out, st = llm.generate_ids(llm.encode(p), N)
        assert out == ref
        taus.append(st.tau)
    assert max(taus) > 1.0      # drafts were accepted, so a wrong acceptance would show
