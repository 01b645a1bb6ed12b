"""QuantSpec on the batched runtime (issue 19), on tiny random models (CPU reference backend):

- greedy output at batch 8 with chunked prefill equals greedy autoregressive decoding of the
  verifier on the same hierarchical cache, each sequence alone, for every drafter: QuantSpec's
  draft (the same model on the 4-bit upper plane, W4A16 weights), n-gram drafts, and Quasar +
  QuantSpec (a W8A8 verifier); blocks of 8 tokens and R = 8, so the buffer flushes many times;
- the flush keeps every token readable at every step (pool slots and codes where the next
  queries look), and the pool is returned in full at the end; preemption frees pool slots too;
- the hierarchical cache is not the dense one: outputs differ somewhere (the comparison above
  could fail), and the draft's view differs from the verifier's;
- configuration errors name the key and the fix; the NPU backend refuses the representation
  with the alternative.
"""
from __future__ import annotations

import pytest
import torch

from tiny import make_tiny
from quasar import backends, kv
from quasar.config import ConfigError, VerifierConfig, from_dict
from quasar.engine.engine import Engine
from quasar.engine.model_runner import ModelRunner
from quasar.engine.sequence import Sequence, StopConditions
from quasar.errors import UnsupportedError
from quasar.kv.hierarchical import quantized_blocks
from quasar.model.loader import build_model
from quasar.spec_decode.drafter import Drafter
from quasar.spec_decode.ngram import NgramDrafter
from quasar.spec_decode.quantized_self import QuantizedSelfDrafter
from quasar.spec_decode.sampling import SamplingParams

S = 160
G, RES = 8, 8


@pytest.fixture(scope="module")
def target(tiny_root):
    return make_tiny(tiny_root, "qwen3", seed=3)


def prompts(seed=1, lengths=(5, 17, 33, 9, 40, 3, 21, 12)):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        x = torch.randint(0, 256, (n,), generator=g).tolist()
        out.append(x + x[:8])
    return out


def model(path, quant=None, draft="w4a16", be="cpu"):
    b = backends.get(be) if isinstance(be, str) else be
    return build_model(path, b, torch.float32, S, VerifierConfig(quant=quant), draft_scheme=draft)


def layout(view="upper", blocks=256):
    return kv.Layout("hierarchical-int4", G, RES, G, view, blocks)


def engine(m, drafter="none", k=4, blocks=256, view="upper", checker=None, **kw):
    r = ModelRunner(m, kv_blocks=blocks, block_size=G, layout=layout(view, blocks))
    d = {"none": lambda: Drafter(), "ngram": lambda: NgramDrafter(m.device, 1, 3),
         "quantized_self": lambda: QuantizedSelfDrafter(r, SamplingParams())}[drafter]()
    kw.setdefault("max_batch_size", 8)
    kw.setdefault("max_prefill_tokens", 20)
    return Engine(r, d, 0 if drafter == "none" else k, prefix_caching=False, **kw)


def run(e, ps, n=30, on_step=None):
    seqs = [Sequence(p, stop=StopConditions(n)) for p in ps]
    for s in seqs:
        e.add(s)
    while e.has_work:
        e.step()
        if on_step:
            on_step(e)
    e.check()
    return [s.output_ids for s in seqs], seqs


def alone(m, ps, n=30):
    return [run(engine(m, "none", max_batch_size=1), [p], n)[0][0] for p in ps]


@pytest.mark.parametrize("quant,drafter", [(None, "quantized_self"), (None, "ngram"), ("w8a8-int8", "quantized_self")],
                         ids=["quantspec", "ngram", "quasar+quantspec"])
def test_greedy_at_batch_8_equals_the_verifiers_own_greedy_alone(target, quant, drafter):
    m = model(target, quant)
    ps = prompts()
    want = alone(m, ps)
    e = engine(m, drafter)
    got, seqs = run(e, ps)
    assert got == want
    assert sum(s.stats.accepted for s in seqs) > 0          # drafts were accepted
    cache = e.runner.cache
    assert len(cache._fp) == 1 and not cache._dirty           # only the scratch block holds a pool slot


