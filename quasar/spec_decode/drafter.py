"""The drafter interface and the `none` drafter (plain autoregressive decoding). The registry of
drafters (`drafter.method` -> class) is quasar.spec_decode.DRAFTERS.

A drafter proposes up to k tokens that follow the context. The scheduler keeps the context on
the host (prompt + emitted tokens, the last of which is not yet in the verifier's KV cache) and
the verifier's committed cache length.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class BatchDraft:
    """A batched runtime's drafts: row b holds sequence b's counts[b] tokens (padded to K)."""
    tokens: torch.Tensor                   # [B, K] int64 on the model's device (K may be 0)
    counts: list[int]
    # tree drafts (quasar.spec_decode.tree): parents[b] has counts[b] + 1 entries, node 0 the root
    # (the sequence's last token, parent -1) and node m the token tokens[b, m - 1]; None = chains
    parents: Optional[list[list[int]]] = None


@dataclass
class Draft:
    tokens: torch.Tensor                   # [d] int64, on the model's device (d may be 0)
    probs: Optional[torch.Tensor] = None   # [d, V] the drafter's distribution (None = one-hot)


class Drafter:
    name = "none"

    @classmethod
    def step_tokens(cls, cfg) -> int:
        """The most tokens (tree nodes) a step drafts per sequence under this config (the engine's
        k): drafter.num_tokens for chains, max_nodes - 1 for trees, 0 for plain decoding."""
        if cls.name == "none":
            return 0
        return cfg.num_tokens if cfg.tree is None else cfg.tree.max_nodes - 1

    @classmethod
    def drafts_trees(cls, cfg) -> bool:
        """Whether the target verifies trees (BatchDraft.parents) under this config."""
        return cfg.tree is not None

    @classmethod
    def draft_scheme(cls, cfg) -> Optional[str]:
        """The scheme the target's linears must also be prepared in for this drafter (None: none)."""
        return None

    @classmethod
    def draft_model(cls, cfg) -> Optional[str]:
        """The separate model this drafter runs (path or name; None: none)."""
        return None

    @classmethod
    def from_config(cls, cfg, runner, sampling, draft_runner=None) -> "Drafter":
        """cfg: quasar.config.DrafterConfig; runner: the verifier's ModelRunner; draft_runner: a
        separate draft model's ModelRunner (draft_model only)."""
        return cls()

    def begin(self, prompt: list[int]) -> None:
        """A new sequence: the verifier has prefilled `prompt`."""

    def propose(self, ctx: list[int], last: torch.Tensor, k: int) -> Draft:
        """ctx: every token so far (ctx[-1] is `last`, at position len(ctx) - 1, not yet cached).
        last: that token as a 0-dim device tensor (no host round trip needed)."""
        return Draft(last.new_empty(0))

    def commit(self, cached: int) -> None:
        """After a step: the verifier's cache now holds `cached` valid positions."""

    # ------------------------------------------------------------------ the batched runtime
    # A sequence's drafter state lives on the sequence (seq.drafter_state); `engine` is the
    # quasar.engine.Engine running the step (its runner, the step's tokens, context builders and
    # the coupled sampler). Device drafters (on_device) make the engine sync before timing verify.
    on_device = False

    def start(self, seq) -> None:
        """A sequence's prefill is done (new, or recomputed after preemption)."""

    def propose_batch(self, seqs, ks: list[int], engine) -> BatchDraft:
        """Up to ks[b] tokens for each running sequence b."""
        return BatchDraft(torch.zeros(len(seqs), 0, dtype=torch.int64, device=engine.device), [0] * len(seqs))

    def storage(self, k: int) -> int:
        """Cache slots past a sequence's last token that drafting k tokens (nodes) may write."""
        return k

    def commit_seq(self, seq, cached: int) -> None:
        """After a step: the verifier's cache holds `cached` valid positions of `seq`."""


NoneDrafter = Drafter
