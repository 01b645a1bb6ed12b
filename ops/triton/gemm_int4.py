"""GEMMs over int4 weights: w4a16 (grouped or per channel, sym or asym) and w4a4 (per channel,
int4 x int4 -> int32). Both read the same prepared object, so QSpec's draft (w4a4) and verify
(w4a16) passes share one copy of the packed codes.

Prepared layout (`Int4Weight`), "planar in 256-wide K blocks":
  packed int32 [KB, N, 32], KB = ceil(K / 256). Word (b, n, w) holds, in nibble j (bits 4j..4j+3),
  code(n, k = 256 b + 32 j + w) + 8 (unsigned). K is zero-padded (code 0) to a multiple of 256.
  A program's tile for one K block is BN * 128 contiguous bytes (16-byte vector loads), and
  nibble j of the [BN, 32] word tile is "plane j": the weights of the 32 consecutive k's
  256 b + 32 j + [0, 32), so every plane multiplies a contiguous slice of x and lies inside one
  quantization group for any group size that is a multiple of 32.
  scale fp32 [G, N] (G = K / group, 1 for per channel); zero fp32 [G, N] = 8 + zero point
  (None when symmetric).

Kernel (weight streaming, one launch; see gemm_int8 for the split-K / swapped-operand scheme):
  per K block: load the word tile once; for q in 0..3 extract planes q and q+4 together,
  t = (words >> 4q) & 0x000F000F, so that the low and high 16-bit halves hold one nibble each;
  - w4a16 on fp16/bf16 activations: t | 0x64006400 (fp16 1024.0) or 0x43004300 (bf16 128.0)
    turns each half into the float (magic + nibble) with a bitcast, and one subtraction of
    (magic + 8 + zero) gives the exact integer weight (code - zero) in the activation dtype
    (no int->float conversion); each plane is one tl.dot [BN, 32] x [32, BM] with fp32
    accumulation; the group scale multiplies the partial sums per group (per block for
    group >= 128, per plane for 32/64, once in the epilogue for per-channel weights);
  - fp32 activations (and bf16 under the interpreter, whose bf16 arithmetic is unusable) take
    the same path with fp32 planes and IEEE fp32 dots;
  - w4a4: planes are int8 (nibble - 8) and the dot is int8 x int8 -> int32 against the int4
    activation codes; the epilogue applies (acc * x_scale[m]) * w_scale[n] like w8a8.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from quasar.errors import UnsupportedError
from quasar.quant.format import QActivation, QuantizedWeight
from . import tuning
from ._common import INTERPRETED, gemm_finish

PLANE = 32
KBLOCK = tuning.KBLOCK       # 8 planes of 32


@dataclass
class Int4Weight:
    packed: torch.Tensor              # int32 [KB, N, 32]
    scale: torch.Tensor               # fp32 [G, N]
    zero: Optional[torch.Tensor]      # fp32 [G, N] = 8 + zero point, None: symmetric
    n: int
    k: int
    group_size: int                   # as in QuantizedWeight: -1 = per output channel
    hadamard: bool = False

    @property
    def shape(self):
        return (self.n, self.k)

    @property
    def group(self) -> int:
        return self.k if self.group_size == -1 else self.group_size

    @property
    def nbytes(self) -> int:
        return self.packed.numel() * 4 + self.scale.numel() * 4 + (
            0 if self.zero is None else self.zero.numel() * 4)


def pack_int4(qw: QuantizedWeight) -> Int4Weight:
    if qw.bits != 4:
        raise UnsupportedError(f"the int4 GEMM kernels need 4-bit codes, got bits={qw.bits}")
    n, k = qw.codes.shape
    groups = qw.scale.shape[1]
    gs = qw.group_size
    if gs == -1:
        if groups != 1:
            raise UnsupportedError(f"per-channel int4 weight with {groups} scale columns")
    elif gs % PLANE or k % gs or groups != k // gs:
        raise UnsupportedError(
            f"int4 group size {gs} with in-features {k}: the CUDA int4 kernels need a group size "
            f"that is a multiple of {PLANE} and divides K (32, 64, 128, ... or -1 per channel)")
    kb = triton.cdiv(k, KBLOCK)
    kp = kb * KBLOCK
    u = (qw.codes.to(torch.int32) + 8) & 0xF                       # [N, K] unsigned nibbles
    if kp != k:
        u = torch.nn.functional.pad(u, (0, kp - k), value=8)       # code 0
    u = u.view(n, kb, 8, PLANE).permute(1, 0, 3, 2).to(torch.int64)   # [KB, N, 32(w), 8(j)]
    shifts = torch.arange(0, 32, 4, device=u.device, dtype=torch.int64)
    words = (u << shifts).sum(-1)                                  # < 2**32
    words = torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32).contiguous()
    scale = qw.scale.float().t().contiguous()                      # [G, N]
    zero = None if qw.zero is None else (8.0 + qw.zero.float()).t().contiguous()
    tuning.counters(words.device)
    return Int4Weight(words, scale, zero, n, k, gs, qw.hadamard)


def unpack_int4(w: Int4Weight) -> torch.Tensor:
    """The int4 codes [N, K] back from the packed layout (tests, debugging)."""
    kb = w.packed.shape[0]
    shifts = torch.arange(0, 32, 4, device=w.packed.device, dtype=torch.int32)
    u = (w.packed.unsqueeze(-1) >> shifts) & 0xF                   # [KB, N, 32, 8]
    c = (u.permute(1, 0, 3, 2).reshape(w.n, kb * KBLOCK) - 8).to(torch.int8)
    return c[:, :w.k].contiguous()


@triton.jit
def _xplane(x_ptr, offs_m, m_mask, k0, offs_w, K, stride_xm, stride_xk, F32DOT: tl.constexpr):
    """x[m, k0 + w] as the transposed tile [32, BM] (zero outside K / M)."""
    ks = k0 + offs_w
    t = tl.load(x_ptr + offs_m[None, :] * stride_xm + ks[:, None] * stride_xk,
                mask=(ks < K)[:, None] & m_mask[None, :], other=0)
    if F32DOT:
        t = t.to(tl.float32)
    return t


@triton.jit
def _planes(words, Q: tl.constexpr, off_lo, off_hi, XDT: tl.constexpr, F32DOT: tl.constexpr):
    """Planes Q and Q + 4 of the word tile as (code - zero) in the dot dtype; off_* = [BN] vectors
    of (8 + zero) (F32DOT) or (magic + 8 + zero) in XDT (the magic-number path)."""
    if F32DOT:
        t = (words >> (4 * Q)) & 0x000F000F
        lo = (t & 0xFFFF).to(tl.float32) - off_lo[:, None]
        hi = (t >> 16).to(tl.float32) - off_hi[:, None]
    else:
        if XDT == tl.float16:
            t = ((words >> (4 * Q)) & 0x000F000F) | 0x64006400
        else:
            t = ((words >> (4 * Q)) & 0x000F000F) | 0x43004300
        lo = t.to(tl.int16).to(XDT, bitcast=True) - off_lo[:, None]
        hi = (t >> 16).to(tl.int16).to(XDT, bitcast=True) - off_hi[:, None]
    return lo, hi


@triton.jit
def _dot(a, b, acc, F32DOT: tl.constexpr):
    if F32DOT:
        r = tl.dot(a, b, acc, input_precision="ieee")
    else:
        r = tl.dot(a, b, acc)
    return r


@triton.jit
def _group_params(s_ptr, z_ptr, offs_n, n_mask, k0, N, NG, GROUP: tl.constexpr,
                  HAS_ZERO: tl.constexpr, MAGIC: tl.constexpr, DDT: tl.constexpr):
    """(scale[g, n], magic + 8 + zero[g, n] in the dot dtype) for the group holding k0."""
    g = tl.minimum(k0 // GROUP, NG - 1)
    s = tl.load(s_ptr + g * N + offs_n, mask=n_mask, other=0.0)
    if HAS_ZERO:
        z = tl.load(z_ptr + g * N + offs_n, mask=n_mask, other=8.0)
    else:
        z = tl.full(s.shape, 8.0, tl.float32)
    return s, (z + MAGIC).to(DDT)


@triton.jit(do_not_specialize=["M", "KB", "NG", "blocks_per_split", "split_k"])
def _int4_kernel(x_ptr, xs_ptr, w_ptr, s_ptr, z_ptr, b_ptr, out_ptr, ws_ptr, cnt_ptr,
                 M, N, K, KB, NG, blocks_per_split, split_k,
                 stride_xm, stride_xk, stride_om, stride_on,
                 GROUP: tl.constexpr, PPG: tl.constexpr, PER_CHANNEL: tl.constexpr,
                 HAS_ZERO: tl.constexpr, ACT_INT4: tl.constexpr, HAS_BIAS: tl.constexpr,
                 SPLIT: tl.constexpr, BN: tl.constexpr, BM: tl.constexpr, MAGIC: tl.constexpr,
                 F32DOT: tl.constexpr, INTERP: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_w = tl.arange(0, 32)
    n_mask = offs_n < N
    m_mask = offs_m < M
    XDT: tl.constexpr = x_ptr.dtype.element_ty
    DDT: tl.constexpr = tl.float32 if F32DOT else XDT
    if ACT_INT4:
        acc = tl.zeros([BN, BM], dtype=tl.int32)
    else:
        acc = tl.zeros([BN, BM], dtype=tl.float32)
    w_tile = w_ptr + offs_n[:, None] * 32 + offs_w[None, :]
    b_start = pid_k * blocks_per_split
    b_end = tl.minimum(b_start + blocks_per_split, KB)
    for b in range(b_start, b_end):
        words = tl.load(w_tile + b * N * 32, mask=n_mask[:, None], other=0)
        kb0 = b * 256
        if ACT_INT4:
            for q in tl.static_range(4):
                t = (words >> (4 * q)) & 0x000F000F
                lo = ((t & 0xFFFF) - 8).to(tl.int8)
                hi = ((t >> 16) - 8).to(tl.int8)
                acc = tl.dot(lo, _xplane(x_ptr, offs_m, m_mask, kb0 + 32 * q, offs_w, K,
                                         stride_xm, stride_xk, False), acc, out_dtype=tl.int32)
                acc = tl.dot(hi, _xplane(x_ptr, offs_m, m_mask, kb0 + 32 * (q + 4), offs_w, K,
                                         stride_xm, stride_xk, False), acc, out_dtype=tl.int32)
        else:
            if PPG >= 4:
                # planes 0..3 lie in one group, planes 4..7 in one group (the same when PPG == 8)
                s_lo, off_lo = _group_params(s_ptr, z_ptr, offs_n, n_mask, kb0, N, NG, GROUP,
                                             HAS_ZERO, MAGIC, DDT)
                s_hi, off_hi = _group_params(s_ptr, z_ptr, offs_n, n_mask, kb0 + 128, N, NG, GROUP,
                                             HAS_ZERO, MAGIC, DDT)
                if PER_CHANNEL:
                    for q in tl.static_range(4):
                        lo, hi = _planes(words, q, off_lo, off_hi, XDT, F32DOT)
                        acc = _dot(lo, _xplane(x_ptr, offs_m, m_mask, kb0 + 32 * q, offs_w, K,
                                               stride_xm, stride_xk, F32DOT), acc, F32DOT)
                        acc = _dot(hi, _xplane(x_ptr, offs_m, m_mask, kb0 + 32 * (q + 4), offs_w, K,
                                               stride_xm, stride_xk, F32DOT), acc, F32DOT)
                else:
                    part_lo = tl.zeros([BN, BM], dtype=tl.float32)
                    part_hi = tl.zeros([BN, BM], dtype=tl.float32)
                    for q in tl.static_range(4):
                        lo, hi = _planes(words, q, off_lo, off_hi, XDT, F32DOT)
                        part_lo = _dot(lo, _xplane(x_ptr, offs_m, m_mask, kb0 + 32 * q, offs_w, K,
                                                   stride_xm, stride_xk, F32DOT), part_lo, F32DOT)
                        part_hi = _dot(hi, _xplane(x_ptr, offs_m, m_mask, kb0 + 32 * (q + 4), offs_w,
                                                   K, stride_xm, stride_xk, F32DOT), part_hi, F32DOT)
                    acc += part_lo * s_lo[:, None] + part_hi * s_hi[:, None]
            else:
                # groups of 32 or 64: scale each plane's partial sums
                for q in tl.static_range(4):
                    s_lo, off_lo = _group_params(s_ptr, z_ptr, offs_n, n_mask, kb0 + 32 * q, N, NG,
                                                 GROUP, HAS_ZERO, MAGIC, DDT)
                    s_hi, off_hi = _group_params(s_ptr, z_ptr, offs_n, n_mask, kb0 + 32 * (q + 4), N,
                                                 NG, GROUP, HAS_ZERO, MAGIC, DDT)
                    lo, hi = _planes(words, q, off_lo, off_hi, XDT, F32DOT)
                    zero = tl.zeros([BN, BM], dtype=tl.float32)
                    p_lo = _dot(lo, _xplane(x_ptr, offs_m, m_mask, kb0 + 32 * q, offs_w, K,
                                            stride_xm, stride_xk, F32DOT), zero, F32DOT)
                    p_hi = _dot(hi, _xplane(x_ptr, offs_m, m_mask, kb0 + 32 * (q + 4), offs_w, K,
                                            stride_xm, stride_xk, F32DOT), zero, F32DOT)
                    acc += p_lo * s_lo[:, None] + p_hi * s_hi[:, None]
    gemm_finish(acc, offs_m, offs_n, m_mask, n_mask, M, N, pid_k, split_k, ws_ptr, cnt_ptr,
                xs_ptr, s_ptr, b_ptr, out_ptr, stride_om, stride_on,
                SPLIT, ACT_INT4, PER_CHANNEL, HAS_BIAS, INTERP)


def _ppg(group: int) -> int:
    for p in (8, 4, 2):
        if group % (PLANE * p) == 0:
            return p
    return 1


def _launch(x, xs, w: Int4Weight, bias, out_dtype, act_int4: bool, out=None, config=None):
    m, k = x.shape
    if k != w.k:
        raise ValueError(f"GEMM: activation has {k} features, the weight expects {w.k}")
    n = w.n
    if act_int4 and (w.group_size != -1 or w.zero is not None):
        raise UnsupportedError("w4a4 needs symmetric per-channel int4 weights "
                               f"(got group_size={w.group_size}, asymmetric={w.zero is not None})")
    cfg = tuning.pick("w4a4" if act_int4 else "w4a16", m, n, k, x.device, config)
    bm = tuning.block_m(m)
    kb = w.packed.shape[0]
    if out is None:
        out = torch.empty((m, n), dtype=out_dtype, device=x.device)
    if m == 0:
        return out
    grid, per, split, ws, cnt = tuning.split_plan(m, n, kb, cfg, out, act_int4)
    per_channel = w.group_size == -1
    group = w.group
    f32dot = bool(((x.dtype == torch.float32) or (INTERPRETED and x.dtype == torch.bfloat16))
                  and not act_int4)
    magic = 0.0 if (f32dot or act_int4) else (1024.0 if x.dtype == torch.float16 else 128.0)
    _int4_kernel[grid](
        x, xs if xs is not None else w.scale, w.packed, w.scale,
        w.zero if w.zero is not None else w.scale, bias if bias is not None else w.scale,
        out, ws, cnt, m, n, k, kb, w.scale.shape[0], per, split,
        x.stride(0), x.stride(1), out.stride(0), out.stride(1),
        GROUP=group, PPG=8 if per_channel else _ppg(group), PER_CHANNEL=per_channel,
        HAS_ZERO=w.zero is not None, ACT_INT4=act_int4, HAS_BIAS=bias is not None,
        SPLIT=split > 1, BN=cfg.bn, BM=bm, MAGIC=magic, F32DOT=f32dot, INTERP=INTERPRETED,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    # no programmatic dependent launch here (unlike the other kernels): with it the W4A16 verify
    # step got 4% slower on an H100 (the next kernels' CTAs, launched early, sit on the SMs this
    # GEMM streams through), and 10% slower with a wait-only prologue (BENCHMARKS.md)
    return out


def gemm_w4a16(x: torch.Tensor, w: Int4Weight, bias=None, out=None, config=None) -> torch.Tensor:
    """x[M, K] in bf16/fp16/fp32; output in x.dtype."""
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise UnsupportedError(f"w4a16 activations must be fp16, bf16 or fp32, got {x.dtype}")
    return _launch(x, None, w, bias, x.dtype, False, out, config)


def gemm_w4a4(a: QActivation, w: Int4Weight, bias=None, out=None, config=None) -> torch.Tensor:
    """a: per-token int4 activation (codes one per int8 element); output in a.dtype."""
    q = a.q.reshape(-1, a.q.shape[-1])
    s = a.scale.reshape(-1).float().contiguous()
    return _launch(q, s, w, bias, a.dtype, True, out, config)
