"""Every Triton kernel of the CUDA backend against the reference semantics (quasar.ops.reference),
run on the CPU under Triton's interpreter (TRITON_INTERPRET=1, set before triton is imported).

Fresh random inputs; row counts M in {1, 2, 5, 6, 16, 33}; K not a multiple of the kernels' block
sizes; int4 groups 32 / 64 / 128 / per channel, symmetric and asymmetric; split-K on and off.
Outputs are poisoned (NaN / sentinel codes) before each launch, so every element must be written.
Tolerances: fp32 outputs rel <= 1e-5 (integer GEMMs: bit-exact), bf16 rel <= 5e-3 (about one
rounding of the output), fp16 rel <= 1e-3. Quantization codes: identical, except for a +-1
difference on exact ties of the reference's x / scale (fp32 summation order in the norm).
"""
import os

import pytest
import torch

if torch.cuda.is_available():
    pytest.skip("CPU twin: on a GPU machine the compiled kernels are tested instead "
                "(tests/test_cuda_backend.py::test_on_a_real_gpu, tests/test_step_runner.py, "
                "tests/test_cross_hardware.py[cuda]); Triton's interpreter and its compiled kernels "
                "cannot share one process", allow_module_level=True)
os.environ["TRITON_INTERPRET"] = "1"   # before anything imports triton

from quasar import quant
from quasar.config import KernelConfig
from quasar.errors import UnsupportedError
from quasar.kv import KVCache
from quasar.ops import reference as R
from quasar.ops.triton import kernels
from quasar.quant import rtn

KN = kernels(interpret=True)
nq, g8, g4, attn, tuning = KN.norm_quant, KN.gemm_int8, KN.gemm_int4, KN.attention, KN.tuning
rope = KN.rope
GemmConfig = tuning.GemmConfig

pytestmark = pytest.mark.slow
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOL = {torch.float32: 1e-5, torch.bfloat16: 5e-3, torch.float16: 1e-3}
DT_ID = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def gen(seed):
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed=0, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, generator=gen(seed)) * scale).to(dtype)


def poison_qs(m, k, qtype="int8"):
    if qtype == "fp8":
        return (torch.full((m, k), 0x55, dtype=torch.uint8).view(torch.float8_e4m3fn),
                torch.full((m, 1), float("nan")))
    return (torch.full((m, k), -100, dtype=torch.int8), torch.full((m, 1), float("nan")))


def bits(q):
    """Codes as integers: int8 codes, or the uint8 bits of e4m3 codes (adjacent values of one
    sign are adjacent integers)."""
    return q.view(torch.uint8).int() if q.dtype == torch.float8_e4m3fn else q.int()


def assert_codes(act, ref, ref_values):
    """act vs ref QActivation; ref_values: the float tensor the reference quantized."""
    want = torch.float8_e4m3fn if ref.qtype == "fp8" else torch.int8
    assert act.q.dtype == want and act.q.shape == ref.q.shape
    assert act.scale.shape == ref.scale.shape and act.dtype == ref.dtype and act.qtype == ref.qtype
    assert not torch.isnan(act.scale).any()
    assert rel(act.scale, ref.scale) <= 1e-6
    diff = bits(act.q) - bits(ref.q)
    bad = diff != 0
    if bad.any() and ref.qtype == "fp8":   # a scale one ulp apart moves a rare value across a tie
        assert (diff.abs() <= 1).all() and bad.float().mean() < 0.01, int(bad.sum())
    elif bad.any():
        v = ref_values.float() / ref.scale
        tie = ((v - v.floor()) - 0.5).abs() < 1e-3
        assert (diff.abs() <= 1).all(), "codes differ by more than one step"
        assert tie[bad].all(), f"{int(bad.sum())} codes differ away from rounding ties"


# ------------------------------------------------------------------ quantization, norm, silu

