"""The CUDA backend's paged-KV-cache ops (issue 17) against their reference definitions
(quasar.ops.reference.paged_rope_kv_write / paged_attention), run on the CPU under Triton's
interpreter (TRITON_INTERPRET=1, set before triton is imported).

The two Triton kernels of the dense cache take the paged cache too: rope.py's _rope_kv_kernel
writes through the slot mapping (SLOTS), attention.py's _attn_kernel reads K/V through the block
tables (PAGED) for uniform steps (every sequence has the same chunk T). Block tables come from a
BlockManager whose free list is shuffled (tables are not contiguous runs); lengths are ragged;
GQA (H 8 / Hkv 2) and MHA (4 / 4); chunks 1, 2, 4, 7; block sizes 4 and 16; fp32 and bf16.
Every slot a sequence must not see (past its length in its last block, other sequences' blocks,
the zero padding of a wide block table) holds large keys and values that would dominate the
softmax if they leaked. Tolerances as tests/test_triton_kernels.py: attention fp32 rel <= 1e-5,
bf16 rel <= 1e-2 against the fp32 reference on the same rounded inputs; the prologue bit-exact
without norms, within one rounding with them.
"""
import os
import random

import pytest
import torch

if torch.cuda.is_available():
    pytest.skip("CPU twin: on a GPU machine the compiled kernels are tested instead; Triton's interpreter "
                "and its compiled kernels cannot share one process", allow_module_level=True)
os.environ["TRITON_INTERPRET"] = "1"   # before anything imports triton

from quasar.engine.block_manager import BlockManager
from quasar.engine.context import StepContext
from quasar.errors import UnsupportedError
from quasar.kv.paged import PagedKVCache
from quasar.ops import reference as R
from quasar.ops.triton import kernels

KN = kernels(interpret=True)
attn, rope = KN.attention, KN.rope

