"""Draft trees (SpecInfer, Medusa, EAGLE-2, SpecMQuant): shape, the verify step's tree metadata,
and acceptance.

A step's tree for one sequence has n nodes in storage order: node 0 is the root (the sequence's
last emitted token, not yet in the cache), node m > 0 a drafted token whose parent parents[m] < m.
A chain is the tree whose parents are m - 1. The verify chunk puts node m at storage index
s + m (its cache slot: the slot of logical position s + m) and at RoPE position s + depth(m);
node m attends to the context (storage < s) and to its ancestors and itself (its mask bits).
After acceptance the accepted path's K/V are moved to storage s + depth (compaction), so the
cache then holds exactly what autoregressive decoding would have written.

Acceptance is an exact-match test: the verifier's token after node m (its argmax, or its seeded
Gumbel-max draw keyed by the request's seed and the position, quasar.spec_decode.sampling.pick) is
computed at every node; node m is correct iff its token equals the verifier's token at its parent,
and the accepted path is the deepest node whose ancestors are all correct (the first in storage
order on a tie). The emitted tokens are the path's drafted tokens plus the verifier's token after
its last node, which is what the verifier alone emits: lossless for greedy and for sampling, for
every drafter (Gumbel-max coupling; Daliri et al. 2024, "Coupling without communication and
drafter-invariant speculative decoding"). With a deterministic set of sibling candidates
(n-gram tries, top-k children) a position is accepted with probability q(candidates), the most
any lossless rule can give (SpecInfer's multi-step rejection reaches the same for such drafts).
"""
from __future__ import annotations

from dataclasses import dataclass

MAX_NODES = 64          # nodes per tree (root included): a node's ancestors are one int64 bitmask


def depths(parents: list[int]) -> list[int]:
    d = [0] * len(parents)
    for m in range(1, len(parents)):
        d[m] = d[parents[m]] + 1
    return d


def masks(parents: list[int]) -> list[int]:
    """Bit j of masks[m]: node j is m or an ancestor of m."""
    out = [1] * len(parents)
    for m in range(1, len(parents)):
        out[m] = out[parents[m]] | (1 << m)
    return out


def check(parents: list[int]) -> None:
    if not parents or parents[0] != -1:
        raise ValueError("a tree's node 0 is its root (parent -1)")
    if len(parents) > MAX_NODES:
        raise ValueError(f"a tree has at most {MAX_NODES} nodes, got {len(parents)}")
    for m in range(1, len(parents)):
        if not 0 <= parents[m] < m:
            raise ValueError(f"node {m}'s parent {parents[m]} must come before it")


@dataclass
class TreeRows:
    """One sequence's rows of a tree verify step (n nodes, padded to T)."""
    positions: list[int]      # RoPE positions s + depth
    storage: list[int]        # s + m (pads: s)
    mask: list[int]           # ancestor bits (pads: the root's)


def rows(start: int, parents: list[int], width: int) -> TreeRows:
    d, m = depths(parents), masks(parents)
    n = len(parents)
    pad = width - n
    return TreeRows([start + x for x in d] + [start] * pad, list(range(start, start + n)) + [start] * pad,
                    m + [1] * pad)


def accepted_path(tokens: list[int], parents: list[int], target: list[int]) -> list[int]:
    """tokens[m]: node m's token (tokens[0], the root's, is not tested); target[m]: the verifier's
    token after node m. Returns the accepted path's nodes [0, a1, ..., ak] (root first)."""
    n = len(parents)
    ok = [True] + [False] * (n - 1)
    best, best_depth = 0, 0
    d = depths(parents)
    for m in range(1, n):
        ok[m] = ok[parents[m]] and tokens[m] == target[parents[m]]
        if ok[m] and d[m] > best_depth:
            best, best_depth = m, d[m]
    path = []
    m = best
    while m >= 0:
        path.append(m)
        m = parents[m]
    return path[::-1]


def chain_parents(n: int) -> list[int]:
    return list(range(-1, n - 1))


class Trie:
    """Builds a token tree under a root by merging continuations (n-gram drafts): each
    continuation is a path from the root; shared prefixes share nodes. Insertion order is the
    priority: nodes beyond max_nodes are dropped (a continuation is cut where the budget ends)."""

    def __init__(self, max_nodes: int):
        self.max_nodes = max_nodes
        self.tokens: list[int] = [0]
        self.parents: list[int] = [-1]
        self.children: list[dict[int, int]] = [{}]

    def __len__(self) -> int:
        return len(self.tokens)

    def add(self, continuation: list[int]) -> None:
        node = 0
        for tok in continuation:
            nxt = self.children[node].get(tok)
            if nxt is None:
                if len(self.tokens) >= self.max_nodes:
                    return
                nxt = len(self.tokens)
                self.tokens.append(tok)
                self.parents.append(node)
                self.children.append({})
                self.children[node][tok] = nxt
            node = nxt
