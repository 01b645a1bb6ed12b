"""Issue 20 (SpecMQuant): tree drafts and hierarchical verification on the batched engine, on tiny
random models.

- greedy output == the verifier's own AR decode, token for token, at batch 8, for every tree
  drafter (n-gram trie, EAGLE-2 trees grown by a draft model and by the target's draft scheme)
  and for the hierarchical pipeline (intermediate: the target's cheaper scheme, or a draft model);
- compaction: after every step the cache holds, at every committed position, what AR decoding
  wrote there, under trees that put the right path on a random branch;
- lossless sampling for trees (chi-square against transformers' joint distribution), and the
  test rejects a wrong rule that accepts siblings independently;
- config errors name the key and the fix.
"""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from tiny import load_hf, load_quasar, make_tiny
from quasar import backends
from quasar.config import TreeConfig, VerifierConfig, from_dict
from quasar.engine.engine import Engine
from quasar.engine.model_runner import ModelRunner
from quasar.engine.sequence import Sequence, StopConditions
from quasar.errors import ConfigError
from quasar.model.loader import build_model
from quasar.spec_decode import tree as T
from quasar.spec_decode.draft_model import DraftModelDrafter
from quasar.spec_decode.drafter import BatchDraft, Drafter
from quasar.spec_decode.hierarchical import HierarchicalDrafter
from quasar.spec_decode.ngram import NgramDrafter
from quasar.spec_decode.quantized_self import QuantizedSelfDrafter
from quasar.spec_decode.sampling import SamplingParams, probs

S = 160
GREEDY = SamplingParams()
TREE = TreeConfig(depth=3, topk=3, max_nodes=12)


def prompts(seed=0, lengths=(5, 17, 33, 9, 40, 3, 21, 12)):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        x = torch.randint(0, 256, (n,), generator=g).tolist()
        out.append(x + x[:8])
    return out


@pytest.fixture(scope="module")
def paths(tiny_root):
    return make_tiny(tiny_root, "qwen3", seed=3), make_tiny(tiny_root, "qwen3", seed=4, num_hidden_layers=1)


def model(path, quant=None, draft_scheme=None, **kw):
    return build_model(path, backends.get("cpu"), torch.float32, S, VerifierConfig(quant=quant, **kw),
                       draft_scheme=draft_scheme)


def runner(m, blocks=256, bs=4):
    return ModelRunner(m, kv_blocks=blocks, block_size=bs)


def ar(m, ps, n):
    e = Engine(runner(m), Drafter(), 0, max_batch_size=8, max_prefill_tokens=48)
    return [s.output_ids for s in e.run([Sequence(p, sampling=GREEDY, stop=StopConditions(n)) for p in ps])]


def run(e, ps, n=24):
    out = e.run([Sequence(p, sampling=GREEDY, stop=StopConditions(n)) for p in ps])
    e.check()
    return out


# ------------------------------------------------------------------ greedy parity

@pytest.mark.parametrize("quant,kw,drafter", [(None, {}, d) for d in ("ngram", "draft_model", "quantized_self",
                                                                      "hier-self", "hier-model")]
                         + [("w8a8-int8", {}, d) for d in ("ngram", "quantized_self", "hier-self")])
def test_greedy_parity_at_batch_8_tree_and_hierarchical(paths, quant, kw, drafter):
    target, draft = paths
    ds = "w4a16" if drafter in ("quantized_self", "hier-self") else None
    m = model(target, quant, ds, **kw)
    ps = prompts()
    want = ar(m, ps, 24)
    r = runner(m)
    if drafter == "ngram":
        d, k = NgramDrafter("cpu", 1, 3, TREE), TREE.max_nodes - 1
    elif drafter == "draft_model":
        d, k = DraftModelDrafter(runner(model(draft)), GREEDY, tree=TREE), TREE.max_nodes - 1
    elif drafter == "quantized_self":
        d, k = QuantizedSelfDrafter(r, GREEDY, tree=TREE), TREE.max_nodes - 1
    elif drafter == "hier-self":
        d, k = HierarchicalDrafter(r, "draft", TREE, 4), 4 + TREE.depth
    else:
        d, k = HierarchicalDrafter(runner(model(draft)), "verify", TREE, 4, own_cache=True), 4 + TREE.depth
    e = Engine(r, d, k, max_batch_size=8, max_prefill_tokens=48)
    out = run(e, ps)
    assert [s.output_ids for s in out] == want
    assert sum(s.stats.drafted for s in out) > 0


