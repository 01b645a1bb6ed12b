"""Captured step execution. On a GPU: CUDA-graph replay gives the same tokens as eager execution.
Its CPU twin: the static-buffer step function (whole-cache attention, visibility from positions,
exactly what a graph replays) matches the plain forward."""
import gc
import weakref

import pytest
import torch

from quasar import backends
from quasar.backends.cuda_graphs import StaticStepRunner
from quasar.config import VerifierConfig
from quasar.engine import ModelRunner
from quasar.model.loader import build_model
from quasar.spec_decode.drafter import Drafter
from quasar.spec_decode.ngram import NgramDrafter
from quasar.spec_decode.quantized_self import QuantizedSelfDrafter
from quasar.spec_decode.sampling import SamplingParams
from quasar.spec_decode.scheduler import Scheduler
from tiny import make_tiny

G = SamplingParams()


def prompt(seed=0):
    g = torch.Generator().manual_seed(seed)
    phrase = torch.randint(0, 200, (7,), generator=g).tolist()
    return phrase * 5


def build(path, device, dtype, quant=None, draft=None, **kw):
    """A ModelRunner (eager: no capture) over the model."""
    m = build_model(path, backends.get(device), dtype, 128, VerifierConfig(quant=quant, **kw), draft_scheme=draft)
    return ModelRunner(m, graphs=False)


@pytest.mark.parametrize("quant,draft,kw", [(None, None, {}), ("w8a8-int8", None, {}),
                                            ("w4a16", "w4a4", {"group_size": -1})])
def test_static_step_runner_matches_plain_forward(tiny_root, quant, draft, kw):
    path = make_tiny(tiny_root, "qwen3", seed=3)
    m = build(path, "cpu", torch.float32, quant, draft, **kw)
    k = 4
    drafter = (QuantizedSelfDrafter(m, G) if draft else NgramDrafter("cpu", 1, 3))
    ref, st_ref = Scheduler(m, drafter, G, k, set()).generate(prompt(), 30)
    m.captured = StaticStepRunner(m.model, m.cache, list(range(1, k + 2)), ("verify", "draft") if draft else ("verify",))
    out, st = Scheduler(m, drafter, G, k, set()).generate(prompt(), 30)
    assert out == ref and st.steps == st_ref.steps
    # and logits of one chunk, static path vs plain
    ids = torch.tensor([prompt()[:5]])
    pos = torch.arange(40, 45).view(1, -1)
    m.captured = None
    plain = m.step(ids, pos, kv_len=45).clone()
    m.captured = StaticStepRunner(m.model, m.cache, [5])
    assert torch.allclose(m.step(ids, pos, kv_len=45), plain, atol=1e-5, rtol=1e-5)


def test_a_dropped_model_with_a_runner_is_freed_without_the_cyclic_gc(tiny_root):
    """The runner wraps the model; the model must not own the runner back. A cycle there is freed
    only by the cyclic GC, at a moment nobody chooses: on a GPU, possibly in the middle of the
    next model's graph capture, whose stream capture it then invalidates."""
    path = make_tiny(tiny_root, "qwen3", seed=3)
    r = build(path, "cpu", torch.float32)
    r.captured = StaticStepRunner(r.model, r.cache, [1, 2])
    ref, cache_ref = weakref.ref(r.model), weakref.ref(r.cache)
    assert not any(v is r or v is r.captured for v in vars(r.model).values())
    enabled = gc.isenabled()
    gc.disable()
    try:
        del r
        assert ref() is None and cache_ref() is None
    finally:
        if enabled:
            gc.enable()


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CUDA graphs, compiled Triton)")


@gpu
@pytest.mark.parametrize("quant,draft,kw", [("bf16", None, {}), ("w8a8-int8", None, {}),
                                            ("w4a16", "w4a4", {"group_size": -1, "hadamard": True})])
def test_cuda_graph_replay_gives_the_same_tokens_as_eager(tiny_root, quant, draft, kw):
    from quasar.backends.cuda_graphs import GraphRunner
    path = make_tiny(tiny_root, "qwen3", seed=5, hidden_size=128, intermediate_size=256, head_dim=32)
    m = build(path, "cuda", torch.bfloat16, quant, draft, **kw)
    k = 4
    mk = lambda: QuantizedSelfDrafter(m, G) if draft else NgramDrafter(m.device, 1, 3)  # noqa: E731
    eager, st_e = Scheduler(m, mk(), G, k, set()).generate(prompt(1), 40)
    m.captured = GraphRunner(m.model, m.cache, list(range(1, k + 2)), ("verify", "draft") if draft else ("verify",))
    graphed, st_g = Scheduler(m, mk(), G, k, set()).generate(prompt(1), 40)
    assert graphed == eager and st_g.steps == st_e.steps


