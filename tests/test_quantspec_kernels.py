"""QuantSpec's hierarchical KV cache (issue 19): the attention reference against a float64
computation from the definitions, and the CUDA backend's Triton kernel against the reference, on
the CPU under Triton's interpreter (TRITON_INTERPRET=1, set before triton is imported), and
compiled on a GPU when one is visible.

Caches are filled through the cache's own bookkeeping (before_step + hier_kv_write: prefill chunks,
then a uniform step), from a BlockManager with a shuffled free list; lengths are ragged, so rows of
one step read different numbers of quantized blocks, and some tiles mix quantized and
full-precision slots. Every plane byte, scale and pool slot no row may read starts out holding
large values, so a leak shows. GQA (8 / 2) and MHA (4 / 4); chunks 1 (decode / draft) and 4, 7
(verify); block (key group) sizes 8 and 16; the draft's upper view and the verifier's both planes.
"""
import os
import random

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"   # before anything imports triton: the CPU twin
DEV = "cuda" if HAS_CUDA else "cpu"         # on a GPU: the compiled kernel, caches on the GPU

from quasar.engine.block_manager import BlockManager
from quasar.engine.context import StepContext
from quasar.kv.hierarchical import HierarchicalKVCache, quantize, dequantize, dequantize_upper, quantized_blocks
from quasar.ops import reference as R
from quasar.ops.triton import kernels

