"""Speculative sampling is lossless: the first generated tokens under speculative sampling follow
the verifier's own autoregressive distribution, for one-hot n-gram drafts and for model drafts.

The exact joint distribution of (t1, t2, t3) under autoregressive sampling is enumerated with
transformers' model (the oracle) on a tiny-vocabulary model; a chi-square test compares it with
speculative samples. The same test must reject a deliberately wrong acceptance rule
("accept when q > p, else reject"), which shows it has the power to fail."""
import numpy as np
import pytest
import torch
from scipy.stats import chisquare

import quasar.spec_decode.scheduler as sched
from quasar import backends
from quasar.config import VerifierConfig
from quasar.engine import ModelRunner
from quasar.model.loader import build_model
from quasar.spec_decode import accept as acc
from quasar.spec_decode.draft_model import DraftModelDrafter
from quasar.spec_decode.ngram import NgramDrafter
from quasar.spec_decode.sampling import SamplingParams, probs, sample
from quasar.spec_decode.scheduler import Scheduler
from tiny import load_hf, make_tiny

V = 8
PROMPT = [1, 2, 3, 4, 5, 6, 7, 0, 1, 2]       # every token occurs: an n-gram draft always exists
SP = SamplingParams(temperature=1.0, top_p=1.0, top_k=0)
N_SAMPLES = 3000
K = 3
ALPHA = 1e-3                                  # significance level of the chi-square test


@pytest.fixture(scope="module")
def setup(tiny_root):
    kw = dict(vocab_size=V, num_hidden_layers=1, hidden_size=32, intermediate_size=64)
    target = make_tiny(tiny_root, "llama", seed=11, std=0.6, **kw)
    draft = make_tiny(tiny_root, "llama", seed=12, std=0.6, **kw)
    # exact AR joint over (t1, t2, t3) from the transformers oracle
    hf = load_hf(target)
    with torch.no_grad():
        p1 = probs(hf(torch.tensor([PROMPT])).logits[0, -1], SP).double()
        seq2 = torch.tensor([PROMPT + [a] for a in range(V)])
        p2 = probs(hf(seq2).logits[:, -1], SP).double()                      # [t1, t2]
        seq3 = torch.tensor([PROMPT + [a, b] for a in range(V) for b in range(V)])
        p3 = probs(hf(seq3).logits[:, -1], SP).double().view(V, V, V)         # [t1, t2, t3]
    joint = p1[:, None, None] * p2[:, :, None] * p3
    assert abs(joint.sum().item() - 1) < 1e-6

    def load(p):
        return ModelRunner(build_model(p, backends.get("cpu"), torch.float32, 64, VerifierConfig()))
    return load(target), load(draft), joint.numpy().ravel()


def spec_samples(m, drafter, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    if hasattr(drafter, "generator"):
        drafter.generator = g
    s = Scheduler(m, drafter, SP, K, eos_ids=set(), generator=g)
    counts = np.zeros(V ** 3)
    drafted = 0
    for _ in range(n):
        out, st = s.generate(PROMPT, 4)        # the first decode step verifies a 2-token draft
        drafted += st.drafted
        counts[out[0] * V * V + out[1] * V + out[2]] += 1
    return counts, drafted


def pvalue(counts, joint):
    exp = joint / joint.sum() * counts.sum()
    order = np.argsort(exp)                    # pool the rare cells so every cell expects >= 5
    obs_b, exp_b, o, e = [], [], 0.0, 0.0
    for i in order:
        o += counts[i]
        e += exp[i]
        if e >= 5:
            obs_b.append(o)
            exp_b.append(e)
            o = e = 0.0
    if e > 0:
        obs_b[-1] += o
        exp_b[-1] += e
    return chisquare(obs_b, exp_b).pvalue


def wrong_accept(draft, logits, sp, draft_probs=None, generator=None):
    """The deliberately broken rule: accept iff q(x) > p(x) (deterministic), else reject."""
    d = draft.shape[0]
    q = probs(logits, sp)
    idx = torch.arange(d)
    p_full = torch.zeros_like(q[:d])
    if draft_probs is None:
        p_full[idx, draft] = 1.0
    else:
        p_full = draft_probs
    ok = (q[idx, draft] > p_full[idx, draft]).long()
    n = ok.cumprod(0).sum()
    resid = (q[:d] - p_full).clamp(min=0)
    mass = resid.sum(-1, keepdim=True)
    resid = torch.where(mass > 0, resid / mass.clamp(min=1e-30), q[:d])
    final = torch.cat([resid, q[d:]], 0)
    nxt = sample(final.index_select(0, n.view(1)), generator)
    emitted = torch.cat([draft, draft.new_zeros(1)]).index_put((n.view(1),), nxt)
    return n, emitted


def test_autoregressive_sampling_matches_the_oracle(setup):
    from quasar.spec_decode.drafter import Drafter
    m, _, joint = setup
    counts, drafted = spec_samples(m, Drafter(), N_SAMPLES)
    assert drafted == 0 and pvalue(counts, joint) > ALPHA


@pytest.mark.parametrize("kind", ["ngram", "draft_model"])
def test_speculative_sampling_is_lossless_and_a_wrong_rule_is_caught(setup, kind, monkeypatch):
    m, dm, joint = setup

    def drafter():
        return NgramDrafter("cpu", 1, 3) if kind == "ngram" else DraftModelDrafter(dm, SP)

    counts, drafted = spec_samples(m, drafter(), N_SAMPLES, seed=1)
    assert drafted >= N_SAMPLES                # drafts really were verified
    p_ok = pvalue(counts, joint)
    assert p_ok > ALPHA, p_ok
    monkeypatch.setattr(sched, "accept", wrong_accept)
    p_bad = pvalue(spec_samples(m, drafter(), N_SAMPLES, seed=2)[0], joint)
    assert p_bad < ALPHA, p_bad
    assert acc.accept is not wrong_accept      # the engine's own rule is untouched
