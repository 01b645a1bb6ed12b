"""QuantSpec's hierarchical INT4/INT8 codes (Tiwari et al., ICML 2025; `rishabh-16/QuantSpec`):
the reference quantizer that the KV representation and its kernels are checked against.

Every group of values is quantized asymmetrically in two levels:

    scale = (max - min) / 15
    upper u = clamp(round((x - min) / scale), 0, 15)                       4 bits: the draft's view
    lower l = clamp(round((x - (u * scale + min)) / (scale / 16)), -8, 7)  4 more bits, stored l + 8

    draft    x4 = u * scale + min                          |x - x4| <= scale / 2
    verifier x8 = u * scale + l * scale / 16 + min         |x - x8| <= scale / 16 (scale / 32 unless l clamps)

Upper and lower codes are kept in separate planes (two uint8 tensors of nibbles here; the
kernels pack two codes per byte), so a reader of the draft's view touches the upper plane only.
A constant group (max == min) has scale 0; its codes are 0 and both views give `min` exactly.

Group axes (QuantSpec's): keys per channel over G consecutive tokens, values per token over G
consecutive channels. `quantize(x, dim)` takes the group along `dim` (x's extent along `dim` is
one group).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch


class Codes(NamedTuple):
    upper: torch.Tensor      # uint8 in [0, 15]
    lower: torch.Tensor      # uint8 in [0, 15]  (the signed residual + 8)
    scale: torch.Tensor      # per group (x's dtype; the group dim kept with extent 1)
    minimum: torch.Tensor


def quantize(x: torch.Tensor, dim: int) -> Codes:
    """Two-level codes of x, one group per slice along `dim` (computed in float32)."""
    xf = x.float()
    mn = xf.amin(dim, keepdim=True)
    mx = xf.amax(dim, keepdim=True)
    scale = (mx - mn) / 15
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    u = torch.clamp(torch.round((xf - mn) / safe), 0, 15)
    u = torch.where(scale > 0, u, torch.zeros_like(u))
    resid = xf - (u * scale + mn)
    low = torch.clamp(torch.round(resid / (safe / 16)), -8, 7)
    low = torch.where(scale > 0, low, torch.zeros_like(low))
    return Codes(u.to(torch.uint8), (low + 8).to(torch.uint8), scale.to(x.dtype), mn.to(x.dtype))


def dequantize_upper(c: Codes, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The draft's view: upper plane only."""
    return (c.upper.float() * c.scale.float() + c.minimum.float()).to(dtype)


