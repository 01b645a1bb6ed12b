"""The Ascend NPU backend (backends/npu.py) against the oracles, on the torch_npu emulation.

By default every test runs on ``tests/npu_emulation`` (a fake torch_npu implementing the documented
semantics of each op on the CPU), put into ``sys.modules`` for that test only. On an Ascend machine,
``QUASAR_NPU_REAL=1 pytest -q tests/test_npu_backend.py`` runs the same tests on the real torch_npu
and device instead (docs/ascend.md): the op-level "documented behaviour" tests then check the
documentation itself (nibble order, mask polarity, the limits) on hardware.

- each op vs quasar.ops.reference (fp32: the composed path, tight; bf16/fp16: the kernels);
- each scheme's GEMM vs float64 dequantize-then-matmul;
- end to end on tiny models: fp32 logits == transformers (bf16 scheme, rel <= 1e-4) and == the CPU
  backend (w8a8-int8, w8a16, w4a16, the same quantized weights); bf16 no worse than the CPU
  reference's own bf16 error; speculative (n-gram) == autoregressive greedy;
- one test per documented constraint showing the backend respects it (group size not a multiple of
  32, K / N above 65535, int4 nibble order, mask polarity, dtype rules), w4a4 / fp8 errors, and the
  error when torch_npu is missing.
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest
import torch

from npu_emulation import emulated_torch_npu, torch_npu_missing, use_real_torch_npu
from quasar import backends, quant
from quasar.engine import ModelRunner
from quasar.errors import UnsupportedError
from quasar.kv import KVCache
from quasar.ops import reference as ref
from quasar.quant import rtn
from quasar.quant.format import QActivation, QuantizedWeight
from quasar.spec_decode.drafter import Drafter
from quasar.spec_decode.ngram import NgramDrafter
from quasar.spec_decode.sampling import SamplingParams
from quasar.spec_decode.scheduler import Scheduler
from tiny import load_hf, load_quasar, make_tiny

REAL = use_real_torch_npu()
GREEDY = SamplingParams()
HALF = [torch.bfloat16, torch.float16]
ALL = [torch.float32, torch.bfloat16, torch.float16]
ERRORS = (RuntimeError, ValueError, TypeError)      # what a rejected torch_npu call raises


@pytest.fixture(autouse=True)
def _one_thread():
    """The emulation runs tiny CPU kernels: one thread avoids OpenMP oversubscription stalls on a
    loaded machine (restored afterwards)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def npu():
    """The npu Backend: on the emulation (default) or, with QUASAR_NPU_REAL=1, on real torch_npu."""
    if REAL:
        try:
            import torch_npu  # noqa: F401
        except Exception as e:  # pragma: no cover - real hardware only
            pytest.fail(f"QUASAR_NPU_REAL=1 but torch_npu does not import: {e}")
        hf32 = torch_npu.npu.matmul.allow_hf32
        torch_npu.npu.matmul.allow_hf32 = False      # the default; fp32 parity needs true fp32 matmuls
        backends.reset("npu")
        yield backends.get("npu")
        backends.reset("npu")
        torch_npu.npu.matmul.allow_hf32 = hf32
    else:
        with emulated_torch_npu():
            yield backends.get("npu")


@pytest.fixture
def tnpu(npu):
    return sys.modules["torch_npu"]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().cpu().double(), b.detach().cpu().double()
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def tol(dtype) -> float:
    """Relative error allowed for one op in `dtype` (a few rounding steps of its epsilon)."""
    return {torch.float32: 1e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}[dtype]


# ================================================================== elementwise ops vs reference

@pytest.mark.parametrize("dtype", ALL)
@pytest.mark.parametrize("shape", [(7, 64), (2, 5, 4, 16)])          # hidden rows; q_norm [B, T, H, D]
def test_rms_norm(npu, dtype, shape):
    x = torch.randn(*shape, generator=gen(0)) * 3
    w = 1 + 0.1 * torch.randn(shape[-1], generator=gen(1))
    want = ref.rms_norm(x.to(dtype), w.to(dtype), 1e-6)
    got = npu.rms_norm(x.to(npu.device, dtype), w.to(npu.device, dtype), 1e-6)
    assert got.dtype == dtype and got.shape == want.shape
    assert rel(got, want) <= tol(dtype)


