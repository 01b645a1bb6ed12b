"""The CUDA backend end to end. On the CPU it is built in interpreter mode (TRITON_INTERPRET=1:
device cpu, the same Triton kernels run by Triton's interpreter), so the tiny models run through
every CUDA code path: fp32 logits match transformers (bf16 scheme, rel <= 1e-4) and the CPU
backend for the same quantized weights (rel <= 1e-3). A real-GPU test runs only where CUDA is.
"""
import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():       # CPU machine: the registry's "cuda" is the interpreter
    os.environ["TRITON_INTERPRET"] = "1"   # (set before anything imports triton); on a GPU the
                                           # interpreted copy is built explicitly (kernels(True))

from quasar import backends, quant
from quasar.backends import CONTRACT_METHODS
from quasar.config import KernelConfig, VerifierConfig
from quasar.engine import ModelRunner
from quasar.errors import UnsupportedError
from quasar.model.loader import build_model
from quasar.ops import OPS
from quasar.ops import reference as R
from quasar.quant import rtn
from quasar.quant.format import QActivation
from tiny import load_hf, make_tiny

pytestmark = pytest.mark.slow


INTERP_ONLY = ("CPU twin: on a GPU machine the compiled kernels are tested instead (test_on_a_real_gpu, "
               "tests/test_step_runner.py, tests/test_cross_hardware.py[cuda]); Triton's interpreter "
               "and its compiled kernels cannot share one process (triton 3.6 on the GPU image)")


@pytest.fixture(scope="module")
def cuda_be():
    if torch.cuda.is_available():
        pytest.skip(INTERP_ONLY)
    from quasar.backends.cuda import make_backend
    return make_backend(interpret=True)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def build(path, be, quant=None, max_seq_len=64, draft_scheme=None, **vkw):
    return build_model(Path(path), be, torch.float32, max_seq_len, VerifierConfig(quant=quant, **vkw),
                       draft_scheme=draft_scheme)


def run_steps(model, ids, full_cache: bool = False, mode: str = "verify"):
    """Prefill 9 (Triton attention: T <= 16), one decode, a verify chunk of 6, then prefill-sized
    chunk of 18 (SDPA); kv_len = the chunk's end, or the whole cache (a fixed CUDA-graph grid).
    Each call runs on a fresh KV cache (a new ModelRunner), in `mode`."""
    runner = ModelRunner(model)
    out, t = [], 0
    for size in (9, 1, 6, 18):
        pos = torch.arange(t, t + size).view(1, -1)
        kv = model.max_seq_len if full_cache else t + size
        out.append(runner.step(ids[:, t:t + size], pos, kv, mode=mode)[0])
        t += size
    return torch.cat(out)


def test_backend_declares_every_op_and_runs_on_the_cpu(cuda_be):
    assert cuda_be.name == "cuda" and cuda_be.device == torch.device("cpu") and cuda_be.interpret
    # every op of the contract is a method the cuda backend implements itself (the GEMM: the
    # scheme's kernels for "cuda", through Backend.gemm)
    assert set(OPS) <= set(CONTRACT_METHODS) | {"gemm"} and callable(cuda_be.gemm)
    assert all("cuda" in backends.implementing(op) for op in CONTRACT_METHODS)
    assert callable(cuda_be.synchronize)
    cuda_be.synchronize()
    assert set(cuda_be.dtypes) == {torch.float32, torch.bfloat16, torch.float16}
    assert {"unquantized", "w8a8-int8", "w8a16", "w4a16", "w4a4"} <= set(cuda_be.schemes)


def test_fp8_is_refused_with_a_clear_error(cuda_be):
    assert "w8a8-fp8" not in cuda_be.schemes
    with pytest.raises(UnsupportedError, match=r"w8a8-fp8.*(8\.9|tensor cores).*w8a8-int8"):
        cuda_be.check_scheme("w8a8-fp8")
    with pytest.raises(UnsupportedError, match="fp8"):
        cuda_be.quantize_per_token(torch.randn(2, 32), "fp8")
    with pytest.raises(UnsupportedError):
        cuda_be.prepare_weight("w8a8-fp8", rtn.fp8_per_channel(torch.randn(16, 32)))


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the registry builds the compiled backend")
def test_registry_builds_the_interpreter_backend():
    backends.reset("cuda")
    try:
        be = backends.get("cuda")
        assert be.name == "cuda" and be.device.type == "cpu"
    finally:
        backends.reset("cuda")