def test_a_self_drafted_chain_shaped_tree_accepts_its_whole_depth(paths):
    """The target as its own tree drafter with top-1 growth: every step accepts depth + 1 tokens,
    which needs the growth steps' masks, positions and slots to be right."""
    target, _ = paths
    m = model(target)
    tc = TreeConfig(depth=4, topk=1, max_nodes=12)
    e = Engine(runner(m), DraftModelDrafter(runner(model(target)), GREEDY, tree=tc), 11, max_batch_size=8,
               max_prefill_tokens=48)
    out = run(e, prompts()[:4], n=21)       # 1 (prefill) + 4 steps x 5
    assert [s.output_ids for s in out] == ar(m, prompts()[:4], 21)
    assert all(s.stats.tau == 5.0 for s in out), [s.stats.tau for s in out]


def test_grown_tree_children_are_the_drafts_top_k_given_their_path(paths):
    """Every node of an EAGLE-2 tree grown by a draft model is among the draft's top-k tokens
    after its root path (transformers computes the draft's logits): a sibling leaking into a
    node's attention would change them."""
    target, draft = paths
    hf = load_hf(draft)
    tc = TreeConfig(depth=3, topk=3, max_nodes=40)
    d = DraftModelDrafter(runner(model(draft)), GREEDY, tree=tc)
    seen = []
    orig = d.propose_batch

    def spy(seqs, ks, engine):
        out = orig(seqs, ks, engine)
        if out.parents is not None:
            seen.extend((list(s.context), out.tokens[b, :out.counts[b]].tolist(), out.parents[b])
                        for b, s in enumerate(seqs))
        return out
    d.propose_batch = spy
    e = Engine(runner(model(target)), d, 39, max_batch_size=8, max_prefill_tokens=48)
    run(e, prompts()[:3], n=45)
    checked = 0
    for ctx, toks, par in seen[:6]:
        tok = [ctx[-1]] + toks
        for m in range(1, len(par)):
            path, x = [], par[m]
            while x > 0:
                path.append(tok[x])
                x = par[x]
            with torch.no_grad():
                logits = hf(torch.tensor([ctx + path[::-1]])).logits[0, -1]
            assert tok[m] in logits.topk(tc.topk).indices.tolist()
            checked += 1
    assert checked > 50


# ------------------------------------------------------------------ compaction

