"""Reference semantics of every op in the contract: plain torch, any device.

This module is the definition. The CPU backend runs these functions as they are; the CUDA and
NPU backends are tested against them. The GEMMs' reference arithmetic is each scheme's
`reference_gemm` (quasar/quant/), built on INVARIANT_ROWS below.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from quasar.ops.types import QMAX, QActivation


# ------------------------------------------------------------------ norms, rope, activations

def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    cos = cos.unsqueeze(2).to(x.dtype)
    sin = sin.unsqueeze(2).to(x.dtype)
    return x * cos + rotate_half(x) * sin


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    i = x.shape[-1] // 2
    return F.silu(x[..., :i]) * x[..., i:]


def quantize_per_token(x: torch.Tensor, qtype: str) -> QActivation:
    qmax = QMAX[qtype]
    xf = x.float()
    amax = xf.abs().amax(dim=-1, keepdim=True)
    scale = (amax / qmax).clamp(min=1e-8)   # a zero row quantizes to zeros, not NaN
    if qtype == "fp8":
        q = (xf / scale).clamp(-qmax, qmax).to(torch.float8_e4m3fn)
    else:
        q = torch.round(xf / scale).clamp(-qmax - 1, qmax).to(torch.int8)
    return QActivation(q, scale, qtype, x.dtype)


def rms_norm_quant(x: torch.Tensor, weight: torch.Tensor, eps: float, qtype: str) -> QActivation:
    return quantize_per_token(rms_norm(x, weight, eps), qtype)


def silu_mul_quant(x: torch.Tensor, qtype: str) -> QActivation:
    return quantize_per_token(silu_mul(x), qtype)


def add_rms_norm_with(rms_norm_fn, rms_norm_quant_fn):
    """add_rms_norm composed of a backend's own rms_norm / rms_norm_quant ops."""
    def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float,
                     qtype: Optional[str] = None):
        s = x + delta
        return (rms_norm_quant_fn(s, weight, eps, qtype) if qtype else rms_norm_fn(s, weight, eps)), s
    return add_rms_norm


add_rms_norm = add_rms_norm_with(rms_norm, rms_norm_quant)


# ------------------------------------------------------------------ batch invariance
#
# A decode step (1 row) and a verify chunk (k+1 rows) must give each row bit-identical results,
# or greedy speculative output drifts from greedy autoregressive output (int8 activation
# rounding amplifies a last-bit difference). BLAS GEMMs and SDPA pick different kernels and
# summation orders for different row counts, so chunks of up to INVARIANT_ROWS rows are computed
# row by row through the very call a one-row step makes. Exact integer GEMMs need no care.

INVARIANT_ROWS = 16



