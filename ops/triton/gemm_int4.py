"""GEMMs over int4 weights: w4a16 (grouped or per channel, sym or asym) and w4a4 (per channel,
int4 x int4 -> int32). Both read the same prepared object, so QSpec's draft (w4a4) and verify
(w4a16) passes share one copy of the packed codes.

Prepared layout (`Int4Weight`), "k-pairs in 256-wide K blocks":
  packed int32 [KB, N, 32], KB = ceil(K / 256). Word (b, n, w) holds, in nibble j = q + 4 h
  (bits 4j..4j+3, q in 0..3, h in 0..1), code(n, k = 256 b + 64 q + 2 w + h) + 8 (unsigned).
  K is zero-padded (code 0) to a multiple of 256. A program's tile for one K block is BN * 128
  contiguous bytes (16-byte vector loads). For each q, t = (word >> 4q) & 0x000F000F holds the
  codes of two *consecutive* k's (2w, 2w + 1 of chunk q) in its low and high 16-bit halves:
  exactly the pair of 16-bit values one register of a tensor-core A fragment holds. So chunk q
  of the tile, the weights of k = 256 b + 64 q + [0, 64), is one [BN, 64] dot operand built in
  registers (no shared-memory round trip; with the PTX below, no byte permutes either), and it
  multiplies a contiguous slice of x.
  scale fp32 [G, N] (G = K / group, 1 for per channel); zero fp32 [G, N] = 8 + zero point
  (None when symmetric).

Kernel (weight streaming, one launch; see gemm_int8 for the split-K / swapped-operand scheme):
  per K block: load the word tile once; for each chunk q:
  - w4a16 on fp16/bf16 activations: t | 0x64006400 (fp16 1024.0) or 0x43004300 (bf16 128.0)
    turns each half into the float (magic + nibble) with a bitcast, and one subtraction of
    (magic + 8 + zero) gives the exact integer weight (code - zero) in the activation dtype
    (no int->float conversion); one tl.dot [BN, 64] x [64, BM] per chunk with fp32
    accumulation. On the GPU this dequantization is three PTX instructions per 32-bit register
    (_chunk_asm: shift, lop3, and the pair subtraction), on the tile read as int16 so that each
    register is one pair. Triton's own lowering of the same arithmetic (_chunk, which the
    interpreter runs, and which the GPU runs with the ptx_dequant option off) splits and re-packs the
    16-bit halves: H100 W4A16 verify step 3.344 -> 3.105 ms with the PTX (BENCHMARKS.md).
    Per-channel weights accumulate all chunks and scale once in the epilogue; grouped weights
    scale the partial sums of each group's chunks (a chunk lies in one group when the group size
    is a multiple of 64; for other multiples of 32 the chunk's two halves of 32 are dotted
    separately against x masked to each half);
  - fp32 activations (and bf16 under the interpreter, whose bf16 arithmetic is unusable) take
    the same path with fp32 operands and IEEE fp32 dots;
  - w4a4: the chunk is int8 (nibble - 8) and the dot is int8 x int8 -> int32 against the int4
    activation codes; the epilogue applies (acc * x_scale[m]) * w_scale[n] like w8a8. On the GPU
    the codes are built in PTX too (_chunk_asm_i8, four k's per register): H100 QSpec draft step
    3.994 -> 2.987 ms.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from quasar.errors import UnsupportedError
from quasar.ops.types import QActivation, QuantizedWeight
from . import tuning
from ._common import INTERPRETED, gemm_finish, pdl_kw, pdl_prologue, prefetch, prefetch_blocks, prefetch_l2, ptx_dequant

# Option `prefetch`: one block of each program's codes prefetched into L2 before the PDL wait. H100,
# Qwen3-8B step, one process, 5 rounds (BENCHMARKS.md): W4A16 verify 3.071 -> 3.037 ms, QSpec w4a4
# draft 3.080 -> 2.979 with one block (two: no better; four: slower than none). Option
# `ptx_dequant`: the PTX dequantization on the GPU (_chunk_asm*), else pure Triton.

PLANE = 32                   # the smallest group size: half a chunk
KBLOCK = tuning.KBLOCK       # 4 chunks of 64


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
    # k = 256 b + 64 q + 2 w + h  ->  word (b, n, w), nibble j = q + 4 h
    u = u.view(n, kb, 4, 32, 2).permute(1, 0, 3, 4, 2).reshape(kb, n, 32, 8).to(torch.int64)
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
    u = (w.packed.unsqueeze(-1) >> shifts) & 0xF                   # [KB, N, 32(w), 8(j = q + 4h)]
    u = u.view(kb, w.n, 32, 2, 4).permute(1, 0, 4, 2, 3)            # [N, KB, q, w, h]
    c = (u.reshape(w.n, kb * KBLOCK) - 8).to(torch.int8)
    return c[:, :w.k].contiguous()


@triton.jit
def _xchunk(x_ptr, offs_m, m_mask, k0, offs_c, K, stride_xm, stride_xk, EVEN_K: tl.constexpr,
            F32DOT: tl.constexpr):
    """x[m, k0 + c] as the transposed tile [64, BM] (zero outside K / M)."""
    ks = k0 + offs_c
    if EVEN_K:
        mask = m_mask[None, :]
    else:
        mask = (ks < K)[:, None] & m_mask[None, :]
    t = tl.load(x_ptr + offs_m[None, :] * stride_xm + ks[:, None] * stride_xk, mask=mask, other=0)
    if F32DOT:
        t = t.to(tl.float32)
    return t


@triton.jit
def _chunk(words, words8, Q: tl.constexpr, off, BN: tl.constexpr, XDT: tl.constexpr,
           F32DOT: tl.constexpr, ACT_INT4: tl.constexpr):
    """Chunk Q of the word tile as the [BN, 64] operand (code - zero), k = 64 Q + 2 w + h: the two
    16-bit halves of (words >> 4Q) & 0x000F000F, joined. words8 = words >> 8. off: (8 + zero)
    (F32DOT), or (magic + 8 + zero) in XDT (odd Q: magic / 16 + 8 + zero), as [BN, 1] (or
    [BN, 64] when it varies along the chunk); unused for w4a4.
    On fp16 the magic-number path takes odd chunks without a shift: t = words & 0x00F000F0 |
    magic is magic + 16 * nibble, and t / 16 - (magic / 16 + 8 + zero) is the same exact integer
    (one multiply-add), so a word costs 1 shift, 4 and-or and 4 subtract/multiply-adds of fp16
    pairs; bf16 (7 mantissa bits) shifts the odd chunks too (3 shifts)."""
    if ACT_INT4:
        t = (words >> (4 * Q)) & 0x000F000F
        lo = ((t & 0xFFFF) - 8).to(tl.int8)
        hi = ((t >> 16) - 8).to(tl.int8)
        a = tl.reshape(tl.join(lo, hi), (BN, 64))
    elif F32DOT:
        t = (words >> (4 * Q)) & 0x000F000F
        lo = (t & 0xFFFF).to(tl.float32)
        hi = (t >> 16).to(tl.float32)
        a = tl.reshape(tl.join(lo, hi), (BN, 64)) - off
    else:
        src = words if Q < 2 else words8
        if XDT == tl.float16:
            if Q % 2 == 0:
                t = (src & 0x000F000F) | 0x64006400
            else:
                t = (src & 0x00F000F0) | 0x64006400
        else:
            # bf16 has 7 mantissa bits: 16 * nibble does not fit under the exponent, so the odd
            # chunks are shifted down like the even ones
            if Q % 2 == 0:
                t = (src & 0x000F000F) | 0x43004300
            else:
                t = ((src >> 4) & 0x000F000F) | 0x43004300
        lo = t.to(tl.int16).to(XDT, bitcast=True)
        hi = (t >> 16).to(tl.int16).to(XDT, bitcast=True)
        a = tl.reshape(tl.join(lo, hi), (BN, 64))
        if Q % 2 == 0 or XDT != tl.float16:
            a = a - off
        else:
            a = a * 0.0625 - off
    return a


@triton.jit
def _chunk_asm(h, Q: tl.constexpr, off, XDT: tl.constexpr):
    """_chunk's magic-number path in PTX, on the GPU: h is the word tile read as int16 [BN, 64]
    (element c = half c % 2 of word c // 2), and each pair of elements is one 32-bit register, so
    a register costs one shift, one and-or (lop3) and one subtraction of a bf16/fp16 pair: the
    compiler's own lowering of the pure-Triton path splits each word into 16-bit halves and
    re-packs them (shifts and byte permutes per half)."""
    # 4 Q as a PTX literal (a jit helper cannot return a constexpr string on triton 3.6)
    S: tl.constexpr = "0" if Q == 0 else ("4" if Q == 1 else ("8" if Q == 2 else "12"))
    if XDT == tl.float16:
        t = tl.inline_asm_elementwise("{.reg .b32 t; shr.b32 t, $1, " + S + "; "
                                      "lop3.b32 $0, t, 0x000F000F, 0x64006400, 0xEA;}",
                                      "=r,r", [h], dtype=tl.float16, is_pure=True, pack=2)
    else:
        t = tl.inline_asm_elementwise("{.reg .b32 t; shr.b32 t, $1, " + S + "; "
                                      "lop3.b32 $0, t, 0x000F000F, 0x43004300, 0xEA;}",
                                      "=r,r", [h], dtype=tl.bfloat16, is_pure=True, pack=2)
    return t - off


@triton.jit
def _chunk_asm_i8(h, Q: tl.constexpr):
    """w4a4's chunk Q as int8 codes (nibble - 8) in PTX, on the GPU: four consecutive k's (two
    words of the int16-read tile) per 32-bit register, the int8 A fragment's unit: per register
    two shifts, two masks, one byte permute, and n - 8 per byte as (n + 0x78) ^ 0x80 (no borrow
    crosses a byte)."""
    # 4 Q as a PTX literal (a jit helper cannot return a constexpr string on triton 3.6)
    S: tl.constexpr = "0" if Q == 0 else ("4" if Q == 1 else ("8" if Q == 2 else "12"))
    return tl.inline_asm_elementwise(
        "{.reg .b32 a, b, d; shr.b32 a, $1, " + S + "; shr.b32 b, $2, " + S + "; "
        "and.b32 a, a, 0x000F000F; and.b32 b, b, 0x000F000F; prmt.b32 d, a, b, 0x6420; "
        "add.u32 d, d, 0x78787878; xor.b32 $0, d, 0x80808080;}",
        "=r,r,r", [h], dtype=tl.int8, is_pure=True, pack=4)


@triton.jit
def _wchunk(h, words, words8, q: tl.constexpr, off_e, off_o, BN: tl.constexpr, XDT: tl.constexpr,
            F32DOT: tl.constexpr, ASM: tl.constexpr):
    """w4a16's chunk q as the dot operand: the PTX dequantization on the GPU (ASM; off_e for every
    chunk), else Triton's own (_chunk; off_e for even chunks, off_o for odd ones)."""
    if ASM:
        a = _chunk_asm(h, q, off_e, XDT)
    else:
        a = _chunk(words, words8, q, off_e if q % 2 == 0 else off_o, BN, XDT, F32DOT, False)
    return a


