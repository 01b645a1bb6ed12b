"""The paged runtime's captured steps (backends/cuda_graphs.py) with draft trees: a tree step is
served only by a tree entry of its size (static tree_positions / tree_mask buffers copied in, the
batch padded to a bucket), never by a chain entry, whose attention ignores the tree.

On the CPU: StaticPagedStepRunner (the eager twin of PagedGraphRunner: the same static buffers
and padding) against the eager step, and PagedGraphRunner's key selection and replay with fake
graphs. On a GPU: the captured tree graphs against the eager step."""
from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from quasar.backends.cuda_graphs import PagedGraphRunner, StaticPagedStepRunner
from quasar.engine.context import StepContext
from quasar.engine.model_runner import ModelRunner
from quasar.errors import ConfigError
from quasar.spec_decode import tree as T
from tiny import load_quasar, make_tiny
from tree_util import random_parents

BS = 16


@pytest.fixture(scope="module")
def target(tiny_root):
    return make_tiny(tiny_root, "qwen3", seed=3)


def _table(b: int, nblk: int) -> list[int]:
    return [b * nblk + i for i in range(nblk)]


def _prefill(r: ModelRunner, ctx_lens: list[int], seed: int) -> list[list[int]]:
    """Each sequence's context written to the cache (one varlen prefill step); its tables."""
    nblk = r.max_blocks
    tables = [_table(b, nblk) for b in range(len(ctx_lens))]
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 200, (sum(ctx_lens),), generator=g).to(r.device)
    ctx = StepContext.build(tables, [(0, n) for n in ctx_lens], BS, r.device, nblk)
    r.run_eager(ids, ctx, "prefill")
    return tables


