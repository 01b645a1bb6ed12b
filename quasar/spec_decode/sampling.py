"""Logits -> probabilities with temperature, top-k and top-p, applied identically to draft and
verifier distributions (transformers' order: temperature, then top-k, then top-p)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class SamplingParams:
    """A request's sampling (vLLM's offline API names): temperature 0 = greedy; `seed` keys the
    request's noise; max_tokens / stop_token_ids / ignore_eos override the deployment's stops."""
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    max_tokens: Optional[int] = None
    stop_token_ids: tuple = ()
    ignore_eos: bool = False

    def __post_init__(self):
        if self.temperature < 0 or not 0 <= self.top_p <= 1 or self.top_k < 0:
            raise ValueError(f"invalid sampling parameters: temperature {self.temperature} (>= 0), "
                             f"top_p {self.top_p} (in [0, 1]), top_k {self.top_k} (>= 0)")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def probs(logits: torch.Tensor, sp: SamplingParams) -> torch.Tensor:
    """logits[..., V] (any float dtype) -> fp32 probabilities after the warpers."""
    x = logits.float() / sp.temperature
    v = x.shape[-1]
    if 0 < sp.top_k < v:
        kth = torch.topk(x, sp.top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if sp.top_p < 1.0:
        sorted_x, idx = torch.sort(x, dim=-1, descending=False)
        cum = sorted_x.softmax(-1).cumsum(-1)
        drop_sorted = cum <= (1 - sp.top_p)
        drop_sorted[..., -1:] = False                       # always keep the most likely token
        drop = drop_sorted.scatter(-1, idx, drop_sorted)
        x = x.masked_fill(drop, float("-inf"))
    return x.softmax(-1)


def sample(p: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One draw per row of p[..., V] -> int64[...]."""
    flat = p.reshape(-1, p.shape[-1])
    out = torch.multinomial(flat, 1, generator=generator)
    return out.view(p.shape[:-1])


# ------------------------------------------------------------------ batched runtime: coupled sampling
#
# The batched engine samples with the Gumbel-max trick and noise keyed by (request seed, position,
# token id): the token at position p is argmax(warped logits + g[seed, p, :]), with g i.i.d.
# Gumbel(0, 1) from a counter-based hash. Given its prefix, that token is an exact draw from the
# warped distribution, because g[seed, p] is independent of everything before p. Verification is
# then greedy on the perturbed logits: the verifier's own token at each position is computed, and
# a draft token is accepted iff it equals it. So:
# - the output is, token for token, what the verifier alone would sample with that seed (lossless,
#   and independent of the drafter, of k and of the batch the request runs in);
# - a drafter that samples with the same noise (quantized_self, draft_model) agrees with the
#   verifier whenever their perturbed argmaxes agree, which is the coupling of the two draws.

_M1 = 0xBF58476D1CE4E5B9 - (1 << 64)       # splitmix64's multipliers as signed int64
_M2 = 0x94D049BB133111EB - (1 << 64)
_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)


def _shr(z: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def _mix(z: torch.Tensor) -> torch.Tensor:
    z = (z ^ _shr(z, 30)) * _M1
    z = (z ^ _shr(z, 27)) * _M2
    return z ^ _shr(z, 31)


def gumbel(seeds: torch.Tensor, positions: torch.Tensor, vocab: int) -> torch.Tensor:
    """Gumbel(0, 1) noise [R, vocab] fp32 for rows with request seeds[R] at positions[R] (int64)."""
    key = _mix(_mix(seeds.to(torch.int64) * _GOLDEN + 1) ^ (positions.to(torch.int64) * _GOLDEN + 2))
    z = _mix(key[:, None] + torch.arange(vocab, device=seeds.device, dtype=torch.int64)[None, :] * _GOLDEN)
    u = (_shr(z, 40).float() + 0.5) * (1.0 / (1 << 24))          # 24 random bits, in (0, 1)
    return -torch.log(-torch.log(u))


def warp(logits: torch.Tensor, sp: SamplingParams) -> torch.Tensor:
    """The log-probabilities (up to a constant) that `probs` normalizes; -inf where filtered."""
    return probs(logits, sp).log()


def pick(logits: torch.Tensor, params: list, seeds: torch.Tensor, positions: torch.Tensor,
         rows_per_chunk: int = 8) -> torch.Tensor:
    """The token at each row of logits[R, V]: argmax for greedy rows, else the Gumbel-max draw of
    row r's request (seeds[r]) at its position (positions[r]). params: SamplingParams per row."""
    out = logits.argmax(-1)
    sampled = [r for r, sp in enumerate(params) if not sp.greedy]
    if not sampled:
        return out
    groups: dict = {}
    for r in sampled:
        groups.setdefault(params[r], []).append(r)
    for sp, rows in groups.items():
        for i in range(0, len(rows), rows_per_chunk):
            idx = torch.tensor(rows[i:i + rows_per_chunk], device=logits.device)
            x = warp(logits.index_select(0, idx), sp)
            g = gumbel(seeds.index_select(0, idx), positions.index_select(0, idx), logits.shape[-1])
            out[idx] = (x + g).argmax(-1)
    return out


def pick_topk(logits: torch.Tensor, params: list, seeds: torch.Tensor, positions: torch.Tensor,
              k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best tokens of each row of logits[R, V] under the row's own pick (argmax for greedy
    rows; for sampled rows Gumbel-top-k with the noise pick() uses, so the first is pick()'s token)
    and the drafter's log-probabilities of those tokens (how tree drafters rank nodes): two [R, k]."""
    lp = torch.log_softmax(logits.float(), -1)
    key = logits.float().clone()
    sampled = [r for r, sp in enumerate(params) if not sp.greedy]
    for r in sampled:
        sp = params[r]
        x = warp(logits[r:r + 1].float(), sp)
        lp[r] = torch.log_softmax(x, -1)[0]
        key[r] = (x + gumbel(seeds[r:r + 1], positions[r:r + 1], logits.shape[-1]))[0]
    top = key.topk(k, -1).indices
    return top, lp.gather(1, top)
