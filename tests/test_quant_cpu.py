"""Each scheme's CPU path against float64 dequantize-then-matmul, the RTN quantizers, fused
activation quantization, Hadamard folding and format concatenation."""
import pytest
import torch

from quasar import backends, quant
from quasar.config import VerifierConfig
from quasar.errors import ConfigError
from quasar.ops import reference as R
from quasar.quant import SCHEMES, rtn
from quasar.quant.format import QuantizedWeight
from quasar.quant.hadamard import rotate

CPU = backends.get("cpu")


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def f64_reference(scheme, x, qw, bias):
    """Dequantize everything to float64 and multiply: the independent oracle."""
    xd = x.double()
    if getattr(qw, "hadamard", False):
        xd = rotate(xd)
    if scheme in ("w8a8-int8", "w4a4", "w8a8-fp8"):
        qt = {"w8a8-int8": "int8", "w4a4": "int4", "w8a8-fp8": "fp8"}[scheme]
        qmax = {"int8": 127, "int4": 7, "fp8": 448.0}[qt]
        s = (xd.abs().amax(-1, keepdim=True) / qmax).clamp(min=1e-8)
        if qt == "fp8":
            xq = (xd / s).float().to(torch.float8_e4m3fn).double() * s
        else:
            xq = torch.round(xd / s).clamp(-qmax - 1, qmax) * s
        xd = xq
    w = qw.double() if scheme == "bf16" else qw.dequantize(torch.float64)
    y = xd @ w.T
    return y + bias.double() if bias is not None else y


CASES = [("bf16", {}), ("w8a16", {}), ("w8a8-int8", {}), ("w8a8-fp8", {}),
         ("w4a16", dict(group_size=128)), ("w4a16", dict(group_size=32, symmetric=False)),
         ("w4a16", dict(group_size=-1)), ("w4a4", dict(group_size=-1)),
         ("w4a4", dict(group_size=-1, hadamard=True)), ("w8a8-int8", dict(hadamard=True))]


@pytest.mark.parametrize("scheme,kw", CASES, ids=[f"{s}-{i}" for i, (s, _) in enumerate(CASES)])
@pytest.mark.parametrize("m", [1, 6, 33])
def test_cpu_gemm_matches_float64_dequant_matmul(scheme, kw, m):
    g = torch.Generator().manual_seed(m)
    n, k = 96, 256
    w = torch.randn(n, k, generator=g)
    x = torch.randn(m, k, generator=g) * 3
    bias = torch.randn(n, generator=g)
    cls = quant.get(scheme)
    layer = cls.layer(CPU, cls.quantize(w, VerifierConfig(**kw)), bias, torch.float32)
    canonical = cls.quantize(w, VerifierConfig(**kw))
    y = layer(x)
    ref = f64_reference(scheme, x, canonical, bias)
    assert y.dtype == torch.float32 and y.shape == (m, n)
    assert rel(y, ref) < 1e-5


@pytest.mark.parametrize("scheme", ["bf16", "w8a8-int8", "w4a16", "w8a16"])
def test_bf16_activations_give_bf16_output_close_to_reference(scheme):
    w = torch.randn(64, 128)
    x = torch.randn(5, 128).bfloat16()
    cls = quant.get(scheme)
    qw = cls.quantize(w.bfloat16() if scheme == "bf16" else w, VerifierConfig())
    y = cls.layer(CPU, qw, None, torch.bfloat16)(x)
    assert y.dtype == torch.bfloat16
    assert rel(y, f64_reference(scheme, x.float(), qw if scheme != "bf16" else qw.float(), None)) < 1e-2


@pytest.mark.parametrize("fn,bits,tol", [(lambda w: rtn.int8_per_channel(w), 8, 0.01),
                                          (lambda w: rtn.int4(w, 128), 4, 0.12),
                                          (lambda w: rtn.int4(w, 32, symmetric=False), 4, 0.10),
                                          (lambda w: rtn.fp8_per_channel(w), 8, 0.05)])
def test_rtn_reconstruction_error_is_bounded(fn, bits, tol):
    w = torch.randn(128, 256)
    qw = fn(w)
    assert qw.bits == bits
    assert rel(qw.dequantize(), w) < tol


