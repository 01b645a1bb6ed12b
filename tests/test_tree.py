"""Draft trees (issue 20): the tree-mask attention's definition against a per-path dense
computation, and the tree helpers (shape, acceptance)."""
import random

import pytest
import torch

from quasar.ops import reference as R
from quasar.spec_decode import tree as T
from tree_util import per_path_reference, tree_case


def _real_rows(nodes, width):
    return torch.tensor([b * width + m for b, n in enumerate(nodes) for m in range(n)])


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2)])
@pytest.mark.parametrize("block_size", [4, 16])
def test_tree_attention_reference_equals_per_path_attention(heads, kv_heads, block_size):
    ctx_lens, nodes, width = [5, 37, 70], [9, 64, 1], 64
    cache, ctx, q, parents = tree_case(3, heads, kv_heads, 16, ctx_lens, nodes, width, block_size)
    want = per_path_reference(q, cache, 0, ctx, ctx_lens, parents, width)
    rows = _real_rows(nodes, width)
    for fn in (R.paged_attention, R.batched_paged_attention):
        got = fn(q, cache, 0, ctx)
        assert torch.allclose(got[rows].double(), want[rows], atol=1e-5), fn.__name__


def test_tree_attention_is_batch_invariant_and_a_chain_tree_is_causal():
    ctx_lens, nodes, width = [11, 29], [13, 20], 20
    cache, ctx, q, parents = tree_case(5, 8, 2, 16, ctx_lens, nodes, width, 16)
    out = R.paged_attention(q, cache, 0, ctx)
    # a chain tree (parents m - 1) is exactly the causal chunk of the same storage positions
    from quasar.engine.context import StepContext
    chain = T.chain_parents(7)
    r = T.rows(4, chain, 7)
    assert r.positions == r.storage == list(range(4, 11))
    tab = ctx.block_tables[0].tolist()
    slots = [tab[p // 16] * 16 + p % 16 for p in range(4, 11)]
    tree_ctx = StepContext.make(r.positions, slots, [0, 7], [tab], [11], 7, "cpu", 0, r.storage, r.mask)
    causal = StepContext.make(r.positions, slots, [0, 7], [tab], [11], 7, "cpu")
    q7 = q[:7]
    assert torch.equal(R.paged_attention(q7, cache, 0, tree_ctx), R.paged_attention(q7, cache, 0, causal))
    # the mask is used: a bushy tree differs from the causal chunk
    assert not torch.allclose(out[:13], R.paged_attention(q[:13], cache, 0, StepContext.make(
        ctx.positions[:13].tolist(), ctx.slot_mapping[:13].tolist(), [0, 13], [tab], [24], 13, "cpu")))


def test_tree_shape_helpers():
    par = [-1, 0, 0, 1, 3, 2]
    T.check(par)
    assert T.depths(par) == [0, 1, 1, 2, 3, 2]
    assert T.masks(par) == [1, 0b11, 0b101, 0b1011, 0b11011, 0b100101]
    with pytest.raises(ValueError, match="come before"):
        T.check([-1, 2, 0])
    with pytest.raises(ValueError, match="at most 64"):
        T.check(T.chain_parents(65))


def test_accepted_path_is_the_deepest_correct_path():
    #        0
    #      1   2          target after node: 0->'b', 1->'x', 2->'c', 5->'d'
    #     3     5
    #     4
    par = [-1, 0, 0, 1, 3, 2]
    tok = [0, ord('a'), ord('b'), ord('x'), ord('y'), ord('c')]
    tgt = [ord('b'), ord('x'), ord('c'), ord('y'), ord('z'), ord('d')]
    # node 1 ('a') is wrong, so its correct descendants 3, 4 do not count; 2 and 5 are right
    assert T.accepted_path(tok, par, tgt) == [0, 2, 5]
    tgt[0] = ord('a')
    assert T.accepted_path(tok, par, tgt) == [0, 1, 3, 4]
    tgt[0] = ord('q')
    assert T.accepted_path(tok, par, tgt) == [0]


def test_trie_merges_shared_prefixes_within_the_budget():
    t = T.Trie(6)
    t.add([1, 2, 3])
    t.add([1, 2, 4])
    t.add([5, 6, 7])
    assert t.tokens == [0, 1, 2, 3, 4, 5]
    assert t.parents == [-1, 0, 1, 2, 2, 0]