def _tree_step(r: ModelRunner, tables, ctx_lens, nodes, width, seed, chain=False):
    """A tree verify step as the engine builds it: sequence b's tree of nodes[b] nodes at storage
    c_b + m, RoPE position c_b + depth, padded to `width` rows (pads: storage c_b, the root's
    mask, the scratch slot). chain: the same step without its tree fields. Returns (ids, ctx)."""
    rng = random.Random(seed)
    pos, slots, qs, lens, tpos, tmask = [], [], [0], [], [], []
    for b, (c, n) in enumerate(zip(ctx_lens, nodes)):
        par = random_parents(rng, n)
        rows = T.rows(c, par, width)
        pos += rows.positions
        tpos += rows.storage
        tmask += rows.mask
        slots += [tables[b][p // BS] * BS + p % BS for p in range(c, c + n)] + [r.scratch_slot] * (width - n)
        qs.append(qs[-1] + width)
        lens.append(c + n)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 200, (len(pos),), generator=g).to(r.device)
    tree = (None, None) if chain else (tpos, tmask)
    return ids, StepContext.make(pos, slots, qs, tables, lens, width, r.device, r.max_blocks, *tree)


# ------------------------------------------------------------------------------------- the CPU

def test_model_runner_takes_tree_lengths(target):
    m = load_quasar(target, max_seq_len=64)
    r = ModelRunner(m, chunk_lengths=(1, 5), kv_blocks=16, block_size=BS, buckets=(2, 4), tree_lengths=(32, 16, 16))
    assert r.tree_lengths == (16, 32)
    assert r.captured is None                                  # the CPU backend captures nothing
    with pytest.raises(ConfigError, match=r"tree_lengths must lie in \[1, 64\]"):
        ModelRunner(m, kv_blocks=16, block_size=BS, tree_lengths=(65,))
    with pytest.raises(ConfigError, match="paged KV cache"):
        ModelRunner(m, tree_lengths=(8,))


def test_base_backend_signature_takes_tree_lengths(target, monkeypatch):
    """ModelRunner hands tree_lengths to the backend's paged_graph_runner (positionally), also
    when there are no chain lengths to capture."""
    m = load_quasar(target, max_seq_len=64)
    seen = []
    be = m.backend
    orig = type(be).paged_graph_runner

    def spy(self, runner, buckets, chunk_lengths, modes, tree_lengths=()):
        seen.append((list(buckets), list(chunk_lengths), tuple(modes), tuple(tree_lengths)))
        return orig(self, runner, buckets, chunk_lengths, modes, tree_lengths)
    monkeypatch.setattr(type(be), "paged_graph_runner", spy)
    ModelRunner(m, chunk_lengths=(1, 5), kv_blocks=16, block_size=BS, buckets=(2,), tree_lengths=(8,))
    ModelRunner(m, kv_blocks=16, block_size=BS, buckets=(2,), tree_lengths=(8,))
    assert seen == [([2], [1, 5], ("verify",), (8,)), ([2], [], ("verify",), (8,))]


def test_static_tree_step_equals_the_eager_step_and_never_uses_a_chain_entry(target):
    """Three sequences (bucket 4: one padded sequence) with random trees of 8, 3 and 1 nodes in
    8 rows: the static-buffer tree entry gives the eager step's logits; the tree matters (the
    same step as a chain differs); a tree step whose size has no tree entry is not served even
    though a chain entry of that T exists."""
    m = load_quasar(target, max_seq_len=64)
    r = ModelRunner(m, kv_blocks=16, block_size=BS)
    ctx_lens, nodes = [20, 7, 33], [8, 3, 1]
    tables = _prefill(r, ctx_lens, 1)
    st = StaticPagedStepRunner(r, (2, 4), (1, 5, 8), ("verify",), (8,))
    assert (("verify", 4, 8, "tree") in st.graphs and ("verify", 4, 8) in st.graphs
            and ("verify", 4, 5, "tree") not in st.graphs)
    served = []
    run = st._run
    st._run = lambda key, entry: served.append(key) or run(key, entry)
    ids, ctx = _tree_step(r, tables, ctx_lens, nodes, 8, 2)
    want = r.run_eager(ids, ctx, "verify")
    r.captured = st
    got = r.run(ids, ctx, "verify")
    assert served == [("verify", 4, 8, "tree")]
    assert got.shape == want.shape and torch.allclose(got, want, atol=1e-4, rtol=1e-4)
    # the padded sequence's tree rows: storage 0, the root only
    assert st.tree_pos[24:32].eq(0).all() and st.tree_mask[24:32].eq(1).all()
    chain = r.run_eager(ids, dataclasses.replace(ctx, tree_positions=None, tree_mask=None), "verify")
    real = [b * 8 + i for b, n in enumerate(nodes) for i in range(n)]
    assert not torch.allclose(chain[real], want[real], atol=1e-2)
    # a chain step of the same shape takes the chain entry
    _, cctx = _tree_step(r, tables, ctx_lens, nodes, 8, 2, chain=True)
    assert st.key(cctx, "verify") == ("verify", 4, 8)
    # T = 5 trees: a chain entry (verify, 4, 5) exists, no tree entry: run eagerly
    ids5, ctx5 = _tree_step(r, tables, ctx_lens, [5, 2, 4], 5, 3)
    served.clear()
    assert st(ids5, ctx5, "verify") is None and served == []
    assert torch.allclose(r.run(ids5, ctx5, "verify"), r.run_eager(ids5, ctx5, "verify"))


class _FakeGraph:
    def __init__(self, key, log):
        self.key, self.log = key, log

    def replay(self):
        self.log.append(self.key)


def test_paged_graph_runner_replays_tree_graphs_for_tree_steps_only(target, monkeypatch):
    """PagedGraphRunner's own selection and replay, with fake graphs (capture needs CUDA): a tree
    step replays the tree graph of its (bucket, T) with the step's tree fields in the static
    buffers; one of an uncaptured size returns None (eager), whatever chain graphs exist."""
    m = load_quasar(target, max_seq_len=64)
    r = ModelRunner(m, kv_blocks=16, block_size=BS)
    log = []
    monkeypatch.setattr(PagedGraphRunner, "_prepare",
                        lambda self, key: (_FakeGraph(key, log), torch.full((self.ids.numel(), 3), float(key[2]))))
    g = PagedGraphRunner.__new__(PagedGraphRunner)
    StaticPagedStepRunner.__init__(g, r, (2, 4), (1, 4, 8), ("verify", "draft"), (4,))
    assert sorted(k for k in g.graphs if len(k) == 4) == [("draft", 2, 4, "tree"), ("draft", 4, 4, "tree"),
                                                          ("verify", 2, 4, "tree"), ("verify", 4, 4, "tree")]
    tables = [_table(b, r.max_blocks) for b in range(3)]
    ids, ctx = _tree_step(r, tables, [10, 3, 17], [4, 2, 3], 4, 5)
    out = g(ids, ctx, "verify")
    assert log == [("verify", 4, 4, "tree")] and out.shape == (12, 3)
    assert torch.equal(g.tree_pos[:12], ctx.tree_positions) and torch.equal(g.tree_mask[:12], ctx.tree_mask)
    assert g.tree_pos[12:16].eq(0).all() and g.tree_mask[12:16].eq(1).all()
    assert torch.equal(g.pos[:12], ctx.positions) and g.pos[12:16].eq(0).all()
    log.clear()
    _, cctx = _tree_step(r, tables, [10, 3, 17], [4, 2, 3], 4, 5, chain=True)
    g(ids, cctx, "draft")
    assert log == [("draft", 4, 4)]
    log.clear()
    ids8, ctx8 = _tree_step(r, tables, [10, 3, 17], [8, 2, 3], 8, 6)      # (verify, 4, 8) is a chain graph
    assert ("verify", 4, 8) in g.graphs and g(ids8, ctx8, "verify") is None and log == []
    ids2, ctx2 = _tree_step(r, tables[:2], [10, 3], [1, 1], 1, 7)         # T = 1 trees: no tree graph
    assert g(ids2, ctx2, "verify") is None and log == []


# ------------------------------------------------------------------------------------- a GPU

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CUDA graphs)")


@gpu
def test_captured_tree_graphs_replay_the_eager_tree_step(tiny_root):
    path = make_tiny(tiny_root, "qwen3", seed=5, hidden_size=128, intermediate_size=256, head_dim=32)
    m = load_quasar(path, device="cuda", dtype=torch.bfloat16, max_seq_len=64)
    r = ModelRunner(m, chunk_lengths=(1, 8), kv_blocks=16, block_size=BS, buckets=(2, 4), tree_lengths=(8,),
                    graphs=True)
    assert isinstance(r.captured, PagedGraphRunner) and ("verify", 4, 8, "tree") in r.captured.graphs
    ctx_lens, nodes = [20, 7, 33], [8, 3, 1]
    tables = _prefill(r, ctx_lens, 1)
    ids, ctx = _tree_step(r, tables, ctx_lens, nodes, 8, 2)
    served = []
    run = r.captured._run
    r.captured._run = lambda key, entry: served.append(key) or run(key, entry)
    got = r.run(ids, ctx, "verify").clone()
    want = r.run_eager(ids, ctx, "verify")
    assert served == [("verify", 4, 8, "tree")]
    real = [b * 8 + i for b, n in enumerate(nodes) for i in range(n)]
    err = ((got[real] - want[real]).norm() / want[real].norm()).item()
    assert err < 2e-2, err
    # a chain step of the same shape replays the chain graph
    _, cctx = _tree_step(r, tables, ctx_lens, nodes, 8, 2, chain=True)
    served.clear()
    r.run(ids, cctx, "verify")
    assert served == [("verify", 4, 8)]
