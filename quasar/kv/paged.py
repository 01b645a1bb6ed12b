"""The paged KV cache: fixed-size blocks shared by every sequence of a batch (issue 17).

Per layer, k[layer] / v[layer] are [num_blocks, Hkv, block_size, D] (BNSD within a block, like the
dense cache's layer layout). A sequence's token at position p lives in slot
`table[p // block_size] * block_size + p % block_size` (quasar.engine.block_manager); each step's
attention metadata (quasar.engine.context.StepContext) carries the slot of every token and the
block table of every sequence, so slots and positions are separate (a tree draft can put several
tokens at one position).
"""
from __future__ import annotations

import torch


class PagedKVCache:
    representation = "paged"

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device):
        shape = (num_layers, num_blocks, num_kv_heads, block_size, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.dtype = dtype
        self.num_blocks, self.block_size = num_blocks, block_size
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                        dtype: torch.dtype) -> int:
        return 2 * num_layers * block_size * num_kv_heads * head_dim * torch.empty(0, dtype=dtype).element_size()

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    def prologue(self, backend, layer, qkv, q_norm, k_norm, eps, cos, sin, ctx):
        """qkv [N, W] -> q [N, H, D], the step's k/v written to ctx.slot_mapping."""
        return backend.paged_rope_kv_write(qkv, q_norm, k_norm, eps, cos, sin, ctx, self, layer)

    def attend(self, backend, layer, q, ctx, draft: bool = False):
        return backend.paged_attention(q, self, layer, ctx)

    def move_slots(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Every layer's K/V at slots src[i] -> slots dst[i] (a tree's accepted path, compacted to
        the positions AR decoding writes): one gather and one scatter over all layers. Every source
        is read before any destination is written, so a destination may be another move's source."""
        bs = self.block_size
        sb, so, db, do = src // bs, src % bs, dst // bs, dst % bs
        self.k[:, db, :, do] = self.k[:, sb, :, so]
        self.v[:, db, :, do] = self.v[:, sb, :, so]

    # the runtime's hooks (representations that keep host-side state use them)
    prefix_caching = True

    def before_step(self, ctx, mode: str) -> bool:
        """Called before each step's forward; True: the step may replay a captured graph."""
        return True

    def release_blocks(self, blocks) -> None:
        """Blocks the block manager freed."""
