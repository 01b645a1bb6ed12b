"""Random draft trees on a paged cache, and the per-path dense definition of tree attention:
node m of a sequence's tree attends to the sequence's context and to its own root path, exactly
as a chain of that path would (shared by the reference, Triton and NPU tree tests)."""
import random

import torch

from quasar.engine.block_manager import BlockManager
from quasar.engine.context import StepContext
from quasar.kv.paged import PagedKVCache
from quasar.ops import reference as R
from quasar.spec_decode import tree as T


def random_parents(rng: random.Random, n: int) -> list[int]:
    """A random tree of n nodes in storage order (bushy and deep ones both occur)."""
    parents = [-1]
    for m in range(1, n):
        parents.append(rng.randrange(m) if rng.random() < 0.5 else m - 1)
    return parents


def tree_case(seed, heads, kv_heads, d, ctx_lens, nodes, width, block_size, dtype=torch.float32,
              layers=1, layer=0, stale=True):
    """A paged cache holding each sequence's context (ctx_lens[b] slots of random K/V) and a tree
    step: sequence b's tree of nodes[b] nodes (padded to `width` rows: pads write to the scratch
    slot) with its K/V already written at storage ctx_len + m. Stale slots hold large values.
    Returns (cache, ctx, q, parents per sequence)."""
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    total = [c + n for c, n in zip(ctx_lens, nodes)]
    bm = BlockManager(num_blocks=sum(-(-n // block_size) for n in total) + 5, block_size=block_size)
    order = list(bm._free)
    rng.shuffle(order)
    bm._free.clear()
    bm._free.update((i, None) for i in order)
    tables = [bm.allocate([b + 1] * n, n).blocks for b, n in enumerate(total)]
    cache = PagedKVCache(layers, bm.num_blocks + 1, block_size, kv_heads, d, dtype, "cpu")
    scratch = bm.num_blocks * block_size
    if stale:
        cache.k.fill_(30.0)
        cache.v.fill_(1e3)
    for b, n in enumerate(total):
        c = StepContext.build([tables[b]], [(0, n)], block_size, "cpu")
        k = torch.randn(n, kv_heads, d, generator=g).to(dtype)
        v = torch.randn(n, kv_heads, d, generator=g).to(dtype)
        R.paged_kv_write(cache, layer, k, v, c.slot_mapping)
    parents = [random_parents(rng, n) for n in nodes]
    pos, slots, qs, tpos, tmask = [], [], [0], [], []
    for b, (c, par) in enumerate(zip(ctx_lens, parents)):
        r = T.rows(c, par, width)
        pos += r.positions
        tpos += r.storage
        tmask += r.mask
        slots += [tables[b][p // block_size] * block_size + p % block_size for p in range(c, c + len(par))]
        slots += [scratch] * (width - len(par))
        qs.append(qs[-1] + width)
    ctx = StepContext.make(pos, slots, qs, tables, total, width, "cpu", 0, tpos, tmask)
    q = torch.randn(len(nodes) * width, heads, d, generator=g).to(dtype)
    return cache, ctx, q, parents


def per_path_reference(q, cache, layer, ctx, ctx_lens, parents, width):
    """Each real node's attention over [context, its root path] in float64 (SDPA-free)."""
    bs = cache.block_size
    out = torch.zeros(q.shape, dtype=torch.float64)
    heads, kv_heads = q.shape[1], cache.k.shape[2]
    g = heads // kv_heads
    for b, (c, par) in enumerate(zip(ctx_lens, parents)):
        table = ctx.block_tables[b].tolist()
        for m in range(len(par)):
            path, x = [], m
            while x >= 0:
                path.append(x)
                x = par[x]
            storage = list(range(c)) + [c + x for x in reversed(path)]
            slots = torch.tensor([table[s // bs] * bs + s % bs for s in storage])
            k = cache.k[layer].permute(0, 2, 1, 3).reshape(-1, kv_heads, q.shape[-1])[slots].double()
            v = cache.v[layer].permute(0, 2, 1, 3).reshape(-1, kv_heads, q.shape[-1])[slots].double()
            row = b * width + m
            for h in range(heads):
                s = (k[:, h // g] @ q[row, h].double()) * q.shape[-1] ** -0.5
                out[row, h] = torch.softmax(s, 0) @ v[:, h // g]
    return out