class OracleTree(Drafter):
    """Test drafter: random trees in which the AR continuation (known in advance) runs down a
    random branch to a random depth, among decoys."""
    name = "oracle"

    def __init__(self, truth: dict, seed: int):
        self.truth, self.rng = truth, random.Random(seed)

    def propose_batch(self, seqs, ks, engine):
        trees = []
        for s, k in zip(seqs, ks):
            rest = self.truth[tuple(s.prompt_ids)][len(s.output_ids):]
            tok, par = [0], [-1]
            node = 0
            depth = self.rng.randint(0, min(4, k // 3))
            for i in range(depth):                    # decoys first, then the right child, at each level
                for _ in range(self.rng.randint(0, 2)):
                    tok.append(self.rng.randrange(256))
                    par.append(node)
                if i < len(rest):
                    tok.append(rest[i])
                    par.append(node)
                    node = len(tok) - 1
            while len(tok) < min(k + 1, 12) and self.rng.random() < 0.7:   # more decoys anywhere
                tok.append(self.rng.randrange(256))
                par.append(self.rng.randrange(len(tok) - 1))
            T.check(par)
            trees.append((tok[1:k + 1], par[:k + 1]))
        width = max(len(t) for t, _ in trees)
        rows = [t + [0] * (width - len(t)) for t, _ in trees]
        return BatchDraft(torch.tensor(rows, dtype=torch.int64).view(len(seqs), width), [len(t) for t, _ in trees],
                          [p for _, p in trees])


def _kv(e, s, n):
    """Every layer's K and V at positions [0, n) of sequence s: [n, L, Hkv, D] each."""
    slots = torch.tensor(e.blocks.slots(s.table, 0, n))
    c = e.runner.cache
    b, o = slots // c.block_size, slots % c.block_size
    return c.k[:, b, :, o], c.v[:, b, :, o]


def test_compaction_keeps_the_cache_equal_to_the_ar_cache_after_every_step(paths):
    target, _ = paths
    m = model(target)
    ps = prompts(5)
    ar_e = Engine(runner(m), Drafter(), 0, max_batch_size=8, max_prefill_tokens=48)
    ar_seqs = [Sequence(p, sampling=GREEDY, stop=StopConditions(30)) for p in ps]
    ref = {}                        # each AR sequence's K/V, as of its last step before it finished
    for a in ar_seqs:
        ar_e.add(a)
    while ar_e.has_work:
        ar_e.step()
        for a in ar_seqs:
            if not a.is_finished and not a.prefilling:
                ref[id(a)] = _kv(ar_e, a, a.num_computed)
    truth = {tuple(s.prompt_ids): s.output_ids for s in ar_seqs}
    e = Engine(runner(m), OracleTree(truth, 1), 11, max_batch_size=8, max_prefill_tokens=48, adaptive=False)
    seqs = [Sequence(p, sampling=GREEDY, stop=StopConditions(30)) for p in ps]
    for s in seqs:
        e.add(s)
    steps = 0
    while e.has_work:
        e.step()
        for s, a in zip(seqs, ar_seqs):
            if s.is_finished or s.prefilling or not s.output_ids:
                continue
            n = min(s.num_computed, ref[id(a)][0].shape[0])
            k1, v1 = _kv(e, s, n)
            k2, v2 = (x[:n] for x in ref[id(a)])
            assert torch.allclose(k1, k2, atol=1e-5, rtol=1e-4) and torch.allclose(v1, v2, atol=1e-5, rtol=1e-4)
        steps += 1
    assert [s.output_ids for s in seqs] == [s.output_ids for s in ar_seqs]
    assert sum(s.stats.accepted for s in seqs) > 40          # long paths on random branches were accepted
    assert steps > 10


# ------------------------------------------------------------------ lossless sampling

V = 8
# every token occurs three times with three different successors: n-gram tries have siblings
PROMPT = [0, 1, 2, 3, 4, 5, 6, 7, 0, 2, 4, 6, 1, 3, 5, 7, 0, 3, 6, 1, 4, 7, 2, 5]
SP = SamplingParams(temperature=1.0)
N = 1600


@pytest.fixture(scope="module")
def small(tiny_root):
    kw = dict(vocab_size=V, num_hidden_layers=1, hidden_size=32, intermediate_size=64)
    target = make_tiny(tiny_root, "llama", seed=11, std=0.6, **kw)
    draft = make_tiny(tiny_root, "llama", seed=12, std=0.6, **kw)
    hf = load_hf(target)
    with torch.no_grad():
        p1 = probs(hf(torch.tensor([PROMPT])).logits[0, -1], SP).double()
        p2 = probs(hf(torch.tensor([PROMPT + [a] for a in range(V)])).logits[:, -1], SP).double()
        seq3 = torch.tensor([PROMPT + [a, b] for a in range(V) for b in range(V)])
        p3 = probs(hf(seq3).logits[:, -1], SP).double().view(V, V, V)
    joint = p1[:, None, None] * p2[:, :, None] * p3
    return target, draft, joint.numpy().ravel()


class IndependentSiblings(Engine):
    """A wrong rule: every tree node is tested against its own independent draw from its
    parent's distribution (noise keyed by the node), so siblings are accepted independently."""

    def pick(self, logits, seqs, positions):
        self._rows, self._b = (logits, seqs, positions), 0
        return super().pick(logits, seqs, positions)

    def wrong_path(self, tokens, parents, target):
        logits, seqs, positions = self._rows
        base, self._b = self._b * len(target), self._b + 1
        ok, best = [True] + [False] * (len(parents) - 1), 0
        depth = T.depths(parents)
        for m in range(1, len(parents)):
            r = base + parents[m]
            draw = Engine.pick(self, logits[r:r + 1], [seqs[r]], [positions[r] + 7919 * m])[0]
            ok[m] = ok[parents[m]] and tokens[m] == int(draw)
            if ok[m] and depth[m] > depth[best]:
                best = m
        path = []
        while best >= 0:
            path.append(best)
            best = parents[best]
        return path[::-1]


def tree_samples(target, draft, kind, cls=Engine, monkeypatch=None):
    from scipy.stats import chisquare  # noqa: F401  (the helper below needs scipy)
    m = load_quasar(target, max_seq_len=64)
    tc = TreeConfig(depth=2, topk=3, max_nodes=8)
    d = NgramDrafter("cpu", 1, 3, tc) if kind == "ngram" else \
        DraftModelDrafter(runner(load_quasar(draft, max_seq_len=64), blocks=128), SP, tree=tc)
    e = cls(runner(m, blocks=128), d, 7, max_batch_size=16, max_prefill_tokens=256, adaptive=False)
    if cls is IndependentSiblings:
        monkeypatch.setattr(T, "accepted_path", e.wrong_path)
    # 5 tokens, so that the step after the first token has room for a tree of 3 drafted nodes; (t1, t2, t3) are tested
    seqs = [Sequence(PROMPT, sampling=SamplingParams(1.0, seed=i), stop=StopConditions(5)) for i in range(N)]
    e.run(seqs)
    counts = np.zeros(V ** 3)
    for s in seqs:
        o = s.output_ids
        counts[o[0] * V * V + o[1] * V + o[2]] += 1
    return counts, sum(s.stats.drafted for s in seqs)


@pytest.mark.parametrize("kind", ["ngram", "draft_model"])
def test_tree_sampling_is_lossless_and_independent_siblings_are_caught(small, kind, monkeypatch):
    from test_sampling_lossless import ALPHA, pvalue
    target, draft, joint = small
    counts, drafted = tree_samples(target, draft, kind)
    assert drafted >= N
    assert pvalue(counts, joint) > ALPHA
    bad, _ = tree_samples(target, draft, kind, IndependentSiblings, monkeypatch)
    assert pvalue(bad, joint) < ALPHA


# ------------------------------------------------------------------ config

def test_config_errors_name_the_key_and_the_fix():
    with pytest.raises(ConfigError, match="needs drafter.tree"):
        from_dict({"drafter": {"method": "hierarchical"}})
    with pytest.raises(ConfigError, match="kv_cache.representation dense"):
        from_dict({"drafter": {"method": "ngram", "tree": {}}, "kv_cache": {"representation": "hierarchical-int4"}})
    with pytest.raises(ConfigError, match="lower drafter.tree.topk"):
        from_dict({"drafter": {"method": "quantized_self", "tree": {"topk": 16, "depth": 6}}})
    with pytest.raises(ConfigError, match="max_nodes"):
        from_dict({"drafter": {"method": "ngram", "tree": {"max_nodes": 65}}})
    with pytest.raises(ConfigError, match="needs a drafter"):
        from_dict({"drafter": {"tree": {}}})
    with pytest.raises(ConfigError, match="unknown key 'width'"):
        from_dict({"drafter": {"method": "ngram", "tree": {"width": 4}}})