def test_gemm_ops_take_tensors_or_prequantized_activations(cuda_be):
    torch.manual_seed(0)
    x = torch.randn(5, 256)
    bias = torch.randn(48)
    for scheme, qw, qtype in [
        ("w8a8-int8", rtn.int8_per_channel(torch.randn(48, 256)), "int8"),
        ("w4a4", rtn.int4(torch.randn(48, 256), -1, hadamard=True), "int4"),
        ("w4a16", rtn.int4(torch.randn(48, 256), 64, symmetric=False, hadamard=True), None),
        ("w8a16", rtn.int8_per_channel(torch.randn(48, 256)), None),
    ]:
        w = cuda_be.prepare_weight(scheme, qw)
        ref = quant.get(scheme).reference_gemm(x, qw, bias)
        y = cuda_be.gemm(scheme, x, w, bias)
        assert y.shape == (5, 48) and rel(y, ref) <= 1e-5, scheme
        if qtype and not qw.hadamard:
            a = cuda_be.rms_norm_quant(x, torch.ones(256), 1e-6, qtype)
            y2 = cuda_be.gemm(scheme, a, w, bias)
            assert torch.equal(y2, quant.get(scheme).reference_gemm(a, qw, bias))
            with pytest.raises(ValueError, match="quantized as"):
                cuda_be.gemm(scheme, cuda_be.quantize_per_token(x, "int4" if qtype == "int8" else "int8"),
                             w, bias)


def test_w4a16_and_w4a4_share_one_packed_weight(cuda_be):
    qw = rtn.int4(torch.randn(32, 256), -1)
    a = cuda_be.prepare_weight("w4a16", qw)
    b = cuda_be.prepare_weight("w4a4", qw)
    assert a is b
    assert cuda_be.prepare_weight("w8a16", rtn.int8_per_channel(torch.randn(8, 256))) is not a


FAMILIES = [("qwen3", dict(head_dim=24)), ("pangu", {}), ("llama", dict(num_key_value_heads=1, tie=True))]


@pytest.mark.parametrize("family,kw", FAMILIES, ids=[f for f, _ in FAMILIES])
def test_bf16_scheme_matches_transformers(tiny_root, cuda_be, family, kw):
    path = make_tiny(tiny_root, family, **kw)
    ids = torch.randint(0, 256, (1, 34), generator=torch.Generator().manual_seed(1))
    ref = load_hf(path)(ids).logits[0]
    model = build(path, cuda_be)
    assert rel(run_steps(model, ids), ref) <= 1e-4
    assert rel(run_steps(model, ids, full_cache=True), ref) <= 1e-4     # a fresh cache


QUANT = [
    ("w8a8-int8", {}),
    ("w4a16", dict(group_size=32, symmetric=True)),
    ("w4a16", dict(group_size=32, symmetric=False)),
    ("w4a4", dict(group_size=-1)),
    ("w8a16", {}),
]


@pytest.mark.parametrize("quant,vkw", QUANT, ids=["w8a8-int8", "w4a16-g32-sym", "w4a16-g32-asym",
                                                  "w4a4", "w8a16"])
def test_quantized_schemes_match_the_cpu_backend(tiny_root, cuda_be, quant, vkw):
    family = "qwen3" if quant != "w4a16" or vkw["symmetric"] else "pangu"
    path = make_tiny(tiny_root, family)
    ids = torch.randint(0, 256, (1, 34), generator=torch.Generator().manual_seed(2))
    got = run_steps(build(path, cuda_be, quant, **vkw), ids, full_cache=True)
    ref = run_steps(build(path, backends.get("cpu"), quant, **vkw), ids)
    assert rel(got, ref) <= 1e-3