@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
@pytest.mark.parametrize("qtype", ["int8", "int4", "fp8"])
def test_quantize_per_token(dtype, qtype):
    for i, (m, k) in enumerate([(1, 200), (2, 200), (5, 1500), (6, 200), (16, 72), (33, 200)]):
        x = randn(m, k, seed=i, dtype=dtype, scale=3.0)
        if m == 5:
            x[2] = 0                                   # a zero row: scale 1e-8, codes 0
            x[3, 7] = 40.0                             # an outlier row
        out = poison_qs(m, k, qtype)
        a = nq.quantize_per_token(x, qtype, out=out)
        ref = R.quantize_per_token(x, qtype)
        assert a.q.data_ptr() == out[0].data_ptr()
        assert torch.equal(bits(a.q), bits(ref.q)) and torch.equal(a.scale, ref.scale)
        assert a.dtype == dtype and a.qtype == qtype


def test_fp8_codes_round_like_torch_everywhere():
    """Scale 1 (amax = 448): every e4m3 binade, the subnormals, exact ties (to even) and values
    that round up into the next binade, both signs, against torch's cast bit for bit."""
    g = torch.Generator().manual_seed(7)
    mags = torch.exp2(torch.empty(3000).uniform_(-12, 8.8, generator=g))
    grid = torch.arange(0, 256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    grid = grid[torch.isfinite(grid) & (grid.abs() <= 448)].abs().unique()
    ties = (grid[:-1] + grid[1:]) / 2                   # halfway between neighbours
    v = torch.cat([torch.tensor([448.0]), mags.clamp(max=448), ties, grid, torch.tensor([0.0])])
    v = torch.cat([v, -v[1:]]).view(1, -1)
    a = nq.quantize_per_token(v, "fp8")
    ref = R.quantize_per_token(v, "fp8")
    assert a.scale.item() == 1.0
    assert torch.equal(bits(a.q), bits(ref.q))


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
def test_rms_norm(dtype):
    for i, (m, k) in enumerate([(1, 200), (6, 1500), (33, 64)]):
        x = randn(m, k, seed=10 + i, dtype=dtype, scale=2.0)
        w = (1 + 0.1 * randn(k, seed=20 + i)).to(dtype)
        out = torch.full((m, k), float("nan"), dtype=dtype)
        y = nq.rms_norm(x, w, 1e-6, out=out)
        ref = R.rms_norm(x, w, 1e-6)
        assert y.dtype == ref.dtype and not torch.isnan(y).any()
        if dtype == torch.float32:
            assert rel(y, ref) <= 1e-6
        else:   # the fp32 math is identical up to the sum order: at most one ulp apart
            assert rel(y, ref) <= TOL[dtype] / 4
    # [B, T, H, D] views of a fused qkv tensor (q_norm / k_norm)
    qkv = randn(2, 3, 7 * 16, seed=5, dtype=dtype)
    q = qkv[..., :4 * 16].view(2, 3, 4, 16)
    w = (1 + 0.1 * randn(16, seed=6)).to(dtype)
    assert rel(nq.rms_norm(q, w, 1e-5), R.rms_norm(q, w, 1e-5)) <= TOL[dtype] / 4


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
@pytest.mark.parametrize("qtype", ["int8", "int4", "fp8"])
def test_rms_norm_quant_matches_unfused(dtype, qtype):
    for i, m in enumerate([1, 2, 5, 6, 16, 33]):
        k = 200 if m != 5 else 1500
        x = randn(m, k, seed=30 + i, dtype=dtype, scale=2.0)
        w = (1 + 0.1 * randn(k, seed=40 + i)).to(dtype)
        a = nq.rms_norm_quant(x, w, 1e-6, qtype, out=poison_qs(m, k, qtype))
        y = R.rms_norm(x, w, 1e-6)
        assert_codes(a, R.quantize_per_token(y, qtype), y)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
@pytest.mark.parametrize("qtype", [None, "int8", "int4", "fp8"])
def test_add_rms_norm(dtype, qtype):
    """The residual add fused into the norm: the sum is exactly torch's x + delta, the norm (and
    its codes) as the unfused reference on that sum; rows longer than one block (K = 1500 under
    the interpreter's 1024 cap) take the multi-pass path."""
    for i, (m, k) in enumerate([(1, 200), (6, 1500), (33, 64)]):
        x = randn(m, k, seed=50 + i, dtype=dtype, scale=2.0)
        d = randn(m, k, seed=60 + i, dtype=dtype, scale=0.7)
        w = (1 + 0.1 * randn(k, seed=70 + i)).to(dtype)
        y, s = nq.add_rms_norm(x, d, w, 1e-6, qtype)
        yr, sr = R.add_rms_norm(x, d, w, 1e-6, qtype)
        assert s.dtype == dtype and torch.equal(s, x + d) and torch.equal(s, sr)
        if qtype is None:
            assert y.dtype == yr.dtype and rel(y, yr) <= (1e-6 if dtype == torch.float32 else TOL[dtype] / 4)
        else:
            assert_codes(y, yr, R.rms_norm(sr, w, 1e-6))
    with pytest.raises(ValueError, match="delta"):
        nq.add_rms_norm(x, d[:1], w, 1e-6)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
def test_silu_mul(dtype):
    for i, (m, i2) in enumerate([(1, 400), (6, 3000), (33, 128)]):
        x = randn(m, i2, seed=50 + i, dtype=dtype, scale=2.0)
        out = torch.full((m, i2 // 2), float("nan"), dtype=dtype)
        y = nq.silu_mul(x, out=out)
        ref = R.silu_mul(x)
        assert not torch.isnan(y).any()
        assert rel(y, ref) <= (1e-6 if dtype == torch.float32 else TOL[dtype] / 4)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
@pytest.mark.parametrize("qtype", ["int8", "int4", "fp8"])
def test_silu_mul_quant_matches_unfused(dtype, qtype):
    for i, m in enumerate([1, 2, 5, 6, 16, 33]):
        i2 = 400 if m != 6 else 3000
        x = randn(m, i2, seed=60 + i, dtype=dtype, scale=2.0)
        a = nq.silu_mul_quant(x, qtype, out=poison_qs(m, i2 // 2, qtype))
        y = R.silu_mul(x)
        assert_codes(a, R.quantize_per_token(y, qtype), y)


# ------------------------------------------------------------------ GEMMs

SPLIT = GemmConfig(bn=32, split_k=2, bk=64, num_warps=1, num_stages=1)
ONE = GemmConfig(bn=64, split_k=1, bk=128, num_warps=1, num_stages=1)


def _gemm_case(n, k, m, dtype, seed, bias=True):
    x = randn(m, k, seed=seed, dtype=dtype)
    b = randn(n, seed=seed + 1, dtype=dtype) if bias else None
    return x, b


def _poison(m, n, dtype):
    return torch.full((m, n), float("nan"), dtype=dtype)


W8A8 = {"int8": (rtn.int8_per_channel, g8.pack_int8, g8.gemm_w8a8_int8, quant.get("w8a8-int8").reference_gemm),
        "fp8": (rtn.fp8_per_channel, g8.pack_fp8, g8.gemm_w8a8_fp8, quant.get("w8a8-fp8").reference_gemm)}


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
@pytest.mark.parametrize("qtype", ["int8", "fp8"])
def test_gemm_w8a8(dtype, qtype):
    """int8: int32 accumulation, bit-exact. fp8 (e4m3 x e4m3, fp32 accumulation): the products
    are exact in fp32, so only the summation order differs from the reference."""
    quantize, pack, gemm, ref_gemm = W8A8[qtype]
    n, k = 40, 200                               # K not a multiple of the 256 pad / the BK
    qw = quantize(randn(n, k, seed=1))
    w = pack(qw)
    assert w.codes.dtype == qw.codes.dtype and w.codes.shape == (n, 256)
    assert (w.codes[:, k:].float() == 0).all()
    for i, m in enumerate([1, 2, 5, 6, 16, 33]):
        x, b = _gemm_case(n, k, m, dtype, 100 + i, bias=i % 2 == 0)
        a = R.quantize_per_token(x, qtype)
        ref = ref_gemm(a, qw, b)
        for cfg in (ONE, SPLIT):
            y = gemm(a, w, b, out=_poison(m, n, dtype), config=cfg)
            assert y.dtype == dtype and not torch.isnan(y).any()
            if qtype == "int8":
                assert torch.equal(y, ref), (m, cfg)
            else:
                assert rel(y, ref) <= (1e-6 if dtype == torch.float32 else TOL[dtype] / 4), (m, cfg)
    if qtype == "fp8":
        with pytest.raises(UnsupportedError, match="e4m3"):
            g8.gemm_w8a8_fp8(R.quantize_per_token(randn(2, k, seed=4), "int8"), w)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
def test_gemm_w8a16(dtype):
    n, k = 40, 200
    qw = rtn.int8_per_channel(randn(n, k, seed=2))
    w = g8.pack_int8(qw)
    for i, m in enumerate([1, 2, 5, 6, 16, 33]):
        x, b = _gemm_case(n, k, m, dtype, 200 + i, bias=i % 2 == 1)
        cfg = SPLIT if i % 2 else ONE
        y = g8.gemm_w8a16(x, w, b, out=_poison(m, n, dtype), config=cfg)
        assert not torch.isnan(y).any()
        assert rel(y, quant.get("w8a16").reference_gemm(x, qw, b)) <= TOL[dtype], (m, cfg)


W4_CASES = [(32, 320), (64, 320), (128, 384), (-1, 264)]   # (group, K): K % 256 != 0


@pytest.mark.parametrize("group,k", W4_CASES, ids=[f"g{g}" for g, _ in W4_CASES])
@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
def test_gemm_w4a16(group, k, sym):
    n = 40
    qw = rtn.int4(randn(n, k, seed=3), group, symmetric=sym)
    w = g4.pack_int4(qw)
    assert torch.equal(g4.unpack_int4(w), qw.codes)
    ms = [1, 2, 5, 6, 16, 33]
    for i, m in enumerate(ms):
        dtype = DTYPES[i % 3]
        x, b = _gemm_case(n, k, m, dtype, 300 + i, bias=i % 2 == 0)
        cfg = SPLIT if i % 2 else ONE
        y = g4.gemm_w4a16(x, w, b, out=_poison(m, n, dtype), config=cfg)
        assert y.dtype == dtype and not torch.isnan(y).any()
        assert rel(y, quant.get("w4a16").reference_gemm(x, qw, b)) <= TOL[dtype], (m, dtype, cfg)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
def test_gemm_w4a4_is_exact(dtype):
    n, k = 40, 264
    qw = rtn.int4(randn(n, k, seed=4), -1, symmetric=True)
    w = g4.pack_int4(qw)
    for i, m in enumerate([1, 2, 5, 6, 16, 33]):
        x, b = _gemm_case(n, k, m, dtype, 400 + i, bias=i % 2 == 0)
        a = R.quantize_per_token(x, "int4")
        cfg = SPLIT if i % 2 else ONE
        y = g4.gemm_w4a4(a, w, b, out=_poison(m, n, dtype), config=cfg)
        assert torch.equal(y, quant.get("w4a4").reference_gemm(a, qw, b)), (m, cfg)


def test_w4a4_refuses_grouped_weights():
    from quasar.errors import UnsupportedError
    qw = rtn.int4(randn(16, 256, seed=5), 128)
    a = R.quantize_per_token(randn(1, 256, seed=6), "int4")
    with pytest.raises(UnsupportedError, match="per-channel"):
        g4.gemm_w4a4(a, g4.pack_int4(qw))


def test_int4_group_size_must_be_a_multiple_of_32():
    from quasar.errors import UnsupportedError
    qw = rtn.int4(randn(16, 96, seed=7), 48)
    with pytest.raises(UnsupportedError, match="multiple of 32"):
        g4.pack_int4(qw)


def test_prefill_sized_gemm_uses_m_tiles():
    """M > 64 adds programs along M (each re-reads the weight tile)."""
    n, k, m = 40, 320, 80
    qw = rtn.int4(randn(n, k, seed=8), 64, symmetric=False)
    x = randn(m, k, seed=9)
    y = g4.gemm_w4a16(x, g4.pack_int4(qw), None, out=_poison(m, n, torch.float32))
    assert rel(y, quant.get("w4a16").reference_gemm(x, qw, None)) <= 1e-5
    qw8 = rtn.int8_per_channel(randn(n, k, seed=10))
    a = R.quantize_per_token(x, "int8")
    assert torch.equal(g8.gemm_w8a8_int8(a, g8.pack_int8(qw8)), quant.get("w8a8-int8").reference_gemm(a, qw8))


def test_tuning_table_roundtrip(tmp_path):
    import json
    p = tmp_path / "t.json"
    p.write_text(json.dumps({"tuned": [{"kind": "int4_a16", "m_bucket": 16, "n": 4096, "k": 4096,
                                        "config": GemmConfig(bn=128, split_k=4).as_dict()}]}))
    try:
        assert tuning.load_table(str(p)) == 1
        assert tuning.pick("int4_a16", 9, 4096, 4096, "cpu") == GemmConfig(bn=128, split_k=4)
    finally:
        tuning.TABLE.clear()
    assert tuning.block_m(1) == 16 and tuning.block_m(17) == 32 and tuning.block_m(64) == 64


def test_shipped_tuning_tables_load_and_launch():
    """Every table in tuned/ loads, names kernels the backend has, covers the Qwen3-8B verify
    shapes (M = 6) and its configs run (here: under the interpreter, on a small slice of K). On
    the CPU no table is loaded by default (they are for the GPU whose name they carry)."""
    import os
    assert tuning.load_default_table("cpu") is None
    d = os.path.join(os.path.dirname(tuning.__file__), "tuned")
    files = sorted(f for f in os.listdir(d) if f.endswith(".json"))
    assert set(tuning.DEFAULT_TABLES.values()) <= set(files)
    for f in files:
        try:
            table = tuning._read(os.path.join(d, f))
            n = len(table)
            assert n >= 4 * 5
            kinds = {key[0] for key in table}
            assert kinds <= set(tuning.KINDS), kinds
            for nk in ((6144, 4096), (4096, 4096), (24576, 4096), (4096, 12288)):
                for kind in ("w8a8_int8", "int4_a16"):
                    assert (kind, 8) + nk in table, (f, kind, nk)
            # a tuned int8 config (BK, split) launched on a smaller K gives the reference result
            cfg = table[("w8a8_int8", 8, 4096, 12288)]
            qw8 = rtn.int8_per_channel(randn(96, 1024, seed=11))
            a = R.quantize_per_token(randn(6, 1024, seed=12), "int8")
            small = GemmConfig(bn=cfg.bn, split_k=cfg.split_k, bk=cfg.bk, num_warps=1, num_stages=1)
            assert torch.equal(g8.gemm_w8a8_int8(a, g8.pack_int8(qw8), config=small), quant.get("w8a8-int8").reference_gemm(a, qw8))
            # a "bf16" entry routes a dense GEMM to the weight-streaming kernel: same product
            for key, cfg in table.items():
                if key[0] == "bf16":
                    wd, xd = randn(96, 1024, seed=13), randn(6, 1024, seed=14)
                    small = GemmConfig(bn=cfg.bn, split_k=cfg.split_k, bk=cfg.bk, num_warps=1, num_stages=1)
                    assert rel(g8.gemm_dense_stream(xd, wd, config=small), xd @ wd.t()) <= 1e-6
                    break
        finally:
            tuning.TABLE.clear()


# ------------------------------------------------------------------ rope + kv write

ROPE = [  # (B, T, H, Hkv, D, starts, norms)
    (1, 1, 4, 2, 16, [40], False),      # decode, no q/k norm (Llama, Pangu)
    (1, 1, 4, 2, 64, [7], True),        # decode with q/k norm (Qwen3)
    (2, 6, 8, 2, 24, [20, 33], True),   # verify chunk, GQA 4, head_dim 24 (not a power of two)
    (2, 6, 6, 6, 32, [0, 50], False),   # MHA, a sequence starting at 0
]


@pytest.mark.parametrize("hb", [None, 1, 2], ids=["hb-all", "hb1-gpu", "hb2"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
@pytest.mark.parametrize("case", range(len(ROPE)))
def test_rope_kv_write(case, dtype, hb):
    from quasar.model.args import ModelArgs
    from quasar.model.decoder import rope_table
    b, t, h, hkv, d, starts, norms = ROPE[case]
    s = 72
    args = ModelArgs(family="qwen3", vocab_size=8, hidden_size=h * d, intermediate_size=8,
                     num_layers=2, num_heads=h, num_kv_heads=hkv, head_dim=d, rope_theta=1e6,
                     rms_norm_eps=1e-6, tie_word_embeddings=False)
    cos, sin = rope_table(args, s, "cpu")
    qkv = randn(b, t, (h + 2 * hkv) * d, seed=case, dtype=dtype, scale=3.0)
    qn = (1 + randn(d, seed=10 + case, scale=0.3)).to(dtype) if norms else None
    kn = (1 + randn(d, seed=20 + case, scale=0.3)).to(dtype) if norms else None
    pos = torch.tensor(starts)[:, None] + torch.arange(t)[None, :]
    got, want = _cache(b, hkv, s, d, dtype, seed=case), _cache(b, hkv, s, d, dtype, seed=case)
    got.k = torch.cat([got.k, got.k.clone()]); got.v = torch.cat([got.v, got.v.clone()])   # 2 layers
    want.k = torch.cat([want.k, want.k.clone()]); want.v = torch.cat([want.v, want.v.clone()])
    q = rope.rope_kv_write(qkv, qn, kn, 1e-6, cos, sin, pos, got, 1, heads_per_program=hb)
    qr = R.rope_kv_write(qkv, qn, kn, 1e-6, cos, sin, pos, want, 1)
    assert q.shape == (b, t, h, d) and q.dtype == qr.dtype == dtype
    assert torch.equal(got.k[0], want.k[0]) and torch.equal(got.v[0], want.v[0])   # layer 0 untouched
    assert torch.equal(got.v, want.v)                                               # v: a plain copy
    written = torch.zeros(b, s, dtype=torch.bool)
    for i in range(b):
        written[i, pos[i]] = True
    untouched = ~written[:, None, :, None].expand_as(got.k[1])
    assert torch.equal(got.k[1][untouched], want.k[1][untouched])
    if norms:   # the mean of squares is summed in another order: last-bit differences only
        assert rel(q, qr) <= TOL[dtype] and rel(got.k[1], want.k[1]) <= TOL[dtype]
    else:       # same operations, same roundings: bit-exact
        assert torch.equal(q, qr) and torch.equal(got.k[1], want.k[1])
    # and the reference is the unfused model code: norms, rope on gathered tables, kv_write
    qs, ks, vs = qkv.view(b, t, h + 2 * hkv, d).split([h, hkv, hkv], dim=2)
    if norms:
        qs, ks = R.rms_norm(qs, qn, 1e-6), R.rms_norm(ks, kn, 1e-6)
    c, sn = cos[pos].to(dtype), sin[pos].to(dtype)
    assert torch.equal(qr, R.rope(qs, c, sn))
    for i in range(b):
        assert torch.equal(want.k[1][i][:, pos[i]], R.rope(ks, c, sn)[i].transpose(0, 1))


def test_rope_kv_write_rejects_bad_shapes():
    cache = _cache(1, 2, 32, 16, torch.float32, seed=0)
    cos = torch.zeros(32, 16)
    with pytest.raises(ValueError, match="head_dim"):
        rope.rope_kv_write(torch.zeros(1, 1, 70), None, None, 1e-6, cos, cos, torch.zeros(1, 1, dtype=torch.long), cache, 0)
    with pytest.raises(ValueError, match="fp32"):
        rope.rope_kv_write(torch.zeros(1, 1, 96), None, None, 1e-6, cos.half(), cos.half(),
                           torch.zeros(1, 1, dtype=torch.long), cache, 0)


# ------------------------------------------------------------------ attention

def _cache(b, hkv, s, d, dtype, seed):
    c = KVCache(1, b, hkv, s, d, dtype, "cpu")
    c.k.copy_(randn(*c.k.shape, seed=seed))
    c.v.copy_(randn(*c.v.shape, seed=seed + 1))
    return c


ATT = [  # (B, T, H, Hkv, D, starts, kv_len ("chunk" = max pos + 1, "full" = S), splits, mask)
    (1, 1, 4, 2, 16, [40], "chunk", 1, False),      # decode
    (1, 1, 4, 2, 16, [40], "full", 3, False),       # decode, fixed grid over the whole cache
    (2, 6, 8, 2, 24, [20, 33], "chunk", 1, False),  # verify chunk, GQA 4, head_dim 24
    (2, 6, 8, 2, 24, [20, 33], "full", 2, False),
    (1, 6, 4, 4, 16, [50], "full", 2, True),        # explicit (tree) mask
    (1, 6, 4, 1, 32, [9], "chunk", 1, True),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
@pytest.mark.parametrize("case", range(len(ATT)))
def test_attention(case, dtype):
    b, t, h, hkv, d, starts, kvl, ns, use_mask = ATT[case]
    s = 72
    cache = _cache(b, hkv, s, d, dtype, seed=case)
    pos = torch.tensor(starts)[:, None] + torch.arange(t)[None, :]
    # stale slots beyond each sequence's chunk (a rejected draft): large keys that would
    # dominate the softmax if they were visible
    for i, st in enumerate(starts):
        cache.k[0, i, :, st + t:] = 30.0
        cache.v[0, i, :, st + t:] = 1e3
    kv_len = int(pos.max()) + 1 if kvl == "chunk" else s
    mask = None
    if use_mask:
        mask = torch.rand(b, t, kv_len, generator=gen(case)) > 0.3
        mask[..., 0] = True
    q = randn(b, t, h, d, seed=100 + case, dtype=dtype)
    out = torch.full_like(q, float("nan"))
    o = attn.attention(q, cache, 0, pos, kv_len, mask, num_splits=ns, out=out)
    assert o.data_ptr() == out.data_ptr() and not torch.isnan(o).any()
    # the reference in fp32 on the same (rounded) inputs isolates the kernel's own error
    c32 = KVCache(1, b, hkv, s, d, torch.float32, "cpu")
    c32.k.copy_(cache.k.float())
    c32.v.copy_(cache.v.float())
    ref = R.attention(q.float(), c32, 0, pos, kv_len, mask)
    assert rel(o, ref) <= {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    # kv_len beyond the chunk changes nothing (positions decide what is visible)
    if kvl == "chunk" and mask is None and dtype == torch.float32:
        o2 = attn.attention(q, cache, 0, pos, s, None, num_splits=2)
        assert rel(o2, o) <= 1e-6


def test_early_loads_change_no_result():
    """Loads moved before the PDL wait (the GEMM's first weight block, attention's first K/V block
    at the slots below the chunk) give the same bits as the kernels without them."""
    common = KN._common
    g = gen(5)
    qw = rtn.int8_per_channel(torch.randn(96, 1024, generator=g))
    p8 = g8.pack_int8(qw)
    x = torch.randn(3, 1024, generator=g)
    a = R.quantize_per_token(x, "int8")
    cache = _cache(1, 2, 72, 16, torch.float32, seed=5)
    q = randn(1, 6, 4, 16, seed=6)
    pos = torch.arange(40, 46).view(1, -1)
    outs = {}
    # every kind of kernel that has early loads (gemm_q: the 8-bit GEMMs; attention), the kernel
    # option early_loads on or off (float-activation GEMMs never load early: _common.EARLY_KINDS)
    assert common.early_loads("gemm_q", KernelConfig()) and not common.early_loads("gemm_f", KernelConfig())
    for early in (True, False):
        opts = KernelConfig(early_loads=early)
        outs[early] = (g8.gemm_w8a8_int8(a, p8, config=tuning.GemmConfig(32, 4, 256, 4, 2), opts=opts),
                       g8.gemm_w8a8_int8(a, p8, config=tuning.GemmConfig(32, 8, 256, 4, 2), opts=opts),
                       attn.attention(q, cache, 0, pos, 72, num_splits=3, opts=opts),
                       attn.attention(q, cache, 0, pos, 46, num_splits=1, opts=opts))
    for got, want in zip(outs[True], outs[False]):
        assert torch.equal(got, want)


def test_attention_supports_and_limits():
    cache = _cache(1, 2, 32, 16, torch.float32, seed=0)
    assert attn.supports(torch.zeros(1, 16, 4, 16), cache)
    assert not attn.supports(torch.zeros(1, 17, 4, 16), cache)       # prefill: SDPA
