"""The NPU backend's paged-KV-cache ops (backends/npu.py: paged_kv_write, paged_rope_kv_write,
paged_attention) against the reference (quasar.ops.reference), on the torch_npu emulation.

The emulation computes page attention the documented way (gathering each sequence's blocks
through block_table, tests/npu_emulation), so these tests check what the backend hands the kernel:
the cache layer itself in the (blocknum, KV_N, blocksize, D) layout, an int32 block table, the
per-sequence KV lengths, the causal mask within a chunk (True = masked), and the scatter indices of
the KV write. Random block tables (a shuffled free list), ragged lengths, GQA, chunk lengths 1, 4
and 7, a varlen prefill step, and the fallbacks for block sizes the kernel refuses. With
QUASAR_NPU_REAL=1 the same tests run on the real torch_npu (docs/ascend.md).
"""
from __future__ import annotations

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
    return StepContext(ctx.positions.to(device), ctx.slot_mapping.to(device), list(ctx.query_start),
                       ctx.block_tables.to(device), ctx.context_lens.to(device), ctx.chunk)


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