def test_qspec_draft_and_verify_share_weights_and_match_cpu(tiny_root, cuda_be):
    path = make_tiny(tiny_root, "qwen3")
    kw = dict(group_size=-1, symmetric=True, hadamard=True)
    mc = build(path, cuda_be, "w4a16", draft_scheme="w4a4", **kw)
    mr = build(path, backends.get("cpu"), "w4a16", draft_scheme="w4a4", **kw)
    lin = mc.layers[0].mlp.down_proj
    assert lin.draft is not None and lin.draft.weight is lin.weight
    ids = torch.randint(0, 256, (1, 34), generator=torch.Generator().manual_seed(3))
    for mode in ("draft", "verify"):
        assert rel(run_steps(mc, ids, mode=mode), run_steps(mr, ids, mode=mode)) <= 1e-3, mode


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (compiled Triton kernels)")
def test_on_a_real_gpu():
    """The compiled kernels vs the reference on the GPU, split where exactness is possible:
    activation quantization (scales equal, codes equal but for +-1 on rare rounding ties), the
    integer GEMMs on the same quantized activation (bit-exact), weight-only GEMMs (rel <= 1e-2 in
    bf16), FP8 (fp32-accumulated up to the tensor cores' accumulator precision)."""
    from quasar.backends.cuda import make_backend
    be = make_backend("cuda", interpret=False)
    assert be.device.type == "cuda" and not be.interpret
    g = torch.Generator().manual_seed(0)
    w8 = rtn.int8_per_channel(torch.randn(384, 512, generator=g)).to("cuda")
    w4 = rtn.int4(torch.randn(384, 512, generator=g), -1).to("cuda")
    w4g = rtn.int4(torch.randn(384, 512, generator=g), 128, symmetric=False).to("cuda")
    for m in (1, 6, 16):
        x = torch.randn(m, 512, generator=g).to("cuda", torch.bfloat16)
        for scheme, qw, qtype in (("w8a8-int8", w8, "int8"), ("w4a4", w4, "int4")):
            # the reference on the CPU: torch's CUDA division by a scalar multiplies by the
            # reciprocal (not IEEE x / y), the Triton kernels and the CPU divide exactly
            got, w = be.quantize_per_token(x, qtype), R.quantize_per_token(x.cpu(), qtype)
            want = QActivation(w.q.cuda(), w.scale.cuda(), qtype, w.dtype)
            assert torch.equal(got.scale, want.scale), (qtype, m)
            diff = (got.q.int() - want.q.int()).abs()
            assert diff.max() <= 1 and (diff > 0).float().mean() < 0.01, (qtype, m)
            y = be.gemm(scheme, want, be.prepare_weight(scheme, qw), None)
            assert torch.equal(y, quant.get(scheme).reference_gemm(want, qw, None)), (scheme, m)
        for scheme, qw in (("w4a16", w4g), ("w8a16", w8)):
            y = be.gemm(scheme, x, be.prepare_weight(scheme, qw), None)
            ref = quant.get(scheme).reference_gemm(x, qw, None)
            assert rel(y, ref) <= 1e-2, (scheme, m)
        if torch.cuda.get_device_capability() >= (8, 9):
            qf = rtn.fp8_per_channel(torch.randn(384, 512, generator=g)).to("cuda")
            # the Triton e4m3 quantization vs torch's cast on the CPU: same scale, same bits but
            # for a value that a one-ulp different quotient moves across a rounding tie
            got, want = be.quantize_per_token(x, "fp8"), R.quantize_per_token(x.cpu(), "fp8")
            assert torch.equal(got.scale.cpu(), want.scale), m
            db = (got.q.cpu().view(torch.uint8).int() - want.q.view(torch.uint8).int()).abs()
            assert db.max() <= 1 and (db > 0).float().mean() < 0.01, m
            af = R.quantize_per_token(x.float(), "fp8")
            bias = torch.randn(384, generator=g).to("cuda")
            y = be.gemm("w8a8-fp8", af, be.prepare_weight("w8a8-fp8", qf), bias)
            # Hopper's FP8 tensor cores accumulate with fewer bits than fp32 (measured on an
            # H100: rel 1.3e-4); an integer GEMM would be exact
            assert rel(y, quant.get("w8a8-fp8").reference_gemm(af, qf, bias)) <= 5e-4, m
    be.synchronize()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (compiled Triton kernels, the PTX "
                    "int4 dequantization); the CPU twin is test_triton_kernels.py::test_gemm_w4a16 (interpreter)")
