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
from .attention import MAX_ROWS, MAX_T, _attn_combine_kernel, default_splits, paged_meta


@triton.jit
def _codes(hi_ptr, lo_ptr, base, d2, D2, ok, UPPER: tl.constexpr):
    """Integer codes of the [BS, BD2] halves (channels d2, d2 + D/2) at byte offsets base + d2:
    u (UPPER) or 16 u + l - 8 (both planes), as float32 (exact)."""
    m2 = ok[:, None] & (d2 < D2)[None, :]
    byte = tl.load(hi_ptr + base[:, None] + d2[None, :], mask=m2, other=0).to(tl.int32)
    if UPPER:
        c_lo = byte & 15
        c_hi = byte >> 4
    else:
        low = tl.load(lo_ptr + base[:, None] + d2[None, :], mask=m2, other=0).to(tl.int32)
        c_lo = (byte & 15) * 16 + (low & 15) - 8
        c_hi = (byte >> 4) * 16 + (low >> 4) - 8
    return c_lo.to(tl.float32), c_hi.to(tl.float32)


@triton.jit
def _dot(a, b_t, F32DOT: tl.constexpr):
    """a [M, K] @ b_t^T ([N, K]), in a's dtype (b exact in it: codes or the pool's values)."""
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
                      PBS: tl.constexpr, VG_HI: tl.constexpr, NUM_SPLITS: tl.constexpr,
                      UPPER: tl.constexpr, F32DOT: tl.constexpr, INTERP: tl.constexpr, PDL: tl.constexpr):
    """A tile is BS slots inside one block (BS divides the block size PBS), so its key scales /
    minima are one [D] vector and its value scales one per token: they are folded into the
    queries and the probabilities, and the codes go to the tensor cores as they are.
        keys:   q . k = sum_c (q_c s_c f) code_c + sum_c q_c min_c      (f = 1 upper, 1/16 both)
        values: P V   = (P * s_v f) @ code + (P @ min_v)                 (per token, per half)"""
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
    # blocks each row reads quantized (rows past T: none)
    nq = tl.where(r_ok, tl.maximum(pos - R, -1) // PBS, 0)
    nq = tl.maximum(nq, 0)
    nq_min = tl.min(tl.where(r_ok, nq, 2147483647), axis=0)
    nq_max = tl.max(nq, axis=0)
    qm = r_ok[:, None] & d_ok[None, :]
    qbase = q_ptr + b * sq_b + t[:, None] * sq_t + h[:, None] * sq_h + d2[None, :]
    q_lo = tl.load(qbase, mask=qm, other=0.0)
    q_hi = tl.load(qbase + D2, mask=qm, other=0.0)
    if F32DOT:
        q_lo = q_lo.to(tl.float32)
        q_hi = q_hi.to(tl.float32)
    FACTOR: tl.constexpr = 1.0 if UPPER else 0.0625
    m_i = tl.full([BR], float("-inf"), tl.float32)
    l_i = tl.zeros([BR], tl.float32)
    acc_lo = tl.zeros([BR, BD2], tl.float32)
    acc_hi = tl.zeros([BR, BD2], tl.float32)
    for s0 in range(start, end, BS):
        m = s0 // PBS                                          # the tile's block (logical)
        off = s0 % PBS + tl.arange(0, BS)
        s = s0 + tl.arange(0, BS)
        s_ok = s < end
        blk = tl.load(bt_ptr + b * sbt + m)
        any_q = m < nq_max
        any_f = m >= nq_min
        use_q = m < nq                                         # [BR]
        pl = blk * spl_b + hk * spl_h + off * spl_s
        sq = tl.zeros([BR, BS], tl.float32)
        sf = tl.zeros([BR, BS], tl.float32)
        if any_q:
            ks = ksc_ptr + blk * sks_b + hk * sks_h + d2
            km = kmn_ptr + blk * sks_b + hk * sks_h + d2
            s_lo = tl.load(ks, mask=d_ok, other=0.0).to(tl.float32) * FACTOR
            s_hi = tl.load(ks + D2, mask=d_ok, other=0.0).to(tl.float32) * FACTOR
            n_lo = tl.load(km, mask=d_ok, other=0.0).to(tl.float32)
            n_hi = tl.load(km + D2, mask=d_ok, other=0.0).to(tl.float32)
            c_lo, c_hi = _codes(khi_ptr, klo_ptr, pl, d2, D2, s_ok, UPPER)
            qf_lo = q_lo.to(tl.float32)
            qf_hi = q_hi.to(tl.float32)
            bias = tl.sum(qf_lo * n_lo[None, :], axis=1) + tl.sum(qf_hi * n_hi[None, :], axis=1)
            sq = _dot((qf_lo * s_lo[None, :]).to(q_lo.dtype), c_lo, F32DOT) \
                + _dot((qf_hi * s_hi[None, :]).to(q_hi.dtype), c_hi, F32DOT) + bias[:, None]
        if any_f:
            fpi = tl.maximum(tl.load(fpi_ptr + blk), 0)
            fb = fpi * sfp_b + hk * sfp_h + off * sfp_s
            f2 = s_ok[:, None] & d_ok[None, :]
            kf_lo = tl.load(kfp_ptr + fb[:, None] + d2[None, :], mask=f2, other=0.0)
            kf_hi = tl.load(kfp_ptr + fb[:, None] + D2 + d2[None, :], mask=f2, other=0.0)
            sf = _dot(q_lo, kf_lo, F32DOT) + _dot(q_hi, kf_hi, F32DOT)
        scores = tl.where(use_q[:, None], sq, sf) * qk_scale
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
            pq = tl.where(use_q[:, None], p, 0.0)
            vb = vsc_ptr + blk * svs_b + hk * svs_h + off * svs_s
            vn = vmn_ptr + blk * svs_b + hk * svs_h + off * svs_s
            vs_lo = tl.load(vb, mask=s_ok, other=0.0).to(tl.float32) * FACTOR
            vs_hi = tl.load(vb + VG_HI, mask=s_ok, other=0.0).to(tl.float32) * FACTOR
            vm_lo = tl.load(vn, mask=s_ok, other=0.0).to(tl.float32)
            vm_hi = tl.load(vn + VG_HI, mask=s_ok, other=0.0).to(tl.float32)
            cv_lo, cv_hi = _codes(vhi_ptr, vlo_ptr, pl, d2, D2, s_ok, UPPER)
            acc_lo += _pv(pq * vs_lo[None, :], cv_lo, q_lo, F32DOT) + tl.sum(pq * vm_lo[None, :], axis=1)[:, None]
            acc_hi += _pv(pq * vs_hi[None, :], cv_hi, q_lo, F32DOT) + tl.sum(pq * vm_hi[None, :], axis=1)[:, None]
        if any_f:
            pf = tl.where(use_q[:, None], 0.0, p)
            fpi2 = tl.maximum(tl.load(fpi_ptr + blk), 0)
            fb2 = fpi2 * sfp_b + hk * sfp_h + off * sfp_s
            f3 = s_ok[:, None] & d_ok[None, :]
            vf_lo = tl.load(vfp_ptr + fb2[:, None] + d2[None, :], mask=f3, other=0.0)
            vf_hi = tl.load(vfp_ptr + fb2[:, None] + D2 + d2[None, :], mask=f3, other=0.0)
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
            and t * (h // hkv) <= MAX_ROWS and n == ctx.num_seqs * t and layout_ok(cache) is None)


def layout_ok(cache) -> Optional[str]:
    """Why the kernel cannot read this cache's layout (None if it can): a tile is a power-of-two
    slice of one block (block size >= 16), and each half of a head is inside one value group."""
    pbs, d, vg = cache.block_size, cache.head_dim, cache.value_group
    if pbs < 16 or pbs & (pbs - 1):
        return f"the block (key group) size must be a power of two >= 16, got {pbs}"
    if vg not in (d // 2, d):
        return f"value groups must be half a head or a whole head (head_dim {d}), got {vg} channels"
    return None


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
    why = layout_ok(cache)
    if why:
        raise UnsupportedError(f"the Triton hierarchical attention kernel cannot read this cache: {why}")
    if q.stride(-1) != 1:
        q = q.contiguous()
    if out is None:
        out = torch.empty((n, h, dh), dtype=q.dtype, device=q.device)
    if n == 0:
        return out
    pbs = cache.block_size
    bt, pos, kv_len = paged_meta(ctx, pbs)
    d2 = dh // 2
    br = max(16, triton.next_power_of_2(t * g))
    bd2 = max(16, triton.next_power_of_2(d2))
    bs = block_s or min(pbs, 32 if INTERPRETED else 64)
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
        G=g, BR=br, BS=bs, BD2=bd2, PBS=int(pbs), VG_HI=d2 // int(cache.value_group), NUM_SPLITS=ns,
        UPPER=bool(upper_only), F32DOT=bool(f32dot), INTERP=INTERPRETED, num_warps=nw, num_stages=nst,
        **pdl_kw(q.device, opts))
    if ns > 1:
        _attn_combine_kernel[(bsz * hkv, t * g)](
            wacc, wml, out, hkv, dh, os_[0], os_[1], os_[2],
            G=g, BR=br, BD=2 * bd2, NUM_SPLITS=ns, NSP=max(2, triton.next_power_of_2(ns)),
            INTERP=INTERPRETED, num_warps=1 if INTERPRETED else 4, **pdl_kw(q.device, opts))
    return out