@pytest.mark.parametrize("dtype", ALL)
@pytest.mark.parametrize("b,t,h,d", [(1, 9, 4, 16), (2, 1, 2, 128), (1, 6, 8, 64)])
def test_rope_is_rotate_half(npu, dtype, b, t, h, d):
    x = torch.randn(b, t, h, d, generator=gen(2))
    ang = torch.rand(b, t, d // 2, generator=gen(3)) * 6
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    want = ref.rope(x.to(dtype), cos.to(dtype), sin.to(dtype))
    got = npu.rope(x.to(npu.device, dtype), cos.to(npu.device, dtype), sin.to(npu.device, dtype))
    assert got.shape == (b, t, h, d) and got.dtype == dtype
    assert rel(got, want) <= tol(dtype)


@pytest.mark.parametrize("dtype", ALL)
def test_silu_mul_gate_is_the_first_half(npu, dtype):
    x = torch.randn(5, 2 * 48, generator=gen(4)) * 2
    got = npu.silu_mul(x.to(npu.device, dtype))
    assert got.shape == (5, 48)
    assert rel(got, ref.silu_mul(x.to(dtype))) <= tol(dtype)
    assert rel(got, ref.silu_mul(x.flip(-1).to(dtype))) > 0.1     # the other order is wrong


@pytest.mark.parametrize("dtype", ALL)
def test_quantize_per_token_int8(npu, dtype):
    x = torch.randn(6, 64, generator=gen(5)) * torch.logspace(-2, 1, 6)[:, None]
    x[3] = 0                                                     # an all-zero row
    a = npu.quantize_per_token(x.to(npu.device, dtype), "int8")
    r = ref.quantize_per_token(x.to(dtype), "int8")
    assert a.q.dtype == torch.int8 and a.q.shape == (6, 64) and a.scale.shape == (6, 1)
    assert a.scale.dtype == torch.float32 and a.qtype == "int8" and a.dtype == dtype
    assert (a.q.cpu().int() - r.q.int()).abs().max() <= 1          # rounding ties may differ on hardware
    deq, want = a.q.cpu().float() * a.scale.cpu(), r.q.float() * r.scale
    assert (deq - want).abs().max() <= (r.scale.max() * 1.01).item()
    zero_row = a.q.cpu()[3].float() * a.scale.cpu()[3]
    assert torch.all(zero_row == 0)                               # an all-zero row dequantizes to 0


@pytest.mark.parametrize("dtype", ALL)
def test_fused_norm_quant_and_silu_quant(npu, dtype):
    x = torch.randn(4, 64, generator=gen(6))
    w = 1 + 0.1 * torch.randn(64, generator=gen(7))
    a = npu.rms_norm_quant(x.to(npu.device, dtype), w.to(npu.device, dtype), 1e-6, "int8")
    r = ref.rms_norm_quant(x.to(dtype), w.to(dtype), 1e-6, "int8")
    assert rel(a.q.cpu().float() * a.scale.cpu(), r.q.float() * r.scale) <= 2e-2
    a = npu.silu_mul_quant(x.to(npu.device, dtype), "int8")
    r = ref.silu_mul_quant(x.to(dtype), "int8")
    assert rel(a.q.cpu().float() * a.scale.cpu(), r.q.float() * r.scale) <= 2e-2


def test_kv_write_scatters_to_positions(npu):
    cache = KVCache(2, 2, 2, 16, 8, torch.bfloat16, npu.device)
    k, v = torch.randn(2, 3, 2, 8, generator=gen(8)), torch.randn(2, 3, 2, 8, generator=gen(9))
    pos = torch.tensor([[4, 5, 6], [0, 1, 2]])
    npu.kv_write(cache, 1, k.to(npu.device), v.to(npu.device), pos.to(npu.device))
    ck = cache.k.cpu().float()
    assert torch.equal(ck[1, 0, :, 4:7].transpose(0, 1), k[0].bfloat16().float())
    assert torch.equal(ck[1, 1, :, 0:3].transpose(0, 1), k[1].bfloat16().float())
    assert ck[0].abs().sum() == 0 and ck[1, 0, :, :4].abs().sum() == 0


# ====================================================================================== attention

def _cache_with(b, hkv, s, d, dtype, device, seed=10):
    cache = KVCache(1, b, hkv, s, d, dtype, device)
    g = gen(seed)
    cache.k[0].copy_(torch.randn(b, hkv, s, d, generator=g).to(dtype))   # stale junk everywhere
    cache.v[0].copy_(torch.randn(b, hkv, s, d, generator=g).to(dtype))
    return cache


ATTN = [  # (B, T, H, Hkv, D, start): prefill, one-token decode, a k+1 verify chunk, GQA 4:1
    (1, 37, 4, 2, 16, 0), (1, 1, 4, 2, 16, 20), (2, 6, 4, 1, 64, 11), (1, 6, 8, 2, 128, 30),
    (1, 6, 4, 2, 24, 9),   # head_dim not 16-aligned (the backend zero-pads for the kernel)
]


@pytest.mark.parametrize("dtype", ALL)
@pytest.mark.parametrize("b,t,h,hkv,d,start", ATTN)
def test_attention_prefill_decode_verify(npu, dtype, b, t, h, hkv, d, start):
    s = 64
    cache = _cache_with(b, hkv, s, d, dtype, npu.device)
    cpu_cache = _cache_with(b, hkv, s, d, dtype, "cpu")
    q = torch.randn(b, t, h, d, generator=gen(11))
    pos = torch.arange(start, start + t).repeat(b, 1)
    kv_len = start + t + 3       # slots past the chunk hold stale drafts: they must stay invisible
    want = ref.attention(q.to(dtype), cpu_cache, 0, pos, kv_len)
    got = npu.attention(q.to(npu.device, dtype), cache, 0, pos.to(npu.device), kv_len)
    assert got.shape == (b, t, h, d) and got.dtype == dtype
    assert rel(got, want) <= tol(dtype) * 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_explicit_tree_mask(npu, dtype):
    b, t, h, hkv, d, start, s = 1, 5, 4, 2, 16, 8, 32
    cache = _cache_with(b, hkv, s, d, dtype, npu.device)
    cpu_cache = _cache_with(b, hkv, s, d, dtype, "cpu")
    q = torch.randn(b, t, h, d, generator=gen(12))
    pos = torch.arange(start, start + t).view(1, -1)
    kv_len = start + t
    tree = torch.ones(b, t, kv_len, dtype=torch.bool)            # True = may attend (the contract)
    tree[0, 3, start + 1:start + 3] = False                       # node 3 branches off after node 0
    tree[0, 4, start + 2] = False
    want = ref.attention(q.to(dtype), cpu_cache, 0, pos, kv_len, tree)
    got = npu.attention(q.to(npu.device, dtype), cache, 0, pos.to(npu.device), kv_len, tree.to(npu.device))
    assert rel(got, want) <= tol(dtype) * 2
    plain = ref.attention(q.to(dtype), cpu_cache, 0, pos, kv_len)
    assert rel(got, plain) > 1e-2                                 # the mask did something


def test_fia_mask_true_means_masked(npu, tnpu):
    """Documented polarity: atten_mask True / 1 = not attended. Everything but slot 2 is masked,
    so every query returns v[slot 2]."""
    q = torch.randn(1, 2, 3, 16, generator=gen(13)).bfloat16().to(npu.device)
    k = torch.randn(1, 2, 8, 16, generator=gen(14)).bfloat16().to(npu.device)
    v = torch.randn(1, 2, 8, 16, generator=gen(15)).bfloat16().to(npu.device)
    m = torch.ones(1, 1, 3, 8, dtype=torch.bool)
    m[..., 2] = False
    out, _ = tnpu.npu_fused_infer_attention_score(q, k, v, atten_mask=m.to(npu.device), num_heads=2,
                                                  input_layout="BNSD", scale=0.25)
    assert torch.allclose(out.cpu().float(), v.cpu().float()[:, :, 2:3].expand(1, 2, 3, 16), atol=1e-2)


def test_fia_rejects_fp32_and_unaligned_d(npu, tnpu):
    q = torch.randn(1, 2, 4, 16).to(npu.device)
    with pytest.raises(ERRORS):
        tnpu.npu_fused_infer_attention_score(q, q, q, num_heads=2, input_layout="BNSD", scale=0.25)
    q = torch.randn(1, 2, 4, 24).bfloat16().to(npu.device)
    with pytest.raises(ERRORS):
        tnpu.npu_fused_infer_attention_score(q, q, q, num_heads=2, input_layout="BNSD", scale=0.2)


# ============================================================================ GEMMs vs float64

def _truth(x: torch.Tensor, qw: QuantizedWeight, bias) -> torch.Tensor:
    """float64 dequantize-then-matmul (x already dequantized for act-quant schemes)."""
    y = x.double() @ qw.dequantize(torch.float64).T
    return y if bias is None else y + bias.double()


def _weights(kind: str, n: int, k: int, seed: int = 20):
    w = torch.randn(n, k, generator=gen(seed)) * 0.1
    if kind == "int8":
        return rtn.int8_per_channel(w)
    gs, sym = {"int4-g32": (32, True), "int4-g128-asym": (128, False), "int4-g64-asym": (64, False),
               "int4-chan": (-1, True), "int4-chan-asym": (-1, False)}[kind]
    return rtn.int4(w, gs, symmetric=sym)


def _bias(n, with_bias, seed=21):
    return (0.1 * torch.randn(n, generator=gen(seed))) if with_bias else None


@pytest.mark.parametrize("dtype", ALL)
@pytest.mark.parametrize("m", [1, 6, 33])
@pytest.mark.parametrize("with_bias", [False, True])
def test_gemm_w8a8_int8(npu, dtype, m, with_bias):
    n, k = 96, 256
    qw = _weights("int8", n, k)
    bias = _bias(n, with_bias)
    x = torch.randn(m, k, generator=gen(22))
    w = npu.prepare_weight("w8a8-int8", qw.to(npu.device))
    b = None if bias is None else bias.to(npu.device, dtype)
    # 1) a pre-quantized activation: only the GEMM's own arithmetic differs from the truth
    a = ref.quantize_per_token(x, "int8")
    got = npu.gemm("w8a8-int8", QActivation(a.q.to(npu.device), a.scale.to(npu.device), "int8", dtype), w, b)
    assert got.shape == (m, n) and got.dtype == dtype
    truth = _truth(a.q.double() * a.scale.double(), qw, None if b is None else b.cpu())
    assert rel(got, truth) <= tol(dtype)
    # 2) from the raw activation (dynamic per-token quantization inside)
    got = npu.gemm("w8a8-int8", x.to(npu.device, dtype), w, b)
    a = ref.quantize_per_token(x.to(dtype), "int8")
    truth = _truth(a.q.double() * a.scale.double(), qw, None if b is None else b.cpu())
    assert rel(got, truth) <= tol(dtype) * 2


@pytest.mark.parametrize("dtype", ALL)
@pytest.mark.parametrize("scheme,kind", [("w8a16", "int8"), ("w4a16", "int4-g32"), ("w4a16", "int4-g128-asym"),
                                         ("w4a16", "int4-chan"), ("w4a16", "int4-chan-asym")])
@pytest.mark.parametrize("m", [1, 17])
@pytest.mark.parametrize("with_bias", [False, True])
def test_gemm_weight_only(npu, dtype, scheme, kind, m, with_bias):
    n, k = 96, 256
    qw = _weights(kind, n, k)
    bias = _bias(n, with_bias)
    x = torch.randn(m, k, generator=gen(23))
    w = npu.prepare_weight(scheme, qw.to(npu.device))
    got = npu.gemm(scheme, x.to(npu.device, dtype), w, None if bias is None else bias.to(npu.device, dtype))
    assert got.shape == (m, n) and got.dtype == dtype
    truth = _truth(x.to(dtype), qw, None if bias is None else bias.to(dtype))
    assert rel(got, truth) <= tol(dtype) * (1 if dtype == torch.float32 else 1.5)


def test_gemm_bf16(npu):
    x, w, b = torch.randn(5, 64), torch.randn(32, 64), torch.randn(32)
    got = npu.gemm("bf16", x.to(npu.device), w.to(npu.device), b.to(npu.device))
    assert rel(got, x.double() @ w.double().T + b.double()) <= 1e-5


def test_prepared_layouts(npu):
    """What the kernels are handed: int8 [K, N]; int4 packed [K, N/8] int32; per-group scale
    [K/g, N]; antiquant_offset = -zero_point."""
    n, k = 64, 128
    w8 = npu.prepare_weight("w8a8-int8", _weights("int8", n, k).to(npu.device))
    p = w8.parts[0]
    assert p.w.dtype == torch.int8 and tuple(p.w.shape) == (k, n) and p.scale.dtype == torch.float32
    qw = _weights("int4-g64-asym", n, k)
    w4 = npu.prepare_weight("w4a16", qw.to(npu.device))
    p = w4.parts[0]
    assert p.w.dtype == torch.int32 and tuple(p.w.shape) == (k, n // 8)
    assert w4.group_size == 64 and tuple(p.scale.shape) == (k // 64, n)
    assert torch.equal(p.offset.cpu(), (-qw.zero.float()).T)


# ============================================================ documented constraints, one each

def test_int4pack_nibble_order(npu, tnpu):
    """npu_convert_weight_to_int4pack: element e of each group of 8 sits at bits [4e, 4e+4) of the
    int32 word, as a two's-complement nibble (ops-nn aclnn_convert_weight_to_int4_pack.cpp)."""
    w = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7, -8, -7, -6, -5, -4, -3, -2, -1],
                      [7, 0, 0, 0, 0, 0, 0, -1, 1, 2, 0, 0, 0, 0, 0, 0]], dtype=torch.int32)
    packed = tnpu.npu_convert_weight_to_int4pack(w.to(npu.device)).cpu()
    assert packed.dtype == torch.int32 and packed.shape == (2, 2)
    as_u32 = [[v & 0xFFFFFFFF for v in row] for row in packed.tolist()]
    assert as_u32 == [[0x76543210, 0xFEDCBA98], [0xF0000007, 0x00000021]]