@triton.jit
def _dot(a, b, acc, F32DOT: tl.constexpr):
    if F32DOT:
        r = tl.dot(a, b, acc, input_precision="ieee")
    else:
        r = tl.dot(a, b, acc)
    return r


@triton.jit
def _group_sz(s_ptr, z_ptr, offs_n, n_mask, k0, N, NG, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr):
    """(scale[g, n], 8 + zero[g, n]) in fp32 for the group holding k0."""
    g = tl.minimum(k0 // GROUP, NG - 1)
    s = tl.load(s_ptr + g * N + offs_n, mask=n_mask, other=0.0)
    if HAS_ZERO:
        z = tl.load(z_ptr + g * N + offs_n, mask=n_mask, other=8.0)
    else:
        z = tl.full(s.shape, 8.0, tl.float32)
    return s, z


@triton.jit(do_not_specialize=["M", "KB", "NG", "blocks_per_split", "split_k"])
def _int4_kernel(x_ptr, xs_ptr, w_ptr, s_ptr, z_ptr, b_ptr, out_ptr, ws_ptr, cnt_ptr,
                 M, N, K, KB, NG, blocks_per_split, split_k,
                 stride_xm, stride_xk, stride_om, stride_on,
                 GROUP: tl.constexpr, PER_CHANNEL: tl.constexpr, HALF: tl.constexpr, QPG: tl.constexpr,
                 HAS_ZERO: tl.constexpr, ACT_INT4: tl.constexpr, HAS_BIAS: tl.constexpr,
                 SPLIT: tl.constexpr, BN: tl.constexpr, BM: tl.constexpr, MAGIC: tl.constexpr,
                 EVEN_K: tl.constexpr, F32DOT: tl.constexpr, INTERP: tl.constexpr,
                 PDL: tl.constexpr, ASM: tl.constexpr = False, NPF: tl.constexpr = 0):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_w = tl.arange(0, 32)
    offs_c = tl.arange(0, 64)
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
    # the odd chunks' offset on the magic-number path (see _chunk)
    MAGIC_ODD: tl.constexpr = MAGIC / 16 if (XDT == tl.float16 and not F32DOT and not ASM) else MAGIC
    # ASM: the tile read as int16 [BN, 64] (see _chunk_asm)
    h_tile = w_ptr.to(tl.pointer_type(tl.int16)) + offs_n[:, None] * 64 + offs_c[None, :]
    if PER_CHANNEL:
        # one (8 + zero) per output channel for the whole of K
        if HAS_ZERO:
            z0 = tl.load(z_ptr + offs_n, mask=n_mask, other=8.0)
        else:
            z0 = tl.full([BN], 8.0, tl.float32)
        off_e = (z0 + MAGIC).to(DDT)[:, None]
        off_o = (z0 + MAGIC_ODD).to(DDT)[:, None]
    if NPF > 0:
        # L2 prefetch of the program's first NPF blocks (one 128-byte line per row and block)
        pb = tl.minimum(b_start + tl.arange(0, NPF), KB - 1)
        rows = tl.where(n_mask, offs_n, 0)
        prefetch_l2(w_ptr + (pb[None, :].to(tl.int64) * N + rows[:, None]) * 32)
    pdl_prologue(PDL)
    for b in range(b_start, b_end):
        # one of the two tile reads (the other names are stand-ins _wchunk does not compile)
        if ASM:
            h = tl.load(h_tile + b * N * 64, mask=n_mask[:, None], other=0)
            words = h
            words8 = h
        else:
            words = tl.load(w_tile + b * N * 32, mask=n_mask[:, None], other=0)
            words8 = words >> 8
            h = words
        kb0 = b * 256
        if not (ACT_INT4 or PER_CHANNEL or HALF):
            part = tl.zeros([BN, BM], dtype=tl.float32)
        for q in tl.static_range(4):
            k0 = kb0 + 64 * q
            if ACT_INT4:
                if ASM:
                    a = _chunk_asm_i8(h, q)
                else:
                    a = _chunk(words, words8, q, 0, BN, XDT, False, True)
                acc = tl.dot(a, _xchunk(x_ptr, offs_m, m_mask, k0, offs_c, K, stride_xm, stride_xk,
                                        EVEN_K, False), acc, out_dtype=tl.int32)
            elif PER_CHANNEL:
                a = _wchunk(h, words, words8, q, off_e, off_o, BN, XDT, F32DOT, ASM)
                acc = _dot(a, _xchunk(x_ptr, offs_m, m_mask, k0, offs_c, K, stride_xm, stride_xk,
                                      EVEN_K, F32DOT), acc, F32DOT)
            elif HALF:
                # a group boundary can fall in the middle of the chunk (group 32, 96, ...): the
                # first 32 k's (w < 16) take one group's (scale, zero), the last 32 the next's
                s_a, z_a = _group_sz(s_ptr, z_ptr, offs_n, n_mask, k0, N, NG, GROUP, HAS_ZERO)
                s_b, z_b = _group_sz(s_ptr, z_ptr, offs_n, n_mask, k0 + 32, N, NG, GROUP, HAS_ZERO)
                mg = MAGIC if q % 2 == 0 else MAGIC_ODD
                off = tl.where(offs_w[None, :] < 16, (z_a + mg).to(DDT)[:, None], (z_b + mg).to(DDT)[:, None])
                # one offset per pair (w): the chunk operand has the pair's two k's side by side
                off = tl.reshape(tl.join(off, off), (BN, 64))
                a = _wchunk(h, words, words8, q, off, off, BN, XDT, F32DOT, ASM)
                xt = _xchunk(x_ptr, offs_m, m_mask, k0, offs_c, K, stride_xm, stride_xk, EVEN_K, F32DOT)
                first = (offs_c < 32)[:, None]
                zero = tl.zeros([BN, BM], dtype=tl.float32)
                p_a = _dot(a, tl.where(first, xt, 0), zero, F32DOT)
                p_b = _dot(a, tl.where(first, 0, xt), zero, F32DOT)
                acc += p_a * s_a[:, None] + p_b * s_b[:, None]
            else:
                # QPG consecutive chunks lie in one group: their dots chain, then one scaling
                if q % QPG == 0:
                    s_g, z_g = _group_sz(s_ptr, z_ptr, offs_n, n_mask, k0, N, NG, GROUP, HAS_ZERO)
                    off_ge = (z_g + MAGIC).to(DDT)[:, None]
                    off_go = (z_g + MAGIC_ODD).to(DDT)[:, None]
                a = _wchunk(h, words, words8, q, off_ge, off_go, BN, XDT, F32DOT, ASM)
                part = _dot(a, _xchunk(x_ptr, offs_m, m_mask, k0, offs_c, K, stride_xm, stride_xk,
                                       EVEN_K, F32DOT), part, F32DOT)
                if q % QPG == QPG - 1:
                    acc += part * s_g[:, None]
                    part = tl.zeros([BN, BM], dtype=tl.float32)
    gemm_finish(acc, offs_m, offs_n, m_mask, n_mask, M, N, pid_k, split_k, ws_ptr, cnt_ptr,
                xs_ptr, s_ptr, b_ptr, out_ptr, stride_om, stride_on,
                SPLIT, ACT_INT4, PER_CHANNEL, HAS_BIAS, INTERP)


def _launch(x, xs, w: Int4Weight, bias, out_dtype, act_int4: bool, out=None, config=None, opts=None):
    m, k = x.shape
    if k != w.k:
        raise ValueError(f"GEMM: activation has {k} features, the weight expects {w.k}")
    n = w.n
    if act_int4 and (w.group_size != -1 or w.zero is not None):
        raise UnsupportedError("w4a4 needs symmetric per-channel int4 weights "
                               f"(got group_size={w.group_size}, asymmetric={w.zero is not None})")
    cfg = tuning.pick("int4_a4" if act_int4 else "int4_a16", m, n, k, x.device, config, opts)
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
        GROUP=group, PER_CHANNEL=per_channel, HALF=(not per_channel) and group % 64 != 0,
        QPG=4 if group % 256 == 0 else (2 if group % 128 == 0 else 1),
        HAS_ZERO=w.zero is not None, ACT_INT4=act_int4, HAS_BIAS=bias is not None,
        SPLIT=split > 1, BN=cfg.bn, BM=bm, MAGIC=magic, EVEN_K=k % KBLOCK == 0, F32DOT=f32dot,
        INTERP=INTERPRETED, ASM=ptx_dequant(opts) and not f32dot, NPF=prefetch_blocks(prefetch(opts)),
        **pdl_kw(out.device, opts),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out


def gemm_w4a16(x: torch.Tensor, w: Int4Weight, bias=None, out=None, config=None, opts=None) -> torch.Tensor:
    """x[M, K] in bf16/fp16/fp32; output in x.dtype."""
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise UnsupportedError(f"w4a16 activations must be fp16, bf16 or fp32, got {x.dtype}")
    return _launch(x, None, w, bias, x.dtype, False, out, config, opts)


def gemm_w4a4(a: QActivation, w: Int4Weight, bias=None, out=None, config=None, opts=None) -> torch.Tensor:
    """a: per-token int4 activation (codes one per int8 element); output in a.dtype."""
    q = a.q.reshape(-1, a.q.shape[-1])
    s = a.scale.reshape(-1).float().contiguous()
    return _launch(q, s, w, bias, a.dtype, True, out, config, opts)