def test_int4_ptx_dequantization_on_a_real_gpu():
    """The int4 GEMM's PTX dequantization (gemm_int4._chunk_asm / _chunk_asm_i8) against the
    reference and against the same kernel with the pure-Triton dequantization, over every group
    path (per channel, 256, 128, 64, and 32 / 96 whose groups split a chunk), symmetric and
    asymmetric, fp16 and bf16, K a multiple of 256 or not."""
    from quasar.backends.cuda import make_backend
    be = make_backend("cuda", interpret=False)
    g4 = be.kernels.gemm_int4
    g = torch.Generator().manual_seed(1)
    for group, k, sym in ((-1, 512, True), (256, 512, False), (128, 384, True), (128, 512, False),
                          (64, 320, False), (32, 320, True), (96, 576, False)):
        qw = rtn.int4(torch.randn(136, k, generator=g), group, symmetric=sym).to("cuda")
        w = g4.pack_int4(qw)
        for m in (1, 6):
            for dt in (torch.bfloat16, torch.float16):
                x = torch.randn(m, k, generator=g).to("cuda", dt)
                y = g4.gemm_w4a16(x, w)
                assert rel(y, quant.get("w4a16").reference_gemm(x, qw, None)) <= 1e-2, (group, k, sym, m, dt)
                y_pure = g4.gemm_w4a16(x, w, opts=KernelConfig(ptx_dequant=False))
                # same codes, same products: only the accumulation order may differ (none here)
                assert rel(y, y_pure) <= 1e-3, (group, k, sym, m, dt)
            if group == -1:
                a = be.quantize_per_token(x.float(), "int4")
                assert torch.equal(g4.gemm_w4a4(a, w), quant.get("w4a4").reference_gemm(a, qw, None)), (k, m)
    be.synchronize()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (compiled Triton kernels, the PTX "
                    "int8 conversion); the CPU twin is test_triton_kernels.py::test_gemm_w8a16 (interpreter)")
def test_w8a16_ptx_conversion_on_a_real_gpu():
    """w8a16's PTX int8 -> fp16/bf16 conversion (gemm_int8._i8_pairs) against the reference and
    against Triton's own conversion, every code value, K a multiple of 256 or not, with bias."""
    from quasar.backends.cuda import make_backend
    be = make_backend("cuda", interpret=False)
    g8 = be.kernels.gemm_int8
    g = torch.Generator().manual_seed(2)
    for k in (512, 328):
        wf = torch.randn(136, k, generator=g)
        wf[0] = torch.linspace(-1, 1, k)        # row 0 takes every code from -127 to 127
        qw = rtn.int8_per_channel(wf).to("cuda")
        w = g8.pack_int8(qw)
        bias = torch.randn(136, generator=g).to("cuda")
        for m in (1, 6):
            for dt in (torch.bfloat16, torch.float16):
                x = torch.randn(m, k, generator=g).to("cuda", dt)
                y = g8.gemm_w8a16(x, w, bias.to(dt))
                assert rel(y, quant.get("w8a16").reference_gemm(x, qw, bias.to(dt))) <= 1e-2, (k, m, dt)
                y_triton = g8.gemm_w8a16(x, w, bias.to(dt), opts=KernelConfig(ptx_dequant=False))
                assert rel(y, y_triton) <= 1e-3, (k, m, dt)
    be.synchronize()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the L2 prefetch is PTX, which the "
                    "interpreter does not run); its CPU twin is test_triton_compile.py, which compiles the "
                    "GEMMs with it for sm_90")