def kv_write(cache, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> None:
    b = torch.arange(k.shape[0], device=k.device)[:, None]
    cache.k[layer][b, :, positions] = k.to(cache.dtype)
    cache.v[layer][b, :, positions] = v.to(cache.dtype)


def _norm_rope(rms_norm_fn, rope_fn, qkv, q_norm, k_norm, eps, cos, sin, positions, hkv, d):
    """q, k, v of qkv[..., (H + 2 Hkv) D]: per-head norms, RoPE at `positions` (same leading shape)."""
    lead, width = qkv.shape[:-1], qkv.shape[-1]
    h = width // d - 2 * hkv
    q, k, v = qkv.view(*lead, h + 2 * hkv, d).split([h, hkv, hkv], dim=-2)
    if q_norm is not None:
        q = rms_norm_fn(q, q_norm, eps)
    if k_norm is not None:
        k = rms_norm_fn(k, k_norm, eps)
    c, s = cos[positions].to(q.dtype), sin[positions].to(q.dtype)
    return rope_fn(q, c, s), rope_fn(k, c, s), v


def rope_kv_write_with(rms_norm_fn, rope_fn, kv_write_fn):
    """rope_kv_write composed of a backend's own rms_norm, rope and kv_write ops."""
    def rope_kv_write(qkv: torch.Tensor, q_norm: Optional[torch.Tensor], k_norm: Optional[torch.Tensor],
                      eps: float, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                      cache, layer: int) -> torch.Tensor:
        q, k, v = _norm_rope(rms_norm_fn, rope_fn, qkv, q_norm, k_norm, eps, cos, sin, positions,
                             cache.k.shape[2], cache.k.shape[-1])
        kv_write_fn(cache, layer, k, v, positions)
        return q
    return rope_kv_write


def paged_rope_kv_write_with(rms_norm_fn, rope_fn, paged_kv_write_fn):
    """paged_rope_kv_write composed of a backend's own rms_norm, rope and paged_kv_write ops."""
    def paged_rope_kv_write(qkv: torch.Tensor, q_norm: Optional[torch.Tensor], k_norm: Optional[torch.Tensor],
                            eps: float, cos: torch.Tensor, sin: torch.Tensor, ctx, cache, layer: int) -> torch.Tensor:
        # as one sequence of N tokens (rope takes [B, T, H, D])
        q, k, v = _norm_rope(rms_norm_fn, rope_fn, qkv[None], q_norm, k_norm, eps, cos, sin,
                             ctx.positions[None], cache.num_kv_heads, cache.head_dim)
        paged_kv_write_fn(cache, layer, k[0], v[0], ctx.slot_mapping)
        return q[0]
    return paged_rope_kv_write


rope_kv_write = rope_kv_write_with(rms_norm, rope, kv_write)


def attention(q: torch.Tensor, cache, layer: int, positions: torch.Tensor, kv_len: int,
              mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    bsz, t, heads, d = q.shape
    kv_heads = cache.k[layer].shape[1]
    if t <= INVARIANT_ROWS:
        # each query row exactly as a one-token decode at its position would compute it
        out = torch.empty_like(q)
        pos = positions.tolist()
        for b in range(bsz):
            for i in range(t):
                n = min(pos[b][i] + 1, kv_len)
                k = cache.k[layer][b:b + 1, :, :n].to(q.dtype)
                v = cache.v[layer][b:b + 1, :, :n].to(q.dtype)
                m = None if mask is None else mask[b:b + 1, i:i + 1, :n][:, None]
                o = F.scaled_dot_product_attention(q[b:b + 1, i:i + 1].transpose(1, 2), k, v, attn_mask=m,
                                                   scale=d ** -0.5, enable_gqa=heads != kv_heads)
                out[b, i] = o[0, :, 0]
        return out
    k = cache.k[layer][:, :, :kv_len]
    v = cache.v[layer][:, :, :kv_len]
    slots = torch.arange(kv_len, device=q.device)
    allow = slots[None, None, :] <= positions[:, :, None]          # [B, T, kv_len]
    if mask is not None:
        allow = allow & mask
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.to(q.dtype), v.to(q.dtype), attn_mask=allow[:, None],
        scale=d ** -0.5, enable_gqa=heads != kv_heads)
    return out.transpose(1, 2)


# ------------------------------------------------------------------ the paged KV cache (batched runtime)

def paged_kv_write(cache, layer: int, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """k, v [N, Hkv, D] -> the cache slots slot_mapping[N] (cache.k[layer]: [blocks, Hkv, bs, D])."""
    bs = cache.block_size
    blk, off = slot_mapping // bs, slot_mapping % bs
    cache.k[layer][blk, :, off] = k.to(cache.dtype)
    cache.v[layer][blk, :, off] = v.to(cache.dtype)


KV_BUCKET = 64      # the paged reference attends over a row's KV padded (masked) to a multiple of this


def _gather(cache_layer: torch.Tensor, table: torch.Tensor, n: int, bs: int) -> torch.Tensor:
    """A sequence's first n slots, contiguous: [1, Hkv, n, D]. Slots past the table's width read
    block 0 (callers mask them)."""
    nb = -(-n // bs)
    ids = table[:nb]
    if ids.shape[0] < nb:
        ids = torch.cat([ids, ids.new_zeros(nb - ids.shape[0])])
    blocks = cache_layer[ids]                                           # [nb, Hkv, bs, D]
    return blocks.permute(1, 0, 2, 3).reshape(blocks.shape[1], -1, blocks.shape[-1])[None, :, :n]


def tree_starts(ctx) -> Optional[torch.Tensor]:
    """A tree step's s_b per token [N] (the storage index of its sequence's first token), else None."""
    if ctx.tree_mask is None:
        return None
    qs = ctx.query_start
    first = torch.tensor([qs[b] for b in range(len(qs) - 1) for _ in range(qs[b], qs[b + 1])],
                         dtype=torch.int64, device=ctx.tree_positions.device)
    return ctx.tree_positions.index_select(0, first)


def visible(j: torch.Tensor, p: torch.Tensor, ctx, rows: Optional[torch.Tensor], starts: Optional[torch.Tensor],
            shape: tuple) -> torch.Tensor:
    """The paged attention's visibility of slots j to rows at (storage) positions p: j <= p, and
    for a tree step (ctx.tree_mask) j < s_b or node j - s_b an ancestor-or-self (its mask bit).
    rows: the rows' token indices (None = all, in order); shape: p's shape."""
    allow = j <= p
    if ctx.tree_mask is None:
        return allow
    m, st = ctx.tree_mask, starts
    if rows is not None:
        m, st = m.index_select(0, rows), st.index_select(0, rows)
    m, st = m.view(shape), st.view(shape)
    rel = j - st
    bit = (m >> rel.clamp(0, 63)) & 1
    return allow & ((rel < 0) | (bit == 1))


def paged_attention(q: torch.Tensor, cache, layer: int, ctx) -> torch.Tensor:
    """q [N, H, D] (the step's tokens, flattened; ctx: quasar.engine.context.StepContext) -> o [N, H, D].
    Token i of sequence b attends to that sequence's slots at positions <= positions[i], found
    through its block table. A tree step (ctx.tree_mask) reads storage indices: token i sees
    slot j iff j <= tree_positions[i] and (j < s_b or bit j - s_b of tree_mask[i]), s_b the
    storage index of b's first token (the tree's root): the context and the node's ancestors.

    Batch invariance: a row's result depends only on its q, its position p and its sequence's KV.
    Every SDPA call has one shape per KV length: rows are grouped by L = p + 1 rounded up to a
    multiple of KV_BUCKET, cut into tiles of exactly INVARIANT_ROWS rows (the last padded by
    repeating a row), and all tiles of one L go into one call, one tile per batch entry, over their
    sequences' slots [0, L) with the causal mask. Masked slots add exact zeros, and for a fixed
    call shape SDPA gives a row the same bits whatever the other rows and batch entries are. So a
    sequence gets the same bits alone, in any batch, in a verify chunk of any length and under any
    prefill chunking: greedy output through an activation-quantizing verifier (W8A8, where a
    last-bit difference can move an int8 code) depends on it."""
    n_tok, heads, d = q.shape
    bs, R = cache.block_size, INVARIANT_ROWS
    kc, vc = cache.k[layer], cache.v[layer]
    kv_heads = kc.shape[1]
    dev = q.device
    apos = ctx.attn_positions
    pos = apos.tolist()
    qs = ctx.query_start
    starts = tree_starts(ctx)
    by_len: dict[int, list[tuple[int, list[int]]]] = {}          # L -> [(sequence, tile rows)]
    for b in range(len(qs) - 1):
        groups: dict[int, list[int]] = {}
        for i in range(qs[b], qs[b + 1]):
            groups.setdefault(-(-(pos[i] + 1) // KV_BUCKET) * KV_BUCKET, []).append(i)
        for n, rows in groups.items():
            for t in range(0, len(rows), R):
                tile = rows[t:t + R]
                by_len.setdefault(n, []).append((b, tile + [tile[-1]] * (R - len(tile))))
    out = torch.empty_like(q)
    for n, tiles in by_len.items():
        k = torch.cat([_gather(kc, ctx.block_tables[b], n, bs) for b, _ in tiles]).to(q.dtype)
        v = torch.cat([_gather(vc, ctx.block_tables[b], n, bs) for b, _ in tiles]).to(q.dtype)
        idx = torch.tensor([r for _, rows in tiles for r in rows], device=dev)
        qt = q.index_select(0, idx).view(len(tiles), R, heads, d).transpose(1, 2)      # [tiles, H, R, D]
        p = apos.index_select(0, idx).view(len(tiles), R)
        allow = visible(torch.arange(n, device=dev)[None, None, :], p[:, :, None], ctx, idx, starts, (len(tiles), R, 1))
        o = F.scaled_dot_product_attention(qt, k, v, attn_mask=allow[:, None], scale=d ** -0.5,
                                           enable_gqa=heads != kv_heads)
        out[idx] = o.transpose(1, 2).reshape(-1, heads, d)      # a padded row rewrites its own value
    return out


paged_rope_kv_write = paged_rope_kv_write_with(rms_norm, rope, paged_kv_write)


def batched_paged_attention(q: torch.Tensor, cache, layer: int, ctx) -> torch.Tensor:
    """paged_attention for every sequence of the step in one SDPA call (the same math as the
    per-sequence definition above, not its per-row bit-for-bit form): queries padded to the
    longest chunk (a pad row repeats its sequence's last query and is dropped), each sequence's
    blocks gathered up to the step's longest context, visibility as a mask. No host sync: the
    chunk lengths come from ctx.query_start and the width from ctx.max_context (host ints).
    What an accelerator backend runs for ragged steps (varlen prefill)."""
    n, heads, d = q.shape
    qs = ctx.query_start
    S = len(qs) - 1
    lens = [qs[b + 1] - qs[b] for b in range(S)]
    tmax = max(lens)
    bs = cache.block_size
    longest = ctx.max_context or int(ctx.context_lens.max())
    width = -(-longest // bs)
    dev = q.device
    uniform = all(x == tmax for x in lens)
    apos = ctx.attn_positions
    if uniform:
        idx = None
        qp, pos = q.view(S, tmax, heads, d), apos.view(S, tmax)
    else:
        idx = torch.tensor([qs[b] + min(t, lens[b] - 1) for b in range(S) for t in range(tmax)], device=dev)
        qp = q.index_select(0, idx).view(S, tmax, heads, d)
        pos = apos.index_select(0, idx).view(S, tmax)
    table = ctx.block_tables[:, :width]
    kc, vc = cache.k[layer], cache.v[layer]
    hkv = kc.shape[1]
    k = kc[table].permute(0, 2, 1, 3, 4).reshape(S, hkv, width * bs, d).to(q.dtype)
    v = vc[table].permute(0, 2, 1, 3, 4).reshape(S, hkv, width * bs, d).to(q.dtype)
    allow = visible(torch.arange(width * bs, device=dev)[None, None, :], pos[:, :, None], ctx,
                    idx, tree_starts(ctx), (S, tmax, 1))                              # [S, tmax, L]
    o = F.scaled_dot_product_attention(qp.transpose(1, 2), k, v, attn_mask=allow[:, None], scale=d ** -0.5,
                                       enable_gqa=heads != hkv).transpose(1, 2)        # [S, tmax, H, D]
    if uniform:
        return o.reshape(n, heads, d)
    keep = torch.tensor([b * tmax + t for b in range(S) for t in range(lens[b])], device=dev)
    return o.reshape(S * tmax, heads, d).index_select(0, keep)


# ------------------------------------------------------------------ the hierarchical KV cache (QuantSpec)

def hier_kv_write(cache, layer: int, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """k, v [N, Hkv, D] -> the full-precision copies of the slots slot_mapping[N] (block slot // G,
    whose pool slot is cache.fp_index[block]); then the blocks the step's prologue quantizes
    (cache.step_quantize, set by cache.before_step), in this layer."""
    G = cache.block_size
    fp = cache.fp_index[slot_mapping // G]
    off = slot_mapping % G
    cache.k_fp[layer][fp, :, off] = k.to(cache.dtype)
    cache.v_fp[layer][fp, :, off] = v.to(cache.dtype)
    if cache.step_quantize is not None:
        cache._quantize(cache.step_quantize, layer)


def _hier_gather(cache, layer: int, table: torch.Tensor, n: int, nq: int, upper_only: bool, dtype, memo=None):
    """A sequence's first n tokens as contiguous K, V [1, Hkv, n, D]: blocks [0, nq) from the
    quantized planes (the upper plane only, or both), the rest from their full-precision copies.
    Past the table's width, block 0 is read (callers mask it). memo: a dict that keeps each
    table's dequantized blocks and pool copies across the calls of one attention."""
    G = cache.block_size
    nb = -(-n // G)
    ids = table[:nb]
    if ids.shape[0] < nb:
        ids = torch.cat([ids, ids.new_zeros(nb - ids.shape[0])])
    key = (id(table), upper_only)
    have = memo.get(key) if memo is not None else None
    if have is None or have[0] < nb:
        kq, vq = cache.dequantize_blocks(layer, ids, upper_only)           # [nb, Hkv, G, D]
        fp = cache.fp_index[ids].clamp(min=0)
        have = (nb, kq.to(dtype), vq.to(dtype), cache.k_fp[layer][fp].to(dtype), cache.v_fp[layer][fp].to(dtype))
        if memo is not None:
            memo[key] = have
    _, kq, vq, kf, vf = have
    k = torch.cat([kq[:nq], kf[nq:nb]])
    v = torch.cat([vq[:nq], vf[nq:nb]])
    h, d = k.shape[1], k.shape[-1]
    return (k.permute(1, 0, 2, 3).reshape(h, -1, d)[None, :, :n],
            v.permute(1, 0, 2, 3).reshape(h, -1, d)[None, :, :n])


def hier_attention(q: torch.Tensor, cache, layer: int, ctx, upper_only: bool) -> torch.Tensor:
    """q [N, H, D] -> o [N, H, D] on the hierarchical KV cache (quasar.kv.hierarchical): as
    paged_attention, where token i (position p) reads its sequence's first
    quantized_blocks(p) blocks from the quantized planes (the upper plane only when
    `upper_only`: a QuantSpec draft step; else both, about 8 bits) and the rest of [0, p] at full
    precision. Batch invariant as paged_attention: rows are tiled by (KV length bucket, quantized
    blocks), both functions of the row's position."""
    from quasar.kv.hierarchical import quantized_blocks
    n_tok, heads, d = q.shape
    G, R = cache.block_size, cache.residual
    T = INVARIANT_ROWS
    kv_heads = cache.num_kv_heads
    dev = q.device
    pos = ctx.positions.tolist()
    qs = ctx.query_start
    by_key: dict[tuple[int, int], list[tuple[int, list[int]]]] = {}
    for b in range(len(qs) - 1):
        groups: dict[tuple[int, int], list[int]] = {}
        for i in range(qs[b], qs[b + 1]):
            key = (-(-(pos[i] + 1) // KV_BUCKET) * KV_BUCKET, quantized_blocks(pos[i], G, R))
            groups.setdefault(key, []).append(i)
        for key, rows in groups.items():
            for t in range(0, len(rows), T):
                tile = rows[t:t + T]
                by_key.setdefault(key, []).append((b, tile + [tile[-1]] * (T - len(tile))))
    out = torch.empty_like(q)
    tables = [ctx.block_tables[b] for b in range(len(qs) - 1)]
    longest = {}
    for (n, _), tiles in by_key.items():
        for b, _ in tiles:
            longest[b] = max(longest.get(b, 0), n)
    memo: dict = {}
    for b, n in longest.items():             # each sequence's blocks dequantized once per call
        _hier_gather(cache, layer, tables[b], n, 0, upper_only, q.dtype, memo)
    for (n, nq), tiles in by_key.items():
        seqs = sorted({b for b, _ in tiles})
        tiles.sort(key=lambda x: x[0])
        kv = {b: _hier_gather(cache, layer, tables[b], n, nq, upper_only, q.dtype, memo) for b in seqs}
        # one gather per sequence, repeated over its tiles without copies
        k = torch.cat([kv[b][0].expand(sum(1 for x, _ in tiles if x == b), -1, -1, -1) for b in seqs])
        v = torch.cat([kv[b][1].expand(sum(1 for x, _ in tiles if x == b), -1, -1, -1) for b in seqs])
        idx = torch.tensor([r for _, rows in tiles for r in rows], device=dev)
        qt = q.index_select(0, idx).view(len(tiles), T, heads, d).transpose(1, 2)
        p = ctx.positions.index_select(0, idx).view(len(tiles), T)
        allow = torch.arange(n, device=dev)[None, None, :] <= p[:, :, None]
        o = F.scaled_dot_product_attention(qt, k, v, attn_mask=allow[:, None], scale=d ** -0.5,
                                           enable_gqa=heads != kv_heads)
        out[idx] = o.transpose(1, 2).reshape(-1, heads, d)
    return out


hier_rope_kv_write = paged_rope_kv_write_with(rms_norm, rope, hier_kv_write)
