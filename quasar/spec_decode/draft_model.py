"""A separate small draft model (same tokenizer) with its own KV cache, rolled back to the
accepted length after every step."""
from __future__ import annotations

import torch

from .drafter import Draft, Drafter
from .tree_grow import grow
from .sampling import SamplingParams, probs, sample


class DraftModelDrafter(Drafter):
    name = "draft_model"

    @classmethod
    def draft_model(cls, cfg):
        return cfg.model

    @classmethod
    def from_config(cls, cfg, runner, sampling, draft_runner=None):
        return cls(draft_runner, sampling, tree=cfg.tree)

    def __init__(self, runner, sp: SamplingParams, generator: torch.Generator | None = None, tree=None):
        """runner: the draft model's ModelRunner (its own KV cache). tree:
        quasar.config.TreeConfig: grow EAGLE-2 trees (quasar.spec_decode.tree_grow); None: chains."""
        self.runner, self.sp = runner, sp
        self.generator = generator
        self.cached = 0
        self.tree = tree

    def begin(self, prompt):
        self.cached = 0

    def propose(self, ctx, last, k):
        m = self.runner
        L = len(ctx)                       # positions 0 .. L-1; ctx[-1] = last
        if L + k > m.max_seq_len:
            k = m.max_seq_len - L
        if k <= 0:
            return Draft(last.new_empty(0))
        # catch the draft cache up on the tokens it has not seen (at least `last`)
        chunk = torch.tensor(ctx[self.cached:L - 1], dtype=torch.int64, device=m.device)
        chunk = torch.cat([chunk, last.view(1)]).view(1, -1)
        positions = torch.arange(self.cached, L, device=m.device).view(1, -1)
        logits = m(chunk, positions, kv_len=L, last_only=True)[0, -1]
        toks, dists = [], []
        for i in range(k):
            if self.sp.greedy:
                nxt = logits.argmax(-1)
            else:
                p = probs(logits, self.sp)
                dists.append(p)
                nxt = sample(p, self.generator)
            toks.append(nxt.view(1))
            if i + 1 < k:
                pos = torch.full((1, 1), L + i, dtype=torch.int64, device=m.device)
                logits = m.step(nxt.view(1, 1), pos, kv_len=L + i + 1)[0, -1]
        self.written = L + k - 1           # the draft cache now holds positions < L + k - 1
        return Draft(torch.cat(toks), torch.stack(dists) if dists else None)

    def commit(self, cached):
        self.cached = min(cached, getattr(self, "written", cached))

    # the batched runtime: the draft model's own paged cache, addressed by the verifier's block
    # tables (same block size and count), caught up on each sequence's unseen tokens in one
    # varlen step, then k - 1 batched one-token steps
    on_device = True

    def start(self, seq):
        seq.drafter_state = 0                  # positions of seq whose KV the draft cache holds

    def propose_batch(self, seqs, ks, engine):
        from .drafter import BatchDraft
        k_max = max(ks, default=0)
        if k_max == 0:
            return Drafter.propose_batch(self, seqs, ks, engine)
        m = self.runner
        starts = [s.drafter_state for s in seqs]
        ctx, ids, rows = engine.catch_up_ctx(seqs, starts)
        logits = m.run(ids, ctx, mode="prefill", rows=rows)
        if self.tree is not None:
            draft = grow(engine, seqs, ks, m, "verify", logits, self.tree)
            for s, c in zip(seqs, engine.cached):
                s.drafter_state = ("written", c + 1)       # the root's K/V; the tree's are not a chain
            return draft
        cur = engine.pick(logits, seqs, [c + 1 for c in engine.cached])
        toks = [cur]
        for j in range(1, k_max):
            pos = [c + j for c in engine.cached]
            ctx = engine.token_ctx(seqs, pos, [j < k for k in ks])
            cur = engine.pick(m.run(cur, ctx, mode="decode"), seqs, [p + 1 for p in pos])
            toks.append(cur)
        for s, c, k in zip(seqs, engine.cached, ks):
            s.drafter_state = ("written", c + max(k, 1))     # valid draft KV below this position
        return BatchDraft(torch.stack(toks, 1), list(ks))

    def commit_seq(self, seq, cached):
        st = seq.drafter_state
        seq.drafter_state = min(cached, st[1]) if isinstance(st, tuple) else min(cached, st)
