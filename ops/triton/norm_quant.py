"""Per-token activation quantization, RMSNorm and SiLU*mul, plain and fused with quantization.

One program per row (token) for the norms and plain quantization; SiLU*mul (plain and
quantizing) splits each row into chunks across programs. All math in fp32, exactly in the order of quasar.ops.reference:
- quantize_per_token: scale = max(amax / qmax, 1e-8), q = clamp(round_half_even(x / scale)),
  int8 codes in [-128, 127], int4 codes in [-8, 7] held one per int8 element. Divisions are
  IEEE-rounded (div_rn), so codes match torch's bit for bit given the same scale.
- rms_norm: y = weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype) (transformers' RMSNorm: the
  normalized value is cast to the input dtype before the weight multiplies it).
- silu_mul: silu(gate).to(dtype) * up, rounded to dtype (what F.silu(g) * u does in torch).
The fused variants quantize the dtype-rounded output of the unfused op, so fused == unfused.
Rows longer than BLOCK are processed in chunks (the passes after the first re-read the row from
L1/L2).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from quasar.ops.types import QMAX, QActivation
from ._common import pdl_kw, pdl_prologue, INTERPRETED, rint, to_dtype

_QMAX = {"int8": 127.0, "int4": 7.0, "fp8": 448.0}


@triton.jit
def _scale(amax, QMAX: tl.constexpr):
    """Per-row scale = max(amax / qmax, 1e-8) (a zero row quantizes to zeros, not NaN)."""
    return tl.maximum(tl.math.div_rn(amax, tl.full([], QMAX, tl.float32)), 1e-8)


@triton.jit
def _codes(y, scale, QMAX: tl.constexpr):
    """int8 / int4: clamp(round_half_even(y / scale)) as int8 codes. fp8 (QMAX = 448): the bits of
    clamp(y / scale, -448, 448) rounded to e4m3 (nearest, ties to even; torch's cast), held in int8."""
    if QMAX == 448.0:
        v = tl.minimum(tl.maximum(tl.math.div_rn(y, scale), -448.0), 448.0)
        return _e4m3_bits(v)
    c = rint(tl.math.div_rn(y, scale))
    return tl.minimum(tl.maximum(c, -QMAX - 1.0), QMAX).to(tl.int8)


@triton.jit
def _e4m3_bits(v):
    """float8_e4m3fn bits of v (|v| <= 448), round to nearest even, by exact fp32 arithmetic (no
    reliance on the hardware / interpreter conversion): with e = max(floor(log2 |v|), -6), the
    multiple q = rint(|v| * 2^(3 - e)) of the e4m3 spacing gives bits ((e + 6) << 3) + q, which
    also covers subnormals (e = -6, q < 8) and a mantissa that rounds up into the next binade."""
    a = tl.abs(v)
    e = ((a.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    e = tl.maximum(e, -6)
    step = ((130 - e) << 23).to(tl.float32, bitcast=True)          # 2^(3 - e), exact
    q = rint(a * step).to(tl.int32)
    bits = ((e + 6) << 3) + q
    bits = tl.where(v.to(tl.int32, bitcast=True) < 0, bits | 0x80, bits)     # sign bit (also of -0.0)
    return bits.to(tl.int8)        # the low 8 bits (one return type for every qtype)


@triton.jit(do_not_specialize=["K"])
def _quant_kernel(x_ptr, q_ptr, s_ptr, K, stride_x, stride_q,
                  QMAX: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    pdl_prologue(PDL)
    row = tl.program_id(0).to(tl.int64)
    xr = x_ptr + row * stride_x
    amax = tl.zeros([BLOCK], tl.float32)
    for k0 in range(0, K, BLOCK):
        o = k0 + tl.arange(0, BLOCK)
        v = tl.load(xr + o, mask=o < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(v))
    a = tl.max(amax, axis=0)
    scale = _scale(a, QMAX)
    tl.store(s_ptr + row, scale)
    for k0 in range(0, K, BLOCK):
        o = k0 + tl.arange(0, BLOCK)
        v = tl.load(xr + o, mask=o < K, other=0.0).to(tl.float32)
        tl.store(q_ptr + row * stride_q + o, _codes(v, scale, QMAX), mask=o < K)


@triton.jit
def _load_row(xr, dr, o, K, RES: tl.constexpr, XDT: tl.constexpr, INTERP: tl.constexpr):
    """x[o] (fp32), or the residual sum x[o] + d[o] rounded to x's dtype (torch's x + d)."""
    v = tl.load(xr + o, mask=o < K, other=0.0).to(tl.float32)
    if RES:
        v = to_dtype(v + tl.load(dr + o, mask=o < K, other=0.0).to(tl.float32), XDT, INTERP).to(tl.float32)
    return v


@triton.jit(do_not_specialize=["K"])
def _rms_norm_kernel(x_ptr, w_ptr, y_ptr, q_ptr, s_ptr, d_ptr, r_ptr, K, stride_x, stride_y, stride_d,
                     stride_r, eps, QUANT: tl.constexpr, QMAX: tl.constexpr, BLOCK: tl.constexpr,
                     INTERP: tl.constexpr, RES: tl.constexpr, ONE_PASS: tl.constexpr, PDL: tl.constexpr):
    """RMSNorm of x (RES: of x + d, whose sum is also stored to r), optionally quantized.
    ONE_PASS (K <= BLOCK): the row is read once and kept in registers (a step's norms are
    latency-bound: M is 1..16 rows, one program each); else each pass re-reads it."""
    pdl_prologue(PDL)
    row = tl.program_id(0).to(tl.int64)
    xr = x_ptr + row * stride_x
    dr = d_ptr + row * stride_d
    XDT: tl.constexpr = x_ptr.dtype.element_ty
    YDT: tl.constexpr = y_ptr.dtype.element_ty
    if ONE_PASS:
        o = tl.arange(0, BLOCK)
        v = _load_row(xr, dr, o, K, RES, XDT, INTERP)
        if RES:
            tl.store(r_ptr + row * stride_r + o, v.to(XDT), mask=o < K)
        w = tl.load(w_ptr + o, mask=o < K, other=0.0).to(tl.float32)
        ms = tl.math.div_rn(tl.sum(v * v, axis=0), K.to(tl.float32))
        rstd = tl.math.div_rn(tl.full([], 1.0, tl.float32), tl.math.sqrt_rn(ms + eps))
        y = w * to_dtype(v * rstd, XDT, INTERP).to(tl.float32)
        if QUANT:
            y = to_dtype(y, YDT, INTERP).to(tl.float32)
            scale = _scale(tl.max(tl.abs(y), axis=0), QMAX)
            tl.store(s_ptr + row, scale)
            tl.store(q_ptr + row * stride_y + o, _codes(y, scale, QMAX), mask=o < K)
        else:
            tl.store(y_ptr + row * stride_y + o, to_dtype(y, YDT, INTERP), mask=o < K)
        return
    ss = tl.zeros([BLOCK], tl.float32)
    for k0 in range(0, K, BLOCK):
        o = k0 + tl.arange(0, BLOCK)
        v = _load_row(xr, dr, o, K, RES, XDT, INTERP)
        if RES:
            tl.store(r_ptr + row * stride_r + o, v.to(XDT), mask=o < K)
        ss += v * v
    ms = tl.math.div_rn(tl.sum(ss, axis=0), K.to(tl.float32))
    rstd = tl.math.div_rn(tl.full([], 1.0, tl.float32), tl.math.sqrt_rn(ms + eps))
    if QUANT:
        amax = tl.zeros([BLOCK], tl.float32)
        for k0 in range(0, K, BLOCK):
            o = k0 + tl.arange(0, BLOCK)
            v = _load_row(xr, dr, o, K, RES, XDT, INTERP)
            w = tl.load(w_ptr + o, mask=o < K, other=0.0).to(tl.float32)
            y = to_dtype(w * to_dtype(v * rstd, XDT, INTERP).to(tl.float32), YDT, INTERP).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(y))
        scale = _scale(tl.max(amax, axis=0), QMAX)
        tl.store(s_ptr + row, scale)
        for k0 in range(0, K, BLOCK):
            o = k0 + tl.arange(0, BLOCK)
            v = _load_row(xr, dr, o, K, RES, XDT, INTERP)
            w = tl.load(w_ptr + o, mask=o < K, other=0.0).to(tl.float32)
            y = to_dtype(w * to_dtype(v * rstd, XDT, INTERP).to(tl.float32), YDT, INTERP).to(tl.float32)
            tl.store(q_ptr + row * stride_y + o, _codes(y, scale, QMAX), mask=o < K)
    else:
        for k0 in range(0, K, BLOCK):
            o = k0 + tl.arange(0, BLOCK)
            v = _load_row(xr, dr, o, K, RES, XDT, INTERP)
            w = tl.load(w_ptr + o, mask=o < K, other=0.0).to(tl.float32)
            y = w * to_dtype(v * rstd, XDT, INTERP).to(tl.float32)
            tl.store(y_ptr + row * stride_y + o, to_dtype(y, YDT, INTERP), mask=o < K)


@triton.jit(do_not_specialize=["I"])
def _silu_mul_kernel(x_ptr, y_ptr, p_ptr, I, stride_x, stride_y, NCH,
                     AMAX: tl.constexpr, BLOCK: tl.constexpr, INTERP: tl.constexpr, PDL: tl.constexpr):
    """y = silu(gate) * up, one chunk of BLOCK features of one row per program (grid: rows x
    chunks; SiLU*mul has no row reduction, and at M = 1..16 rows one program per row would leave
    the GPU idle). AMAX: also store the chunk's max |y| (of the dtype-rounded y) to p[row, chunk]
    for _quant_chunks_kernel, which then quantizes the row without another pass over it."""
    pdl_prologue(PDL)
    row = tl.program_id(0).to(tl.int64)
    ch = tl.program_id(1)
    xr = x_ptr + row * stride_x
    DT: tl.constexpr = x_ptr.dtype.element_ty
    o = ch * BLOCK + tl.arange(0, BLOCK)
    g = tl.load(xr + o, mask=o < I, other=0.0).to(tl.float32)
    u = tl.load(xr + I + o, mask=o < I, other=0.0).to(tl.float32)
    s = to_dtype(tl.math.div_rn(g, 1.0 + tl.exp(-g)), DT, INTERP).to(tl.float32)
    y = to_dtype(s * u, DT, INTERP)
    tl.store(y_ptr + row * stride_y + o, y, mask=o < I)
    if AMAX:
        tl.store(p_ptr + row * NCH + ch, tl.max(tl.abs(y.to(tl.float32)), axis=0))


@triton.jit(do_not_specialize=["K"])
def _quant_chunks_kernel(y_ptr, p_ptr, q_ptr, s_ptr, K, stride_y, stride_q, NCH,
                         QMAX: tl.constexpr, BLOCK: tl.constexpr, PCH: tl.constexpr, PDL: tl.constexpr):
    """Per-token quantization of y[row] from its per-chunk amax partials p[row, :NCH]: grid rows x
    chunks, each program quantizes one chunk (the row's scale is the same in all of them)."""
    pdl_prologue(PDL)
    row = tl.program_id(0).to(tl.int64)
    ch = tl.program_id(1)
    pc = tl.arange(0, PCH)
    a = tl.max(tl.load(p_ptr + row * NCH + pc, mask=pc < NCH, other=0.0), axis=0)
    scale = _scale(a, QMAX)
    if ch == 0:
        tl.store(s_ptr + row, scale)
    o = ch * BLOCK + tl.arange(0, BLOCK)
    v = tl.load(y_ptr + row * stride_y + o, mask=o < K, other=0.0).to(tl.float32)
    tl.store(q_ptr + row * stride_q + o, _codes(v, scale, QMAX), mask=o < K)


# ------------------------------------------------------------------ launch helpers

def _block(k: int, cap: int = 4096) -> int:
    """Elements per chunk of a row: the whole row when it fits under cap (one pass, kept in
    registers), else chunks of cap. The interpreter caps at 1024 (so the tests take both paths)."""
    cap = 1024 if INTERPRETED else cap
    return max(16, min(cap, triton.next_power_of_2(max(int(k), 1))))


def _warps(block: int) -> int:
    """~128 elements of a row per warp, 4..32 warps: these kernels are latency-bound (a few rows
    of 4096..12288), and on an H100 32 warps beat 8 or 16 on a 4096-wide row by 1.3..1.9x
    (BENCHMARKS.md history)."""
    return 1 if INTERPRETED else min(32, max(4, block // 128))


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as [R, K] with unit stride along K (a view when possible)."""
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    return x2


def _check_qtype(qtype: str) -> float:
    if qtype not in _QMAX:
        raise ValueError(f"the Triton quantization kernels produce int8, int4 or fp8 codes, not {qtype!r}")
    return _QMAX[qtype]


def _qs_out(out, m, k, device, qtype="int8"):
    """(q [m, k] int8 / float8_e4m3fn, scale [m, 1] fp32): the caller's (tests poison them) or
    fresh ones."""
    dt = torch.float8_e4m3fn if qtype == "fp8" else torch.int8
    if out is not None:
        q, s = out
        assert q.shape == (m, k) and q.dtype == dt and q.is_contiguous()
        assert s.shape == (m, 1) and s.dtype == torch.float32 and s.is_contiguous()
        return q, s
    return (torch.empty((m, k), dtype=dt, device=device),
            torch.empty((m, 1), dtype=torch.float32, device=device))


def _kq(q: torch.Tensor) -> torch.Tensor:
    """The codes buffer as the kernels write it (e4m3 codes as their bits, in int8)."""
    return q.view(torch.int8) if q.dtype == torch.float8_e4m3fn else q


def quantize_per_token(x: torch.Tensor, qtype: str, out=None, opts=None) -> QActivation:
    qmax = _check_qtype(qtype)
    x2 = _rows(x)
    m, k = x2.shape
    q, s = _qs_out(out, m, k, x.device, qtype)
    if m:
        blk = _block(k)
        _quant_kernel[(m,)](x2, _kq(q), s, k, x2.stride(0), q.stride(0), QMAX=qmax, BLOCK=blk,
                            num_warps=_warps(blk), **pdl_kw(x.device, opts))
    return QActivation(q.view(*x.shape[:-1], k), s.view(*x.shape[:-1], 1), qtype, x.dtype)


def _norm(x, weight, eps, qtype, out=None, delta=None, opts=None):
    x2 = _rows(x)
    m, k = x2.shape
    if weight.shape[-1] != k:
        raise ValueError(f"rms_norm: weight has {weight.shape[-1]} elements, x has {k} features")
    w = weight.contiguous()
    out_dtype = torch.promote_types(x.dtype, weight.dtype)
    blk = _block(k)
    if delta is not None:      # add_rms_norm: the residual sum x + delta is stored to r
        if delta.shape != x.shape or delta.dtype != x.dtype:
            raise ValueError(f"add_rms_norm: delta {tuple(delta.shape)} {delta.dtype} must match x "
                             f"{tuple(x.shape)} {x.dtype}")
        d2 = _rows(delta)
        r = torch.empty((m, k), dtype=x.dtype, device=x.device)
    else:
        d2 = r = x2
    res = dict(RES=delta is not None, INTERP=INTERPRETED, ONE_PASS=k <= blk, num_warps=_warps(blk),
               **pdl_kw(x.device, opts))
    if qtype is None:
        y = out.view(m, k) if out is not None else torch.empty((m, k), dtype=out_dtype, device=x.device)
        if m:
            _rms_norm_kernel[(m,)](x2, w, y, y, y, d2, r, k, x2.stride(0), y.stride(0), d2.stride(0),
                                   r.stride(0), float(eps), QUANT=False, QMAX=1.0, BLOCK=blk, **res)
        y = y.view(x.shape)
    else:
        qmax = _check_qtype(qtype)
        q, s = _qs_out(out, m, k, x.device, qtype)
        # y_ptr only carries the output dtype here (nothing is stored through it)
        ydt = torch.empty(0, dtype=out_dtype, device=x.device)
        if m:
            _rms_norm_kernel[(m,)](x2, w, ydt, _kq(q), s, d2, r, k, x2.stride(0), q.stride(0), d2.stride(0),
                                   r.stride(0), float(eps), QUANT=True, QMAX=qmax, BLOCK=blk, **res)
        y = QActivation(q.view(*x.shape[:-1], k), s.view(*x.shape[:-1], 1), qtype, out_dtype)
    return y if delta is None else (y, r.view(x.shape))


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float,
                 qtype=None, opts=None):
    """(rms_norm(x + delta) [quantized when qtype is given], x + delta): the residual add fused
    into the next norm (one read of x and delta, one write of the sum)."""
    return _norm(x, weight, eps, qtype, None, delta, opts)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out=None, opts=None) -> torch.Tensor:
    return _norm(x, weight, eps, None, out, opts=opts)


def rms_norm_quant(x: torch.Tensor, weight: torch.Tensor, eps: float, qtype: str, out=None, opts=None) -> QActivation:
    return _norm(x, weight, eps, qtype, out, opts=opts)


def _silu(x, qtype, out=None, opts=None):
    """SiLU*mul over row chunks of 1024 (all programs busy at M = 1..16); with qtype, the chunks
    also emit their amax and a second row-chunked kernel quantizes. Measured on an H100 at M = 6,
    I = 12288 (BENCHMARKS.md history): one program per row doing SiLU and quantization in one pass
    took 11.7 us at its best; the row-chunked pair takes less (see BENCHMARKS.md)."""
    x2 = _rows(x)
    m, k2 = x2.shape
    if k2 % 2:
        raise ValueError(f"silu_mul needs an even last dimension (gate|up), got {k2}")
    i = k2 // 2
    blk = _block(i, cap=1024)
    nch = triton.cdiv(i, blk)
    if qtype is None:
        y = out.view(m, i) if out is not None else torch.empty((m, i), dtype=x.dtype, device=x.device)
        if m:
            _silu_mul_kernel[(m, nch)](x2, y, y, i, x2.stride(0), y.stride(0), nch, AMAX=False, BLOCK=blk,
                                       INTERP=INTERPRETED, num_warps=_warps(blk), **pdl_kw(x.device, opts))
        return y.view(*x.shape[:-1], i)
    qmax = _check_qtype(qtype)
    q, s = _qs_out(out, m, i, x.device, qtype)
    if m:
        y = torch.empty((m, i), dtype=x.dtype, device=x.device)
        part = torch.empty((m, nch), dtype=torch.float32, device=x.device)
        _silu_mul_kernel[(m, nch)](x2, y, part, i, x2.stride(0), y.stride(0), nch, AMAX=True, BLOCK=blk,
                                   INTERP=INTERPRETED, num_warps=_warps(blk), **pdl_kw(x.device, opts))
        _quant_chunks_kernel[(m, nch)](y, part, _kq(q), s, i, y.stride(0), q.stride(0), nch, QMAX=qmax, BLOCK=blk,
                                       PCH=triton.next_power_of_2(nch), num_warps=_warps(blk),
                                       **pdl_kw(x.device, opts))
    return QActivation(q.view(*x.shape[:-1], i), s.view(*x.shape[:-1], 1), qtype, x.dtype)


def silu_mul(x: torch.Tensor, out=None, opts=None) -> torch.Tensor:
    return _silu(x, None, out, opts)


def silu_mul_quant(x: torch.Tensor, qtype: str, out=None, opts=None) -> QActivation:
    return _silu(x, qtype, out, opts)


assert set(_QMAX) <= set(QMAX)