KN = kernels(interpret=not HAS_CUDA)
LAYERS, LAYER = 2, 1


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _case(seed, heads, kv_heads, d, lens, t, G, Rtok, dtype, mode="verify", vg=0, chunk=13):
    """A hierarchical cache holding each sequence's first lens[b] - t tokens (prefilled in chunks of
    `chunk` tokens) and a uniform step whose sequence b writes and queries its last t positions.
    Returns (cache, ctx, q, raw) with raw[b] = (k, v) [lens[b], Hkv, D] as written (layer LAYER)."""
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    nb = sum(-(-n // G) for n in lens) + 4
    bm = BlockManager(nb, G, prefix_caching=False)
    order = list(bm._free)
    rng.shuffle(order)
    bm._free.clear()
    bm._free.update((i, None) for i in order)
    tables = [bm.allocate([b + 1] * n, n).blocks for b, n in enumerate(lens)]
    cache = HierarchicalKVCache(LAYERS, nb + 1, G, kv_heads, d, dtype, DEV, Rtok, fp_blocks=nb + 1,
                                value_group=vg)
    for x in (cache.k_hi, cache.k_lo, cache.v_hi, cache.v_lo):
        x.fill_(255)
    for x in (cache.k_scale, cache.v_scale, cache.k_min, cache.v_min, cache.k_fp, cache.v_fp):
        x.fill_(50.0)
    raw = [(torch.randn(n, kv_heads, d, generator=g).to(dtype), torch.randn(n, kv_heads, d, generator=g).to(dtype))
           for n in lens]

    def write(starts_counts, mode):
        ctx = StepContext.build(tables, starts_counts, G, DEV)
        cache.before_step(ctx, mode)
        ks = torch.cat([raw[b][0][a:a + c] for b, (a, c) in enumerate(starts_counts)]).to(DEV)
        vs = torch.cat([raw[b][1][a:a + c] for b, (a, c) in enumerate(starts_counts)]).to(DEV)
        for layer in range(LAYERS):
            R.hier_kv_write(cache, layer, ks, vs, ctx.slot_mapping)
        return ctx

    done = [0] * len(lens)
    while any(done[b] < lens[b] - t for b in range(len(lens))):
        sc = [(done[b], min(chunk, lens[b] - t - done[b])) for b in range(len(lens))]
        write(sc, "prefill")
        done = [a + c for a, c in sc]
    ctx = write([(n - t, t) for n in lens], mode)
    q = torch.randn(len(lens) * t, heads, d, generator=g).to(dtype).to(DEV)
    return cache, ctx, q, raw


def _float64_expected(q, ctx, raw, G, Rtok, upper, vg, d):
    """Each row from the definitions in float64: block m of the row's sequence dequantized from
    quantize() of the raw values when m < quantized_blocks(p), raw values elsewhere."""
    out = torch.empty(q.shape, dtype=torch.float64)
    qs, pos = ctx.query_start, ctx.positions.tolist()
    for b in range(len(qs) - 1):
        k, v = raw[b][0].double(), raw[b][1].double()
        for i in range(qs[b], qs[b + 1]):
            p = pos[i]
            nq = quantized_blocks(p, G, Rtok)
            kk, vv = k[:p + 1].clone(), v[:p + 1].clone()
            for m in range(nq):
                blk = slice(m * G, (m + 1) * G)
                kc = quantize(k[blk].float(), dim=0)                     # per channel over the block's tokens
                vc = quantize(v[blk].float().unflatten(-1, (-1, vg)), dim=-1)   # per token over vg channels
                deq = dequantize_upper if upper else dequantize
                kk[blk] = deq(kc).double()
                vv[blk] = deq(vc).flatten(-2).double()
            h, hkv = q.shape[1], k.shape[1]
            kr = kk.repeat_interleave(h // hkv, 1)                        # [n, H, D]
            vr = vv.repeat_interleave(h // hkv, 1)
            s = torch.einsum("hd,nhd->hn", q[i].double(), kr) * d ** -0.5
            out[i] = torch.einsum("hn,nhd->hd", s.softmax(-1), vr)
    return out


@pytest.mark.parametrize("upper", [False, True], ids=["verify-view", "draft-view"])
@pytest.mark.parametrize("heads,kv_heads,G,Rtok,t,vg", [(8, 2, 8, 8, 4, 0), (4, 4, 16, 4, 1, 8), (8, 2, 16, 20, 7, 16)])
def test_reference_equals_float64_definition(upper, heads, kv_heads, G, Rtok, t, vg):
    d = 16
    lens = [9, 37, 64, 71]
    cache, ctx, q, raw = _case(1, heads, kv_heads, d, lens, t, G, Rtok, torch.float32, vg=vg)
    got = R.hier_attention(q, cache, LAYER, ctx, upper).cpu()
    want = _float64_expected(q.cpu(), ctx, raw, G, Rtok, upper, vg or d, d)
    assert rel(got, want) < (2e-6 if DEV == "cpu" else 1e-4)     # TF32 matmuls on a GPU
    # and the two views differ: the lower plane is read (or not)
    other = R.hier_attention(q, cache, LAYER, ctx, not upper).cpu()
    assert rel(other, got) > 1e-4


def test_full_precision_buffer_holds_R_to_R_plus_G_recent_tokens():
    """After the step, each sequence keeps pool slots only for blocks some later query reads at
    full precision; the rest went back to the pool."""
    G, Rtok = 8, 8
    lens = [9, 37, 64, 71]
    cache, ctx, _, _ = _case(2, 4, 2, 16, lens, 1, G, Rtok, torch.float32)
    tables = ctx.host_tables
    for table, n in zip(tables, lens):
        first_fp = quantized_blocks(n - 1, G, Rtok)
        held = [m for m, blk in enumerate(table) if int(cache.fp_index[blk]) >= 0]
        assert held == list(range(first_fp, len(table))), (n, held)
        assert (n - first_fp * G) <= Rtok + G               # R..R+G recent tokens at full precision


TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


CASES = [(8, 2, 16, 16, 4, 0, 1), (4, 4, 16, 4, 1, 16, 3), (8, 2, 32, 20, 7, 16, 2), (8, 2, 16, 16, 1, 0, 1)]


@pytest.mark.slow
@pytest.mark.parametrize("upper", [False, True], ids=["verify-view", "draft-view"])
@pytest.mark.parametrize("dtype,case", [(torch.float32, c) for c in CASES] + [(torch.bfloat16, c) for c in CASES[1:3]],
                         ids=[f"fp32-{i}" for i in range(4)] + ["bf16-1", "bf16-2"])
def test_triton_kernel_matches_reference(dtype, case, upper):
    heads, kv_heads, G, Rtok, t, vg, splits = case
    d = 32
    lens = [9, 40, 64, 83]
    cache, ctx, q, _ = _case(3, heads, kv_heads, d, lens, t, G, Rtok, dtype, vg=vg)
    got = KN.hier_attention.hier_attention(q, cache, LAYER, ctx, upper, num_splits=splits)
    # the reference in fp32 on the same stored codes and pool
    want = R.hier_attention(q.float(), _as_fp32(cache), LAYER, ctx, upper)
    assert torch.isfinite(got).all()
    assert rel(got, want) < TOL[dtype]


def _as_fp32(cache):
    if cache.dtype == torch.float32:
        return cache
    import copy
    c = copy.copy(cache)
    for name in ("k_scale", "k_min", "v_scale", "v_min", "k_fp", "v_fp"):
        setattr(c, name, getattr(cache, name).float())
    c.dtype = torch.float32
    return c


def test_kernel_refuses_layouts_it_cannot_read_and_the_backend_falls_back_to_the_reference():
    """Blocks of 8 tokens (a tile is a power-of-two slice of one block, >= 16) or value groups of a
    quarter head: the kernel says why; the CUDA backend's op then runs the reference."""
    from quasar.errors import UnsupportedError
    for G, vg in ((8, 0), (16, 8)):
        cache, ctx, q, _ = _case(5, 4, 2, 32, [20, 40], 2, G, 8, torch.float32, vg=vg)
        assert not KN.hier_attention.supports(q, cache, ctx)
        with pytest.raises(UnsupportedError, match="cannot read this cache"):
            KN.hier_attention.hier_attention(q, cache, LAYER, ctx, False)


def test_kernel_refuses_ragged_steps():
    from quasar.errors import UnsupportedError
    cache, ctx, q, _ = _case(4, 4, 2, 16, [20, 30], 2, 16, 8, torch.float32)
    ragged = StepContext.build(ctx.host_tables, [(17, 3), (28, 2)], 16, DEV)
    assert not KN.hier_attention.supports(q[:5], cache, ragged)
    with pytest.raises(UnsupportedError, match="uniform steps"):
        KN.hier_attention.hier_attention(q[:5], cache, LAYER, ragged, False)
