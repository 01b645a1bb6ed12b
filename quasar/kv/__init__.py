"""KV cache representations. A cache is one object with a `representation` that attention takes
whole, so a new representation (QuantSpec's hierarchical int4/int8) is a new module here, not a new
code path. `allocate` is the one place a model's cache is made (by the engine's ModelRunner, which
owns the step)."""
from __future__ import annotations

import torch

from .dense import KVCache

REPRESENTATIONS = {KVCache.representation: KVCache}


def allocate(args, batch: int, max_seq_len: int, dtype: torch.dtype, device,
             representation: str = "dense") -> KVCache:
    """The KV cache for a model of `args` (quasar.model.args.ModelArgs)."""
    cls = REPRESENTATIONS[representation]
    return cls(args.num_layers, batch, args.num_kv_heads, max_seq_len, args.head_dim, dtype, device)


__all__ = ["KVCache", "allocate", "REPRESENTATIONS"]
