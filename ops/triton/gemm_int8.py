"""GEMMs over 8-bit per-output-channel weights: w8a8-int8, w8a16 and w8a8-fp8 (e4m3 weights and
per-token e4m3 activations; the same kernel with an fp8 x fp8 -> fp32 tl.dot).

Weight-streaming design for M = 1..64 rows (decode / verify), one launch per GEMM:
- the operands are swapped: each program computes the transposed tile acc[BN, BM] =
  W[BN, BK] @ X^T[BK, BM], so the weight tile is the MMA's large operand and the few activation
  rows (padded to BM = 16/32/64) the small one; every weight byte is read once whatever M is;
- split-K over programs (grid = N tiles x SPLIT_K x M tiles) so that N = 4096 still gives enough
  programs to fill the GPU; partials meet in a workspace and the last program of each tile
  finishes it (see _common.gemm_finish);
- w8a8-int8: int8 x int8 -> int32 tl.dot, exact; the epilogue applies (acc * x_scale[m]) *
  w_scale[n] (+ bias) in fp32 and casts to the activation dtype, as the reference does;
- w8a16: the int8 tile is converted to the activation dtype in registers (exact: |c| <= 128)
  and multiplied with the activations on the tensor cores in fp32 accumulation; the per-channel
  scale is applied once in the epilogue. On the GPU the conversion is PTX (_i8_pairs: the tile
  read as int16, four codes per 32-bit register, x gathered in the matching k order); H100, one
  Qwen3-8B layer at M = 6: 108.1 -> 99.7 us against Triton's own conversion (BENCHMARKS.md).
- w8a8-fp8: e4m3 x e4m3 on the tensor cores with fp32 accumulation (max_num_imprecise_acc = 0:
  Hopper's fast FP8 accumulation is not used), the epilogue as w8a8-int8's. On an H100 at M = 6
  cuBLAS (torch._scaled_mm) reached about half of the bandwidth on these shapes (BENCHMARKS.md).

Prepared layout (`Int8Weight`): codes int8 [N, K_pad] (K contiguous, zero-padded to a multiple
of 256, so K blocks need no mask), scale fp32 [N]. The same object serves both int8 schemes;
w8a8-fp8 uses it with float8_e4m3fn codes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from quasar.errors import UnsupportedError
from quasar.ops.types import QActivation, QuantizedWeight
from . import tuning
from ._common import (pdl_kw, pdl_prologue, INTERPRETED, early_loads, gemm_finish, prefetch, ptx_dequant,
                      prefetch_blocks, prefetch_l2)

# Option `prefetch`: blocks of each program's weight rows prefetched into L2 (prefetch.global.L2,
# 128-byte lines) before the PDL wait, for both kinds of GEMM ("gemm_q" 8-bit activations, "gemm_f"
# float). H100, Qwen3-8B step (BENCHMARKS.md): W8A8 verify 3.988 -> 3.917 ms with one block (two:
# 3.933); for the float GEMMs (bf16 decode) one block was within the noise. Option `ptx_dequant`:
# w8a16's int8 -> float conversion in PTX on the GPU (_i8_pairs), else Triton's own.


@triton.jit
def _prefetch_rows(w_ptr, offs_n, n_mask, KPAD, k0, NPF: tl.constexpr, BK: tl.constexpr):
    """L2 prefetch of NPF blocks of BK codes of the tile's weight rows from k0 (a hint: no
    registers held, nothing waits for it; k0 + NPF * BK <= KPAD)."""
    ESZ: tl.constexpr = w_ptr.dtype.element_ty.primitive_bitwidth // 8
    LINES: tl.constexpr = NPF * BK * ESZ // 128
    offs_l = tl.arange(0, LINES) * (128 // ESZ)
    rows = tl.where(n_mask, offs_n, 0)
    prefetch_l2(w_ptr + rows[:, None].to(tl.int64) * KPAD + k0 + offs_l[None, :])


@dataclass
class Int8Weight:
    codes: torch.Tensor       # int8 [N, K_pad]
    scale: torch.Tensor       # fp32 [N]
    n: int
    k: int
    hadamard: bool = False

    @property
    def shape(self):
        return (self.n, self.k)

    @property
    def nbytes(self) -> int:
        return self.codes.numel() + self.scale.numel() * 4


def _pack(qw: QuantizedWeight) -> Int8Weight:
    """The codes K-padded to a multiple of KBLOCK (with zeros: +0.0 for e4m3), per-channel scales."""
    n, k = qw.codes.shape
    kp = triton.cdiv(k, tuning.KBLOCK) * tuning.KBLOCK
    codes = qw.codes
    if kp != k:
        codes = torch.nn.functional.pad(codes.view(torch.uint8), (0, kp - k)).view(codes.dtype)
    tuning.counters(codes.device)
    return Int8Weight(codes.contiguous(), qw.scale.reshape(n).float().contiguous(), n, k, qw.hadamard)


def pack_int8(qw: QuantizedWeight) -> Int8Weight:
    if qw.is_fp8 or qw.bits != 8 or qw.codes.dtype != torch.int8:
        raise UnsupportedError("the int8 GEMM kernels need int8 codes (bits=8)")
    if qw.group_size != -1 or qw.scale.shape[1] != 1 or qw.zero is not None:
        raise UnsupportedError("the int8 GEMM kernels need symmetric per-output-channel int8 weights "
                               f"(got group_size={qw.group_size}, zero points={qw.zero is not None})")
    return _pack(qw)


def pack_fp8(qw: QuantizedWeight) -> Int8Weight:
    if not qw.is_fp8 or qw.group_size != -1 or qw.scale.shape[1] != 1:
        raise UnsupportedError("the FP8 GEMM kernel needs float8_e4m3fn per-output-channel weights")
    return _pack(qw)


@triton.jit
def _mac(acc, w, xt, XDT: tl.constexpr, ACT_INT8: tl.constexpr, ACT_FP8: tl.constexpr, F32DOT: tl.constexpr):
    """acc += W[BN, BK] @ X^T[BK, BM] for one K block, in the scheme's arithmetic."""
    if ACT_INT8:
        acc = tl.dot(w, xt, acc, out_dtype=tl.int32)
    elif ACT_FP8:   # the codes arrive as uint8 (a masked load's zero fill is then +0.0)
        w = w.to(tl.float8e4nv, bitcast=True)
        xt = xt.to(tl.float8e4nv, bitcast=True)
        if F32DOT:
            acc = tl.dot(w.to(tl.float32), xt.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(w, xt, acc, max_num_imprecise_acc=0)
    else:
        if F32DOT:
            acc = tl.dot(w.to(tl.float32), xt.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(w.to(XDT), xt, acc)
    return acc


@triton.jit
def _i8_pairs(h, XDT: tl.constexpr):
    """w8a16 on the GPU: int8 codes -> float, in PTX. h is the weight tile read as int16
    [BN, BK / 2]; a pair of its elements (2i, 2i + 1) is one 32-bit register holding the codes of
    k = 4i .. 4i + 3. Returns (lo, hi), [BN, BK / 2] each in XDT: lo holds k = 4i, 4i + 1 and hi
    k = 4i + 2, 4i + 3 at elements (2i, 2i + 1), each pair one register of the tensor-core A
    fragment. fp16: the biased byte (b ^ 0x80) under fp16 1024's exponent, minus 1152 (5
    instructions per 4 codes); bf16, whose 7 mantissa bits cannot hold a byte: fp32 8388608 + byte,
    minus 8388736, rounded pairwise to bf16 (exact: |b| <= 128)."""
    if XDT == tl.float16:
        lo, hi = tl.inline_asm_elementwise(
            "{.reg .b32 u, e, m; mov.b32 e, 0x64646464; mov.b32 m, 0x64806480; "
            "xor.b32 u, $2, 0x80808080; prmt.b32 $0, u, e, 0x5140; prmt.b32 $1, u, e, 0x7362; "
            "sub.f16x2 $0, $0, m; sub.f16x2 $1, $1, m;}",
            "=r,=r,r", [h], dtype=(tl.float16, tl.float16), is_pure=True, pack=2)
    else:
        lo, hi = tl.inline_asm_elementwise(
            "{.reg .b32 u, e; .reg .f32 f0, f1, f2, f3; mov.b32 e, 0x4b000000; xor.b32 u, $2, 0x80808080; "
            "prmt.b32 f0, u, e, 0x7650; prmt.b32 f1, u, e, 0x7651; "
            "prmt.b32 f2, u, e, 0x7652; prmt.b32 f3, u, e, 0x7653; "
            "sub.f32 f0, f0, 0f4B000080; sub.f32 f1, f1, 0f4B000080; "
            "sub.f32 f2, f2, 0f4B000080; sub.f32 f3, f3, 0f4B000080; "
            "cvt.rn.bf16x2.f32 $0, f1, f0; cvt.rn.bf16x2.f32 $1, f3, f2;}",
            "=r,=r,r", [h], dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=2)
    return lo, hi


@triton.jit(do_not_specialize=["M", "NKB", "blocks_per_split", "split_k"])
def _int8_weight_kernel(x_ptr, xs_ptr, w_ptr, s_ptr, b_ptr, out_ptr, ws_ptr, cnt_ptr,
                        M, N, K, KPAD, NKB, blocks_per_split, split_k,
                        stride_xm, stride_xk, stride_om, stride_on,
                        ACT_INT8: tl.constexpr, ACT_FP8: tl.constexpr, HAS_BIAS: tl.constexpr,
                        SPLIT: tl.constexpr,
                        BN: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
                        F32DOT: tl.constexpr, EARLY_W: tl.constexpr, INTERP: tl.constexpr, PDL: tl.constexpr,
                        ASM16: tl.constexpr = False, NPF: tl.constexpr = 0):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_k = tl.arange(0, BK)
    n_mask = offs_n < N
    m_mask = offs_m < M
    XDT: tl.constexpr = x_ptr.dtype.element_ty
    w_tile = w_ptr + offs_n[:, None] * KPAD + offs_k[None, :]
    x_tile = x_ptr + offs_m[None, :] * stride_xm + offs_k[:, None] * stride_xk
    b_start = pid_k * blocks_per_split
    b_end = tl.minimum(b_start + blocks_per_split, NKB)
    if EARLY_W:
        # the first weight tile is loaded before waiting for the previous kernel (no kernel writes
        # weights): with programmatic dependent launch its HBM latency overlaps that kernel's tail
        # (an empty split, b_start >= b_end, loads a valid block it then does not use)
        w0 = tl.load(w_tile + tl.minimum(b_start, NKB - 1) * BK, mask=n_mask[:, None], other=0)
    if NPF > 0:
        # the program's first block(s) after the early tile, kept inside the row (NKB >= NPF)
        if EARLY_W:
            pf0 = tl.minimum(b_start + 1, NKB - NPF)
        else:
            pf0 = tl.minimum(b_start, NKB - NPF)
        _prefetch_rows(w_ptr, offs_n, n_mask, KPAD, pf0 * BK, NPF, BK)
    pdl_prologue(PDL)
    if ACT_INT8:
        acc = tl.zeros([BN, BM], dtype=tl.int32)
    else:
        acc = tl.zeros([BN, BM], dtype=tl.float32)
    b_loop = b_start
    if EARLY_W:
        if b_start < b_end:
            k0 = b_start * BK
            xt = tl.load(x_tile + k0 * stride_xk, mask=((k0 + offs_k) < K)[:, None] & m_mask[None, :], other=0)
            acc = _mac(acc, w0, xt, XDT, ACT_INT8, ACT_FP8, F32DOT)
        b_loop = b_start + 1
    if ASM16:
        # w8a16 on the GPU (see _i8_pairs): the tile as int16 [BN, BK / 2], x gathered in the
        # same k order for the two halves
        offs_j = tl.arange(0, BK // 2)
        kx = 4 * (offs_j // 2) + offs_j % 2
        h_tile = w_ptr.to(tl.pointer_type(tl.int16)) + offs_n[:, None] * (KPAD // 2) + offs_j[None, :]
        x_lo = x_ptr + offs_m[None, :] * stride_xm + kx[:, None] * stride_xk
        for b in range(b_loop, b_end):
            k0 = b * BK
            h = tl.load(h_tile + k0 // 2, mask=n_mask[:, None], other=0)
            lo, hi = _i8_pairs(h, XDT)
            x0 = tl.load(x_lo + k0 * stride_xk, mask=((k0 + kx) < K)[:, None] & m_mask[None, :], other=0)
            x1 = tl.load(x_lo + (k0 + 2) * stride_xk, mask=((k0 + 2 + kx) < K)[:, None] & m_mask[None, :],
                         other=0)
            acc = tl.dot(lo, x0, acc)
            acc = tl.dot(hi, x1, acc)
    else:
        for b in range(b_loop, b_end):
            k0 = b * BK
            w = tl.load(w_tile + k0, mask=n_mask[:, None], other=0)
            xt = tl.load(x_tile + k0 * stride_xk, mask=((k0 + offs_k) < K)[:, None] & m_mask[None, :],
                         other=0)
            acc = _mac(acc, w, xt, XDT, ACT_INT8, ACT_FP8, F32DOT)
    gemm_finish(acc, offs_m, offs_n, m_mask, n_mask, M, N, pid_k, split_k, ws_ptr, cnt_ptr,
                xs_ptr, s_ptr, b_ptr, out_ptr, stride_om, stride_on,
                SPLIT, ACT_INT8 or ACT_FP8, True, HAS_BIAS, INTERP)


def _launch(x, xs, w: Int8Weight, bias, out_dtype, act_int8: bool, out=None, config=None, kind=None,
            act_fp8: bool = False, opts=None):
    m, k = x.shape
    if k != w.k:
        raise ValueError(f"GEMM: activation has {k} features, the weight expects {w.k}")
    n = w.n
    kind = kind or ("w8a8_int8" if act_int8 else ("w8a8_fp8" if act_fp8 else "int8_a16"))
    # FP8 streams the same bytes through the same loop as int8: without an entry of its own it
    # takes int8's tuned configuration
    if act_fp8 and config is None and tuning.tuned(kind, m, n, k, x.device, opts) is None:
        kind = "w8a8_int8"
    cfg = tuning.pick(kind, m, n, k, x.device, config, opts)
    bm = tuning.block_m(m)
    bk = cfg.bk
    kpad = w.codes.shape[1]
    if kpad % bk:
        raise ValueError(f"BK={bk} does not divide the padded K={kpad}")
    nkb = kpad // bk
    if out is None:
        out = torch.empty((m, n), dtype=out_dtype, device=x.device)
    if m == 0:
        return out
    grid, per, split, ws, cnt = tuning.split_plan(m, n, nkb, cfg, out, act_int8)
    f32dot = (x.dtype == torch.float32) or INTERPRETED
    codes = w.codes
    # w8a16 (int8 codes, 16-bit activations) on the GPU: the PTX conversion (_i8_pairs)
    asm16 = bool(ptx_dequant(opts) and not (act_int8 or act_fp8 or f32dot) and codes.dtype == torch.int8)
    if act_fp8:
        x, codes = x.view(torch.uint8), codes.view(torch.uint8)
    _int8_weight_kernel[grid](
        x, xs if xs is not None else w.scale, codes, w.scale, bias if bias is not None else w.scale,
        out, ws, cnt, m, n, k, kpad, nkb, per, split, x.stride(0), x.stride(1), out.stride(0), out.stride(1),
        ACT_INT8=act_int8, ACT_FP8=act_fp8, HAS_BIAS=bias is not None, SPLIT=split > 1, BN=cfg.bn, BM=bm,
        BK=bk, F32DOT=bool(f32dot and not act_int8),
        EARLY_W=early_loads("gemm_q" if (act_int8 or act_fp8) else "gemm_f", opts) and not asm16, INTERP=INTERPRETED,
        ASM16=asm16, NPF=prefetch_blocks(prefetch(opts), nkb),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **pdl_kw(out.device, opts))
    return out


def gemm_w8a8_int8(a: QActivation, w: Int8Weight, bias=None, out=None, config=None, opts=None) -> torch.Tensor:
    """a: per-token int8 activation (q[M, K] int8, scale[M, 1] fp32); output in a.dtype."""
    q = a.q.reshape(-1, a.q.shape[-1])
    s = a.scale.reshape(-1).float().contiguous()
    return _launch(q, s, w, bias, a.dtype, True, out, config, opts=opts)


def gemm_w8a8_fp8(a: QActivation, w: Int8Weight, bias=None, out=None, config=None, opts=None) -> torch.Tensor:
    """a: per-token e4m3 activation (q[M, K] float8_e4m3fn, scale[M, 1] fp32); w: pack_fp8's;
    output in a.dtype, as quasar.ops.reference.gemm_w8a8_fp8 (fp32 accumulation, then
    (acc * x_scale) * w_scale (+ bias))."""
    if a.q.dtype != torch.float8_e4m3fn or w.codes.dtype != torch.float8_e4m3fn:
        raise UnsupportedError(f"w8a8-fp8 needs e4m3 activations and weights, got {a.q.dtype} x {w.codes.dtype}")
    q = a.q.reshape(-1, a.q.shape[-1])
    s = a.scale.reshape(-1).float().contiguous()
    return _launch(q, s, w, bias, a.dtype, False, out, config, act_fp8=True, opts=opts)


def gemm_w8a16(x: torch.Tensor, w: Int8Weight, bias=None, out=None, config=None, opts=None) -> torch.Tensor:
    """x[M, K] in bf16/fp16/fp32; output in x.dtype."""
    return _launch(x, None, w, bias, x.dtype, False, out, config, opts=opts)


_ONES: dict = {}


def gemm_dense_stream(x: torch.Tensor, w: torch.Tensor, bias=None, out=None, config=None, opts=None) -> torch.Tensor:
    """x[M, K] @ w[N, K]^T for a dense bf16/fp16 weight through the same weight-streaming kernel
    (the w8a16 path without the int8 -> float conversion; the per-channel scale is 1.0, an exact
    multiply). cuBLAS picks tiles for large M; at M = 1..16 on the small projections it reaches
    about half of the bandwidth (BENCHMARKS.md), so the CUDA backend routes a dense GEMM here
    only where a tuned table says this kernel is faster (kind "bf16")."""
    n, k = w.shape
    if w.stride(1) != 1 or w.stride(0) != k or w.dtype != x.dtype:
        raise ValueError("gemm_dense_stream needs a row-major weight in the activation dtype")
    key = (n, str(w.device))
    ones = _ONES.get(key)
    if ones is None:
        ones = _ONES[key] = torch.ones(n, dtype=torch.float32, device=w.device)
    return _launch(x, None, Int8Weight(w, ones, n, k), bias, x.dtype, False, out, config, kind="bf16", opts=opts)
