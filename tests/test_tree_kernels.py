"""The Triton paged attention kernel on tree steps (quasar.spec_decode.tree) against the reference
(quasar.ops.reference.paged_attention, the tree-mask definition), run on the CPU under Triton's
interpreter (TRITON_INTERPRET=1, set before triton is imported).

A tree step is a uniform paged step (every sequence padded to T = width rows) whose positions are
storage indices and whose rows carry ancestor bitmasks (ctx.tree_positions / tree_mask): node m of
sequence b sees b's context and its own root path. Random trees of up to 64 nodes
(tests/tree_util.tree_case: bushy and deep ones, ragged node counts so sequences have pad rows,
shuffled block tables, stale slots holding large keys and values); GQA (H 8 / Hkv 2: 64 nodes are
256 rows per kv head, cut into two row tiles), MHA (4 / 4), G = 6 (tiles of 21 tokens, the last
one partial) and G = 16 (one program per 8 tokens); block sizes 4 and 16; one split and several;
fp32 (rel <= 1e-5) and bf16 (rel <= 1e-2) against the fp32 reference on the same rounded inputs,
on the real rows only (a pad row's output is never read). Chains through the same kernel:
tests/test_triton_paged.py.
"""
import os
import random

import pytest
import torch

if torch.cuda.is_available():
    pytest.skip("CPU twin: on a GPU machine the compiled kernels are tested instead; Triton's interpreter "
                "and its compiled kernels cannot share one process", allow_module_level=True)
os.environ["TRITON_INTERPRET"] = "1"   # before anything imports triton

from quasar.engine.context import StepContext
from quasar.errors import UnsupportedError
from quasar.kv.paged import PagedKVCache
from quasar.ops import reference as R
from quasar.ops.triton import kernels
from quasar.spec_decode import tree as T
from tree_util import per_path_reference, tree_case

KN = kernels(interpret=True)
attn = KN.attention

pytestmark = pytest.mark.slow
DT_ID = {torch.float32: "fp32", torch.bfloat16: "bf16"}
ATT_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _real_rows(nodes, width):
    return torch.tensor([b * width + m for b, n in enumerate(nodes) for m in range(n)])


def _reference(q, cache, ctx):
    """The reference in fp32 on the same (rounded) inputs: isolates the kernel's own error."""
    c32 = PagedKVCache(cache.k.shape[0], cache.num_blocks, cache.block_size, cache.k.shape[2],
                       cache.k.shape[-1], torch.float32, "cpu")
    c32.k.copy_(cache.k.float())
    c32.v.copy_(cache.v.float())
    return R.paged_attention(q.float(), c32, 0, ctx)


def _check(heads, kv_heads, ctx_lens, nodes, width, block_size, dtype, splits, seed, block_s=None):
    cache, ctx, q, _ = tree_case(seed, heads, kv_heads, 16, ctx_lens, nodes, width, block_size, dtype)
    assert ctx.chunk == width and ctx.tree_mask is not None and attn.supports_paged(q, cache, ctx)
    out = torch.full_like(q, float("nan"))
    o = attn.paged_attention(q, cache, 0, ctx, num_splits=splits, block_s=block_s, out=out)
    rows = _real_rows(nodes, width)
    assert o.data_ptr() == out.data_ptr() and not torch.isnan(o[rows]).any()
    err = rel(o[rows], _reference(q, cache, ctx)[rows])
    assert err <= ATT_TOL[dtype], err
    return o, cache, ctx, q


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DT_ID.get)
@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("heads,kv_heads", [(8, 2), (4, 4)], ids=["gqa4", "mha"])
def test_tree_paged_attention(heads, kv_heads, block_size, dtype):
    """Ragged trees (1 to 64 nodes) padded to 64 rows; GQA's 256 rows per kv head are two tiles.
    One split (the split cases below are small: the interpreter runs the combine kernel one
    program per row)."""
    seed = 10 * block_size + heads + (dtype == torch.bfloat16)
    rng = random.Random(seed)
    nodes = [64, rng.randrange(2, 40), 1]
    ctx_lens = [rng.randrange(1, 30) for _ in nodes]
    _check(heads, kv_heads, ctx_lens, nodes, 64, block_size, dtype, 1, seed)


TILES = [  # (H, Hkv, nodes per sequence, width, splits, dtype)
    (8, 2, [20, 7], 20, 2, torch.float32),        # G 4, 80 rows: one tile (the untiled kernel, tree mask)
    (8, 2, [11], 16, 2, torch.bfloat16),
    (12, 2, [64, 23], 64, 1, torch.float32),      # G 6: tiles of 21 tokens (126 of 128 rows), the 4th holds one
    (6, 1, [19], 22, 2, torch.float32),           # G 6, 2 tiles (the last one token), split: the combine's row mask
    (16, 1, [64, 40], 64, 1, torch.float32),      # G 16: 8 tokens per tile, 8 tiles
    (16, 1, [11], 16, 3, torch.float32),          # 2 tiles, 3 splits
]


