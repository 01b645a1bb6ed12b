"""The attention prologue in one launch: per-head RMSNorm of q and k (Qwen3's q_norm / k_norm),
rotate-half RoPE from the fp32 cos/sin tables at each token's position, and the write of the
rotated k and of v into the static cache. Replaces ~10 small torch kernels per layer (gathers of
cos/sin, neg/cat/mul/add, two index_put) with one.

One program per (token, block of HB heads) over the H query heads and the Hkv key/value heads (HB
= 1 on the GPU; all heads under the interpreter); each reads its heads' D values of the fused qkv
projection output (and the rotate-half partner values, from L1).
Arithmetic follows quasar.ops.reference.rope_kv_write in order and rounding: the norm's
normalized value is rounded to the input dtype before the weight multiplies it, cos/sin are
rounded to the rope dtype, and x*cos, rotate_half(x)*sin and their sum are each rounded to it, as
torch's elementwise ops do. Given the same norm scale the output is bit-identical to the
reference (the mean of squares is summed in another order, so with a norm it can differ in the
last bit).

The same kernel writes the paged cache (SLOTS, quasar.kv.paged: [blocks, Hkv, PBS, D] per layer):
token m's k / v go to slot slot_mapping[m] (block slot // PBS, offset slot % PBS) instead of
position positions[m] of sequence m // T; paged_rope_kv_write is the wrapper (op
paged_rope_kv_write), the same arithmetic (bit-identical to the reference without norms).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import pdl_kw, pdl_prologue, INTERPRETED, to_dtype


@triton.jit
def _heads(src, heads, hmask, offs, partner, sign, dmask, n_ptr, cos_ptr, sin_ptr, pos, D, eps,
           NORM: tl.constexpr, XDT: tl.constexpr, RDT: tl.constexpr, INTERP: tl.constexpr):
    """Normalize (optionally) and rotate a block of heads [HB, D]; returns fp32 (RDT-exact)."""
    m2 = hmask[:, None] & dmask[None, :]
    base = src + heads[:, None] * D
    x = tl.load(base + offs[None, :], mask=m2, other=0.0).to(tl.float32)
    xr = tl.load(base + partner[None, :], mask=m2, other=0.0).to(tl.float32)
    if NORM:
        ms = tl.math.div_rn(tl.sum(x * x, axis=1), D.to(tl.float32))
        rstd = tl.math.div_rn(tl.full([], 1.0, tl.float32), tl.math.sqrt_rn(ms + eps))[:, None]
        w = tl.load(n_ptr + offs, mask=dmask, other=0.0).to(tl.float32)[None, :]
        wr = tl.load(n_ptr + partner, mask=dmask, other=0.0).to(tl.float32)[None, :]
        x = to_dtype(w * to_dtype(x * rstd, XDT, INTERP).to(tl.float32), RDT, INTERP).to(tl.float32)
        xr = to_dtype(wr * to_dtype(xr * rstd, XDT, INTERP).to(tl.float32), RDT, INTERP).to(tl.float32)
    c = to_dtype(tl.load(cos_ptr + pos * D + offs, mask=dmask, other=0.0), RDT, INTERP).to(tl.float32)[None, :]
    s = to_dtype(tl.load(sin_ptr + pos * D + offs, mask=dmask, other=0.0), RDT, INTERP).to(tl.float32)[None, :]
    a = to_dtype(x * c, RDT, INTERP).to(tl.float32)
    b = to_dtype((sign[None, :] * xr) * s, RDT, INTERP).to(tl.float32)
    return to_dtype(a + b, RDT, INTERP).to(tl.float32)


@triton.jit
def _rope_kv_kernel(qkv_ptr, qn_ptr, kn_ptr, cos_ptr, sin_ptr, pos_ptr, slot_ptr, q_ptr, kc_ptr, vc_ptr,
                    T, D, stride_row, stride_qm, stride_qh, stride_cb, stride_ch, stride_cs, eps,
                    H: tl.constexpr, HKV: tl.constexpr, QNORM: tl.constexpr, KNORM: tl.constexpr,
                    HB: tl.constexpr, BLOCK_D: tl.constexpr, SLOTS: tl.constexpr, PBS: tl.constexpr,
                    INTERP: tl.constexpr, PDL: tl.constexpr):
    pdl_prologue(PDL)
    m = tl.program_id(0).to(tl.int64)           # token row (b * T + t)
    hb = tl.program_id(1)                       # block of HB query heads, then of key/value heads
    QB: tl.constexpr = (H + HB - 1) // HB
    XDT: tl.constexpr = qkv_ptr.dtype.element_ty
    RDT: tl.constexpr = q_ptr.dtype.element_ty
    CDT: tl.constexpr = kc_ptr.dtype.element_ty
    half = D // 2
    offs = tl.arange(0, BLOCK_D)
    dmask = offs < D
    lower = offs < half
    partner = tl.where(lower, offs + half, offs - half)
    sign = tl.where(lower, -1.0, 1.0)
    pos = tl.load(pos_ptr + m)
    row = qkv_ptr + m * stride_row
    if hb < QB:
        heads = hb * HB + tl.arange(0, HB)
        hmask = heads < H
        y = _heads(row, heads, hmask, offs, partner, sign, dmask, qn_ptr, cos_ptr, sin_ptr, pos, D, eps,
                   QNORM, XDT, RDT, INTERP)
        ptrs = q_ptr + m * stride_qm + heads[:, None] * stride_qh + offs[None, :]
        tl.store(ptrs, to_dtype(y, RDT, INTERP), mask=hmask[:, None] & dmask[None, :])
    else:
        j = (hb - QB) * HB + tl.arange(0, HB)
        hmask = j < HKV
        m2 = hmask[:, None] & dmask[None, :]
        y = _heads(row + H * D, j, hmask, offs, partner, sign, dmask, kn_ptr, cos_ptr, sin_ptr, pos, D,
                   eps, KNORM, XDT, RDT, INTERP)
        if SLOTS:
            # the paged cache [blocks, Hkv, PBS, D]: token m's slot from the slot mapping (not its
            # position); a negative slot (none) writes nothing
            sl = tl.load(slot_ptr + m)
            ok = hmask & ((j * 0 + sl) >= 0)       # (a tensor: the interpreter rejects tensor & scalar)
            m2 = ok[:, None] & dmask[None, :]
            slot = (sl // PBS) * stride_cb + j[:, None] * stride_ch + (sl % PBS) * stride_cs + offs[None, :]
        else:
            # the dense cache [B, Hkv, S, D]: sequence m // T, slot = position
            b = m // T
            slot = b * stride_cb + j[:, None] * stride_ch + pos * stride_cs + offs[None, :]
        tl.store(kc_ptr + slot, to_dtype(y, CDT, INTERP), mask=m2)
        v = tl.load(row + (H + HKV) * D + j[:, None] * D + offs[None, :], mask=m2, other=0.0).to(tl.float32)
        tl.store(vc_ptr + slot, to_dtype(v, CDT, INTERP), mask=m2)


# No FP contraction: Triton fuses by default, and on the GPU (sm_90, triton 3.6) turned
# bf16(a + bf16(xr * s)) into fma.rn.bf16x2 and x*cos + xr*sin into fma.rn.f32, one rounding
# where the reference (torch's elementwise ops) rounds twice, so q and k were not bit-identical to
# it there (the interpreter does not fuse). A compile option: nothing to pass to the interpreter.
_NO_FMA = {} if INTERPRETED else {"enable_fp_fusion": False}


def _check(width: int, hkv: int, d: int, cos, sin, q_norm, k_norm, op: str) -> None:
    if d % 2 or width % d or width // d <= 2 * hkv:
        raise ValueError(f"{op}: qkv width {width} is not (H + 2*{hkv}) * head_dim {d}")
    if cos.shape[-1] != d or cos.dtype != torch.float32 or sin.shape != cos.shape:
        raise ValueError(f"{op}: cos/sin must be fp32 [S, {d}] tables, got {tuple(cos.shape)} "
                         f"{cos.dtype}")
    if (q_norm is None) != (k_norm is None):
        raise ValueError(f"{op}: q_norm and k_norm come together (Qwen3) or not at all")


def _launch(qkv2, q_norm, k_norm, eps, cos, sin, pos, slots, q, kc, vc, t, pbs, heads_per_program, opts):
    """One launch over the rows of qkv2 [M, W] (q [M, H, D] out). slots None: the dense cache
    kc/vc [B, Hkv, S, D], row m of sequence m // t at its position; else the paged cache
    [blocks, Hkv, pbs, D] at slots[m]."""
    m, h, d = q.shape
    hkv = kc.shape[1]
    cos, sin = cos.contiguous(), sin.contiguous()
    qn = q_norm.contiguous() if q_norm is not None else cos
    kn = k_norm.contiguous() if k_norm is not None else cos
    blk = max(16, triton.next_power_of_2(d))
    # one head per program on the GPU (many small programs hide latency); all heads of a token
    # in one program under the interpreter (it runs programs one after another)
    hb = triton.next_power_of_2(max(h, hkv)) if INTERPRETED else 1
    if heads_per_program is not None:
        hb = int(heads_per_program)
    grid = (m, triton.cdiv(h, hb) + triton.cdiv(hkv, hb))
    _rope_kv_kernel[grid](
        qkv2, qn, kn, cos, sin, pos, pos if slots is None else slots, q, kc, vc, t, d, qkv2.stride(0),
        q.stride(0), q.stride(1), kc.stride(0), kc.stride(1), kc.stride(2), float(eps), H=h, HKV=hkv,
        QNORM=q_norm is not None, KNORM=k_norm is not None, HB=hb, BLOCK_D=blk,
        SLOTS=slots is not None, PBS=int(pbs), INTERP=INTERPRETED,
        num_warps=1 if INTERPRETED or blk <= 128 else 2, **_NO_FMA, **pdl_kw(qkv2.device, opts))


def _rope_dtype(qkv, q_norm, k_norm):
    rdt = qkv.dtype
    for n in (q_norm, k_norm):
        if n is not None:
            rdt = torch.promote_types(rdt, n.dtype)
    return rdt


def rope_kv_write(qkv: torch.Tensor, q_norm, k_norm, eps: float, cos: torch.Tensor, sin: torch.Tensor,
                  positions: torch.Tensor, cache, layer: int, heads_per_program: int | None = None,
                  opts=None) -> torch.Tensor:
    """See quasar.ops (op rope_kv_write). qkv [B, T, (H + 2 Hkv) D]; cos/sin [S, D] fp32 tables.
    heads_per_program (a power of two) overrides the default (tests run the GPU's choice, 1, under
    the interpreter too)."""
    bsz, t, width = qkv.shape
    kc, vc = cache.k[layer], cache.v[layer]             # [B, Hkv, S, D]
    hkv, d = kc.shape[1], kc.shape[3]
    _check(width, hkv, d, cos, sin, q_norm, k_norm, "rope_kv_write")
    h = width // d - 2 * hkv
    qkv2 = qkv.reshape(bsz * t, width)
    if qkv2.stride(-1) != 1:
        qkv2 = qkv2.contiguous()
    pos = positions.reshape(-1).to(torch.int64).contiguous()
    q = torch.empty((bsz, t, h, d), dtype=_rope_dtype(qkv, q_norm, k_norm), device=qkv.device)
    if bsz * t == 0:
        return q
    _launch(qkv2, q_norm, k_norm, eps, cos, sin, pos, None, q.view(bsz * t, h, d), kc, vc, t, 1,
            heads_per_program, opts)
    return q


def paged_rope_kv_write(qkv: torch.Tensor, q_norm, k_norm, eps: float, cos: torch.Tensor, sin: torch.Tensor,
                        ctx, cache, layer: int, heads_per_program: int | None = None, opts=None) -> torch.Tensor:
    """See quasar.ops (op paged_rope_kv_write). qkv [N, (H + 2 Hkv) D] (the step's tokens,
    flattened), RoPE at ctx.positions, k / v written to the paged cache (cache.k[layer]: [blocks,
    Hkv, block_size, D]) at ctx.slot_mapping (slot s: block s // block_size, offset s %
    block_size); any chunk lengths (ragged prefill too). Returns q [N, H, D]."""
    n, width = qkv.shape
    kc, vc = cache.k[layer], cache.v[layer]             # [blocks, Hkv, block_size, D]
    hkv, d = kc.shape[1], kc.shape[3]
    _check(width, hkv, d, cos, sin, q_norm, k_norm, "paged_rope_kv_write")
    if ctx.positions.numel() != n or ctx.slot_mapping.numel() != n:
        raise ValueError(f"paged_rope_kv_write: {n} tokens, but {ctx.positions.numel()} positions and "
                         f"{ctx.slot_mapping.numel()} slots")
    h = width // d - 2 * hkv
    qkv2 = qkv if qkv.stride(-1) == 1 else qkv.contiguous()
    pos = ctx.positions.reshape(-1).to(torch.int64).contiguous()
    slots = ctx.slot_mapping.reshape(-1).to(torch.int64).contiguous()
    q = torch.empty((n, h, d), dtype=_rope_dtype(qkv, q_norm, k_norm), device=qkv.device)
    if n == 0:
        return q
    _launch(qkv2, q_norm, k_norm, eps, cos, sin, pos, slots, q, kc, vc, 1, cache.block_size,
            heads_per_program, opts)
    return q
