"""The NPU backend's paged-KV-cache ops (backends/npu.py: paged_kv_write, paged_rope_kv_write,
paged_attention) against the reference (quasar.ops.reference), on the torch_npu emulation.

The emulation computes page attention the documented way (gathering each sequence's blocks
through block_table, tests/npu_emulation), so these tests check what the backend hands the kernel:
the cache layer itself in the (blocknum, KV_N, blocksize, D) layout, an int32 block table, the
per-sequence KV lengths, the causal mask within a chunk (True = masked), and the scatter indices of
the KV write. Random block tables (a shuffled free list), ragged lengths, GQA, chunk lengths 1, 4
and 7, a varlen prefill step, and the fallbacks for block sizes the kernel refuses. Tree steps
(draft trees of up to 64 nodes, tests/tree_util.py) against the float64 per-path definition and
the reference: storage-index KV lengths and the explicit tree mask. With
QUASAR_NPU_REAL=1 the same tests run on the real torch_npu (docs/ascend.md).
"""
from __future__ import annotations

import dataclasses
import logging
import random
import sys

import pytest
import torch

from npu_emulation import emulated_torch_npu, use_real_torch_npu
from quasar import backends
from quasar.engine.block_manager import BlockManager
from quasar.engine.context import StepContext
from quasar.kv.paged import PagedKVCache
from quasar.ops import reference as R
from tree_util import per_path_reference, tree_case

REAL = use_real_torch_npu()
ERRORS = (RuntimeError, ValueError, TypeError)


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def npu():
    if REAL:  # pragma: no cover - real hardware only
        import torch_npu  # noqa: F401
        backends.reset("npu")
        yield backends.get("npu")
        backends.reset("npu")
    else:
        with emulated_torch_npu():
            yield backends.get("npu")


@pytest.fixture
def tnpu(npu):
    return sys.modules["torch_npu"]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().cpu().double(), b.detach().cpu().double()
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


TOL = {torch.float32: 1e-6, torch.bfloat16: 3.2e-2, torch.float16: 4e-3}


# ------------------------------------------------------------------------------------ fixtures