@pytest.mark.parametrize("case", range(len(TILES)))
def test_tree_paged_attention_tiles(case):
    heads, kv_heads, nodes, width, splits, dtype = TILES[case]
    rng = random.Random(case)
    _check(heads, kv_heads, [rng.randrange(1, 40) for _ in nodes], nodes, width, 4, dtype, splits, 50 + case)


def test_tree_paged_attention_equals_per_path_attention():
    """The kernel against the float64 per-path definition (each node as a chain of its root
    path); K/V tiles of 16 slots over pages of 4."""
    ctx_lens, nodes, width = [5, 37, 70], [9, 64, 1], 64
    cache, ctx, q, parents = tree_case(3, 8, 2, 16, ctx_lens, nodes, width, 4)
    rows = _real_rows(nodes, width)
    want = per_path_reference(q, cache, 0, ctx, ctx_lens, parents, width)[rows]
    for bs in (None, 16):
        got = attn.paged_attention(q, cache, 0, ctx, num_splits=1, block_s=bs)
        assert (got[rows].double() - want).abs().max().item() <= 1e-5, bs


def test_chain_tree_is_the_causal_chunk():
    """A chain tree (parents m - 1) through the tree path equals the same chunk as a chain step."""
    cache, ctx, q, _ = tree_case(5, 8, 2, 16, [11, 29], [13, 20], 20, 16)
    chain = T.chain_parents(7)
    r = T.rows(4, chain, 7)
    tab = ctx.block_tables[0].tolist()
    slots = [tab[p // 16] * 16 + p % 16 for p in range(4, 11)]
    tree_ctx = StepContext.make(r.positions, slots, [0, 7], [tab], [11], 7, "cpu", 0, r.storage, r.mask)
    causal = StepContext.make(r.positions, slots, [0, 7], [tab], [11], 7, "cpu")
    a = attn.paged_attention(q[:7], cache, 0, tree_ctx)
    b = attn.paged_attention(q[:7], cache, 0, causal)
    assert rel(a, b) <= 1e-6 and rel(a, R.paged_attention(q[:7], cache, 0, causal)) <= 1e-5


def test_tree_supports_and_limits():
    cache, ctx, q, _ = tree_case(1, 32, 2, 16, [3], [64], 64, 4)      # G 16: 1024 rows per kv head
    assert attn.supports_paged(q, cache, ctx)
    # the same step as a chain: T > MAX_T
    chain = StepContext.make(ctx.positions.tolist(), ctx.slot_mapping.tolist(), [0, 64],
                             ctx.block_tables.tolist(), [67], 64, "cpu")
    assert not attn.supports_paged(q, cache, chain)
    with pytest.raises(UnsupportedError, match="tokens"):
        attn.paged_attention(q, cache, 0, chain)
    # 65 rows: more than a tree holds
    tab = ctx.block_tables.tolist()
    big = StepContext.make([3] * 65, [0] * 65, [0, 65], tab, [67], 65, "cpu", 0, [3] * 65, [1] * 65)
    q65 = torch.zeros(65, 32, 16)
    assert not attn.supports_paged(q65, cache, big)
    with pytest.raises(UnsupportedError, match="trees"):
        attn.paged_attention(q65, cache, 0, big)
    # ragged trees (no common chunk) are the reference's
    ragged = StepContext.make([3, 4], [0, 1], [0, 1, 2], tab + tab, [4, 5], 0, "cpu", 0, [3, 4], [1, 1])
    assert not attn.supports_paged(torch.zeros(2, 32, 16), cache, ragged)


def test_cuda_backend_takes_tree_steps(monkeypatch):
    """The CUDA backend (interpreter mode): a uniform tree step goes to the kernel."""
    from quasar.backends.cuda import make_backend
    be = make_backend("cpu", interpret=True)
    assert be.triton is KN
    calls = []
    launch = KN.attention.paged_attention
    monkeypatch.setattr(KN.attention, "paged_attention", lambda *a, **kw: calls.append(1) or launch(*a, **kw))
    nodes, width = [6, 17], 17
    cache, ctx, q, _ = tree_case(9, 8, 2, 16, [8, 21], nodes, width, 16)
    o = be.paged_attention(q, cache, 0, ctx)
    rows = _real_rows(nodes, width)
    assert calls and rel(o[rows], R.paged_attention(q, cache, 0, ctx)[rows]) <= 1e-5
