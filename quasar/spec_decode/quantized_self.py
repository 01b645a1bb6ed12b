"""QSpec's drafter: k autoregressive steps of the *same* model with its linears switched to the
draft scheme (w4a4 over the verifier's w4a16 codes by default). It shares the weights and the KV
cache; the verification pass then overwrites the KV entries the draft wrote."""
from __future__ import annotations

import torch

from .drafter import Draft, Drafter
from .tree_grow import grow
from .sampling import SamplingParams, probs, sample


class QuantizedSelfDrafter(Drafter):
    name = "quantized_self"

    @classmethod
    def draft_scheme(cls, cfg):
        from quasar import quant
        return cfg.scheme or quant.DEFAULT_DRAFT

    @classmethod
    def from_config(cls, cfg, runner, sampling, draft_runner=None):
        return cls(runner, sampling, tree=cfg.tree)

    def __init__(self, runner, sp: SamplingParams, generator: torch.Generator | None = None, tree=None):
        """runner: the verifier's ModelRunner (quasar.engine.ModelRunner). tree:
        quasar.config.TreeConfig: grow EAGLE-2 trees (quasar.spec_decode.tree_grow); None: chains."""
        if getattr(runner.model, "draft_scheme", None) is None:
            raise ValueError("the model was loaded without a draft scheme")
        self.runner, self.sp = runner, sp
        self.generator = generator
        self.tree = tree

    def propose(self, ctx, last, k):
        m = self.runner
        pos = len(ctx) - 1
        toks, dists = [], []
        cur = last.view(1, 1)
        for i in range(k):
            positions = torch.full((1, 1), pos + i, dtype=torch.int64, device=m.device)
            logits = m.step(cur, positions, kv_len=pos + i + 1, mode="draft")[0, -1]
            if self.sp.greedy:
                nxt = logits.argmax(-1)
            else:
                p = probs(logits, self.sp)
                dists.append(p)
                nxt = sample(p, self.generator)
            toks.append(nxt.view(1))
            cur = nxt.view(1, 1)
        return Draft(torch.cat(toks), torch.stack(dists) if dists else None)

    # the batched runtime: K draft steps of every sequence together, in the draft scheme, over the
    # verifier's paged cache (the verify step then overwrites the slots the drafts wrote)
    on_device = True

    def propose_batch(self, seqs, ks, engine):
        from .drafter import BatchDraft
        k_max = max(ks, default=0)
        cur = engine.last
        if self.tree is not None and k_max > 0:
            ctx = engine.token_ctx(seqs, list(engine.cached), [True] * len(seqs))
            root = self.runner.run(cur, ctx, mode="draft")
            return grow(engine, seqs, ks, self.runner, "draft", root, self.tree)
        toks = []
        for j in range(k_max):
            # token j of sequence b sits at position cached_b + j; a sequence drafting fewer than
            # k_max tokens writes its extra steps to the scratch slot
            pos = [c + j for c in engine.cached]
            ctx = engine.token_ctx(seqs, pos, [j < k for k in ks])
            logits = self.runner.run(cur, ctx, mode="draft")
            cur = engine.pick(logits, seqs, [p + 1 for p in pos])
            toks.append(cur)
        tokens = torch.stack(toks, 1) if toks else cur.new_zeros(len(seqs), 0)
        return BatchDraft(tokens, list(ks))
