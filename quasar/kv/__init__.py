"""KV cache representations. A cache is one object with a `representation` that attention takes
whole, so a new representation (QuantSpec's hierarchical int4/int8) is a new module here, not a new
code path. `allocate` is the one place a model's cache is made (by the engine's ModelRunner, which
owns the step)."""
from __future__ import annotations

import torch

from .dense import KVCache
from .paged import PagedKVCache

REPRESENTATIONS = {KVCache.representation: KVCache, PagedKVCache.representation: PagedKVCache}


def allocate(args, batch: int, max_seq_len: int, dtype: torch.dtype, device,
             representation: str = "dense") -> KVCache:
    """The KV cache for a model of `args` (quasar.model.args.ModelArgs)."""
    cls = REPRESENTATIONS[representation]
    return cls(args.num_layers, batch, args.num_kv_heads, max_seq_len, args.head_dim, dtype, device)


def allocate_paged(args, num_blocks: int, block_size: int, dtype: torch.dtype, device) -> PagedKVCache:
    """The paged KV cache (the batched runtime) for a model of `args`."""
    return PagedKVCache(args.num_layers, num_blocks, block_size, args.num_kv_heads, args.head_dim, dtype, device)


def bytes_per_token(args, dtype: torch.dtype) -> int:
    return PagedKVCache.bytes_per_block(args.num_layers, 1, args.num_kv_heads, args.head_dim, dtype)


__all__ = ["KVCache", "PagedKVCache", "allocate", "allocate_paged", "bytes_per_token", "REPRESENTATIONS"]