def test_int4_codes_and_zero_points_stay_in_range():
    w = torch.randn(32, 64) + 0.7          # skewed rows: asymmetric quantization helps
    for sym in (True, False):
        qw = rtn.int4(w, 32, symmetric=sym)
        assert qw.codes.dtype == torch.int8 and qw.codes.min() >= -8 and qw.codes.max() <= 7
        if not sym:
            assert qw.zero.min() >= -8 and qw.zero.max() <= 7
    assert rel(rtn.int4(w, 32, symmetric=False).dequantize(), w) < rel(rtn.int4(w, 32).dequantize(), w)


def test_hadamard_is_orthogonal_and_folding_is_exact():
    for k in (64, 576, 1536):              # power of two, and block-diagonal cases
        x = torch.randn(3, k, dtype=torch.float64)
        w = torch.randn(5, k, dtype=torch.float64)
        assert torch.allclose(rotate(rotate(x)), x, atol=1e-10)
        assert torch.allclose(rotate(x) @ rotate(w).T, x @ w.T, atol=1e-9)


def test_hadamard_rotation_is_the_block_diagonal_sylvester_matrix():
    """rotate() (two small Kronecker-factor matmuls) == x @ blockdiag(H_b) with H_b the dense
    normalized Sylvester matrix, for power-of-two and block-diagonal K."""
    from quasar.quant.hadamard import _sylvester, block_size
    for k in (8, 64, 96, 576, 1536, 4096):
        x = torch.randn(3, k, dtype=torch.float64)
        b = block_size(k)
        h = _sylvester(b, "cpu").double()
        assert torch.allclose(rotate(x), (x.reshape(3, k // b, b) @ h).reshape(3, k), atol=1e-12), k


def test_hadamard_reduces_w4a4_error_on_outlier_activations():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(128, 256, generator=g)
    x = torch.randn(16, 256, generator=g)
    x[:, 3] *= 40                          # an outlier channel, as in real LLM activations
    exact = x.double() @ w.double().T
    errs = {}
    for had in (False, True):
        cfg = VerifierConfig(group_size=-1, hadamard=had)
        layer = SCHEMES["w4a4"].layer(CPU, SCHEMES["w4a4"].quantize(w, cfg), None, torch.float32)
        errs[had] = rel(layer(x), exact)
    assert errs[True] < 0.5 * errs[False]


def test_pre_quantized_activation_equals_internal_quantization():
    w = torch.randn(64, 128)
    x = torch.randn(4, 128)
    qw = rtn.int8_per_channel(w)
    a = R.quantize_per_token(x, "int8")
    gemm = quant.get("w8a8-int8").reference_gemm
    assert torch.equal(gemm(a, qw, None), gemm(x, qw, None))
    nw = torch.ones(128) * 0.5
    assert torch.equal(gemm(R.rms_norm_quant(x, nw, 1e-6, "int8"), qw, None),
                       gemm(R.rms_norm(x, nw, 1e-6), qw, None))


def test_quantized_weight_concatenation_equals_parts():
    a, b = torch.randn(32, 64), torch.randn(16, 64)
    qa, qb = rtn.int4(a, 32, symmetric=False), rtn.int4(b, 32, symmetric=False)
    cat = QuantizedWeight.cat([qa, qb])
    assert torch.equal(cat.dequantize(), torch.cat([qa.dequantize(), qb.dequantize()]))
    assert torch.equal(rtn.int4(torch.cat([a, b]), 32, symmetric=False).codes, cat.codes)


def test_w4a4_rejects_grouped_weights():
    qw = rtn.int4(torch.randn(16, 64), 32)
    with pytest.raises(ConfigError, match="w4a4 needs symmetric per-channel int4 weights"):
        SCHEMES["w4a4"].layer(CPU, qw, None, torch.float32)


def test_group_size_must_divide_k():
    with pytest.raises(ConfigError, match="does not divide the in-features 96"):
        SCHEMES["w4a16"].quantize(torch.randn(8, 96), VerifierConfig(group_size=64))


def test_quantize_per_token_zero_row_is_finite():
    x = torch.zeros(2, 16)
    x[1] = torch.randn(16)
    for qt in ("int8", "int4", "fp8"):
        a = R.quantize_per_token(x, qt)
        assert torch.isfinite(a.scale).all() and (a.q[0].float() == 0).all()