@gpu
def test_capture_is_not_invalidated_by_a_collection_of_another_models_graphs(tiny_root):
    """Regression (seen once in the step benchmark: cudaErrorStreamCaptureInvalidated): a dead
    reference cycle holds a model with captured graphs, and an automatic collection runs in the
    middle of the next capture (a hook collects whenever the GC is enabled, as Python's
    allocation-triggered collections would). Freeing a graph while a stream captures invalidates
    the capture; the runner collects before capturing and keeps the GC off during it."""
    from quasar.backends.cuda_graphs import GraphRunner
    path = make_tiny(tiny_root, "qwen3", seed=5, hidden_size=128, intermediate_size=256, head_dim=32)
    old = build(path, "cuda", torch.bfloat16)
    old.captured = GraphRunner(old.model, old.cache, [1, 2])
    junk = [old]
    junk.append(junk)                  # a dead cycle holding the old graphs
    del old, junk
    m = build(path, "cuda", torch.bfloat16)

    def collect_mid_capture(*_):
        if torch.cuda.is_current_stream_capturing() and gc.isenabled():
            gc.collect()
    hook = m.model.layers[0].register_forward_pre_hook(collect_mid_capture)
    try:
        m.captured = GraphRunner(m.model, m.cache, [1, 2])
    finally:
        hook.remove()
    ids = torch.tensor([[5, 6]], device="cuda")
    pos = torch.tensor([[0, 1]], device="cuda")
    graphed = m.step(ids, pos, 2).clone()
    m.captured = None
    eager = m.step(ids, pos, 2)
    assert torch.equal(graphed.argmax(-1), eager.argmax(-1))
    assert torch.allclose(graphed.float(), eager.float(), atol=3e-2, rtol=3e-2)


@gpu
@pytest.mark.parametrize("quant,kw", [("bf16", {}), ("w8a8-int8", {}), ("w4a16", {"group_size": 32}),
                                      ("w4a16", {"group_size": 32, "symmetric": False}), ("w8a16", {}),
                                      ("w8a8-fp8", {}), ("w4a4", {"group_size": -1, "hadamard": True})])
def test_gpu_schemes_match_the_cpu_reference(tiny_root, quant, kw):
    """bf16 logits on the GPU vs the CPU reference of the same scheme in fp32 (the scheme's exact
    math): no further from it than 2% or 1.5x the CPU reference's own bf16 error, whichever is
    larger (FP8's 3-bit mantissa turns bf16 rounding differences into whole-code flips)."""
    if quant == "w8a8-fp8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 needs compute capability >= 8.9")
    path = make_tiny(tiny_root, "llama", seed=6, hidden_size=128, intermediate_size=256)
    g = build(path, "cuda", torch.bfloat16, quant, **kw)
    c = build(path, "cpu", torch.bfloat16, quant, **kw)
    t = build(path, "cpu", torch.float32, quant, **kw)
    ids = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(24).view(1, -1)
    d_ids, d_pos = ids[:, :1] * 0 + 7, torch.tensor([[24]])
    lt, dt = t(ids, pos, 24), t(d_ids, d_pos, 25)
    lc, dc = c(ids, pos, 24), c(d_ids, d_pos, 25)
    lg = g(ids.cuda(), pos.cuda(), 24).cpu()
    dg = g(d_ids.cuda(), d_pos.cuda(), 25).cpu()      # decode through the Triton attention
    for got, cpu, truth in ((lg, lc, lt), (dg, dc, dt)):
        err = ((got.float() - truth).norm() / truth.norm()).item()
        bound = max(2e-2, 1.5 * ((cpu.float() - truth).norm() / truth.norm()).item())
        assert err <= bound, (quant, err, bound)


@gpu
def test_greedy_agreement_bf16_spec_vs_ar_on_gpu_is_reported(tiny_root):
    """bf16 chunks and single rows round differently: agreement is a measured figure, but on a
    tiny model the first tokens must agree."""
    path = make_tiny(tiny_root, "qwen3", seed=8, hidden_size=128, intermediate_size=256, head_dim=32)
    m = build(path, "cuda", torch.bfloat16, "w8a8-int8")
    ar, _ = Scheduler(m, Drafter(), G, 0, set()).generate(prompt(2), 24)
    sp, _ = Scheduler(m, NgramDrafter(m.device, 1, 3), G, 4, set()).generate(prompt(2), 24)
    assert ar[:4] == sp[:4]


@gpu
def test_dense_gemms_routed_by_a_tuned_table_match_cublas(tiny_root, monkeypatch):
    """Where a tuned table has a "bf16" entry, the CUDA backend runs a dense few-row GEMM on the
    weight-streaming Triton kernel instead of cuBLAS: the logits stay those of cuBLAS (bf16
    rounding and summation order aside), also when replayed from a CUDA graph."""
    from quasar.backends.cuda_graphs import GraphRunner
    path = make_tiny(tiny_root, "qwen3", seed=9, hidden_size=256, intermediate_size=512, head_dim=32)
    m = build(path, "cuda", torch.bfloat16, "bf16")
    be = m.backend
    g8, tuning = be.kernels.gemm_int8, be.kernels.tuning
    ids = torch.randint(0, 256, (1, 6), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    pos = torch.arange(20, 26, device="cuda").view(1, -1)
    ref = m(ids, pos, 26).float()
    calls = []
    real = g8.gemm_dense_stream
    monkeypatch.setattr(g8, "gemm_dense_stream", lambda *a, **k: calls.append(a[1].shape) or real(*a, **k))
    from quasar.quant import QuantLinear
    shapes = {tuple(q.weight.shape) for q in m.model.modules() if isinstance(q, QuantLinear)}
    added = [("bf16", tuning.m_bucket(6), n, k) for (n, k) in shapes if k % 256 == 0]
    assert added
    for key in added:
        tuning.TABLE[key] = tuning.GemmConfig(bn=64, split_k=2, bk=256)
    try:
        got = m(ids, pos, 26).float()
        assert calls, "no dense GEMM took the streaming kernel"
        err = ((got - ref).norm() / ref.norm()).item()
        assert err < 2e-2, err
        assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.8
        m.captured = GraphRunner(m.model, m.cache, [6])
        graphed = m.step(ids, pos, 26).float()
        assert ((graphed - ref).norm() / ref.norm()).item() < 2e-2
    finally:
        for key in added:
            tuning.TABLE.pop(key, None)
