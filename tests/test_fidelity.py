"""Verifier fidelity on the real model (SmolLM2-135M-Instruct, CPU): RTN-quantized verifiers keep
top-1 agreement with the unquantized model, a structurally pruned verifier does not; QuantSpec's
hierarchical KV cache keeps it too, the verifier's 8-bit view closer than the draft's 4-bit one.

Threshold: 60% top-1 agreement over teacher-forced generated positions. Measured on 24 Spec-Bench
prompts x 32 tokens (BENCHMARKS.md): w8a8-int8 89.7%, w8a16 96.7%, w4a16 g64 70.1%, w8a8-fp8
90.1%, dropping 7 of 30 layers 14.2%. 60% sits below the weakest quantized verifier (w4a16 RTN on
a 135M model, the most fragile case) with margin for the smaller prompt set used here, and far
above the pruned one: the pruned verifier saves 23% of the layers' bytes, w4a16 saves 75%, yet
only quantization keeps the distribution."""
import pytest

from quasar.fidelity import run

THRESHOLD = 0.60
PROMPTS = ["What is the capital of France?", "Write a short poem about autumn leaves.",
           "Explain how a bicycle works in three sentences.", "Translate to French: I like green apples.",
           "Summarize: The quick brown fox jumps over the lazy dog because it wanted to cross.",
           "What is 17 times 3? Explain step by step."]


@pytest.fixture(scope="module")
def rows(smollm2_dir):
    spec = {"schemes": ["w8a8-int8", "w4a16"], "group_size": 64, "prune": 7,
            "kv": ["hierarchical-int4", "hierarchical-int4-upper"], "kv_group_size": 8, "kv_residual": 8}
    out = run("smollm2-135m-instruct", PROMPTS, spec, device="cpu", dtype="float32", n_tokens=16,
              progress=False, own_greedy=False)
    return {("kv-" + r["variant"].split("(")[1].split(":")[0] if r["variant"].startswith("KV")
             else r["variant"].split(" ")[0].rstrip(":")): r for r in out}


def test_quantized_verifiers_keep_top1_agreement(rows):
    for name in ("w8a8-int8", "w4a16"):
        assert rows[name]["top1"] >= THRESHOLD, rows[name]
        # greedy may stop early at EOS (where depends on the machine's BLAS): most positions remain
        assert rows[name]["positions"] >= 6 * 10


def test_pruned_verifier_falls_below_the_threshold(rows):
    pruned = rows["pruned"]
    assert "7/30" in pruned["variant"]
    assert pruned["top1"] < THRESHOLD
    assert pruned["kl"] > 5 * max(rows["w8a8-int8"]["kl"], rows["w4a16"]["kl"])


def test_hierarchical_kv_cache_keeps_the_distribution(rows):
    """QuantSpec's cache (groups of 8 tokens, R = 8, so most positions read quantized blocks): the
    verifier's view (both planes, ~8 bits) is close to the unquantized cache, the draft's (the
    4-bit upper plane) further away, both above the threshold."""
    both, upper = rows["kv-verifier view"], rows["kv-draft view"]
    assert both["top1"] >= THRESHOLD and upper["top1"] >= THRESHOLD
    assert 0 < both["kl"] < upper["kl"]
    assert both["kl"] < rows["w8a8-int8"]["kl"]          # 8-bit KV costs less than 8-bit weights and activations
