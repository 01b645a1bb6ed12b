"""Prompt-lookup n-gram drafter (Quasar's drafter; vLLM's `ngram` speculative method).

Find the most recent earlier occurrence of the context's last n tokens, trying n from `max`
down to `min`, and propose the (up to) k tokens that followed it. No match: propose nothing,
and the step is a plain decode. The drafts are one-hot (no draft distribution).

`lookup` is the plain definition; `NgramDrafter` keeps an incremental index (n-gram -> most
recent start) so that a step costs O(n_max) dictionary look-ups instead of a scan of the context.
"""
from __future__ import annotations

import torch

from . import tree as T
from .drafter import Draft, Drafter


def lookup(ctx: list[int], k: int, n_min: int, n_max: int) -> list[int]:
    """The continuation (<= k tokens) after the most recent earlier match of the last n tokens."""
    length = len(ctx)
    for n in range(min(n_max, length - 1), n_min - 1, -1):
        tail = ctx[length - n:]
        for start in range(length - n - 1, -1, -1):     # most recent first, tail itself excluded
            if ctx[start:start + n] == tail:
                return ctx[start + n:start + n + k]
    return []


class NgramDrafter(Drafter):
    name = "ngram"

    @classmethod
    def from_config(cls, cfg, runner, sampling, draft_runner=None):
        return cls(runner.device, cfg.ngram.min, cfg.ngram.max, cfg.tree)

    def __init__(self, device, n_min: int = 1, n_max: int = 3, tree=None):
        """tree: quasar.config.TreeConfig (None: chains). A tree merges up to tree.topk matches
        (longer n-grams first, then more recent occurrences; distinct continuations of up to
        tree.depth tokens) into a trie of up to tree.max_nodes nodes (lookahead decoding,
        SuffixDecoding)."""
        self.device = device
        self.n_min, self.n_max = n_min, n_max
        self.tree = tree
        self.begin([])

    def begin(self, prompt):
        self.index = {n: {} for n in range(self.n_min, self.n_max + 1)}
        self.indexed = {n: 0 for n in self.index}   # n-grams starting before this are indexed

    def _catch_up(self, ctx: list[int]) -> None:
        length = len(ctx)
        for n, idx in self.index.items():
            # index every n-gram that starts at or before length - n - 1 (all but the tail)
            for start in range(self.indexed[n], length - n):
                idx.setdefault(tuple(ctx[start:start + n]), []).append(start)
            self.indexed[n] = max(self.indexed[n], length - n)

    def find(self, ctx: list[int], k: int) -> list[int]:
        self._catch_up(ctx)
        length = len(ctx)
        for n in range(min(self.n_max, length - 1), self.n_min - 1, -1):
            starts = self.index[n].get(tuple(ctx[length - n:]))
            if starts:
                return ctx[starts[-1] + n:starts[-1] + n + k]
        return []

    def find_tree(self, ctx: list[int], budget: int) -> tuple[list[int], list[int]]:
        """(node tokens without the root, parents with the root) of the trie of matches, at most
        `budget` drafted nodes."""
        self._catch_up(ctx)
        tr = self.tree
        trie = T.Trie(min(tr.max_nodes, budget + 1))
        seen: set = set()
        length = len(ctx)
        for n in range(min(self.n_max, length - 1), self.n_min - 1, -1):
            for start in reversed(self.index[n].get(tuple(ctx[length - n:]), ())):
                cont = tuple(ctx[start + n:start + n + tr.depth])
                if cont and cont not in seen:
                    seen.add(cont)
                    trie.add(list(cont))
                    if len(seen) >= tr.topk:
                        return trie.tokens[1:], trie.parents
        return trie.tokens[1:], trie.parents

    def propose(self, ctx, last, k):
        return Draft(torch.tensor(self.find(ctx, k), dtype=torch.int64, device=self.device))

    # the batched runtime: an index per sequence (its drafter state), matched on the host
    def start(self, seq):
        seq.drafter_state = self.start_state()

    def start_state(self):
        return NgramDrafter(self.device, self.n_min, self.n_max, self.tree)

    def propose_batch(self, seqs, ks, engine):
        from .drafter import BatchDraft
        if self.tree is not None:
            trees = [s.drafter_state.find_tree(s.context, k) if k > 0 else ([], [-1]) for s, k in zip(seqs, ks)]
            width = max((len(t) for t, _ in trees), default=0)
            rows = [t + [0] * (width - len(t)) for t, _ in trees]
            return BatchDraft(torch.tensor(rows, dtype=torch.int64).view(len(seqs), width).to(engine.device),
                              [len(t) for t, _ in trees], [p for _, p in trees])
        found = [s.drafter_state.find(s.context, k) if k > 0 else [] for s, k in zip(seqs, ks)]
        width = max((len(f) for f in found), default=0)
        rows = [f + [0] * (width - len(f)) for f in found]
        return BatchDraft(torch.tensor(rows, dtype=torch.int64).view(len(seqs), width).to(engine.device),
                          [len(f) for f in found])