def test_the_hierarchical_cache_is_not_the_dense_cache(target):
    """The parity above compares the hierarchical verifier with itself; here it differs from the
    dense-cache model somewhere, so that comparison would catch a cache silently left dense."""
    m = model(target)
    ps = prompts()
    hier = alone(m, ps)
    dense_runner = ModelRunner(m, kv_blocks=256, block_size=G)
    dense, _ = run(Engine(dense_runner, Drafter(), 0, max_batch_size=8, max_prefill_tokens=20), ps)
    assert dense != hier
    same = sum(a == b for x, y in zip(dense, hier) for a, b in zip(x, y))
    assert same > 0.5 * sum(map(len, dense))                 # ... but it is an approximation of it


def test_flush_keeps_every_token_readable_at_every_step(target):
    """After each step, for every running sequence whose next query sits at position p: blocks
    m < quantized_blocks(p) hold final codes (not written since quantized) and every later block
    holds a pool slot; preemptions (a tiny block budget) return their pool slots."""
    m = model(target)
    ps = prompts(2)
    checked = []

    def check(e):
        cache = e.runner.cache
        for s in e.sched.running:
            if s.prefilling:
                continue
            p = s.num_computed                      # the next step's first query position
            table = s.table.blocks
            nq = quantized_blocks(p, G, RES)
            for mb in range(min(nq, len(table))):
                assert table[mb] not in cache._dirty
            for mb in range(nq, -(-p // G)):
                assert int(cache.fp_index[table[mb]]) >= 0
            held = sum(1 for blk in table if int(cache.fp_index[blk]) >= 0)
            assert held <= -(-(RES + e.k + 1) // G) + 2
            checked.append(p)

    want = alone(m, ps, 40)
    e = engine(m, "quantized_self", blocks=26, max_batch_size=4)
    got, _ = run(e, ps, 40, check)
    assert got == want
    assert e.sched.preemptions > 0 and max(checked) > 4 * G
    assert len(e.runner.cache._fp) == 1


def test_draft_view_reads_the_upper_plane_only(target):
    """The draft steps of QuantSpec (view upper) and of a draft on both planes (view full) are
    different models: the same verifier output, different acceptance."""
    m = model(target)
    ps = prompts(3)
    outs, acc = [], []
    for view in ("upper", "full"):
        got, seqs = run(engine(m, "quantized_self", view=view), ps)
        outs.append(got)
        acc.append([s.stats.accepted for s in seqs])
    assert outs[0] == outs[1]
    assert acc[0] != acc[1]


# ------------------------------------------------------------------ configuration and backends

def test_config_names_the_problem():
    cfg = from_dict({"kv_cache": {"representation": "bf16"}})
    assert cfg.kv_cache.representation == "dense"
    with pytest.raises(ConfigError, match="hierarchical-int4"):
        from_dict({"kv_cache": {"representation": "hierarchical-int8"}})
    with pytest.raises(ConfigError, match="residual"):
        from_dict({"kv_cache": {"residual": 64}})
    with pytest.raises(ConfigError, match="drafter.kv: upper .* needs"):
        from_dict({"drafter": {"method": "quantized_self", "kv": "upper"}})
    ok = from_dict({"kv_cache": {"representation": "hierarchical-int4", "group_size": 64},
                    "drafter": {"method": "quantized_self", "kv": "upper", "scheme": "w4a16"}})
    lay = kv.Layout.from_config(ok, 5)
    assert lay.block_size == 64 and lay.draft_view == "upper" and not lay.prefix_caching


def test_odd_value_groups_are_refused_with_the_fix(target):
    with pytest.raises(ValueError, match="does not divide head_dim 16"):
        kv.HierarchicalKVCache(1, 4, 8, 2, 16, torch.float32, "cpu", 8, 4, value_group=6)


def test_npu_refuses_the_representation_naming_the_alternative():
    from npu_emulation import emulated_torch_npu
    with emulated_torch_npu():
        be = backends.get("npu")
        with pytest.raises(UnsupportedError, match="representation: dense"):
            be.check_kv("hierarchical-int4")
        be.check_kv("dense")
