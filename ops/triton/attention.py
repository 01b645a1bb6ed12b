"""Flash-decoding attention over the static KV cache, for decode (T = 1) and verify chunks
(T = k + 1 <= 16), with GQA and the exact visibility rule of quasar.ops.reference.attention:
slot j is visible to query (b, i) iff j < kv_len, j <= positions[b, i] and (mask[b, i, j] when
an explicit mask is given).

Grid: (B * Hkv, NUM_SPLITS). A program owns one KV head of one sequence and all T * (H / Hkv)
query rows that read it (rows r = t * G + g, padded to BR >= 16), so each K/V tile is loaded once
for the whole chunk: scores = Q[BR, D] @ K^T[D, BS] on the tensor cores, online softmax in fp32
(exp2), O += P @ V. The visible length is read on the device from `positions`
(max_t positions[b, t] + 1, capped at kv_len): the S range [0, visible) is cut into NUM_SPLITS
chunks, so a launch with a fixed grid (kv_len = the full cache length, as in a CUDA graph) stays
correct and spends no time on invisible slots; splits with nothing to do exit after writing an
empty (m = -inf, l = 0) record. With NUM_SPLITS > 1 a second small kernel merges the splits'
(m, l, acc) records (log-sum-exp); with one split the first kernel writes O directly.
Rows with no visible slot at all get zeros (the reference's SDPA would give NaN). Prefill
(T > 16, or T * G > 128 rows) is left to torch SDPA (see the backend).

The paged cache (PAGED, quasar.kv.paged: [blocks, Hkv, PBS, D] per layer) goes through the same
kernel for uniform steps (every sequence has T tokens: decode, verify; op paged_attention): q,
positions and o are [N = B * T, ...] (sequence b's rows are tokens b*T .. b*T + T - 1, which the
(sequence, token) strides express), and the K/V row of logical slot s of sequence b is offset
s % PBS of block block_tables[b, s // PBS] (a gather per row, so the tile BS is independent of
the page size). KV_LEN is the block table's width * PBS; the visible length still comes from the
positions. Ragged steps (varlen prefill) are left to the reference (see the backend).

Tree steps (HAS_TREE; quasar.spec_decode.tree, ctx.tree_mask): a uniform paged step whose chunk
holds each sequence's draft tree (T <= MAX_TREE_T = 64 nodes). The positions passed are storage
indices (ctx.attn_positions: node m of sequence b at s_b + m, s_b = its token 0's) and each row
loads its int64 ancestor mask: slot s is visible iff s <= pos and (s < s_b or bit s - s_b of the
mask), quasar.ops.reference.visible; only the blocks that reach s_b evaluate the mask (a
second loop: the context's blocks run the chain's loop). T * G may
exceed MAX_ROWS: the rows are then tiled (TILED), RT = cdiv(T, TT) programs per (sequence, kv
head), each owning TT = MAX_ROWS // G whole tokens (grid axis 0: (b * Hkv + hk) * RT + rt; the
split records and the combine kernel follow it). A tile's visible length is its own rows' max
position + 1. With one tile (RT = 1) the kernel is the untiled one.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from quasar.errors import UnsupportedError
from ._common import pdl_kw, pdl_prologue, INTERPRETED, early_loads, to_dtype

MAX_ROWS = 128      # T * (H / Hkv) handled by one program
MAX_T = 16
MAX_TREE_T = 64     # a tree step's chunk (quasar.spec_decode.tree.MAX_NODES): its rows are tiled


@triton.jit
def _attn_block(qt, kt, vt, s, s_ok, pos, t, r_ok, b, m_i, l_i, acc, mask_ptr, sm_b, sm_t, sm_s, qk_scale,
                tm, s_root, HAS_MASK: tl.constexpr, F32DOT: tl.constexpr, HAS_TREE: tl.constexpr):
    """One block of BS cache slots s: scores, visibility, online softmax, O += P @ V.
    HAS_TREE (a block that reaches the tree's nodes): the rows' ancestor bitmasks tm [BR] (int64)
    over the nodes, which sit at slots s_root + m; a slot below s_root is context (visible up to
    the position rule), slot s_root + m is visible iff bit m of the row's mask is set."""
    if F32DOT:
        scores = tl.dot(qt, tl.trans(kt.to(tl.float32)), input_precision="ieee")
    else:
        scores = tl.dot(qt, tl.trans(kt))
    scores = scores * qk_scale
    allow = (s[None, :] <= pos[:, None]) & s_ok[None, :]
    if HAS_MASK:
        mk = tl.load(mask_ptr + b * sm_b + t[:, None] * sm_t + s[None, :] * sm_s,
                     mask=r_ok[:, None] & s_ok[None, :], other=0)
        allow = allow & (mk != 0)
    if HAS_TREE:
        rel = s - s_root
        bit = (tm[:, None] >> tl.minimum(tl.maximum(rel, 0), 63).to(tl.int64)[None, :]) & 1
        allow = allow & ((rel < 0)[None, :] | (bit != 0))
    scores = tl.where(allow, scores, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, axis=1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(scores - m_use[:, None])
    alpha = tl.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if F32DOT:
        pv = tl.dot(p, vt.to(tl.float32), input_precision="ieee")
    else:
        pv = tl.dot(p.to(vt.dtype), vt)
    acc = acc * alpha[:, None] + pv
    return m_new, l_i, acc


@triton.jit
def _kv_tile(k_ptr, v_ptr, bt_ptr, b, hk, s, ok, d, d_ok, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, sbt,
             PAGED: tl.constexpr, PBS: tl.constexpr):
    """K and V [BS, BD] at the slots s of sequence b, kv head hk (rows where `ok`; zeros elsewhere).
    Dense cache [B, Hkv, S, D]: slot s of sequence b. Paged cache [blocks, Hkv, PBS, D] (sk_b /
    sv_b: the block stride): logical slot s of sequence b is offset s % PBS of its block
    block_tables[b, s // PBS], one gather per row (the tile need not be one page)."""
    m2 = ok[:, None] & d_ok[None, :]
    if PAGED:
        blk = tl.load(bt_ptr + b * sbt + s // PBS, mask=ok, other=0)
        off = s % PBS
        kt = tl.load(k_ptr + hk * sk_h + (blk * sk_b + off * sk_s)[:, None] + d[None, :], mask=m2, other=0.0)
        vt = tl.load(v_ptr + hk * sv_h + (blk * sv_b + off * sv_s)[:, None] + d[None, :], mask=m2, other=0.0)
    else:
        kt = tl.load(k_ptr + b * sk_b + hk * sk_h + s[:, None] * sk_s + d[None, :], mask=m2, other=0.0)
        vt = tl.load(v_ptr + b * sv_b + hk * sv_h + s[:, None] * sv_s + d[None, :], mask=m2, other=0.0)
    return kt, vt


@triton.jit
def _split_range(pos_ptr, b, t, r_ok, sp_b, sp_t, split, KV_LEN, NUM_SPLITS: tl.constexpr, BS: tl.constexpr):
    """The rows' positions, the visible length (max position + 1, capped at KV_LEN) and this
    split's slot range [start, end) of it, in whole blocks."""
    pos = tl.load(pos_ptr + b * sp_b + t * sp_t, mask=r_ok, other=-1).to(tl.int32)
    vis = tl.minimum(tl.max(pos, axis=0) + 1, KV_LEN)
    chunk = tl.cdiv(tl.cdiv(vis, NUM_SPLITS), BS) * BS
    start = split * chunk
    end = tl.minimum(start + chunk, vis)
    return pos, start, end


@triton.jit(do_not_specialize=["T", "KV_LEN", "RT"])
def _attn_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, mask_ptr, o_ptr, wacc_ptr, wml_ptr, bt_ptr, tm_ptr,
                 T, HKV, KV_LEN, D, qk_scale, RT,
                 sq_b, sq_t, sq_h, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, sp_b, sp_t,
                 sm_b, sm_t, sm_s, so_b, so_t, so_h, sbt,
                 G: tl.constexpr, BR: tl.constexpr, BS: tl.constexpr, BD: tl.constexpr,
                 NUM_SPLITS: tl.constexpr, HAS_MASK: tl.constexpr, F32DOT: tl.constexpr,
                 EARLY_KV: tl.constexpr, PAGED: tl.constexpr, PBS: tl.constexpr,
                 HAS_TREE: tl.constexpr, TILED: tl.constexpr, TT: tl.constexpr,
                 INTERP: tl.constexpr, PDL: tl.constexpr):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    r = tl.arange(0, BR)
    if TILED:
        # RT tiles of TT whole tokens (TT * G <= BR rows) per (sequence, kv head): program
        # pid = (b * HKV + hk) * RT + rt owns tokens rt * TT .. rt * TT + TT - 1
        pid_bh = pid // RT
        t = (pid % RT) * TT + r // G
        r_ok = (r < TT * G) & (t < T)
    else:
        pid_bh = pid
        t = r // G
        r_ok = t < T
    b = pid_bh // HKV
    hk = pid_bh % HKV
    h = hk * G + r % G
    d = tl.arange(0, BD)
    d_ok = d < D
    if HAS_TREE:
        # the rows' ancestor masks (indexed like the positions) and the tree's root slot s_b: the
        # (storage) position of the sequence's token 0
        tm = tl.load(tm_ptr + b * sp_b + t * sp_t, mask=r_ok, other=0)
        s_root = tl.load(pos_ptr + b * sp_b).to(tl.int32)
    else:
        tm = r_ok
        s_root = 0
    if EARLY_KV:
        # Before waiting for the previous kernel: the positions (an input no kernel writes), this
        # split's range, and the first block of K/V at the slots the chunk does not write (slots
        # below its lowest position: the kernel before, rope_kv_write, writes only the chunk's
        # own slots). With programmatic dependent launch these HBM reads overlap that kernel.
        pos, start, end = _split_range(pos_ptr, b, t, r_ok, sp_b, sp_t, split, KV_LEN, NUM_SPLITS, BS)
        pmin = tl.min(tl.where(r_ok, pos, 2147483647), axis=0)
        s = start + tl.arange(0, BS)
        s_ok = s < end
        old = s_ok & (s < pmin)
        kt, vt = _kv_tile(k_ptr, v_ptr, bt_ptr, b, hk, s, old, d, d_ok, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s,
                          sbt, PAGED, PBS)
    pdl_prologue(PDL)
    qt = tl.load(q_ptr + b * sq_b + t[:, None] * sq_t + h[:, None] * sq_h + d[None, :],
                 mask=r_ok[:, None] & d_ok[None, :], other=0.0)
    if F32DOT:
        qt = qt.to(tl.float32)
    m_i = tl.full([BR], float("-inf"), tl.float32)
    l_i = tl.zeros([BR], tl.float32)
    acc = tl.zeros([BR, BD], tl.float32)
    if EARLY_KV:
        # the chunk's own slots in the first block, now that they are written
        new = s_ok & (s >= pmin)
        kn, vn = _kv_tile(k_ptr, v_ptr, bt_ptr, b, hk, s, new, d, d_ok, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s,
                          sbt, PAGED, PBS)
        kt = tl.where(new[:, None], kn, kt)
        vt = tl.where(new[:, None], vn, vt)
        m_i, l_i, acc = _attn_block(qt, kt, vt, s, s_ok, pos, t, r_ok, b, m_i, l_i, acc, mask_ptr,
                                    sm_b, sm_t, sm_s, qk_scale, tm, s_root, HAS_MASK, F32DOT, HAS_TREE)
        s_first = start + BS
    else:
        pos, start, end = _split_range(pos_ptr, b, t, r_ok, sp_b, sp_t, split, KV_LEN, NUM_SPLITS, BS)
        s_first = start
    if HAS_TREE:
        # the blocks wholly below the tree's root slot read context only (no mask): the loop as a
        # chain's; the blocks from there on (the nodes' slots) evaluate the ancestor masks
        mid = tl.minimum(s_first + tl.maximum(s_root - s_first, 0) // BS * BS, end)
    else:
        mid = end
    for s0 in range(s_first, mid, BS):
        s = s0 + tl.arange(0, BS)
        s_ok = s < end
        kt, vt = _kv_tile(k_ptr, v_ptr, bt_ptr, b, hk, s, s_ok, d, d_ok, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s,
                          sbt, PAGED, PBS)
        m_i, l_i, acc = _attn_block(qt, kt, vt, s, s_ok, pos, t, r_ok, b, m_i, l_i, acc, mask_ptr,
                                    sm_b, sm_t, sm_s, qk_scale, tm, s_root, HAS_MASK, F32DOT, False)
    if HAS_TREE:
        for s0 in range(mid, end, BS):
            s = s0 + tl.arange(0, BS)
            s_ok = s < end
            kt, vt = _kv_tile(k_ptr, v_ptr, bt_ptr, b, hk, s, s_ok, d, d_ok, sk_b, sk_h, sk_s, sv_b, sv_h,
                              sv_s, sbt, PAGED, PBS)
            m_i, l_i, acc = _attn_block(qt, kt, vt, s, s_ok, pos, t, r_ok, b, m_i, l_i, acc, mask_ptr,
                                        sm_b, sm_t, sm_s, qk_scale, tm, s_root, HAS_MASK, F32DOT, True)
    if NUM_SPLITS == 1:
        o = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
        ODT: tl.constexpr = o_ptr.dtype.element_ty
        tl.store(o_ptr + b * so_b + t[:, None] * so_t + h[:, None] * so_h + d[None, :],
                 to_dtype(o, ODT, INTERP), mask=r_ok[:, None] & d_ok[None, :])
    else:
        rec = pid * NUM_SPLITS + split
        tl.store(wml_ptr + (rec * 2) * BR + r, m_i)
        tl.store(wml_ptr + (rec * 2 + 1) * BR + r, l_i)
        if start < end:
            tl.store(wacc_ptr + rec * BR * BD + r[:, None] * BD + d[None, :], acc)


@triton.jit
def _attn_combine_kernel(wacc_ptr, wml_ptr, o_ptr, HKV, D, so_b, so_t, so_h,
                         G: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr,
                         NUM_SPLITS: tl.constexpr, NSP: tl.constexpr, INTERP: tl.constexpr, PDL: tl.constexpr,
                         T=0, RT=1, TILED: tl.constexpr = False, TT: tl.constexpr = 1):
    """Grid (programs of the attention kernel, rows per program): merges one row's split records.
    TILED (row tiles, see _attn_kernel): program p = (b * HKV + hk) * RT + rt, row r of it is token
    rt * TT + r // G (< T) of sequence b."""
    pdl_prologue(PDL)
    pid = tl.program_id(0)
    r = tl.program_id(1)
    if TILED:
        pid_bh = pid // RT
        t = (pid % RT) * TT + r // G
    else:
        pid_bh = pid
        t = r // G
    b = pid_bh // HKV
    hk = pid_bh % HKV
    h = hk * G + r % G
    sp = tl.arange(0, NSP)
    sp_ok = sp < NUM_SPLITS
    rec = pid * NUM_SPLITS + sp
    m = tl.load(wml_ptr + (rec * 2) * BR + r, mask=sp_ok, other=float("-inf"))
    l = tl.load(wml_ptr + (rec * 2 + 1) * BR + r, mask=sp_ok, other=0.0)
    m_max = tl.max(m, axis=0)
    m_use = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.where(l > 0.0, tl.exp2(m - m_use), 0.0)
    total = tl.sum(l * w, axis=0)
    d = tl.arange(0, BD)
    if TILED:
        d_ok = d < tl.where(t < T, D, 0)       # a row past the last token (a partial last tile)
    else:
        d_ok = d < D
    live = sp_ok & (l > 0.0)
    a = tl.load(wacc_ptr + rec[:, None] * BR * BD + r * BD + d[None, :], mask=live[:, None],
                other=0.0)
    a = tl.where(live[:, None], a, 0.0)
    o = tl.sum(a * w[:, None], axis=0) / tl.where(total > 0.0, total, 1.0)
    ODT: tl.constexpr = o_ptr.dtype.element_ty
    tl.store(o_ptr + b * so_b + t * so_t + h * so_h + d, to_dtype(o, ODT, INTERP), mask=d_ok)


def _check_chunk(t: int, g: int, k: torch.Tensor, v: torch.Tensor, tree: bool = False) -> None:
    """The limits the kernel puts on a step (dense and paged): a chain of <= MAX_T tokens in one
    program per kv head (<= MAX_ROWS rows), a tree of <= MAX_TREE_T tokens (rows tiled)."""
    if tree:
        if t > MAX_TREE_T:
            raise UnsupportedError(f"the Triton attention kernel takes trees of <= {MAX_TREE_T} nodes; got T={t}")
    elif t > MAX_T or t * g > MAX_ROWS:
        raise UnsupportedError(f"the Triton attention kernel takes chunks of <= {MAX_T} tokens "
                               f"(<= {MAX_ROWS} query rows per kv head); got T={t}, G={g}")
    if k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("the KV cache must be contiguous along head_dim")


def supports(q: torch.Tensor, cache) -> bool:
    """Whether the Triton kernel takes this call (else: SDPA, for prefill-sized chunks)."""
    b, t, h, _ = q.shape
    hkv = cache.k[0].shape[1]
    return (getattr(cache, "representation", "dense") == "dense" and t <= MAX_T
            and t * (h // hkv) <= MAX_ROWS)


def default_splits(batch_heads: int, kv_len: int, device) -> int:
    if INTERPRETED or torch.device(device).type != "cuda":
        return 1
    from .tuning import sm_count
    # ~2 programs per SM, at least 64 slots of the launch's kv_len per split (a CUDA graph
    # launches with kv_len = the whole cache; splits past the visible length exit at once).
    # H100, 8 kv heads, ctx 4096: 33 splits 8.7 us vs 17 splits 10.3 (a sweep; BENCHMARKS.md history).
    # 64 slots = one block, which each program loads before its PDL wait: with 128 slots per split
    # the Qwen3-8B step at ctx 512 (cache 576: 5 -> 9 splits) was 0.8% slower in bf16 decode and
    # 0.5% in W8A8 verify (same process, BENCHMARKS.md)
    want = triton.cdiv(2 * sm_count(device), batch_heads)
    return int(max(1, min(want, triton.cdiv(kv_len, 64), 64)))


def row_tiles(t: int, g: int) -> tuple[int, int]:
    """(RT, TT): a chunk of t tokens with g query rows each per kv head is cut into RT programs of
    TT whole tokens (TT * g <= MAX_ROWS rows; one token per program if g > MAX_ROWS)."""
    if t * g <= MAX_ROWS:
        return 1, t
    tt = max(1, MAX_ROWS // g)
    return triton.cdiv(t, tt), tt


def _launch(q, k, v, positions, pos_strides, mk, sm, out, bsz, t, hkv, kv_len, bt, sbt, pbs, qs, os_,
            num_splits, block_s, num_warps, num_stages, early, opts, tree=None):
    """One launch of _attn_kernel (+ the combine kernel when split) over B = bsz sequences of t
    rows each. qs / os_: (sequence, token, head) strides of q / out; mk: the mask (uint8, strides
    sm) or None; bt: the block tables (paged, pbs slots per block) or None (dense); tree: the
    tokens' int64 ancestor masks (a tree step, indexed like `positions`, which then hold storage
    indices) or None. Rows are tiled (RT programs per sequence and kv head) when t * G > MAX_ROWS."""
    h, dh = q.shape[-2], q.shape[-1]
    g = h // hkv
    rt, tt = row_tiles(t, g)
    br = max(16, triton.next_power_of_2(tt * g))
    bd = max(16, triton.next_power_of_2(dh))
    bs = block_s or (32 if INTERPRETED else 64)
    progs = bsz * hkv * rt
    ns = num_splits or default_splits(progs, kv_len, q.device)
    f32dot = q.dtype == torch.float32 or (INTERPRETED and q.dtype == torch.bfloat16)
    qk_scale = dh ** -0.5 * 1.4426950408889634   # log2(e): the kernel uses exp2
    if ns > 1:
        wacc = torch.empty(progs * ns * br * bd, dtype=torch.float32, device=q.device)
        wml = torch.empty(progs * ns * 2 * br, dtype=torch.float32, device=q.device)
    else:
        wacc = wml = out
    nw = num_warps or (1 if INTERPRETED else 4)
    nst = num_stages or (1 if INTERPRETED else 2)
    tiled = rt > 1
    _attn_kernel[(progs, ns)](
        q, k, v, positions, positions if mk is None else mk, out, wacc, wml,
        positions if bt is None else bt, positions if tree is None else tree, t, hkv, kv_len, dh, qk_scale, rt,
        qs[0], qs[1], qs[2], k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), pos_strides[0], pos_strides[1],
        sm[0], sm[1], sm[2], os_[0], os_[1], os_[2], sbt,
        G=g, BR=br, BS=bs, BD=bd, NUM_SPLITS=ns, HAS_MASK=mk is not None, F32DOT=bool(f32dot),
        EARLY_KV=early, PAGED=bt is not None, PBS=int(pbs), HAS_TREE=tree is not None, TILED=tiled,
        TT=tt if tiled else 1, INTERP=INTERPRETED, num_warps=nw, num_stages=nst, **pdl_kw(q.device, opts))
    if ns > 1:
        extra = dict(T=t, RT=rt, TILED=True, TT=tt) if tiled else {}
        _attn_combine_kernel[(progs, tt * g)](
            wacc, wml, out, hkv, dh, os_[0], os_[1], os_[2],
            G=g, BR=br, BD=bd, NUM_SPLITS=ns, NSP=max(2, triton.next_power_of_2(ns)),
            INTERP=INTERPRETED, num_warps=1 if INTERPRETED else 4, **extra, **pdl_kw(q.device, opts))
    return out


def attention(q: torch.Tensor, cache, layer: int, positions: torch.Tensor, kv_len: int,
              mask: Optional[torch.Tensor] = None, num_splits: Optional[int] = None,
              block_s: Optional[int] = None, out: Optional[torch.Tensor] = None,
              num_warps: Optional[int] = None, num_stages: Optional[int] = None, opts=None) -> torch.Tensor:
    if getattr(cache, "representation", "dense") != "dense":
        raise UnsupportedError(f"the Triton attention kernel reads a dense KV cache, not "
                               f"{cache.representation!r} (paged: paged_attention)")
    bsz, t, h, dh = q.shape
    k = cache.k[layer]
    v = cache.v[layer]
    hkv = k.shape[1]
    if h % hkv:
        raise ValueError(f"{h} query heads are not a multiple of {hkv} kv heads")
    g = h // hkv
    _check_chunk(t, g, k, v)
    if q.stride(-1) != 1:
        q = q.contiguous()
    kv_len = int(min(kv_len, k.shape[2]))
    if out is None:
        out = torch.empty((bsz, t, h, dh), dtype=q.dtype, device=q.device)
    if mask is not None:
        if mask.shape != (bsz, t, kv_len):
            raise ValueError(f"attention mask has shape {tuple(mask.shape)}, expected {(bsz, t, kv_len)}")
        mk = mask.to(torch.uint8) if mask.dtype == torch.bool else mask
        sm = mk.stride()
    else:
        mk, sm = None, (0, 0, 0)
    return _launch(q, k, v, positions, positions.stride(), mk, sm, out, bsz, t, hkv, kv_len, None, 0, 1,
                   q.stride()[:3], out.stride()[:3], num_splits, block_s, num_warps, num_stages,
                   early_loads("attention", opts), opts)


def supports_paged(q: torch.Tensor, cache, ctx) -> bool:
    """Whether the Triton kernel takes this paged_attention call: every sequence has the same
    chunk length T (ctx.chunk = T > 0, N = B * T), and either a chain with T <= MAX_T and
    T * (H / Hkv) <= MAX_ROWS or a tree (ctx.tree_mask) with T <= MAX_TREE_T (rows tiled)
    (else the reference: ragged / prefill chunks)."""
    n, h, _ = q.shape
    hkv = cache.k[0].shape[1]
    t = int(getattr(ctx, "chunk", 0) or 0)
    if getattr(cache, "representation", "dense") != "paged" or t <= 0 or h % hkv or n != ctx.num_seqs * t:
        return False
    if getattr(ctx, "tree_mask", None) is not None:
        return t <= MAX_TREE_T
    return t <= MAX_T and t * (h // hkv) <= MAX_ROWS


def paged_meta(ctx, block_size: int, positions: Optional[torch.Tensor] = None):
    """A uniform paged step's launch metadata: int64 contiguous block tables and flat positions
    (ctx.positions, or `positions`: paged_attention passes ctx.attn_positions, a tree step's
    storage indices), and the launch's KV_LEN (the tables' width in slots)."""
    bt = ctx.block_tables
    if bt.dtype != torch.int64 or bt.stride(-1) != 1:
        bt = bt.to(torch.int64).contiguous()
    pos = (ctx.positions if positions is None else positions).reshape(-1)
    if pos.dtype != torch.int64 or pos.stride(-1) != 1:
        pos = pos.to(torch.int64).contiguous()
    return bt, pos, bt.shape[1] * block_size


def paged_attention(q: torch.Tensor, cache, layer: int, ctx, num_splits: Optional[int] = None,
                    block_s: Optional[int] = None, out: Optional[torch.Tensor] = None,
                    num_warps: Optional[int] = None, num_stages: Optional[int] = None, opts=None) -> torch.Tensor:
    """See quasar.ops (op paged_attention), for a uniform step: q [N, H, D] with N = B * T
    (ctx.chunk = T), sequence b's rows are tokens b*T .. b*T + T - 1 at ctx.positions; K/V
    through ctx.block_tables [B, W] (cache.k[layer]: [blocks, Hkv, block_size, D]). The launch's
    KV_LEN is W * block_size (a fixed-width table, as in a CUDA graph, stays correct: the
    visible length is read from the positions). Early K/V loads (EARLY_KV) are off here: they
    assume that the kernel before writes no slot below the chunk's lowest position, which the
    dense cache's positions guarantee but a slot mapping need not (slots are separate from
    positions).

    A tree step (ctx.tree_mask, T <= MAX_TREE_T): positions are ctx.tree_positions (storage
    indices) and token i of sequence b sees slot j iff j <= tree_positions[i] and (j < s_b or bit
    j - s_b of tree_mask[i]), s_b the storage index of b's first token (reference.visible). Its
    T * (H / Hkv) rows per kv head are cut into tiles of <= MAX_ROWS rows (row_tiles)."""
    if getattr(cache, "representation", "dense") != "paged":
        raise UnsupportedError("paged_attention reads a paged KV cache (dense: attention)")
    n, h, dh = q.shape
    k = cache.k[layer]
    v = cache.v[layer]
    hkv = k.shape[1]
    if h % hkv:
        raise ValueError(f"{h} query heads are not a multiple of {hkv} kv heads")
    g = h // hkv
    bsz = ctx.num_seqs
    t = int(getattr(ctx, "chunk", 0) or 0)
    if t <= 0 or n != bsz * t:
        raise UnsupportedError(f"the Triton paged attention kernel takes steps whose {bsz} sequences all "
                               f"have one chunk length (ctx.chunk = {t}, {n} tokens)")
    tmask = getattr(ctx, "tree_mask", None)
    _check_chunk(t, g, k, v, tree=tmask is not None)
    if q.stride(-1) != 1:
        q = q.contiguous()
    if out is None:
        out = torch.empty((n, h, dh), dtype=q.dtype, device=q.device)
    if n == 0:
        return out
    pbs = cache.block_size
    bt, pos, kv_len = paged_meta(ctx, pbs, None if tmask is None else ctx.tree_positions)
    if tmask is not None:
        tmask = tmask.reshape(-1)
        if tmask.dtype != torch.int64 or tmask.stride(-1) != 1:
            tmask = tmask.to(torch.int64).contiguous()
    # sequence b, token i is row b * t + i of q / positions / out (and of the tree masks)
    return _launch(q, k, v, pos, (t, 1), None, (0, 0, 0), out, bsz, t, hkv, kv_len, bt, bt.stride(0), pbs,
                   (t * q.stride(0), q.stride(0), q.stride(1)),
                   (t * out.stride(0), out.stride(0), out.stride(1)),
                   num_splits, block_s, num_warps, num_stages, False, opts, tree=tmask)
