"""One request: its tokens, its own sampling parameters and seeded generator, its stop conditions,
its status and statistics, its KV block table and its drafter's state.

A sampled request draws with noise keyed by its own seed and each token's position
(quasar.spec_decode.sampling.pick), so its tokens do not depend on what else is in the batch. The
committed context is `prompt_ids + output_ids`; the last of these is not yet in the KV cache while
the sequence runs (the next step writes it, with the step's draft).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable, Optional

import torch

from quasar.spec_decode.sampling import SamplingParams
from quasar.spec_decode.scheduler import Stats
from .block_manager import BlockTable


class Status(Enum):
    WAITING = "waiting"          # not admitted yet, or preempted (its KV is recomputed when it resumes)
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(frozen=True)
class StopConditions:
    max_new_tokens: int = 128
    eos_ids: frozenset = frozenset()
    stop_token_ids: frozenset = frozenset()
    ignore_eos: bool = False

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


_IDS = itertools.count()


@dataclass
class Sequence:
    prompt_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: StopConditions = field(default_factory=StopConditions)
    seq_id: int = field(default_factory=lambda: next(_IDS))
    output_ids: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    finish_reason: str = ""
    error: Optional[str] = None               # a request that failed reports its own error
    stats: Stats = field(default_factory=Stats)
    table: BlockTable = field(default_factory=BlockTable)
    num_computed: int = 0                     # leading context tokens whose KV is in the cache
    drafter_state: Any = None                 # per-sequence drafter state (e.g. an n-gram index)
    index: int = 0                            # the request's place in its caller's input order
    on_tokens: Optional[Callable[[list[int]], None]] = None   # streaming: called with each step's tokens
    accepts: float = 2.0                      # decayed counts of accepted / rejected draft tokens
    rejects: float = 1.0                      # (a prior of 2:1), the adaptive-k acceptance estimate

    def __post_init__(self):
        if not self.prompt_ids:
            raise ValueError("a sequence needs at least one prompt token")
        self.prompt_ids = list(self.prompt_ids)
        self._tokens: Optional[list[int]] = None
        self.stats.prompt_tokens = len(self.prompt_ids)

    # ------------------------------------------------------------------ KV progress
    @property
    def prefill_target(self) -> int:
        """Tokens whose KV a prefill computes: the whole prompt for a new request (its logits give
        the first token), every token but the last for a preempted one being recomputed."""
        return len(self) - 1 if self.output_ids else len(self)

    @property
    def prefilling(self) -> bool:
        return self.num_computed < self.prefill_target

    @property
    def alpha(self) -> float:
        """Running per-token draft acceptance rate."""
        return self.accepts / (self.accepts + self.rejects)

    def observe(self, drafted: int, accepted: int, decay: float = 0.9) -> None:
        if drafted:
            self.accepts = self.accepts * decay + accepted
            self.rejects = self.rejects * decay + (accepted < drafted)

    # ------------------------------------------------------------------ tokens
    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def context(self) -> list[int]:
        """prompt + output, kept as one list (no copy per step: n-gram matching on 64 sequences of
        8k tokens would otherwise copy them all every step). Read-only for callers."""
        if self._tokens is None or len(self._tokens) != len(self):
            self._tokens = self.prompt_ids + self.output_ids
        return self._tokens

    @property
    def last_token(self) -> int:
        return self.output_ids[-1] if self.output_ids else self.prompt_ids[-1]

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED

    def append(self, tokens: list[int]) -> list[int]:
        """Commit accepted tokens, applying the stop conditions: returns the tokens kept (a run
        is cut after an EOS / stop token or at max_new_tokens) and finishes the sequence there."""
        kept = []
        st = self.stop
        for t in tokens:
            if len(self.output_ids) >= st.max_new_tokens:
                break
            self.output_ids.append(t)
            if self._tokens is not None:
                self._tokens.append(t)
            kept.append(t)
            if t in st.stop_token_ids:
                self.finish("stop")
                break
            if not st.ignore_eos and t in st.eos_ids:
                self.finish("eos")
                break
        if not self.is_finished and len(self.output_ids) >= st.max_new_tokens:
            self.finish("length")
        self.stats.new_tokens = len(self.output_ids)
        return kept

    def finish(self, reason: str, error: Optional[str] = None) -> None:
        self.status = Status.FINISHED
        self.finish_reason = self.stats.finish_reason = reason
        self.error = error

    def preempt(self) -> None:
        """Back to waiting; its KV is dropped and recomputed (prompt + output) when it resumes."""
        self.status = Status.WAITING
        self.num_computed = 0
        self.drafter_state = None