def test_w4a16_group_size_not_multiple_of_32_is_refused(npu):
    """antiquant_group_size must be a multiple of 32 in [32, K-1]: a group of 16 with different
    scales per group cannot run per channel exactly -> a clear error, not a silent change."""
    qw = rtn.int4(torch.randn(64, 128, generator=gen(30)), 16)
    with pytest.raises(UnsupportedError, match="multiple of 32"):
        npu.prepare_weight("w4a16", qw.to(npu.device))


def test_w4a16_group_size_falls_back_per_channel_only_when_exact(npu, caplog):
    n, k = 64, 128
    codes = torch.randint(-8, 8, (n, k), generator=gen(31), dtype=torch.int8)
    s = torch.rand(n, 1, generator=gen(32)) * 0.01 + 1e-3
    qw = QuantizedWeight(codes, s.repeat(1, k // 16), bits=4, group_size=16)   # equal scales per row
    with caplog.at_level(logging.WARNING, logger="quasar"):
        w = npu.prepare_weight("w4a16", qw.to(npu.device))
    assert w.group_size == 0 and "per channel (exact)" in caplog.text
    x = torch.randn(3, k, generator=gen(33))
    got = npu.gemm("w4a16", x.to(npu.device, torch.bfloat16), w)
    assert rel(got, _truth(x.bfloat16(), qw, None)) <= tol(torch.bfloat16)


def test_wqbmm_group_size_limits_are_enforced_by_the_op(npu, tnpu):
    """The documented antiquant_group_size range, straight on the op."""
    k, n = 128, 16
    x = torch.randn(2, k).bfloat16().to(npu.device)
    w = torch.randint(-8, 8, (k, n), dtype=torch.int8).to(npu.device)
    for g in (16, 48, 128):            # not a multiple of 32 / not a multiple of 32 / not < K
        s = torch.rand(-(-k // g), n).bfloat16().to(npu.device)
        with pytest.raises(ERRORS):
            tnpu.npu_weight_quant_batchmatmul(x, w, s, antiquant_group_size=g)
    s = torch.rand(k // 64, n).bfloat16().to(npu.device)
    assert tnpu.npu_weight_quant_batchmatmul(x, w, s, antiquant_group_size=64).shape == (2, n)


def test_w4a16_group_size_16_model_load_is_a_clear_error(npu, tiny_root):
    path = make_tiny(tiny_root, "qwen3", seed=3)
    with pytest.raises(UnsupportedError, match="verifier.group_size"):
        load_quasar(path, device="npu", quant="w4a16", group_size=16)


@pytest.mark.parametrize("scheme,kind", [("w8a8-int8", "int8"), ("w8a16", "int8"), ("w4a16", "int4-g32")])
def test_out_features_over_65535_are_tiled(npu, tnpu, scheme, kind):
    """npu_quant_matmul / npu_weight_quant_batchmatmul reject a last dim > 65535 (the emulation, like
    the op); the backend tiles N, which is exact."""
    n, k = 65600, 64
    qw = _weights(kind, n, k, seed=34)
    w = npu.prepare_weight(scheme, qw.to(npu.device))
    assert len(w.parts) == 2 and all(p.n1 - p.n0 <= 65535 for p in w.parts)
    x = torch.randn(2, k, generator=gen(35))
    got = npu.gemm(scheme, x.to(npu.device, torch.bfloat16), w).cpu()
    if scheme == "w8a8-int8":
        a = ref.quantize_per_token(x.bfloat16(), "int8")
        truth = _truth(a.q.double() * a.scale.double(), qw, None)
    else:
        truth = _truth(x.bfloat16(), qw, None)
    assert got.shape == (2, n) and rel(got, truth) <= tol(torch.bfloat16) * 1.5
    # and the op itself refuses the untiled weight
    x8 = torch.randint(-5, 5, (2, k), dtype=torch.int8).to(npu.device)
    with pytest.raises(ERRORS):
        tnpu.npu_quant_matmul(x8, qw.codes.t().contiguous().to(npu.device), torch.ones(n).to(npu.device),
                              pertoken_scale=torch.ones(2).to(npu.device), output_dtype=torch.bfloat16)


def test_in_features_over_65535_are_refused(npu):
    qw = rtn.int8_per_channel(torch.randn(8, 65536 + 64, generator=gen(36)))
    with pytest.raises(UnsupportedError, match="65535"):
        npu.prepare_weight("w8a8-int8", qw.to(npu.device))


def test_quant_matmul_dtype_table_is_enforced(npu, tnpu):
    """Rows of the documented dtype table: bf16 output with fp32/bf16 scale and fp32 pertoken is
    allowed; a float16 bias with float16 output, or pertoken_scale with int8 output, is not."""
    k, n, m = 32, 16, 3
    x1 = torch.randint(-5, 5, (m, k), dtype=torch.int8).to(npu.device)
    x2 = torch.randint(-5, 5, (k, n), dtype=torch.int8).to(npu.device)
    s32, pt, b32 = torch.rand(n).to(npu.device), torch.rand(m).to(npu.device), torch.rand(n).to(npu.device)
    y = tnpu.npu_quant_matmul(x1, x2, s32, pertoken_scale=pt, bias=b32, output_dtype=torch.bfloat16)
    want = (x1.cpu().double() @ x2.cpu().double()) * s32.cpu().double() * pt.cpu().double()[:, None] \
        + b32.cpu().double()                                    # bias added after the dequant scales
    assert y.dtype == torch.bfloat16 and y.shape == (m, n) and rel(y, want) <= tol(torch.bfloat16)
    with pytest.raises(ERRORS):
        tnpu.npu_quant_matmul(x1, x2, s32, pertoken_scale=pt, bias=torch.rand(n).half().to(npu.device),
                              output_dtype=torch.float16)
    with pytest.raises(ERRORS):
        tnpu.npu_quant_matmul(x1, x2, s32, pertoken_scale=pt)              # int8 output + pertoken
    with pytest.raises(ERRORS):
        tnpu.npu_dynamic_quant(torch.randn(2, 8).to(npu.device))           # float32 input


def test_w4a4_and_fp8_are_clear_errors(npu, tiny_root):
    for scheme, needle in (("w4a4", "w4a16"), ("w8a8-fp8", "w8a8-int8")):
        with pytest.raises(UnsupportedError) as e:
            npu.check_scheme(scheme)
        msg = str(e.value)
        assert "unsupported on npu" in msg and needle in msg and "cpu" in msg
    qw4 = rtn.int4(torch.randn(32, 64, generator=gen(37)), -1)
    with pytest.raises(UnsupportedError, match="w4a4"):
        npu.gemm("w4a4", torch.randn(2, 64, dtype=torch.bfloat16).to(npu.device), qw4.to(npu.device))
    with pytest.raises(UnsupportedError, match="w4a4"):
        npu.prepare_weight("w4a4", qw4.to(npu.device))
    with pytest.raises(UnsupportedError):
        npu.quantize_per_token(torch.randn(2, 8, dtype=torch.bfloat16).to(npu.device), "fp8")
    path = make_tiny(tiny_root, "qwen3", seed=4)
    with pytest.raises(UnsupportedError, match="w4a4"):
        load_quasar(path, device="npu", quant="w4a4", group_size=-1)


@pytest.mark.skipif(REAL, reason="torch_npu is installed")
def test_missing_torch_npu_names_the_versions_to_install():
    with torch_npu_missing():
        with pytest.raises(UnsupportedError) as e:
            backends.get("npu")
    msg = str(e.value)
    for needle in ("torch_npu", "torch-npu==2.12.0", "torch==2.12.0", "CANN 9.1", "CANN 8.5.0",
                   "docs/ascend.md", torch.__version__):
        assert needle in msg, (needle, msg)


@pytest.mark.skipif(REAL, reason="torch_npu is installed")
def test_cli_device_npu_without_torch_npu_exits_2(tmp_path):
    r = subprocess.run([sys.executable, "-m", "quasar.run", "--device", "npu", "--prompt", "hi"],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path,
                       env=dict(os.environ, PYTHONUNBUFFERED="1"))
    assert r.returncode == 2, r.stderr
    assert "torch-npu" in r.stderr and "CANN" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_configs_validate():
    from pathlib import Path

    from quasar.config import load
    root = Path(__file__).resolve().parents[1] / "configs"
    for name, model in (("openpangu-7b-w8a8-ngram-npu.yaml", "openPangu-Embedded-7B"),
                        ("qwen3-8b-w8a8-ngram-npu.yaml", "Qwen3-8B")):
        cfg = load(root / name)
        assert cfg.device == "npu" and cfg.dtype == "bfloat16"
        assert cfg.verifier.quant == "w8a8-int8" and quant.get(cfg.verifier.lm_head_quant or quant.default()) is quant.get("bf16")
        d = cfg.drafter
        assert (d.method, d.num_tokens, d.ngram.min, d.ngram.max) == ("ngram", 5, 1, 3)
        assert cfg.sampling.temperature == 0.0
        assert cfg.model.startswith("/path/to/") and cfg.model.endswith(model)   # a placeholder


# ====================================================================== end to end, tiny models

FAMILIES = [("qwen3", {}), ("pangu", {}), ("llama", dict(num_key_value_heads=1))]


@pytest.mark.parametrize("family,kw", FAMILIES, ids=[f for f, _ in FAMILIES])
def test_fp32_logits_match_transformers(npu, tiny_root, family, kw):
    path = make_tiny(tiny_root, family, **kw)
    ids = torch.randint(0, 256, (1, 37), generator=gen(40))
    want = load_hf(path)(ids).logits
    q = ModelRunner(load_quasar(path, device="npu"))
    got = q(ids.to(q.device), torch.arange(37, device=q.device).view(1, -1), kv_len=37)
    assert got.shape == want.shape and rel(got, want) <= 1e-4


def test_prefill_decode_and_chunks_match_one_forward(npu, tiny_root):
    path = make_tiny(tiny_root, "pangu", num_key_value_heads=1)
    n = 30
    ids = torch.randint(0, 256, (1, n), generator=gen(41))
    want = load_hf(path)(ids).logits[0]
    q = ModelRunner(load_quasar(path, device="npu"))
    dev = q.device
    got = [q(ids[:, :12].to(dev), torch.arange(12, device=dev).view(1, -1), kv_len=12)[0]]
    t = 12
    for size in (1, 1, 6, 4, 6):
        got.append(q(ids[:, t:t + size].to(dev), torch.arange(t, t + size, device=dev).view(1, -1),
                     kv_len=t + size + 2)[0])                     # +2: stale slots past the chunk
        t += size
    assert t == n and rel(torch.cat(got), want) <= 1e-4


QUANTS = [("w8a8-int8", {}), ("w8a16", {}), ("w4a16", dict(group_size=32)),
          ("w4a16", dict(group_size=32, symmetric=False)), ("w4a16", dict(group_size=-1))]


@pytest.fixture(scope="module")
def qwen3_path(tiny_root):
    return make_tiny(tiny_root, "qwen3", seed=5)


@pytest.mark.parametrize("quant,kw", QUANTS, ids=[f"{q}-{i}" for i, (q, _) in enumerate(QUANTS)])
def test_fp32_quantized_logits_match_cpu_backend(npu, qwen3_path, quant, kw):
    ids = torch.randint(0, 256, (1, 29), generator=gen(42))
    pos = torch.arange(29).view(1, -1)
    want = ModelRunner(load_quasar(qwen3_path, device="cpu", quant=quant, **kw))(ids, pos, kv_len=29)
    q = ModelRunner(load_quasar(qwen3_path, device="npu", quant=quant, **kw))
    got = q(ids.to(q.device), pos.to(q.device), kv_len=29)
    assert rel(got, want) <= 1e-5


@pytest.mark.parametrize("quant,kw", [("bf16", {})] + QUANTS, ids=["bf16"] + [f"{q}-{i}" for i, (q, _) in enumerate(QUANTS)])
def test_bf16_kernels_no_worse_than_cpu_bf16(npu, qwen3_path, quant, kw):
    """bf16 runs the fused kernels end to end; against the same scheme in fp32 their error must be
    of the size of the CPU reference's own bf16 error."""
    ids = torch.randint(0, 256, (1, 29), generator=gen(43))
    pos = torch.arange(29).view(1, -1)
    truth = ModelRunner(load_quasar(qwen3_path, device="cpu", quant=quant, **kw))(ids, pos, kv_len=29)
    cpu16 = ModelRunner(load_quasar(qwen3_path, device="cpu", dtype=torch.bfloat16, quant=quant, **kw))(
        ids, pos, kv_len=29)
    q = ModelRunner(load_quasar(qwen3_path, device="npu", dtype=torch.bfloat16, quant=quant, **kw))
    got = q(ids.to(q.device), pos.to(q.device), kv_len=29)
    assert rel(got, truth) <= 1.5 * rel(cpu16, truth) + 5e-3


def repetitive_prompt(seed: int, length: int = 40) -> list[int]:
    phrase = torch.randint(0, 200, (8,), generator=gen(seed)).tolist()
    return (phrase * (length // 8 + 1))[:length]


@pytest.mark.parametrize("quant,dtype", [("bf16", torch.float32), ("w8a8-int8", torch.float32),
                                         ("w4a16", torch.float32), ("w8a8-int8", torch.bfloat16)])
def test_speculative_equals_autoregressive_greedy(npu, qwen3_path, quant, dtype):
    """Quasar's setup (n-gram drafts, k = 5, W8A8 verifier) is lossless on the npu backend."""
    kw = dict(group_size=32) if quant == "w4a16" else {}
    m = ModelRunner(load_quasar(qwen3_path, device="npu", dtype=dtype, max_seq_len=128, quant=quant, **kw))
    taus = []
    for prompt in (repetitive_prompt(0), repetitive_prompt(1), list(range(3, 40, 2))):
        want, _ = Scheduler(m, Drafter(), GREEDY, 0, set()).generate(prompt, 32)
        got, st = Scheduler(m, NgramDrafter(m.device, 1, 3), GREEDY, 5, set()).generate(prompt, 32)
        assert got == want
        taus.append(st.tau)
    assert max(taus) > 1.0          # drafts were accepted, so the comparison could have failed
