"""SpecMQuant's hierarchical verification (Zhang et al., arXiv 2505.22179): a cheap stage-1 tree is
verified by an intermediate model, which turns it into a chain; the target verifies only the chain.

    repeat until the chain has drafter.min_chain tokens (or the step's budget):
      tree  = the n-gram trie of the context + the chain so far        stage 1 (drafter.tree)
      path  = the intermediate's tree verification of it               stage 2: one tree step
      chain += the path's tokens + the intermediate's token after it   (>= 1 token per round)
    the target verifies the chain                                      stage 3: the engine's chain step

The intermediate is the target itself in a cheaper scheme (`drafter.intermediate: self`, the
scheme `drafter.scheme`, default w4a16; it drafts over the target's paged cache, whose slots the
chain's verification then overwrites) or a separate draft model (`drafter.intermediate: PATH`, its
own cache addressed by the target's block tables). Stage 2 uses the same exact-match acceptance
as every verify step (the intermediate's argmax, or its draw under the request's noise), and the
accepted path's K/V are compacted in the intermediate's cache, so round r + 1 continues from a
cache that holds the chain. SpecMQuant's stage 1 is an EAGLE-2 head; ours is the prompt-lookup
trie (no trained head exists for these models).
"""
from __future__ import annotations

import torch

from . import tree as T
from .drafter import BatchDraft, Drafter
from .ngram import NgramDrafter


