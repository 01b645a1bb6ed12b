"""Verification of a draft against the verifier's logits, on the device, without host syncs.

Greedy: the longest prefix of the draft that equals the verifier's argmax, plus the verifier's
token at the first mismatch (the bonus token when everything matched). The output is therefore
token-for-token the verifier's greedy decode.

Sampling (Leviathan et al. / Chen et al.): draft token x_i is accepted with probability
min(1, q_i(x_i) / p_i(x_i)); at the first rejection the replacement is drawn from
norm(max(q_i - p_i, 0)); if all k are accepted the bonus token is drawn from q_k. With one-hot
drafts (n-gram lookup) p_i(x_i) = 1. The emitted tokens are distributed exactly as the
verifier's own samples.
"""
from __future__ import annotations

from typing import Optional

import torch

from .sampling import SamplingParams, probs, sample


def accept(draft: torch.Tensor, logits: torch.Tensor, sp: SamplingParams,
           draft_probs: Optional[torch.Tensor] = None,
           generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """draft[d] int64 (d >= 0), logits[d+1, V] -> (n_accepted (0-dim int64), emitted[d+1] int64).
    The first n_accepted + 1 entries of `emitted` are the step's new tokens (the rest is padding).
    draft_probs[d, V]: the drafter's distribution (None = one-hot drafts)."""
    d = draft.shape[0]
    if sp.greedy:
        target = logits.argmax(-1)
        match = (target[:d] == draft).long()
        n = match.cumprod(0).sum()
        return n, target           # target[:n] == draft[:n]; target[n] is the correction/bonus
    q = probs(logits, sp)                                       # [d+1, V]
    idx = torch.arange(d, device=draft.device)
    q_tok = q[idx, draft]
    if draft_probs is None:
        p_tok = torch.ones_like(q_tok)
    else:
        p_tok = draft_probs[idx, draft]
    u = torch.rand(d, generator=generator, device=draft.device)
    ok = (u * p_tok < q_tok).long()                             # u < q/p without dividing by 0
    n = ok.cumprod(0).sum()
    # Residual distribution at every position (only the one at n is used): max(q - p, 0).
    if draft_probs is None:
        p_full = torch.zeros_like(q[:d])
        p_full[idx, draft] = 1.0
    else:
        p_full = draft_probs
    resid = (q[:d] - p_full).clamp(min=0)
    mass = resid.sum(-1, keepdim=True)
    # If q == p exactly the residual is empty; that position is then always accepted, so the
    # fallback to q is never drawn from, it only keeps the row a valid distribution.
    resid = torch.where(mass > 0, resid / mass.clamp(min=1e-30), q[:d])
    final = torch.cat([resid, q[d:]], 0)                        # [d+1, V]; row d = bonus dist
    row = final.index_select(0, n.view(1))
    nxt = sample(row, generator)                                # [1]
    emitted = torch.cat([draft, draft.new_zeros(1)])
    emitted = emitted.index_put((n.view(1),), nxt)
    return n, emitted
