"""KV cache representations. A cache is one object with a `representation` that attention takes
whole, so a new representation (QuantSpec's hierarchical int4/int8) is a new module here, not a new
code path. `allocate` / `allocate_paged` are the one place a model's cache is made (by the engine's
ModelRunner, which owns the step); `Layout` is what the runtime needs to know of one before it is
made (its block size and bytes, whether prefix caching applies)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .dense import KVCache
from .hierarchical import HierarchicalKVCache
from .paged import PagedKVCache

REPRESENTATIONS = {KVCache.representation: KVCache, PagedKVCache.representation: PagedKVCache}

# the paged runtime's representations, by their config name (kv_cache.representation)
PAGED = {"dense": PagedKVCache, HierarchicalKVCache.representation: HierarchicalKVCache}


def names() -> tuple[str, ...]:
    return tuple(PAGED)


@dataclass(frozen=True)
class Layout:
    """A paged cache before it is made: kv_cache config + the runtime sizes it depends on."""
    representation: str = "dense"
    block_size: int = 16
    residual_tokens: int = 0
    group_size: int = 0
    draft_view: str = "full"
    fp_blocks: int = 0            # hierarchical: the full-precision pool (blocks)

    @staticmethod
    def from_config(cfg, k: int = 0) -> "Layout":
        """cfg: quasar.config.DeployConfig; k: tokens drafted per step."""
        kc, rt = cfg.kv_cache, cfg.runtime
        if kc.representation == "dense":
            return Layout("dense", rt.kv_block_size)
        fp = HierarchicalKVCache.fp_blocks_needed(kc.group_size, kc.residual_tokens, rt.max_batch_size, k,
                                                  rt.max_prefill_tokens)
        return Layout(kc.representation, kc.group_size, kc.residual_tokens, kc.group_size,
                      cfg.drafter.kv, fp)

    @property
    def prefix_caching(self) -> bool:
        return PAGED[self.representation].prefix_caching

    def bytes_per_block(self, args, dtype: torch.dtype) -> int:
        if self.representation == "dense":
            return PagedKVCache.bytes_per_block(args.num_layers, self.block_size, args.num_kv_heads, args.head_dim, dtype)
        return HierarchicalKVCache.bytes_per_block(args.num_layers, self.block_size, args.num_kv_heads,
                                                   args.head_dim, dtype, self.group_size)

    def fixed_bytes(self, args, dtype: torch.dtype) -> int:
        """Bytes beyond the blocks (the hierarchical cache's full-precision pool)."""
        if self.representation == "dense":
            return 0
        return self.fp_blocks * PagedKVCache.bytes_per_block(args.num_layers, self.block_size, args.num_kv_heads,
                                                             args.head_dim, dtype)


def allocate(args, batch: int, max_seq_len: int, dtype: torch.dtype, device,
             representation: str = "dense") -> KVCache:
    """The KV cache for a model of `args` (quasar.model.args.ModelArgs)."""
    cls = REPRESENTATIONS[representation]
    return cls(args.num_layers, batch, args.num_kv_heads, max_seq_len, args.head_dim, dtype, device)


def allocate_paged(args, num_blocks: int, block_size: int, dtype: torch.dtype, device,
                   layout: Optional[Layout] = None):
    """The paged KV cache (the batched runtime) for a model of `args`; its last block is the
    runner's scratch block. layout: None = dense blocks of `block_size`."""
    if layout is None or layout.representation == "dense":
        return PagedKVCache(args.num_layers, num_blocks, block_size, args.num_kv_heads, args.head_dim, dtype, device)
    return HierarchicalKVCache(args.num_layers, num_blocks, layout.block_size, args.num_kv_heads, args.head_dim,
                               dtype, device, layout.residual_tokens, layout.fp_blocks, layout.group_size,
                               "upper" if layout.draft_view == "upper" else "full")


def bytes_per_token(args, dtype: torch.dtype) -> int:
    return PagedKVCache.bytes_per_block(args.num_layers, 1, args.num_kv_heads, args.head_dim, dtype)


__all__ = ["KVCache", "PagedKVCache", "HierarchicalKVCache", "Layout", "allocate", "allocate_paged",
           "bytes_per_token", "names", "REPRESENTATIONS", "PAGED"]