def dequantize(c: Codes, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The verifier's view: both planes (about 8 bits)."""
    s = c.scale.float()
    return (c.upper.float() * s + (c.lower.float() - 8) * (s / 16) + c.minimum.float()).to(dtype)


# ------------------------------------------------------------------ packing (two codes per byte)
#
# A plane packs channel c (low nibble) with channel c + D/2 (high nibble) of the same token: the
# kernels then read the two halves of a head as two [tokens, D/2] tiles, with no interleave.

def pack(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [..., D] in [0, 15] -> bytes [..., D/2]."""
    h = codes.shape[-1] // 2
    return codes[..., :h] | (codes[..., h:] << 4)


def unpack(plane: torch.Tensor) -> torch.Tensor:
    """bytes [..., D/2] -> uint8 codes [..., D]."""
    return torch.cat([plane & 15, plane >> 4], -1)


# ------------------------------------------------------------------ the KV representation

def quantized_blocks(position: int, group: int, residual: int) -> int:
    """How many leading blocks a query at `position` reads from the quantized planes: block m
    (tokens [m G, (m + 1) G)) once at least `residual` tokens follow it, (m + 1) G + R <= p. The
    rest, up to the query itself, is read at full precision (the buffer of recent tokens). A
    function of the position alone, so every step (decode, a verify chunk, a prefill chunk, any
    batch) shows a token the same cache: greedy speculation stays exactly the verifier's own
    greedy decoding."""
    return max(0, (position - residual) // group)


class HierarchicalKVCache:
    """QuantSpec's hierarchical INT4/INT8 KV cache on the paged runtime (issue 19).

    A block is one key group of G = block_size tokens. Per layer:
      k_hi, k_lo, v_hi, v_lo   [blocks, Hkv, G, D/2] uint8   upper / lower nibble planes (packed)
      k_scale, k_min           [blocks, Hkv, D]              keys: per channel over the block's G tokens
      v_scale, v_min           [blocks, Hkv, G, D/Gv]        values: per token over Gv channels
      k_fp, v_fp               [fp_blocks, Hkv, G, D]        full precision, for the recent tokens
    fp_index[block] is the block's slot in the full-precision pool (-1: none).

    The full-precision buffer. Every token is written at full precision first (its block takes a
    pool slot); a complete block is quantized once its tokens are committed, and its pool slot is
    given back once no query can read it at full precision any more (see `quantized_blocks`):
    each sequence keeps between R and R + G recent tokens at full precision (QuantSpec's R..2R
    buffer with G = R), so generation of any length works with a bounded pool.

    Views: the verifier (prefill / decode / verify) reads both planes, about 8 bits; a draft step
    reads the upper plane only when `draft_view` is "upper" (QuantSpec's draft), else both.
    """
    representation = "hierarchical-int4"
    prefix_caching = False        # a shared prompt block may already have lost its full-precision copy

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device, residual_tokens: int, fp_blocks: int,
                 value_group: int = 0, draft_view: str = "upper"):
        if head_dim % 2:
            raise ValueError(f"the hierarchical KV cache packs two channels per byte; head_dim {head_dim} is odd")
        vg = value_group or head_dim
        vg = min(vg, head_dim)
        if head_dim % vg:
            raise ValueError(f"kv_cache.group_size: values are grouped over channels, and {vg} does not "
                             f"divide head_dim {head_dim}; use a divisor of {head_dim} or >= {head_dim}")
        G, D, H, L = block_size, head_dim, num_kv_heads, num_layers
        self.num_blocks, self.block_size, self.dtype = num_blocks, block_size, dtype
        self.num_kv_heads, self.head_dim, self.value_group = H, D, vg
        self.residual = residual_tokens
        self.draft_view = draft_view
        u8 = dict(dtype=torch.uint8, device=device)
        f = dict(dtype=dtype, device=device)
        self.k_hi = torch.zeros(L, num_blocks, H, G, D // 2, **u8)
        self.k_lo = torch.zeros(L, num_blocks, H, G, D // 2, **u8)
        self.v_hi = torch.zeros(L, num_blocks, H, G, D // 2, **u8)
        self.v_lo = torch.zeros(L, num_blocks, H, G, D // 2, **u8)
        self.k_scale = torch.zeros(L, num_blocks, H, D, **f)
        self.k_min = torch.zeros(L, num_blocks, H, D, **f)
        self.v_scale = torch.zeros(L, num_blocks, H, G, D // vg, **f)
        self.v_min = torch.zeros(L, num_blocks, H, G, D // vg, **f)
        fp_blocks = max(2, min(fp_blocks, num_blocks))
        self.k_fp = torch.zeros(L, fp_blocks, H, G, D, **f)
        self.v_fp = torch.zeros(L, fp_blocks, H, G, D, **f)
        self.fp_index = torch.full((num_blocks,), -1, dtype=torch.int64, device=device)
        # host bookkeeping: block -> pool slot, the free pool slots, blocks written since quantized
        self._fp: dict[int, int] = {}
        self._fp_free = list(range(fp_blocks - 1, -1, -1))
        self._dirty: set[int] = set()
        self.step_quantize: Optional[torch.Tensor] = None     # blocks the current step's prologue quantizes
        self.fp_peak = 0
        self.scratch = num_blocks - 1
        self._take(self.scratch)         # the runner's scratch block (the last) keeps a pool slot

    # ------------------------------------------------------------------ sizes
    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                        dtype: torch.dtype, value_group: int = 0) -> int:
        """The quantized planes and their scales (the full-precision pool is counted apart)."""
        e = torch.empty(0, dtype=dtype).element_size()
        vg = min(value_group or head_dim, head_dim)
        planes = 4 * block_size * head_dim // 2
        scales = 2 * head_dim * e + 2 * block_size * (head_dim // vg) * e
        return num_layers * num_kv_heads * (planes + scales)

    @staticmethod
    def fp_blocks_needed(group: int, residual: int, max_batch: int, k: int, max_prefill: int) -> int:
        """Pool slots that the runtime can hold at once: per running sequence its R..R+G recent
        tokens plus a step's k + 1; plus a prefill step's chunk."""
        per_seq = -(-(residual + k + 1) // group) + 2
        return max_batch * per_seq + 2 * -(-max_prefill // group) + 2

    @property
    def fp_blocks(self) -> int:
        return self.k_fp.shape[1]

    def nbytes(self) -> int:
        ts = (self.k_hi, self.k_lo, self.v_hi, self.v_lo, self.k_scale, self.k_min, self.v_scale,
              self.v_min, self.k_fp, self.v_fp)
        return sum(t.numel() * t.element_size() for t in ts)

    # ------------------------------------------------------------------ the step's bookkeeping
    def _take(self, block: int) -> None:
        if block in self._fp:
            return
        if not self._fp_free:
            raise RuntimeError(
                f"the hierarchical KV cache's full-precision pool ({self.k_fp.shape[1]} blocks) is exhausted; "
                "lower runtime.max_batch_size or runtime.max_prefill_tokens, or raise kv_cache.group_size")
        slot = self._fp_free.pop()
        self._fp[block] = slot
        self.fp_index[block] = slot
        self.fp_peak = max(self.fp_peak, len(self._fp))

    def release_blocks(self, blocks) -> None:
        """Blocks freed by the block manager give their pool slots back."""
        for b in blocks:
            slot = self._fp.pop(b, None)
            if slot is not None:
                self._fp_free.append(slot)
                self.fp_index[b] = -1
            self._dirty.discard(b)

    def before_step(self, ctx, mode: str) -> bool:
        """Host-side, before the step's forward (outside any CUDA graph): give every block the
        step writes a pool slot; quantize (all layers) the complete blocks whose tokens are now
        committed; give back the pool slots no query can read any more; and list the blocks that
        this step completes and also reads quantized (long prefill chunks) for its prologue. Returns
        whether the step may replay a captured graph (False when its prologue quantizes)."""
        if getattr(ctx, "tree_mask", None) is not None:
            from quasar.errors import UnsupportedError
            raise UnsupportedError("the hierarchical-int4 KV cache does not take tree steps (its attention has no "
                                   "tree mask and its buffer no path compaction); use kv_cache.representation: "
                                   "dense with drafter.tree")
        G, R = self.block_size, self.residual
        pos, slots, tables, qs = ctx.host_positions, ctx.host_slots, ctx.host_tables, ctx.query_start
        written = {s // G for s in slots}
        written.discard(self.scratch)            # padding's writes: never read, never quantized
        for blk in written:
            self._take(blk)
        in_step: list[int] = []
        if mode != "draft":
            ready, release = [], []
            for b in range(len(qs) - 1):
                if qs[b + 1] == qs[b]:
                    continue
                p_min = min(pos[qs[b]:qs[b + 1]])
                p_max = max(pos[qs[b]:qs[b + 1]])
                table = tables[b]
                # blocks complete before this step hold committed tokens (a step starts at its
                # sequence's committed length), so their codes are final; the written-since
                # blocks are the newest complete ones
                m = min(p_min // G, len(table)) - 1
                while m >= 0 and table[m] in self._dirty:
                    ready.append(table[m])
                    m -= 1
                # blocks this step completes that a row of this step reads quantized (a prefill
                # chunk longer than R; every token of a prefill chunk is final)
                for m in range(p_min // G, min(quantized_blocks(p_max, G, R), len(table))):
                    in_step.append(table[m])
                # no later query of this sequence reads these at full precision
                m = min(quantized_blocks(p_min, G, R), len(table)) - 1
                while m >= 0 and table[m] in self._fp:
                    release.append(table[m])
                    m -= 1
            if ready:
                self._quantize(torch.tensor(ready, dtype=torch.int64, device=self.fp_index.device))
                self._dirty.difference_update(ready)
            for blk in release:
                if blk in self._fp and blk not in written and blk not in self._dirty:
                    self._fp_free.append(self._fp.pop(blk))
                    self.fp_index[blk] = -1
        self._dirty.update(written)
        self._dirty.difference_update(in_step)
        self.step_quantize = (torch.tensor(in_step, dtype=torch.int64, device=self.fp_index.device)
                              if in_step else None)
        return self.step_quantize is None          # a captured step (CUDA graph) does no quantization

    def _quantize(self, blocks: torch.Tensor, layer: Optional[int] = None) -> None:
        """Quantize `blocks` from their full-precision copies (every layer, or one)."""
        lay = slice(None) if layer is None else slice(layer, layer + 1)
        slots = self.fp_index[blocks]
        k = self.k_fp[lay][:, slots]                        # [L, n, H, G, D]
        v = self.v_fp[lay][:, slots]
        kc = quantize(k, dim=-2)                            # keys: per channel over the block's tokens
        vg = self.value_group
        vc = quantize(v.unflatten(-1, (-1, vg)), dim=-1)    # values: per token over vg channels
        self.k_hi[lay][:, blocks] = pack(kc.upper)
        self.k_lo[lay][:, blocks] = pack(kc.lower)
        self.k_scale[lay][:, blocks] = kc.scale.squeeze(-2)
        self.k_min[lay][:, blocks] = kc.minimum.squeeze(-2)
        self.v_hi[lay][:, blocks] = pack(vc.upper.flatten(-2))
        self.v_lo[lay][:, blocks] = pack(vc.lower.flatten(-2))
        self.v_scale[lay][:, blocks] = vc.scale.squeeze(-1)
        self.v_min[lay][:, blocks] = vc.minimum.squeeze(-1)

    # ------------------------------------------------------------------ the decoder's calls
    def prologue(self, backend, layer, qkv, q_norm, k_norm, eps, cos, sin, ctx):
        """qkv [N, W] -> q [N, H, D]; the step's k / v written at full precision to ctx.slot_mapping
        (and the blocks the step completes and reads quantized, quantized)."""
        return backend.hier_rope_kv_write(qkv, q_norm, k_norm, eps, cos, sin, ctx, self, layer)

    def attend(self, backend, layer, q, ctx, draft: bool = False):
        return backend.hier_attention(q, self, layer, ctx, draft and self.draft_view == "upper")

    def dequantize_blocks(self, layer: int, blocks: torch.Tensor, upper_only: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V [n, H, G, D] (float32) of quantized `blocks`: the upper plane only, or both."""
        def deq(hi, lo, scale, mn):
            s, u = scale.float(), unpack(hi).float()
            x = u * s if upper_only else u * s + (unpack(lo).float() - 8) * (s / 16)
            return x + mn.float()
        k = deq(self.k_hi[layer][blocks], self.k_lo[layer][blocks], self.k_scale[layer][blocks][:, :, None],
                self.k_min[layer][blocks][:, :, None])
        vg = self.value_group
        v = deq(self.v_hi[layer][blocks], self.v_lo[layer][blocks],
                self.v_scale[layer][blocks].repeat_interleave(vg, -1), self.v_min[layer][blocks].repeat_interleave(vg, -1))
        return k, v