pytestmark = pytest.mark.slow
DT_ID = {torch.float32: "fp32", torch.bfloat16: "bf16"}
ATT_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
LAYERS, LAYER = 2, 1          # the ops touch layer 1 only


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _tables(rng, lens, block_size, spare=5):
    """Block tables for sequences of `lens` slots from a BlockManager with a shuffled free list."""
    bm = BlockManager(num_blocks=sum(-(-n // block_size) for n in lens) + spare, block_size=block_size)
    order = list(bm._free)
    rng.shuffle(order)
    bm._free.clear()
    bm._free.update((i, None) for i in order)
    return bm, [bm.allocate([b + 1] * n, n).blocks for b, n in enumerate(lens)]


def _attn_case(seed, heads, kv_heads, d, lens, t, block_size, dtype, width=0):
    """A paged cache holding each sequence's first lens[b] slots (random K/V; stale slots hold
    large values) and a uniform step: sequence b queries its last t positions."""
    g = torch.Generator().manual_seed(seed)
    bm, tables = _tables(random.Random(seed), lens, block_size)
    cache = PagedKVCache(LAYERS, bm.num_blocks, block_size, kv_heads, d, dtype, "cpu")
    cache.k.fill_(30.0)
    cache.v.fill_(1e3)
    for b, n in enumerate(lens):
        ctx = StepContext.build([tables[b]], [(0, n)], block_size, "cpu")
        k = torch.randn(n, kv_heads, d, generator=g).to(dtype)
        v = torch.randn(n, kv_heads, d, generator=g).to(dtype)
        R.paged_kv_write(cache, LAYER, k, v, ctx.slot_mapping)
    ctx = StepContext.build(tables, [(n - t, t) for n in lens], block_size, "cpu", width=width)
    q = torch.randn(len(lens) * t, heads, d, generator=g).to(dtype)
    return cache, ctx, q


def _reference(q, cache, ctx):
    """The reference in fp32 on the same (rounded) inputs: isolates the kernel's own error."""
    c32 = PagedKVCache(LAYERS, cache.num_blocks, cache.block_size, cache.k.shape[2], cache.k.shape[-1],
                       torch.float32, "cpu")
    c32.k.copy_(cache.k.float())
    c32.v.copy_(cache.v.float())
    return R.paged_attention(q.float(), c32, LAYER, ctx)


# ------------------------------------------------------------------ paged attention

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DT_ID.get)
@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("t", [1, 2, 4, 7])
@pytest.mark.parametrize("heads,kv_heads", [(8, 2), (4, 4)], ids=["gqa4", "mha"])
def test_paged_attention(heads, kv_heads, t, block_size, dtype):
    seed = 100 * t + block_size + heads
    rng = random.Random(seed)
    lens = [t + rng.randrange(0, 40) for _ in range(3)]      # ragged lengths, uniform chunk
    cache, ctx, q = _attn_case(seed, heads, kv_heads, 16, lens, t, block_size, dtype)
    assert ctx.chunk == t and attn.supports_paged(q, cache, ctx)
    out = torch.full_like(q, float("nan"))
    o = attn.paged_attention(q, cache, LAYER, ctx, out=out)
    assert o.data_ptr() == out.data_ptr() and o.shape == q.shape and not torch.isnan(o).any()
    assert rel(o, _reference(q, cache, ctx)) <= ATT_TOL[dtype]


def test_paged_attention_splits_and_a_wide_table():
    """num_splits = 3 over longer sequences, a block table padded with zeros far past every
    sequence's blocks (a CUDA graph's fixed width: KV_LEN = width * block_size), head_dim 24
    (not a power of two): the same result as one split over the tight table."""
    lens, t = [70, 9, 45], 4
    cache, ctx, q = _attn_case(7, 8, 2, 24, lens, t, 4, torch.float32)
    _, wide, _ = _attn_case(7, 8, 2, 24, lens, t, 4, torch.float32, width=ctx.block_tables.shape[1] + 6)
    assert wide.block_tables.shape[1] == ctx.block_tables.shape[1] + 6
    assert (wide.block_tables[:, ctx.block_tables.shape[1]:] == 0).all()
    ref = _reference(q, cache, ctx)
    one = attn.paged_attention(q, cache, LAYER, ctx, num_splits=1)
    assert rel(one, ref) <= 1e-5
    for c in (ctx, wide):
        o = attn.paged_attention(q, cache, LAYER, c, num_splits=3)
        assert rel(o, ref) <= 1e-5 and rel(o, one) <= 1e-6
    # a tile of 16 slots over pages of 4 (several pages per tile) and of 8 (a tile within a page)
    assert rel(attn.paged_attention(q, cache, LAYER, wide, num_splits=2, block_s=16), ref) <= 1e-5


def test_paged_attention_supports_and_limits():
    cache, ctx, q = _attn_case(3, 4, 2, 16, [20, 20], 2, 4, torch.float32)
    assert attn.supports_paged(q, cache, ctx)
    ragged = StepContext.build(ctx.block_tables.tolist(), [(17, 3), (10, 1)], 4, "cpu")
    assert ragged.chunk == 0 and not attn.supports_paged(q, cache, ragged)
    with pytest.raises(UnsupportedError, match="chunk"):
        attn.paged_attention(q, cache, LAYER, ragged)
    long = StepContext.build(ctx.block_tables.tolist(), [(0, 17), (0, 17)], 4, "cpu")
    assert not attn.supports_paged(torch.zeros(34, 4, 16), cache, long)              # T > MAX_T
    wide = StepContext.build(ctx.block_tables.tolist(), [(0, 16), (0, 16)], 4, "cpu")
    assert attn.supports_paged(torch.zeros(32, 4, 16), cache, wide)
    assert not attn.supports_paged(torch.zeros(32, 32, 16), cache, wide)             # T * G > MAX_ROWS
    dense = KN.attention.supports(torch.zeros(1, 2, 4, 16), cache)
    assert not dense                                     # the dense kernel does not take a paged cache
    with pytest.raises(UnsupportedError, match="paged"):
        attn.attention(torch.zeros(1, 2, 4, 16), cache, LAYER, torch.zeros(1, 2, dtype=torch.long), 8)


# ------------------------------------------------------------------ the prologue (norms, RoPE, paged write)

def _rope_tables(h, hkv, d, s=96):
    from quasar.model.args import ModelArgs
    from quasar.model.decoder import rope_table
    args = ModelArgs(family="qwen3", vocab_size=8, hidden_size=h * d, intermediate_size=8,
                     num_layers=2, num_heads=h, num_kv_heads=hkv, head_dim=d, rope_theta=1e6,
                     rms_norm_eps=1e-6, tie_word_embeddings=False)
    return rope_table(args, s, "cpu")


ROPE = [  # (H, Hkv, D, block size, chunks (first position, tokens), norms, shuffled slots, heads per program)
    (8, 2, 24, 4, [(0, 7), (33, 1), (12, 4)], False, False, None),   # ragged chunks, a prefill from 0
    (4, 4, 16, 16, [(40, 2), (5, 2), (70, 2)], False, True, 1),      # MHA; slots not following positions; GPU's 1 head
    (8, 2, 32, 16, [(20, 4), (3, 4)], True, False, None),            # q/k norms (Qwen3)
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DT_ID.get)
@pytest.mark.parametrize("case", range(len(ROPE)))
def test_paged_rope_kv_write(case, dtype):
    h, hkv, d, bs, chunks, norms, shuffled, hb = ROPE[case]
    g = torch.Generator().manual_seed(case)
    rng = random.Random(case)
    cos, sin = _rope_tables(h, hkv, d)
    bm, tables = _tables(rng, [p + n for p, n in chunks], bs)
    ctx = StepContext.build(tables, chunks, bs, "cpu")
    if shuffled:   # the op writes to ctx.slot_mapping, whatever the positions: any distinct slots
        free = torch.randperm(bm.num_blocks * bs, generator=g)[:ctx.slot_mapping.numel()]
        ctx.slot_mapping = free.to(torch.int64)
    n = ctx.positions.numel()
    qkv = (torch.randn(n, (h + 2 * hkv) * d, generator=g) * 3).to(dtype)
    qn = (1 + 0.3 * torch.randn(d, generator=g)).to(dtype) if norms else None
    kn = (1 + 0.3 * torch.randn(d, generator=g)).to(dtype) if norms else None
    got = PagedKVCache(LAYERS, bm.num_blocks, bs, hkv, d, dtype, "cpu")
    got.k.copy_(torch.randn(got.k.shape, generator=g))
    got.v.copy_(torch.randn(got.v.shape, generator=g))
    want = PagedKVCache(LAYERS, bm.num_blocks, bs, hkv, d, dtype, "cpu")
    want.k.copy_(got.k)
    want.v.copy_(got.v)
    q = rope.paged_rope_kv_write(qkv, qn, kn, 1e-6, cos, sin, ctx, got, LAYER, heads_per_program=hb)
    qr = R.paged_rope_kv_write(qkv, qn, kn, 1e-6, cos, sin, ctx, want, LAYER)
    assert q.shape == (n, h, d) and q.dtype == qr.dtype == dtype
    assert torch.equal(got.v, want.v)                    # v: a plain copy (every layer, every slot)
    assert torch.equal(got.k[0], want.k[0])              # the other layer untouched
    written = torch.zeros(bm.num_blocks * bs, dtype=torch.bool)
    written[ctx.slot_mapping] = True
    untouched = ~written.view(bm.num_blocks, 1, bs, 1).expand_as(got.k[LAYER])
    assert torch.equal(got.k[LAYER][untouched], want.k[LAYER][untouched])
    if norms:   # the mean of squares is summed in another order: last-bit differences only
        tol = {torch.float32: 1e-5, torch.bfloat16: 5e-3}[dtype]
        assert rel(q, qr) <= tol and rel(got.k[LAYER], want.k[LAYER]) <= tol
    else:       # same operations, same roundings: bit-exact
        assert torch.equal(q, qr) and torch.equal(got.k[LAYER], want.k[LAYER])


def test_paged_rope_kv_write_rejects_bad_shapes():
    cache = PagedKVCache(1, 4, 4, 2, 16, torch.float32, "cpu")
    ctx = StepContext.build([[1]], [(0, 1)], 4, "cpu")
    cos = torch.zeros(32, 16)
    with pytest.raises(ValueError, match="head_dim"):
        rope.paged_rope_kv_write(torch.zeros(1, 70), None, None, 1e-6, cos, cos, ctx, cache, 0)
    with pytest.raises(ValueError, match="fp32"):
        rope.paged_rope_kv_write(torch.zeros(1, 96), None, None, 1e-6, cos.half(), cos.half(), ctx, cache, 0)
    with pytest.raises(ValueError, match="tokens"):
        rope.paged_rope_kv_write(torch.zeros(2, 96), None, None, 1e-6, cos, cos, ctx, cache, 0)


# ------------------------------------------------------------------ through the backend

def test_cuda_backend_paged_ops(monkeypatch):
    """The CUDA backend (interpreter mode, on the CPU): the paged ops of the contract, the Triton
    kernels for uniform steps, the reference for ragged and prefill-sized ones."""
    from quasar import backends
    from quasar.backends.cuda import make_backend
    be = make_backend("cpu", interpret=True)
    assert be.interpret and be.triton is KN
    for op in ("paged_kv_write", "paged_rope_kv_write", "paged_attention"):
        assert "cuda" in backends.implementing(op), op
    calls = []
    launch = KN.attention.paged_attention
    monkeypatch.setattr(KN.attention, "paged_attention", lambda *a, **kw: calls.append(1) or launch(*a, **kw))

    # the write and the prologue: bit for bit the reference
    h, hkv, d, bs = 8, 2, 16, 4
    g = torch.Generator().manual_seed(11)
    cos, sin = _rope_tables(h, hkv, d)
    bm, tables = _tables(random.Random(11), [12, 30], bs)
    mine = PagedKVCache(LAYERS, bm.num_blocks, bs, hkv, d, torch.float32, "cpu")
    ref = PagedKVCache(LAYERS, bm.num_blocks, bs, hkv, d, torch.float32, "cpu")
    pre = StepContext.build(tables, [(0, 10), (0, 27)], bs, "cpu")            # a ragged prefill
    k, v = torch.randn(37, hkv, d, generator=g), torch.randn(37, hkv, d, generator=g)
    be.paged_kv_write(mine, LAYER, k, v, pre.slot_mapping)
    R.paged_kv_write(ref, LAYER, k, v, pre.slot_mapping)
    assert torch.equal(mine.k, ref.k) and torch.equal(mine.v, ref.v)
    step = StepContext.build(tables, [(10, 2), (27, 2)], bs, "cpu")           # a verify step, T = 2
    qkv = torch.randn(4, (h + 2 * hkv) * d, generator=g)
    q = be.paged_rope_kv_write(qkv, None, None, 1e-6, cos, sin, step, mine, LAYER)
    qr = R.paged_rope_kv_write(qkv, None, None, 1e-6, cos, sin, step, ref, LAYER)
    assert torch.equal(q, qr) and torch.equal(mine.k, ref.k) and torch.equal(mine.v, ref.v)

    # attention: the kernel for the uniform step, one masked SDPA call (batched_paged_attention) otherwise
    o = be.paged_attention(q, mine, LAYER, step)
    assert calls and rel(o, R.paged_attention(q, ref, LAYER, step)) <= 1e-5
    calls.clear()
    ragged = StepContext.build(tables, [(10, 2), (28, 1)], bs, "cpu")
    qx = torch.randn(3, h, d, generator=g)
    assert rel(be.paged_attention(qx, mine, LAYER, ragged), R.paged_attention(qx, ref, LAYER, ragged)) <= 1e-5
    qp = torch.randn(37, h, d, generator=g)
    assert rel(be.paged_attention(qp, mine, LAYER, pre), R.paged_attention(qp, ref, LAYER, pre)) <= 1e-5
    assert not calls
