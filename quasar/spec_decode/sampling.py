"""Logits -> probabilities with temperature, top-k and top-p, applied identically to draft and
verifier distributions (transformers' order: temperature, then top-k, then top-p)."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0

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