def test_l2_prefetch_changes_no_result_on_a_real_gpu():
    """The weight prefetch before the PDL wait (kernel option `prefetch`, blocks per program) is a
    hint: with 0, 1 and 2 blocks every GEMM gives bit-identical outputs, including K with fewer
    blocks than the prefetch (the prefetch is then dropped) and split-K."""
    from quasar.backends.cuda import make_backend
    from quasar.ops.triton.tuning import GemmConfig
    be = make_backend("cuda", interpret=False)
    g8, g4, nq = be.kernels.gemm_int8, be.kernels.gemm_int4, be.kernels.norm_quant
    g = torch.Generator().manual_seed(3)
    cfgs = (None, GemmConfig(64, 4, 256, 4, 3))
    for k in (256, 1024):
        wf = torch.randn(200, k, generator=g)
        p8 = g8.pack_int8(rtn.int8_per_channel(wf).to("cuda"))
        p4 = g4.pack_int4(rtn.int4(wf, 128, symmetric=True).to("cuda"))
        dense = wf.to("cuda", torch.bfloat16)
        x = torch.randn(6, k, generator=g).to("cuda", torch.bfloat16)
        a8 = nq.quantize_per_token(x, "int8")
        outs = {}
        for npf in (0, 1, 2):
            opts = KernelConfig(prefetch=npf)
            outs[npf] = [f() for cfg in cfgs for f in (
                lambda: g8.gemm_w8a8_int8(a8, p8, config=cfg, opts=opts),
                lambda: g8.gemm_w8a16(x, p8, config=cfg, opts=opts),
                lambda: g8.gemm_dense_stream(x, dense, config=cfg, opts=opts),
                lambda: g4.gemm_w4a16(x, p4, opts=opts))]
        for npf in (1, 2):
            for i, (a, b) in enumerate(zip(outs[0], outs[npf])):
                assert torch.equal(a, b), (k, npf, i)
    be.synchronize()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (compiled Triton kernels); "
                    "the CPU twin is tests/test_triton_paged.py under the interpreter")
def test_paged_ops_on_a_real_gpu():
    """The compiled paged kernels (rope + KV write through slots, attention through block tables)
    vs the reference on random block tables, ragged lengths, GQA, chunks 1 and 6, bf16."""
    import random

    from quasar.engine.block_manager import BlockManager
    from quasar.engine.context import StepContext
    from quasar.kv.paged import PagedKVCache
    be = backends.get("cuda")
    rng = random.Random(0)
    h, hkv, d, bs = 32, 8, 128, 16
    lens = [700, 33, 1500, 257]
    bm = BlockManager(sum(-(-n // bs) + 1 for n in lens) + 5, bs)
    order = list(bm._free)
    rng.shuffle(order)
    bm._free.clear()
    bm._free.update((i, None) for i in order)
    tables = [bm.allocate([i + 1] * (n + 6), n + 6).blocks for i, n in enumerate(lens)]
    cache = PagedKVCache(1, bm.num_blocks, bs, hkv, d, torch.bfloat16, "cuda")
    cache.k.normal_()
    cache.v.normal_()
    ref = PagedKVCache(1, bm.num_blocks, bs, hkv, d, torch.bfloat16, "cuda")
    ref.k.copy_(cache.k)
    ref.v.copy_(cache.v)
    S = 4096
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, device="cuda").float() / d))
    f = torch.outer(torch.arange(S, device="cuda").float(), inv)
    cos, sin = torch.cat((f, f), -1).cos(), torch.cat((f, f), -1).sin()
    for t in (1, 6):
        ctx = StepContext.build(tables, [(n, t) for n in lens], bs, "cuda")
        qkv = torch.randn(len(lens) * t, (h + 2 * hkv) * d, device="cuda", dtype=torch.bfloat16)
        q = be.paged_rope_kv_write(qkv, None, None, 1e-6, cos, sin, ctx, cache, 0)
        qr = R.paged_rope_kv_write(qkv, None, None, 1e-6, cos, sin, ctx, ref, 0)
        assert rel(q, qr) <= 1e-2 and rel(cache.k, ref.k) <= 1e-2 and torch.equal(cache.v, ref.v)
        o = be.paged_attention(q, cache, 0, ctx)
        assert rel(o, R.paged_attention(q, ref, 0, ctx)) <= 1e-2, t
