"""The paged KV cache's reference ops (the definition for issue 17's kernels): writing through a
slot mapping and attending through random block tables give exactly what the dense cache gives,
for ragged lengths, GQA and chunk lengths 1..16 (and a prefill-sized chunk), every sequence of a
batch bit for bit as it is alone."""
import random

import pytest
import torch

from quasar.engine.block_manager import BlockManager
from quasar.engine.context import StepContext
from quasar.kv import KVCache
from quasar.kv.paged import PagedKVCache
from quasar.ops import reference as R


def _case(seed, heads, kv_heads, d, lens, chunks, block_size, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    smax = max(lens) + 1
    dense = [KVCache(1, 1, kv_heads, smax, d, dtype, "cpu") for _ in lens]
    bm = BlockManager(num_blocks=sum(-(-n // block_size) for n in lens) + 7, block_size=block_size)
    # scatter the free list so that tables are not contiguous runs
    order = list(bm._free)
    rng.shuffle(order)
    bm._free.clear()
    bm._free.update((i, None) for i in order)
    paged = PagedKVCache(1, bm.num_blocks, block_size, kv_heads, d, dtype, "cpu")
    tables = []
    for b, n in enumerate(lens):
        t = bm.allocate([b + 1] * n, n)
        tables.append(t.blocks)
        k = torch.randn(1, n, kv_heads, d, generator=g, dtype=dtype)
        v = torch.randn(1, n, kv_heads, d, generator=g, dtype=dtype)
        R.kv_write(dense[b], 0, k, v, torch.arange(n).view(1, -1))
        ctx = StepContext.build([t.blocks], [(0, n)], block_size, "cpu")
        R.paged_kv_write(paged, 0, k[0], v[0], ctx.slot_mapping)
    # this step: sequence b queries its last chunks[b] positions
    ctx = StepContext.build(tables, [(n - c, c) for n, c in zip(lens, chunks)], block_size, "cpu")
    q = torch.randn(sum(chunks), heads, d, generator=g, dtype=dtype)
    return dense, paged, ctx, q


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2), (6, 1)])
@pytest.mark.parametrize("block_size", [4, 16])
def test_paged_attention_equals_the_dense_cache_and_is_batch_invariant_bit_for_bit(heads, kv_heads, block_size):
    lens = [37, 5, 64, 18, 1, 150]
    chunks = [6, 1, 16, 3, 1, 40]
    dense, paged, ctx, q = _case(0, heads, kv_heads, 16, lens, chunks, block_size)
    out = R.paged_attention(q, paged, 0, ctx)
    for b, (n, c) in enumerate(zip(lens, chunks)):
        a = ctx.query_start[b]
        want = R.attention(q[a:a + c][None], dense[b], 0, torch.arange(n - c, n).view(1, -1), n)[0]
        torch.testing.assert_close(out[a:a + c], want, rtol=1e-5, atol=1e-6)
        # the same sequence alone (a batch of one, its own table width): the same bits
        solo = StepContext.build([ctx.block_tables[b].tolist()[:-(-n // block_size)]], [(n - c, c)], block_size, "cpu")
        assert torch.equal(R.paged_attention(q[a:a + c], paged, 0, solo), out[a:a + c]), b
        # each row alone (a chunk of one token at its position): the same bits, so a verify chunk
        # of any length and any prefill chunking give a row the same result
        for i in range(c):
            one = StepContext.build([ctx.block_tables[b].tolist()], [(n - c + i, 1)], block_size, "cpu")
            assert torch.equal(R.paged_attention(q[a + i:a + i + 1], paged, 0, one), out[a + i:a + i + 1]), (b, i)


def test_a_prefill_sized_chunk_and_bf16():
    lens, chunks = [40, 29], [40, 20]
    dense, paged, ctx, q = _case(1, 8, 2, 32, lens, chunks, 8, torch.bfloat16)
    out = R.paged_attention(q, paged, 0, ctx)
    for b, (n, c) in enumerate(zip(lens, chunks)):
        a = ctx.query_start[b]
        want = R.attention(q[a:a + c][None], dense[b], 0, torch.arange(n - c, n).view(1, -1), n)[0]
        torch.testing.assert_close(out[a:a + c].float(), want.float(), rtol=2e-2, atol=2e-2)


def test_slot_mapping_follows_the_block_table():
    ctx = StepContext.build([[3, 0, 5], [1]], [(7, 3), (0, 2)], 4, "cpu")
    assert ctx.slot_mapping.tolist() == [0 * 4 + 3, 5 * 4 + 0, 5 * 4 + 1, 1 * 4 + 0, 1 * 4 + 1]
    assert ctx.positions.tolist() == [7, 8, 9, 0, 1] and ctx.query_start == [0, 3, 5]
    assert ctx.context_lens.tolist() == [10, 2] and ctx.block_tables.shape == (2, 3)


@pytest.mark.parametrize("chunks", [[1, 1, 1, 1], [4, 4, 4, 4], [1, 7, 16, 3], [20, 1, 5, 33]])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batched_paged_attention_equals_the_definition(chunks, dtype):
    """The one-call form (what accelerator backends run for varlen prefill) against the
    per-sequence definition: uniform and ragged chunks, GQA, a padded block-table width."""
    lens = [40, 9, 23, 57]
    dense, paged, ctx, q = _case(7, 8, 2, 16, lens, chunks, 4, dtype)
    want = R.paged_attention(q, paged, 0, ctx)
    got = R.batched_paged_attention(q, paged, 0, ctx)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert (got.float() - want.float()).abs().max() <= tol * want.float().abs().max()