class HierarchicalDrafter(Drafter):
    name = "hierarchical"
    on_device = True

    @classmethod
    def drafts_trees(cls, cfg) -> bool:
        return False            # the intermediate verifies the trees; the target gets a chain

    @classmethod
    def draft_scheme(cls, cfg):
        from quasar import quant
        return (cfg.scheme or quant.DEFAULT_INTERMEDIATE) if cfg.intermediate == "self" else None

    @classmethod
    def draft_model(cls, cfg):
        return None if cfg.intermediate == "self" else cfg.intermediate

    @classmethod
    def from_config(cls, cfg, runner, sampling, draft_runner=None):
        if cfg.intermediate == "self":
            return cls(runner, "draft", cfg.tree, cfg.min_chain, cfg.ngram.min, cfg.ngram.max, own_cache=False)
        return cls(draft_runner, "verify", cfg.tree, cfg.min_chain, cfg.ngram.min, cfg.ngram.max, own_cache=True)

    def __init__(self, runner, mode: str, tree, min_chain: int, n_min: int = 1, n_max: int = 3,
                 own_cache: bool = False):
        """runner / mode: the intermediate's steps (the target's runner in "draft" mode, or a
        draft model's runner); tree: quasar.config.TreeConfig of the stage-1 n-gram trie;
        own_cache: the intermediate keeps its own cache (a draft model), caught up every step."""
        self.runner, self.mode, self.tree, self.min_chain = runner, mode, tree, min_chain
        self.ngram = NgramDrafter(runner.device, n_min, n_max, tree)
        self.own_cache = own_cache
        self.proposals = self.rounds = 0      # per sequence: target steps drafted for, intermediate tree steps

    @property
    def rounds_per_step(self) -> float:
        """Intermediate tree steps per target step of a sequence (what a step costs the intermediate)."""
        return self.rounds / self.proposals if self.proposals else float("nan")

    @classmethod
    def step_tokens(cls, cfg) -> int:
        """The longest chain a step builds: min_chain, plus up to a path and a token past it."""
        return cfg.min_chain + cfg.tree.depth

    def start(self, seq):
        seq.drafter_state = [self.ngram.start_state(), 0]   # the trie index; the intermediate's valid KV

    def propose_batch(self, seqs, ks, engine):
        B = len(seqs)
        dev = engine.device
        chains: list[list[int]] = [[] for _ in range(B)]
        if max(ks, default=0) == 0:
            return BatchDraft(torch.zeros(B, 0, dtype=torch.int64, device=dev), [0] * B)
        if self.own_cache:          # the draft model's cache catches up on the tokens it has not seen
            starts = [min(s.drafter_state[1], c) for s, c in zip(seqs, engine.cached)]
            ctx, ids, rows = engine.catch_up_ctx(seqs, starts)
            self.runner.run(ids, ctx, mode="prefill", rows=rows)
        goal = [min(self.min_chain, k) for k in ks]
        self.proposals += sum(1 for k in ks if k > 0)
        while True:
            act = [b for b in range(B) if len(chains[b]) < goal[b]]
            if not act:
                break
            self.rounds += len(act)
            self._round(engine, [seqs[b] for b in act], [chains[b] for b in act], [ks[b] for b in act],
                        [engine.cached[b] for b in act])
        for s, c, ch in zip(seqs, engine.cached, chains):
            s.drafter_state[1] = c + len(ch)            # the chain's last token is not written yet
        counts = [min(len(ch), k) for ch, k in zip(chains, ks)]
        width = max(counts)
        rows = [ch[:n] + [0] * (width - n) for ch, n in zip(chains, counts)]
        return BatchDraft(torch.tensor(rows, dtype=torch.int64).view(B, width).to(dev), counts)

    def _round(self, engine, seqs, chains, ks, cached) -> None:
        """One stage-2 tree step of the intermediate over each sequence's n-gram trie; extends
        each chain by the accepted path and the intermediate's next token."""
        from quasar.engine.context import StepContext   # (lazy: quasar.engine imports the drafters)
        dev = engine.device
        trees, starts = [], []
        for s, ch, k, c in zip(seqs, chains, ks, cached):
            ctx_tokens = s.context + ch
            budget = max(0, k - len(ch) - 1)     # path + next token <= k: storage stays below c + k
            toks, par = s.drafter_state[0].find_tree(ctx_tokens, budget) if budget else ([], [-1])
            trees.append(([ctx_tokens[-1]] + toks, par))
            starts.append(c + len(ch))
        n_max = max(len(p) for _, p in trees)
        W = min((w for w in getattr(self.runner, "tree_lengths", ()) if w >= n_max), default=n_max)
        ids, pos, slots, qs, lens, tpos, tmask = [], [], [], [0], [], [], []
        scratch = self.runner.scratch_slot
        for s, (tok, par), st in zip(seqs, trees, starts):
            n = len(par)
            r = T.rows(st, par, W)
            ids += tok + [0] * (W - n)
            pos += r.positions
            tpos += r.storage
            tmask += r.mask
            slots += engine.blocks.slots_at(s.table, range(st, st + n)) + [scratch] * (W - n)
            qs.append(qs[-1] + W)
            lens.append(st + n)
        ctx = StepContext.make(pos, slots, qs, [s.table.blocks for s in seqs], lens, W, dev,
                               self.runner.max_blocks, tpos, tmask)
        logits = self.runner.run(torch.tensor(ids, dtype=torch.int64, device=dev), ctx, self.mode)
        target = engine.pick(logits, [s for s in seqs for _ in range(W)], [p + 1 for p in pos]).view(len(seqs), W)
        host = target.tolist()
        src, dst = [], []
        for b, (s, (tok, par), st, ch) in enumerate(zip(seqs, trees, starts, chains)):
            path = T.accepted_path(tok, par, host[b])
            ch += [tok[a] for a in path[1:]] + [host[b][path[-1]]]
            moved = [(a, i) for i, a in enumerate(path) if a != i]
            if moved:
                src += engine.blocks.slots_at(s.table, [st + a for a, _ in moved])
                dst += engine.blocks.slots_at(s.table, [st + i for _, i in moved])
        if src:
            self.runner.cache.move_slots(torch.tensor(src, dtype=torch.int64, device=dev),
                                         torch.tensor(dst, dtype=torch.int64, device=dev))

    def commit_seq(self, seq, cached):
        seq.drafter_state[1] = min(cached, seq.drafter_state[1])