def _tables(seed: int, lens: list[int], block_size: int, spare: int = 5):
    """Block tables from a BlockManager whose free list is shuffled (tables are not runs)."""
    bm = BlockManager(num_blocks=sum(-(-n // block_size) for n in lens) + spare, block_size=block_size)
    order = list(bm._free)
    random.Random(seed).shuffle(order)
    bm._free.clear()
    bm._free.update((i, None) for i in order)
    return bm, [bm.allocate([1000 * (b + 1) + i for i in range(n)], n).blocks for b, n in enumerate(lens)]


def _filled(npu, seed, lens, hkv, d, block_size, dtype):
    """(npu cache, cpu cache, tables): both caches hold random junk everywhere (stale drafts,
    other sequences), then every sequence's KV written through its slot mapping, on the npu by
    npu.paged_kv_write and on the cpu by the reference."""
    g = torch.Generator().manual_seed(seed)
    bm, tables = _tables(seed, lens, block_size)
    dev = PagedKVCache(1, bm.num_blocks, block_size, hkv, d, dtype, npu.device)
    cpu = PagedKVCache(1, bm.num_blocks, block_size, hkv, d, dtype, "cpu")
    junk_k = torch.randn(cpu.k.shape, generator=g).to(dtype)
    junk_v = torch.randn(cpu.v.shape, generator=g).to(dtype)
    cpu.k.copy_(junk_k), cpu.v.copy_(junk_v)
    dev.k.copy_(junk_k.to(npu.device)), dev.v.copy_(junk_v.to(npu.device))
    for t, n in zip(tables, lens):
        ctx = StepContext.build([t], [(0, n)], block_size, "cpu")
        k = torch.randn(n, hkv, d, generator=g).to(dtype)
        v = torch.randn(n, hkv, d, generator=g).to(dtype)
        R.paged_kv_write(cpu, 0, k, v, ctx.slot_mapping)
        npu.paged_kv_write(dev, 0, k.to(npu.device), v.to(npu.device), ctx.slot_mapping.to(npu.device))
    return dev, cpu, tables


def _on(ctx: StepContext, device) -> StepContext:
    """ctx with its tensors on `device` (the tree fields too; host metadata kept)."""
    mv = (lambda t: None if t is None else t.to(device))
    return dataclasses.replace(ctx, positions=mv(ctx.positions), slot_mapping=mv(ctx.slot_mapping),
                               query_start=list(ctx.query_start), block_tables=mv(ctx.block_tables),
                               context_lens=mv(ctx.context_lens), tree_positions=mv(ctx.tree_positions),
                               tree_mask=mv(ctx.tree_mask))


@pytest.fixture
def fia_calls(npu, tnpu, monkeypatch):
    """Records the keyword arguments of every npu_fused_infer_attention_score call."""
    calls = []
    real = tnpu.npu_fused_infer_attention_score

    def spy(query, key, value, **kw):
        calls.append(dict(kw, key=key, value=value, query_shape=tuple(query.shape)))
        return real(query, key, value, **kw)
    monkeypatch.setattr(tnpu, "npu_fused_infer_attention_score", spy)
    return calls


# ------------------------------------------------------------------------------------ kv write

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hkv,block_size", [(1, 16), (2, 128), (4, 4)])
def test_paged_kv_write_is_the_reference_bit_for_bit(npu, dtype, hkv, block_size):
    lens = [37, 5, 130, 1]
    dev, cpu, _ = _filled(npu, 1, lens, hkv, 16, block_size, dtype)
    assert torch.equal(dev.k.cpu(), cpu.k) and torch.equal(dev.v.cpu(), cpu.v)


def test_paged_kv_write_uses_scatter_nd_update_on_the_layer(npu, tnpu, monkeypatch):
    """The write is npu_scatter_nd_update_ in place on cache.k[layer] (no copy of the cache),
    indices [N, Hkv, 3] = (block, head, offset)."""
    seen = []
    real = tnpu.npu_scatter_nd_update_

    def spy(inp, idx, upd):
        seen.append((inp.data_ptr(), tuple(idx.shape), idx.dtype, tuple(upd.shape)))
        return real(inp, idx, upd)
    monkeypatch.setattr(tnpu, "npu_scatter_nd_update_", spy)
    cache = PagedKVCache(3, 6, 16, 2, 8, torch.bfloat16, npu.device)
    ctx = StepContext.build([[4, 1]], [(14, 3)], 16, npu.device)
    k = torch.randn(3, 2, 8).bfloat16().to(npu.device)
    npu.paged_kv_write(cache, 2, k, k + 1, ctx.slot_mapping)
    assert [s[0] for s in seen] == [cache.k[2].data_ptr(), cache.v[2].data_ptr()]
    assert seen[0][1:] == ((3, 2, 3), torch.int64, (3, 2, 8))
    ck = cache.k.cpu()
    assert torch.equal(ck[2, 4, :, 14:16].transpose(0, 1), k[:2].cpu())      # positions 14, 15: block 4
    assert torch.equal(ck[2, 1, :, 0], k[2].cpu())                             # position 16: block 1, offset 0
    assert ck[:2].abs().sum() == 0


# ----------------------------------------------------------------------------------- attention

def _step_vs_reference(npu, dtype, lens, chunks, h, hkv, d, block_size, seed=2, chunk_starts=None):
    dev, cpu, tables = _filled(npu, seed, lens, hkv, d, block_size, dtype)
    starts = chunk_starts or [n - c for n, c in zip(lens, chunks)]
    ctx = StepContext.build(tables, list(zip(starts, chunks)), block_size, "cpu")
    q = torch.randn(sum(chunks), h, d, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    want = R.paged_attention(q, cpu, 0, ctx)
    got = npu.paged_attention(q.to(npu.device), dev, 0, _on(ctx, npu.device))
    assert got.shape == q.shape and got.dtype == dtype
    return got, want, ctx


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("h,hkv", [(4, 4), (8, 2)])
@pytest.mark.parametrize("t", [1, 4, 7])
def test_uniform_chunks_run_page_attention_on_the_cache_itself(npu, fia_calls, dtype, h, hkv, t):
    """Decode (T = 1) and verify chunks (T = 4, 7) of ragged sequences: one page-attention call
    with the cache layer as key/value (a view, not a copy), an int32 block table, KV lengths =
    last position + 1, and a causal mask within the chunk."""
    lens = [300, 5 + t, 129, 140]       # some sequences span 3 blocks, one sits inside a block
    bs = 128
    got, want, ctx = _step_vs_reference(npu, dtype, lens, [t] * len(lens), h, hkv, 64, bs)
    assert rel(got, want) <= TOL[dtype]
    assert len(fia_calls) == 1
    c = fia_calls[0]
    assert c["block_size"] == bs and c["block_table"].dtype == torch.int32
    assert c["block_table"].tolist() == ctx.block_tables.tolist()
    assert c["input_layout"] == "BNSD" and c["query_shape"] == (len(lens), h, t, 64)
    assert list(c["actual_seq_lengths_kv"]) == lens
    assert c["key"].dim() == 4 and tuple(c["key"].shape[1:3]) == (hkv, bs)      # (blocknum, KV_N, bs, D)
    if t == 1:
        assert c["atten_mask"] is None                  # decode: the KV lengths alone are the mask
    else:
        m = c["atten_mask"]
        assert m.dtype == torch.bool and tuple(m.shape) == (len(lens), 1, t, ctx.block_tables.shape[1] * bs)
        # row i of sequence 0 (positions 300 - t + i) sees slots <= its position: True = masked
        assert not m[0, 0, 0, 300 - t].item() and m[0, 0, 0, 300 - t + 1].item()


def test_the_causal_mask_matters(npu):
    """Query rows of a verify chunk must not see the chunk's later tokens: the same step with every
    row attending to its whole sequence gives a clearly different answer."""
    dtype, lens, t = torch.bfloat16, [200, 150], 7
    got, want, ctx = _step_vs_reference(npu, dtype, lens, [t, t], 4, 2, 32, 128)
    assert rel(got, want) <= TOL[dtype]
    _, cpu, _ = _filled(npu, 2, lens, 2, 32, 128, dtype)
    last = torch.tensor([n - 1 for n in lens]).repeat_interleave(t)            # every row at the end
    full = StepContext(last, ctx.slot_mapping, ctx.query_start, ctx.block_tables, ctx.context_lens, t)
    q = torch.randn(2 * t, 4, 32, generator=torch.Generator().manual_seed(3)).to(dtype)
    assert rel(got, R.paged_attention(q, cpu, 0, full)) > 5e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_varlen_prefill_step(npu, fia_calls, dtype):
    """A ragged step (ctx.chunk == 0): two prompts of different lengths, a prompt continuing
    after a cached prefix, a decode token and a second 9-token chunk: one call per distinct chunk
    length, every row correct."""
    lens = [40, 150, 9, 300, 200]
    chunks = [40, 150, 9, 1, 9]        # 3 x prefill from 0, a decode, a 9-token chunk after 191 slots
    got, want, ctx = _step_vs_reference(npu, dtype, lens, chunks, 8, 2, 32, 128)
    assert ctx.chunk == 0
    assert rel(got, want) <= TOL[dtype]
    if dtype != torch.float32:
        assert sorted(c["query_shape"][2] for c in fia_calls) == [1, 9, 40, 150]
        nine = next(c for c in fia_calls if c["query_shape"][2] == 9)
        assert nine["query_shape"][0] == 2 and list(nine["actual_seq_lengths_kv"]) == [9, 200]


@pytest.mark.parametrize("t", [1, 4])
def test_block_sizes_the_kernel_refuses_fall_back_to_a_gathered_copy(npu, fia_calls, caplog, t):
    """block_size 16: decode (Q_S = 1, 16-aligned) still runs page attention; a verify chunk
    (Q_S > 1 needs a multiple of 128) gathers the sequences' blocks and runs the dense kernel."""
    dtype = torch.bfloat16
    with caplog.at_level(logging.WARNING, logger="quasar"):
        got, want, _ = _step_vs_reference(npu, dtype, [37, 5 + t, 64, 18], [t] * 4, 8, 2, 32, 16)
    assert rel(got, want) <= TOL[dtype]
    c = fia_calls[0]
    if t == 1:
        assert c["block_table"] is not None and c["block_size"] == 16
    else:
        assert c.get("block_table") is None and c["key"].shape[0] == 4      # dense [B, Hkv, S, D]
        assert "block_size 16" in caplog.text


def test_unaligned_head_dim_verify_falls_back(npu):
    dtype = torch.float16
    got, want, _ = _step_vs_reference(npu, dtype, [150, 130], [4, 4], 4, 2, 24, 128)
    assert rel(got, want) <= TOL[dtype]


def test_float32_is_the_reference_exactly(npu):
    got, want, _ = _step_vs_reference(npu, torch.float32, [300, 12, 140], [7, 7, 7], 8, 2, 16, 128)
    assert torch.equal(got.cpu(), want)


# ----------------------------------------------------------------------------------- tree steps

def _tree_on_npu(npu, seed, h, hkv, d, ctx_lens, nodes, width, bs, dtype):
    """tree_case's cache and step, with a copy of the cache on the npu."""
    cache, ctx, q, parents = tree_case(seed, h, hkv, d, ctx_lens, nodes, width, bs, dtype=dtype)
    dev = PagedKVCache(1, cache.k.shape[1], bs, hkv, d, dtype, npu.device)
    dev.k.copy_(cache.k.to(npu.device)), dev.v.copy_(cache.v.to(npu.device))
    return cache, dev, ctx, q, parents


def _real_rows(nodes, width):
    return torch.tensor([b * width + m for b, n in enumerate(nodes) for m in range(n)])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("h,hkv", [(4, 4), (8, 2)])
def test_tree_step_runs_page_attention_with_the_tree_mask(npu, fia_calls, dtype, h, hkv):
    """A batched tree verify step (random trees of 9, 64, 1 and 33 nodes padded to 64 rows,
    contexts inside one block and across three, GQA): one page-attention call whose KV lengths
    are the last storage index + 1 and whose bool mask is the tree rule; every real row matches
    the float64 per-path definition, every row (pads included) the reference."""
    ctx_lens, nodes, width, bs, d = [5, 300, 129, 70], [9, 64, 1, 33], 64, 128, 64
    cache, dev, ctx, q, parents = _tree_on_npu(npu, 11, h, hkv, d, ctx_lens, nodes, width, bs, dtype)
    got = npu.paged_attention(q.to(npu.device), dev, 0, _on(ctx, npu.device))
    assert got.shape == q.shape and got.dtype == dtype
    rows = _real_rows(nodes, width)
    want = per_path_reference(q, cache, 0, ctx, ctx_lens, parents, width)
    ref = R.paged_attention(q, cache, 0, ctx)
    if dtype == torch.float32:                 # the composed path is the reference itself
        assert torch.equal(got.cpu(), ref)
        assert torch.allclose(got.cpu()[rows].double(), want[rows], atol=1e-5)
        return
    assert rel(got[rows], want[rows]) <= TOL[dtype]
    assert rel(got, ref) <= TOL[dtype]
    assert len(fia_calls) == 1
    c = fia_calls[0]
    assert c["block_size"] == bs and c["block_table"].dtype == torch.int32
    assert list(c["actual_seq_lengths_kv"]) == [cl + n for cl, n in zip(ctx_lens, nodes)]
    m = c["atten_mask"]
    assert m.dtype == torch.bool and tuple(m.shape) == (4, 1, width, ctx.block_tables.shape[1] * bs)
    # sequence 1 (context 300, 64 nodes): node m sees the context and exactly its root path
    par = parents[1]
    for node in (0, 5, 63):
        path, x = set(), node
        while x >= 0:
            path.add(x)
            x = par[x]
        seen = (~m[1, 0, node]).nonzero().view(-1).tolist()
        assert seen == list(range(300)) + sorted(300 + x for x in path)


def test_tree_pads_and_a_single_node_tree_decode(npu, fia_calls):
    """Trees of one node (the root only: a decode step in tree form, Q_S = 1) still pass the
    explicit mask, and match the reference."""
    dtype, ctx_lens, nodes = torch.bfloat16, [40, 257, 3], [1, 1, 1]
    cache, dev, ctx, q, parents = _tree_on_npu(npu, 12, 8, 2, 32, ctx_lens, nodes, 1, 128, dtype)
    got = npu.paged_attention(q.to(npu.device), dev, 0, _on(ctx, npu.device))
    want = per_path_reference(q, cache, 0, ctx, ctx_lens, parents, 1)
    assert rel(got, want) <= TOL[dtype]
    c = fia_calls[0]
    assert c["block_table"] is not None and c["atten_mask"] is not None
    assert list(c["actual_seq_lengths_kv"]) == [41, 258, 4]


@pytest.mark.parametrize("bs,d", [(16, 32), (128, 24)])
def test_tree_step_falls_back_to_a_gathered_copy(npu, fia_calls, caplog, bs, d):
    """Block sizes (16: Q_S > 1 needs a multiple of 128) and head dims (24: not 16-aligned) the
    page kernel refuses: the gathered copy and the dense kernel, with the same tree mask."""
    dtype, ctx_lens, nodes, width = torch.bfloat16, [37, 64, 18], [20, 7, 13], 20
    with caplog.at_level(logging.WARNING, logger="quasar"):
        cache, dev, ctx, q, parents = _tree_on_npu(npu, 13, 8, 2, d, ctx_lens, nodes, width, bs, dtype)
        got = npu.paged_attention(q.to(npu.device), dev, 0, _on(ctx, npu.device))
    rows = _real_rows(nodes, width)
    want = per_path_reference(q, cache, 0, ctx, ctx_lens, parents, width)
    assert rel(got[rows], want[rows]) <= TOL[dtype]
    assert rel(got, R.paged_attention(q, cache, 0, ctx)) <= TOL[dtype]
    c = fia_calls[0]
    assert c.get("block_table") is None and c["atten_mask"] is not None
    assert ("block_size 16" if bs == 16 else "head_dim 24") in caplog.text


def test_ragged_tree_step_batches_equal_node_counts(npu, fia_calls):
    """Trees without padding rows (ctx.chunk == 0): one call per distinct node count, the
    sequences of one count batched (their rows gathered), each with its own tree mask."""
    dtype, ctx_lens, nodes, width, bs = torch.bfloat16, [50, 140, 9, 260], [9, 64, 9, 1], 64, 128
    cache, dev, ctx, q, parents = _tree_on_npu(npu, 14, 8, 2, 32, ctx_lens, nodes, width, bs, dtype)
    rows = _real_rows(nodes, width)
    keep = rows.tolist()
    qs = [0]
    for n in nodes:
        qs.append(qs[-1] + n)
    tables = [ctx.block_tables[b, :-(-(c + n) // bs)].tolist() for b, (c, n) in enumerate(zip(ctx_lens, nodes))]
    sub = StepContext.make([ctx.host_positions[i] for i in keep], [ctx.host_slots[i] for i in keep], qs, tables,
                           [c + n for c, n in zip(ctx_lens, nodes)], 0, "cpu", ctx.block_tables.shape[1],
                           ctx.tree_positions[rows].tolist(), [m & ((1 << 64) - 1) for m in ctx.tree_mask[rows].tolist()])
    got = npu.paged_attention(q[rows].to(npu.device), dev, 0, _on(sub, npu.device))
    want = per_path_reference(q, cache, 0, ctx, ctx_lens, parents, width)[rows]
    assert rel(got, want) <= TOL[dtype]
    assert rel(got, R.paged_attention(q[rows], cache, 0, sub)) <= TOL[dtype]
    assert sorted(c["query_shape"][2] for c in fia_calls) == [1, 9, 64]
    nine = next(c for c in fia_calls if c["query_shape"][2] == 9)
    assert nine["query_shape"][0] == 2 and list(nine["actual_seq_lengths_kv"]) == [59, 18]


def test_tree_metadata_follows_an_in_place_rewrite_of_the_tree_mask(npu):
    """The per-step metadata is cached on the identity and version of ctx's tensors, the tree
    fields included: rewriting tree_mask in place (a static buffer) rebuilds the mask."""
    dtype, ctx_lens, nodes, width = torch.bfloat16, [30, 150], [17, 40], 40
    cache, dev, ctx, q, parents = _tree_on_npu(npu, 15, 4, 2, 32, ctx_lens, nodes, width, 128, dtype)
    dctx, qd = _on(ctx, npu.device), q.to(npu.device)
    first = npu.paged_attention(qd, dev, 0, dctx).clone()
    assert torch.equal(npu.paged_attention(qd, dev, 0, dctx).cpu(), first.cpu())      # cached: the same
    dctx.tree_mask.fill_(1)                                  # every row: the context and the root only
    got = npu.paged_attention(qd, dev, 0, dctx)
    want = R.paged_attention(q, cache, 0, dataclasses.replace(ctx, tree_mask=torch.ones_like(ctx.tree_mask)))
    assert rel(got, want) <= TOL[dtype]
    assert rel(got, first) > 5e-2


# ------------------------------------------------------------------------ paged_rope_kv_write

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("norms", [False, True])
def test_paged_rope_kv_write(npu, dtype, norms):
    h, hkv, d, bs = 8, 2, 32, 16
    lens = [20, 7, 33]
    dev, cpu, tables = _filled(npu, 5, lens, hkv, d, bs, dtype)
    ctx = StepContext.build(tables, [(n - c, c) for n, c in zip(lens, [4, 4, 4])], bs, "cpu")
    g = torch.Generator().manual_seed(6)
    qkv = torch.randn(ctx.positions.numel(), (h + 2 * hkv) * d, generator=g).to(dtype)
    ang = torch.arange(64)[:, None] * torch.rand(d // 2, generator=g)[None]
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    qn = (1 + 0.1 * torch.randn(d, generator=g)).to(dtype) if norms else None
    kn = (1 + 0.1 * torch.randn(d, generator=g)).to(dtype) if norms else None
    want = R.paged_rope_kv_write(qkv, qn, kn, 1e-6, cos, sin, ctx, cpu, 0)
    to = (lambda x: None if x is None else x.to(npu.device))
    got = npu.paged_rope_kv_write(qkv.to(npu.device), to(qn), to(kn), 1e-6, cos.to(npu.device),
                                  sin.to(npu.device), _on(ctx, npu.device), dev, 0)
    assert got.shape == (qkv.shape[0], h, d) and got.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert rel(got, want) <= tol
    assert rel(dev.k, cpu.k) <= tol and torch.equal(dev.v.cpu(), cpu.v)          # v is written as is
    # slots outside the step are untouched
    keep = torch.ones(dev.k.shape[1] * bs, dtype=torch.bool)
    keep[ctx.slot_mapping] = False
    flat = lambda c: c.k[0].cpu().transpose(1, 2).reshape(-1, hkv, d)          # noqa: E731  [blocks*bs, Hkv, D]
    assert torch.equal(flat(dev)[keep], flat(cpu)[keep])


# --------------------------------------------------------------- documented kernel constraints

def _pool(nblk=6, hkv=2, bs=128, d=16, dtype=torch.bfloat16, device="cpu"):
    g = torch.Generator().manual_seed(9)
    return (torch.randn(nblk, hkv, bs, d, generator=g).to(dtype).to(device),
            torch.randn(nblk, hkv, bs, d, generator=g).to(dtype).to(device))


def test_emulated_page_attention_gathers_through_the_block_table(npu, tnpu):
    """The documented semantics on the op itself: sequence b's position j is block
    block_table[b, j // bs], offset j % bs; positions >= actual_seq_lengths_kv are not attended."""
    k, v = _pool(device=npu.device)
    q = torch.randn(2, 4, 1, 16, generator=torch.Generator().manual_seed(10)).bfloat16().to(npu.device)
    table = torch.tensor([[3, 0, 5], [1, 4, 2]], dtype=torch.int32, device=npu.device)
    out, _ = tnpu.npu_fused_infer_attention_score(q, k, v, block_table=table, block_size=128,
                                                  actual_seq_lengths_kv=[200, 1], num_heads=4,
                                                  num_key_value_heads=2, input_layout="BNSD", scale=0.25)
    # sequence 1 sees one slot, block 1 offset 0: every head returns that value row
    assert torch.allclose(out[1, :, 0].cpu().float(), v[1, :, 0].cpu().float().repeat_interleave(2, 0), atol=1e-2)
    # sequence 0 against an explicit dense gather of its first 200 positions
    kd = torch.cat([k[3], k[0]], 1)[:, :200].float().cpu().repeat_interleave(2, 0)
    vd = torch.cat([v[3], v[0]], 1)[:, :200].float().cpu().repeat_interleave(2, 0)
    p = torch.softmax(q[0, :, 0].float().cpu()[:, None, :] @ kd.transpose(1, 2) * 0.25, -1)
    assert torch.allclose(out[0, :, 0].cpu().float(), (p @ vd)[:, 0], atol=1e-2)


@pytest.mark.skipif(REAL, reason="checks the emulation's enforcement of the documented limits")
def test_page_attention_constraints_are_clear_errors(npu, tnpu):
    k, v = _pool(device=npu.device)
    q1 = torch.randn(1, 4, 1, 16).bfloat16().to(npu.device)
    q4 = torch.randn(1, 4, 4, 16).bfloat16().to(npu.device)
    ok = dict(block_size=128, actual_seq_lengths_kv=[130], num_heads=4, num_key_value_heads=2,
              input_layout="BNSD", scale=0.25)
    table = torch.tensor([[2, 5]], dtype=torch.int32, device=npu.device)
    fia = tnpu.npu_fused_infer_attention_score
    fia(q4, k, v, block_table=table, **ok)                                  # the valid call
    with pytest.raises(RuntimeError, match="block_table must be an int32"):
        fia(q4, k, v, block_table=table.long(), **ok)
    with pytest.raises(RuntimeError, match=r"block_size a multiple of 128 in \[128, 512\], got 64"):
        fia(q4, k.view(12, 2, 64, 16), v.view(12, 2, 64, 16), block_table=table, **dict(ok, block_size=64))
    with pytest.raises(RuntimeError, match="16-aligned block_size, got 8"):
        fia(q1, k.view(96, 2, 8, 16), v.view(96, 2, 8, 16), block_table=table, **dict(ok, block_size=8))
    with pytest.raises(RuntimeError, match="below maxBlockNumPerSeq"):
        fia(q4, k, v, block_table=table[:, :1], **ok)
    with pytest.raises(RuntimeError, match="requires actual_seq_lengths_kv"):
        fia(q4, k, v, block_table=table, **dict(ok, actual_seq_lengths_kv=None))
    with pytest.raises(RuntimeError, match="needs the query input_layout BNSD or TND"):
        fia(q4.transpose(1, 2).reshape(1, 4, 64), k, v, block_table=table, **dict(ok, input_layout="BSH"))
    with pytest.raises(RuntimeError, match="outside"):
        fia(q4, k, v, block_table=table + 5, **ok)
    with pytest.raises(RuntimeError, match=r"atten_mask KV_S \(128\) must be >= maxBlockNumPerSeq"):
        fia(q4, k, v, block_table=table, atten_mask=torch.zeros(1, 1, 4, 128, dtype=torch.bool), **ok)
    # the (blocknum, blocksize, H) layout is accepted for BSH queries and gives the same answer
    bsh_k = k.transpose(1, 2).reshape(6, 128, 32).contiguous()
    bsh_v = v.transpose(1, 2).reshape(6, 128, 32).contiguous()
    a, _ = fia(q4, k, v, block_table=table, **ok)
    b, _ = fia(q4.transpose(1, 2).reshape(1, 4, 64).contiguous(), bsh_k, bsh_v, block_table=table,
               **dict(ok, input_layout="BSH"))
    assert torch.allclose(a.transpose(1, 2).reshape(1, 4, 64).float(), b.float(), atol=1e-2)


@pytest.mark.skipif(REAL, reason="checks the emulation's enforcement of the documented limits")
def test_scatter_nd_update_constraints_are_clear_errors(npu, tnpu):
    cache = torch.zeros(4, 2, 8, 16, dtype=torch.bfloat16)
    upd = torch.ones(3, 2, 16, dtype=torch.bfloat16)
    idx = torch.tensor([[[0, 0, 1], [0, 1, 1]], [[3, 0, 7], [3, 1, 7]], [[2, 0, 0], [2, 1, 0]]])
    tnpu.npu_scatter_nd_update_(cache, idx, upd)
    assert cache.sum().item() == 3 * 2 * 16 and cache[3, 1, 7].sum().item() == 16
    with pytest.raises(RuntimeError, match="out of range"):
        tnpu.npu_scatter_nd_update_(cache, idx + torch.tensor([4, 0, 0]), upd)
    with pytest.raises(RuntimeError, match="updates dtype"):
        tnpu.npu_scatter_nd_update_(cache, idx, upd.float())
    with pytest.raises(RuntimeError, match="updates shape"):
        tnpu.npu_scatter_nd_update_(cache, idx, upd[:, 0])
