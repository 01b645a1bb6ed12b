"""EAGLE-2's dynamic draft tree, grown by a draft model (draft_model) or by the target in its draft
scheme (quantized_self), for every sequence of a batch at once.

    depth 1:  the root's top-k children (the draft's k best tokens after the sequence's last token)
    depth d:  the top-k nodes of depth d - 1 by cumulative draft log-probability are expanded: one
              draft step over them (a tree step: each sees the context, its ancestors and itself),
              each gets its top-k children
    finally:  the max_nodes - 1 nodes of highest cumulative log-probability (an ancestor never
              scores below its descendant, so the set is a tree) in storage order

A growth step's chunk is [root, frontier...] per sequence: the root row comes first so that the
tree mask's base is the root's storage index c (quasar.engine.context.StepContext), and node
expanded e-th is written at storage c + 1 + e. Expansion stops where the storage would pass the
sequence's node budget k (the slots the engine reserved, c + k); the verify step then writes its
own nodes at c + m.

For sampled requests a node's children are the Gumbel-top-k of the draft's warped logits under the
request's noise at that position (quasar.spec_decode.sampling.pick_topk): the child the draft
itself would sample comes first, and acceptance stays the exact-match test of the verifier's own
draw (lossless whatever the tree).
"""
from __future__ import annotations

import torch

from .drafter import BatchDraft
from .sampling import pick_topk
from .tree import MAX_NODES


def grown_slots(tree) -> int:
    """Storage past the root that growing a tree of this shape writes."""
    return 1 + tree.topk * (tree.depth - 1)


def _topk(engine, seqs, logits, positions, k):
    params = [s.sampling for s in seqs]
    dev = logits.device
    seeds = torch.tensor([p.seed or 0 for p in params], dtype=torch.int64, device=dev)
    tok, lp = pick_topk(logits, params, seeds, torch.tensor(positions, dtype=torch.int64, device=dev), k)
    return tok.tolist(), lp.tolist()


def grow(engine, seqs, ks: list[int], runner, mode: str, root_logits: torch.Tensor, tree) -> BatchDraft:
    """seqs: the step's sequences (last token at position engine.cached[b], its draft K/V already
    written at that storage index); ks: each sequence's node budget (0 = no draft);
    root_logits [B, V]: the draft's logits at the root; runner / mode: the draft's steps."""
    from quasar.engine.context import StepContext   # (lazy: quasar.engine imports the drafters)
    B = len(seqs)
    dev = engine.device
    cached = engine.cached
    topk = tree.topk
    # per sequence: node tokens, parents, depths, cumulative log-probabilities, storage offsets
    tok = [[0] for _ in range(B)]
    par = [[-1] for _ in range(B)]
    dep = [[0] for _ in range(B)]
    score = [[0.0] for _ in range(B)]
    off = [{0: 0} for _ in range(B)]
    room = [min(k, engine.max_seq_len - c - 1) for k, c in zip(ks, cached)]
    live = [k > 0 and r >= 1 for k, r in zip(ks, room)]
    toks, lps = _topk(engine, seqs, root_logits, [c + 1 for c in cached], topk)
    for b in range(B):
        if live[b]:
            _add(tok[b], par[b], dep[b], score[b], 0, toks[b], lps[b])
    for d in range(2, tree.depth + 1):
        frontier = []
        for b in range(B):
            cand = [m for m in range(len(tok[b])) if dep[b][m] == d - 1 and score[b][m] > float("-inf")]
            cand.sort(key=lambda m: (-score[b][m], m))
            # a node is expanded only while its storage stays inside the sequence's room
            n_exp = len(off[b])
            cand = cand[:max(0, min(topk, room[b] + 1 - n_exp, MAX_NODES - n_exp))] if live[b] else []
            for m in cand:
                off[b][m] = len(off[b])
            frontier.append(cand)
        F = 1 + max(len(f) for f in frontier)
        if F == 1:
            break
        ids, pos, slots, qs, lens, tpos, tmask, rows = [], [], [], [0], [], [], [], []
        scratch = runner.scratch_slot
        for b, s in enumerate(seqs):
            c = cached[b]
            f = frontier[b]
            ids += [s.last_token] + [tok[b][m] for m in f] + [0] * (F - 1 - len(f))
            pos += [c] + [c + dep[b][m] for m in f] + [c] * (F - 1 - len(f))
            tpos += [c] + [c + off[b][m] for m in f] + [c] * (F - 1 - len(f))
            tmask += [1] + [_ancestor_bits(m, par[b], off[b]) for m in f] + [1] * (F - 1 - len(f))
            slots += engine.blocks.slots_at(s.table, [c] + [c + off[b][m] for m in f]) + [scratch] * (F - 1 - len(f))
            lens.append(c + 1 + max([off[b][m] for m in f], default=0))
            rows += [qs[-1] + 1 + i for i in range(len(f))]
            qs.append(qs[-1] + F)
        ctx = StepContext.make(pos, slots, qs, [s.table.blocks for s in seqs], lens, F, dev,
                               runner.max_blocks, tpos, tmask)
        logits = runner.run(torch.tensor(ids, dtype=torch.int64, device=dev), ctx, mode)
        fr_seqs = [s for s, f in zip(seqs, frontier) for _ in f]
        fr_pos = [cached[b] + dep[b][m] + 1 for b, f in enumerate(frontier) for m in f]
        toks, lps = _topk(engine, fr_seqs, logits.index_select(0, torch.tensor(rows, device=dev)), fr_pos, topk)
        i = 0
        for b, f in enumerate(frontier):
            for m in f:
                _add(tok[b], par[b], dep[b], score[b], m, toks[i], lps[i])
                i += 1
    return select(tok, par, score, [min(k, tree.max_nodes - 1) for k in ks], dev)


def _ancestor_bits(m: int, par: list[int], off: dict) -> int:
    bits = 0
    while m >= 0:
        bits |= 1 << off[m]
        m = par[m]
    return bits


def _add(tok, par, dep, score, parent, toks, lps):
    for t, lp in zip(toks, lps):
        if lp == float("-inf"):          # filtered out by top-k / top-p: never a candidate
            continue
        tok.append(t)
        par.append(parent)
        dep.append(dep[parent] + 1)
        score.append(score[parent] + lp)


def select(tok, par, score, budgets, dev) -> BatchDraft:
    """Keep each tree's `budget` best nodes by cumulative log-probability (ties: earlier node),
    renumbered in storage order."""
    out_tok, out_par = [], []
    for t, p, s, n in zip(tok, par, score, budgets):
        keep = sorted(range(1, len(t)), key=lambda m: (-s[m], m))[:n]
        keep = [0] + sorted(keep)
        new = {m: i for i, m in enumerate(keep)}
        out_tok.append([t[m] for m in keep[1:]])
        out_par.append([-1] + [new[p[m]] for m in keep[1:]])
    width = max((len(t) for t in out_tok), default=0)
    rows = [t + [0] * (width - len(t)) for t in out_tok]
    return BatchDraft(torch.tensor(rows, dtype=torch.int64).view(len(tok), width).to(dev),
                      [len(t) for t in out_tok], out_par)
