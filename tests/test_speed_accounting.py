"""The roofline floor's byte count (quasar.bench.speed.weight_bytes): each linear's codes and scales once."""
import pytest
import torch

from quasar import backends
from quasar.config import VerifierConfig
from quasar.model.loader import build_random_model
from quasar.bench.speed import SHAPES, weight_bytes


def _linears(model):
    a = model.args
    per_layer = [((a.num_heads + 2 * a.num_kv_heads) * a.head_dim, a.hidden_size),
                 (a.hidden_size, a.num_heads * a.head_dim),
                 (2 * a.intermediate_size, a.hidden_size), (a.hidden_size, a.intermediate_size)]
    return per_layer * a.num_layers


def test_weight_bytes_count_each_linear_once():
    be = backends.get("cpu")
    hf = SHAPES["tiny"]
    dense = build_random_model(hf, be, torch.bfloat16, 64, VerifierConfig(quant="bf16"))
    w4 = build_random_model(hf, be, torch.bfloat16, 64, VerifierConfig(quant="w4a16", group_size=-1))
    qspec = build_random_model(hf, be, torch.bfloat16, 64, VerifierConfig(quant="w4a16", group_size=-1),
                               draft_scheme="w4a4")
    a = dense.args
    norms = (2 * a.num_layers + 1) * a.hidden_size * 2
    head = a.vocab_size * a.hidden_size * 2
    assert weight_bytes(dense) == sum(n * k * 2 for n, k in _linears(dense)) + head + norms
    want4 = sum(n * k // 2 + 4 * n for n, k in _linears(w4)) + head + norms
    assert weight_bytes(w4) == want4
    assert weight_bytes(qspec) == want4     # the draft (w4a4) reads the same codes: not twice


@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
@pytest.mark.parametrize("symmetric", [True, False])
def test_weight_bytes_count_group_scales_and_zero_points(group_size, symmetric):
    """Grouped int4: one fp32 scale per output channel and group, plus an fp32 zero point per group
    when asymmetric (what the kernels read); the codes at 4 bits."""
    be = backends.get("cpu")
    hf = SHAPES["tiny"]
    m = build_random_model(hf, be, torch.bfloat16, 64,
                           VerifierConfig(quant="w4a16", group_size=group_size, symmetric=symmetric))
    a = m.args
    norms = (2 * a.num_layers + 1) * a.hidden_size * 2
    head = a.vocab_size * a.hidden_size * 2
    per_group = 4 * (1 if symmetric else 2)
    groups = lambda k: 1 if group_size == -1 else k // group_size  # noqa: E731
    want = sum(n * k // 2 + n * groups(k) * per_group for n, k in _linears(m)) + head + norms
    assert weight_bytes(m) == want
    layer = m.layers[0].mlp.down_proj
    assert layer.group_size == group_size and layer.symmetric == symmetric


def test_time_variants_sets_up_each_variant_per_round_and_keeps_its_logits():
    """The in-process A/B helper of step experiments, on the CPU backend."""
    from quasar.bench.speed import random_step_model, time_variants
    be = backends.get("cpu")
    m = random_step_model(SHAPES["tiny"], be, torch.float32, 64, VerifierConfig(quant="bf16"))
    assert m.cache.k.abs().sum() > 0          # the cache is filled, not zeros
    calls, scale = [], {"a": 1.0, "b": 2.0}
    norm = m.model.norm.clone()

    def setup(name):
        calls.append(name)
        m.model.norm.copy_(norm * scale[name])      # b changes the final norm: different logits

    times, logits = time_variants(m, be, 2, 16, {n: (lambda n=n: setup(n)) for n in "ab"}, iters=1, rounds=2)
    assert calls == ["a", "b", "a", "b"]
    assert set(times) == {"a", "b"} and all(len(v) == 2 and min(v) > 0 for v in times.values())
    assert logits["a"].shape == (1, 2, SHAPES["tiny"]["vocab_size"]) and logits["a"].dtype == torch.float32
    assert not torch.equal(logits["a"], logits["b"]) and m.captured is None
