"""Flash-decoding attention over QuantSpec's hierarchical KV cache (quasar.kv.hierarchical), for
uniform steps: decode and draft (T = 1), verify chunks (T = k + 1 <= 16). The semantics are the
reference's (quasar.ops.reference.hier_attention): a row at position p reads its sequence's first
quantized_blocks(p) = max(0, (p - R) // G) blocks from the nibble planes, dequantized in
registers, and the rest of [0, p] from the full-precision pool.

Grid: (B * Hkv, NUM_SPLITS), as the dense kernel (quasar.ops.triton.attention): a program owns one
KV head of one sequence and all T * (H / Hkv) query rows that read it (GQA without repeating K/V),
so each tile of codes is read once for the chunk. A tile is BS slots; slot s is offset s % G of
block block_tables[b, s // G]. Planes pack channel c with channel c + D/2 in one byte, so a tile
is two [BS, D/2] halves: scores = Q_lo K_lo^T + Q_hi K_hi^T and O_lo / O_hi accumulate apart, with
no interleave. UPPER (a draft step) reads the upper plane only: half the bytes of the verifier's
read, a quarter of bf16's. A tile every row reads quantized loads only codes and scales; a tile
every row reads at full precision only the pool; only the tile at the boundary of rows' quantized
prefixes loads both and selects per row. Splits are merged by the dense kernel's LSE combine.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from quasar.errors import UnsupportedError
from ._common import pdl_kw, pdl_prologue, INTERPRETED, to_dtype
from .attention import MAX_ROWS, MAX_T, _attn_combine_kernel, default_splits


@triton.jit
def _plane_tile(hi_ptr, lo_ptr, sc_ptr, mn_ptr, base, sbase, d2, D2, ok, sc_lo_off, sc_hi_off,
                UPPER: tl.constexpr):
    """Dequantized [BS, BD2] halves (channels d2 and d2 + D/2) of the rows at byte offsets `base`
    (plus d2); scale / min at `sbase` + sc_*_off (their channel or channel-group offsets)."""
    m2 = ok[:, None] & (d2 < D2)[None, :]
    byte = tl.load(hi_ptr + base[:, None] + d2[None, :], mask=m2, other=0).to(tl.int32)
    s_lo = tl.load(sc_ptr + sbase[:, None] + sc_lo_off, mask=m2, other=0.0).to(tl.float32)
    s_hi = tl.load(sc_ptr + sbase[:, None] + sc_hi_off, mask=m2, other=0.0).to(tl.float32)
    n_lo = tl.load(mn_ptr + sbase[:, None] + sc_lo_off, mask=m2, other=0.0).to(tl.float32)
    n_hi = tl.load(mn_ptr + sbase[:, None] + sc_hi_off, mask=m2, other=0.0).to(tl.float32)
    u_lo = (byte & 15).to(tl.float32)
    u_hi = (byte >> 4).to(tl.float32)
    if UPPER:
        x_lo = u_lo * s_lo + n_lo
        x_hi = u_hi * s_hi + n_hi
    else:
        low = tl.load(lo_ptr + base[:, None] + d2[None, :], mask=m2, other=0).to(tl.int32)
        l_lo = (low & 15).to(tl.float32) - 8.0
        l_hi = (low >> 4).to(tl.float32) - 8.0
        x_lo = u_lo * s_lo + l_lo * (s_lo / 16.0) + n_lo
        x_hi = u_hi * s_hi + l_hi * (s_hi / 16.0) + n_hi
    return x_lo, x_hi


@triton.jit
def _fp_tile(fp_ptr, base, d2, D2, ok):
    m2 = ok[:, None] & (d2 < D2)[None, :]
    x_lo = tl.load(fp_ptr + base[:, None] + d2[None, :], mask=m2, other=0.0).to(tl.float32)
    x_hi = tl.load(fp_ptr + base[:, None] + D2 + d2[None, :], mask=m2, other=0.0).to(tl.float32)
    return x_lo, x_hi


@triton.jit
def _dot(a, b_t, F32DOT: tl.constexpr):
    """a [M, K] @ b_t^T ([N, K])."""
    if F32DOT:
        return tl.dot(a.to(tl.float32), tl.trans(b_t.to(tl.float32)), input_precision="ieee")
    return tl.dot(a, tl.trans(b_t.to(a.dtype)))


@triton.jit
def _pv(p, v, like, F32DOT: tl.constexpr):
    """p [M, N] @ v [N, K], in the dtype of `like` (the queries) unless F32DOT."""
    if F32DOT:
        return tl.dot(p, v.to(tl.float32), input_precision="ieee")
    return tl.dot(p.to(like.dtype), v.to(like.dtype))


@triton.jit(do_not_specialize=["T", "KV_LEN", "R"])
def _hier_attn_kernel(q_ptr, khi_ptr, klo_ptr, ksc_ptr, kmn_ptr, vhi_ptr, vlo_ptr, vsc_ptr, vmn_ptr,
                      kfp_ptr, vfp_ptr, fpi_ptr, pos_ptr, bt_ptr, o_ptr, wacc_ptr, wml_ptr,
                      T, HKV, KV_LEN, R, D2, qk_scale,
                      sq_b, sq_t, sq_h, sp_b, sp_t, so_b, so_t, so_h, sbt,
                      spl_b, spl_h, spl_s, sks_b, sks_h, svs_b, svs_h, svs_s, sfp_b, sfp_h, sfp_s,
                      G: tl.constexpr, BR: tl.constexpr, BS: tl.constexpr, BD2: tl.constexpr,
                      PBS: tl.constexpr, VG: tl.constexpr, NUM_SPLITS: tl.constexpr,
                      UPPER: tl.constexpr, F32DOT: tl.constexpr, INTERP: tl.constexpr, PDL: tl.constexpr):
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    b = pid_bh // HKV
    hk = pid_bh % HKV
    r = tl.arange(0, BR)
    t = r // G
    h = hk * G + r % G
    r_ok = t < T
    d2 = tl.arange(0, BD2)
    d_ok = d2 < D2
    pdl_prologue(PDL)
    pos = tl.load(pos_ptr + b * sp_b + t * sp_t, mask=r_ok, other=-1).to(tl.int32)
    vis = tl.minimum(tl.max(pos, axis=0) + 1, KV_LEN)
    chunk = tl.cdiv(tl.cdiv(vis, NUM_SPLITS), BS) * BS
    start = split * chunk
    end = tl.minimum(start + chunk, vis)
    # blocks each row reads quantized; rows past T read nothing
    nq = tl.where(r_ok, tl.maximum(pos - R, -1) // PBS, 0)
    nq = tl.maximum(nq, 0)
    nq_min = tl.min(tl.where(r_ok, nq, 2147483647), axis=0)
    nq_max = tl.max(nq, axis=0)
    qm = r_ok[:, None] & d_ok[None, :]
    qbase = q_ptr + b * sq_b + t[:, None] * sq_t + h[:, None] * sq_h + d2[None, :]
    q_lo = tl.load(qbase, mask=qm, other=0.0)
    q_hi = tl.load(qbase + D2, mask=qm, other=0.0)
    m_i = tl.full([BR], float("-inf"), tl.float32)
    l_i = tl.zeros([BR], tl.float32)
    acc_lo = tl.zeros([BR, BD2], tl.float32)
    acc_hi = tl.zeros([BR, BD2], tl.float32)
    for s0 in range(start, end, BS):
        s = s0 + tl.arange(0, BS)
        s_ok = s < end
        mblk = s // PBS                                        # logical block of each slot
        off = s % PBS
        blk = tl.load(bt_ptr + b * sbt + mblk, mask=s_ok, other=0)
        t_lo = s0 // PBS
        t_hi = (s0 + BS - 1) // PBS
        any_q = t_lo < nq_max
        any_f = t_hi >= nq_min
        sq = tl.zeros([BR, BS], tl.float32)
        sf = tl.zeros([BR, BS], tl.float32)
        v_lo = tl.zeros([BS, BD2], tl.float32)
        v_hi = tl.zeros([BS, BD2], tl.float32)
        vf_lo = tl.zeros([BS, BD2], tl.float32)
        vf_hi = tl.zeros([BS, BD2], tl.float32)
        if any_q:
            qok = s_ok & (mblk < nq_max)
            pl = blk * spl_b + hk * spl_h + off * spl_s
            k_lo, k_hi = _plane_tile(khi_ptr, klo_ptr, ksc_ptr, kmn_ptr, pl, blk * sks_b + hk * sks_h, d2, D2, qok,
                                     d2[None, :], D2 + d2[None, :], UPPER)
            sq = _dot(q_lo, k_lo, F32DOT) + _dot(q_hi, k_hi, F32DOT)
            vsb = blk * svs_b + hk * svs_h + off * svs_s
            v_lo, v_hi = _plane_tile(vhi_ptr, vlo_ptr, vsc_ptr, vmn_ptr, pl, vsb, d2, D2, qok,
                                     d2[None, :] // VG, (D2 + d2[None, :]) // VG, UPPER)
        if any_f:
            fok = s_ok & (mblk >= nq_min)
            fpi = tl.maximum(tl.load(fpi_ptr + blk, mask=fok, other=0), 0)
            fb = fpi * sfp_b + hk * sfp_h + off * sfp_s
            kf_lo, kf_hi = _fp_tile(kfp_ptr, fb, d2, D2, fok)
            sf = _dot(q_lo, kf_lo, F32DOT) + _dot(q_hi, kf_hi, F32DOT)
            vf_lo, vf_hi = _fp_tile(vfp_ptr, fb, d2, D2, fok)
        use_q = mblk[None, :] < nq[:, None]                     # [BR, BS]
        scores = tl.where(use_q, sq, sf) * qk_scale
        allow = (s[None, :] <= pos[:, None]) & s_ok[None, :] & r_ok[:, None]
        scores = tl.where(allow, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(scores - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc_lo = acc_lo * alpha[:, None]
        acc_hi = acc_hi * alpha[:, None]
        if any_q:
            pq = tl.where(use_q, p, 0.0)
            acc_lo += _pv(pq, v_lo, q_lo, F32DOT)
            acc_hi += _pv(pq, v_hi, q_lo, F32DOT)
        if any_f:
            pf = tl.where(use_q, 0.0, p)
            acc_lo += _pv(pf, vf_lo, q_lo, F32DOT)
            acc_hi += _pv(pf, vf_hi, q_lo, F32DOT)
        m_i = m_new
    if NUM_SPLITS == 1:
        inv = 1.0 / tl.where(l_i > 0.0, l_i, 1.0)
        ODT: tl.constexpr = o_ptr.dtype.element_ty
        ob = o_ptr + b * so_b + t[:, None] * so_t + h[:, None] * so_h + d2[None, :]
        tl.store(ob, to_dtype(acc_lo * inv[:, None], ODT, INTERP), mask=qm)
        tl.store(ob + D2, to_dtype(acc_hi * inv[:, None], ODT, INTERP), mask=qm)
    else:
        rec = pid_bh * NUM_SPLITS + split
        tl.store(wml_ptr + (rec * 2) * BR + r, m_i)
        tl.store(wml_ptr + (rec * 2 + 1) * BR + r, l_i)
        if start < end:
            wb = wacc_ptr + rec * BR * (2 * BD2) + r[:, None] * (2 * BD2) + d2[None, :]
            tl.store(wb, acc_lo, mask=d_ok[None, :])
            tl.store(wb + D2, acc_hi, mask=d_ok[None, :])


def supports(q: torch.Tensor, cache, ctx) -> bool:
    """Whether the kernel takes this hier_attention call: a uniform step (every sequence has the
    same chunk T <= MAX_T, T * H / Hkv <= MAX_ROWS); else the reference (prefill)."""
    n, h, _ = q.shape
    hkv = cache.num_kv_heads
    t = int(getattr(ctx, "chunk", 0) or 0)
    return (getattr(cache, "representation", "") == "hierarchical-int4" and 0 < t <= MAX_T and h % hkv == 0
            and t * (h // hkv) <= MAX_ROWS and n == ctx.num_seqs * t)


def hier_attention(q: torch.Tensor, cache, layer: int, ctx, upper_only: bool,
                   num_splits: Optional[int] = None, block_s: Optional[int] = None,
                   out: Optional[torch.Tensor] = None, num_warps: Optional[int] = None,
                   num_stages: Optional[int] = None, opts=None) -> torch.Tensor:
    """See quasar.ops (op hier_attention), for a uniform step: q [N, H, D], N = B * T (ctx.chunk = T)."""
    if getattr(cache, "representation", "") != "hierarchical-int4":
        raise UnsupportedError("hier_attention reads a hierarchical KV cache")
    n, h, dh = q.shape
    hkv = cache.num_kv_heads
    g = h // hkv
    bsz = ctx.num_seqs
    t = int(getattr(ctx, "chunk", 0) or 0)
    if t <= 0 or n != bsz * t or t > MAX_T or t * g > MAX_ROWS:
        raise UnsupportedError(f"the Triton hierarchical attention kernel takes uniform steps of <= {MAX_T} "
                               f"tokens (<= {MAX_ROWS} rows per kv head); got {bsz} sequences, {n} tokens")
    if q.stride(-1) != 1:
        q = q.contiguous()
    if out is None:
        out = torch.empty((n, h, dh), dtype=q.dtype, device=q.device)
    if n == 0:
        return out
    pbs = cache.block_size
    bt = ctx.block_tables
    if bt.dtype != torch.int64 or bt.stride(-1) != 1:
        bt = bt.to(torch.int64).contiguous()
    pos = ctx.positions.reshape(-1)
    if pos.dtype != torch.int64 or pos.stride(-1) != 1:
        pos = pos.to(torch.int64).contiguous()
    kv_len = bt.shape[1] * pbs
    d2 = dh // 2
    br = max(16, triton.next_power_of_2(t * g))
    bd2 = max(16, triton.next_power_of_2(d2))
    bs = block_s or max(16, min(64, pbs) if INTERPRETED else min(128, max(pbs, 64)))
    ns = num_splits or default_splits(bsz * hkv, kv_len, q.device)
    f32dot = q.dtype == torch.float32 or (INTERPRETED and q.dtype == torch.bfloat16)
    qk_scale = dh ** -0.5 * 1.4426950408889634
    if ns > 1:
        wacc = torch.empty(bsz * hkv * ns * br * 2 * bd2, dtype=torch.float32, device=q.device)
        wml = torch.empty(bsz * hkv * ns * 2 * br, dtype=torch.float32, device=q.device)
    else:
        wacc = wml = out
    khi, klo, vhi, vlo = cache.k_hi[layer], cache.k_lo[layer], cache.v_hi[layer], cache.v_lo[layer]
    ksc, kmn, vsc, vmn = cache.k_scale[layer], cache.k_min[layer], cache.v_scale[layer], cache.v_min[layer]
    kfp, vfp = cache.k_fp[layer], cache.v_fp[layer]
    qs = (t * q.stride(0), q.stride(0), q.stride(1))
    os_ = (t * out.stride(0), out.stride(0), out.stride(1))
    nw = num_warps or (1 if INTERPRETED else 4)
    nst = num_stages or (1 if INTERPRETED else 2)
    _hier_attn_kernel[(bsz * hkv, ns)](
        q, khi, klo, ksc, kmn, vhi, vlo, vsc, vmn, kfp, vfp, cache.fp_index, pos, bt, out, wacc, wml,
        t, hkv, kv_len, cache.residual, d2, qk_scale,
        qs[0], qs[1], qs[2], t, 1, os_[0], os_[1], os_[2], bt.stride(0),
        khi.stride(0), khi.stride(1), khi.stride(2), ksc.stride(0), ksc.stride(1),
        vsc.stride(0), vsc.stride(1), vsc.stride(2), kfp.stride(0), kfp.stride(1), kfp.stride(2),
        G=g, BR=br, BS=bs, BD2=bd2, PBS=int(pbs), VG=int(cache.value_group), NUM_SPLITS=ns,
        UPPER=bool(upper_only), F32DOT=bool(f32dot), INTERP=INTERPRETED, num_warps=nw, num_stages=nst,
        **pdl_kw(q.device, opts))
    if ns > 1:
        _attn_combine_kernel[(bsz * hkv, t * g)](
            wacc, wml, out, hkv, dh, os_[0], os_[1], os_[2],
            G=g, BR=br, BD=2 * bd2, NUM_SPLITS=ns, NSP=max(2, triton.next_power_of_2(ns)),
            INTERP=INTERPRETED, num_warps=1 if INTERPRETED else 4, **pdl_kw(q.device, opts))
    return out
