"""The device-agnostic speculative scheduler.

    prefill(prompt)                          -> KV cache filled, first token
    loop:
      draft  = drafter.propose(context, k)   tokens (+ draft probabilities when sampling)
      logits = verifier([last] + draft)      one forward over d+1 positions (d <= k)
      n, out = accept(draft, logits)         on the device
      commit(draft[:n] + [next])             the committed length moves; rejected slots are
                                             overwritten by the next step (static cache)

Only device-generic torch and backend ops are used here: no device branches. The one host sync
per step is the read of the step's accepted tokens (the host keeps the context for the n-gram
drafter and for stopping). `drafter: none` is plain autoregressive decoding through the same loop.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from quasar.errors import ContextLengthError
from .accept import accept
from .drafter import Drafter
from .sampling import SamplingParams, probs, sample


@dataclass
class Stats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    draft_s: float = 0.0
    verify_s: float = 0.0
    steps: int = 0                    # verification steps (decode steps)
    decode_tokens: int = 0            # tokens emitted by verification steps
    drafted: int = 0
    accepted: int = 0
    pos_tries: list = field(default_factory=list)    # per draft position: steps that drafted it
    pos_accepts: list = field(default_factory=list)  # ... and steps that accepted it
    finish_reason: str = ""
    k_sum: int = 0                    # tokens the step allowed this sequence to draft, summed (adaptive k)

    @property
    def mean_k(self) -> float:
        return self.k_sum / self.steps if self.steps else float("nan")

    @property
    def tau(self) -> float:
        """Mean accepted length: tokens emitted / verification steps, bonus included."""
        return self.decode_tokens / self.steps if self.steps else float("nan")

    @property
    def decode_tok_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else float("nan")

    @property
    def e2e_tok_s(self) -> float:
        t = self.prefill_s + self.decode_s
        return self.new_tokens / t if t > 0 else float("nan")

    def acceptance(self) -> list[float]:
        return [a / t if t else float("nan") for a, t in zip(self.pos_accepts, self.pos_tries)]

    def as_dict(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens, "new_tokens": self.new_tokens,
            "prefill_s": round(self.prefill_s, 6), "decode_s": round(self.decode_s, 6),
            "decode_tok_s": round(self.decode_tok_s, 3), "e2e_tok_s": round(self.e2e_tok_s, 3),
            "steps": self.steps, "tau": round(self.tau, 4), "drafted": self.drafted,
            "accepted": self.accepted, "acceptance_per_position": [round(a, 4) for a in self.acceptance()],
            "draft_ms_per_step": round(1e3 * self.draft_s / self.steps, 4) if self.steps else None,
            "verify_ms_per_step": round(1e3 * self.verify_s / self.steps, 4) if self.steps else None,
            "mean_k": round(self.mean_k, 3), "finish_reason": self.finish_reason,
        }


class Scheduler:
    def __init__(self, runner, drafter: Drafter, sp: SamplingParams, k: int, eos_ids: set[int],
                 generator: Optional[torch.Generator] = None, sync: Optional[Callable] = None):
        """runner: the verifier's ModelRunner (quasar.engine.ModelRunner: the model, its KV cache
        and its captured steps)."""
        self.runner, self.drafter, self.sp, self.k = runner, drafter, sp, k
        self.eos = set(eos_ids)
        self.generator = generator
        # sync(): waits for the device, so that draft and verify times are split correctly. The
        # backend supplies it; None = no split timing (the step total is still exact).
        self.sync = sync

    def _first_token(self, logits: torch.Tensor) -> torch.Tensor:
        if self.sp.greedy:
            return logits.argmax(-1)
        return sample(probs(logits, self.sp), self.generator)

    @torch.inference_mode()
    def generate(self, prompt: list[int], max_new_tokens: int,
                 on_tokens: Optional[Callable[[list[int]], None]] = None) -> tuple[list[int], Stats]:
        m = self.runner
        S = m.max_seq_len
        st = Stats(prompt_tokens=len(prompt), pos_tries=[0] * self.k, pos_accepts=[0] * self.k)
        if not prompt:
            raise ContextLengthError("the prompt is empty")
        if len(prompt) >= S:
            raise ContextLengthError(
                f"the prompt has {len(prompt)} tokens but max_seq_len is {S}; raise max_seq_len "
                f"(--max-seq-len / max_seq_len:) to at least {len(prompt) + max_new_tokens + self.k + 1} "
                "or shorten the prompt")
        dev = m.device
        t0 = time.perf_counter()
        ids = torch.tensor([prompt], dtype=torch.int64, device=dev)
        pos = torch.arange(len(prompt), device=dev).view(1, -1)
        logits = m.prefill(ids, pos, kv_len=len(prompt))[0, -1]
        last = self._first_token(logits)
        first = int(last)                                     # the prefill's one sync
        st.prefill_s = time.perf_counter() - t0
        out = [first]
        ctx = list(prompt) + out
        self.drafter.begin(list(prompt))
        if on_tokens:
            on_tokens([first])
        st.finish_reason = "eos" if first in self.eos else ""
        t_dec = time.perf_counter()
        while not st.finish_reason:
            if len(out) >= max_new_tokens:
                st.finish_reason = "length"
                break
            cached = len(ctx) - 1                             # `last` sits at position `cached`
            room = S - cached - 1                             # slots after `last`
            if room < 0:
                st.finish_reason = "max_seq_len"
                break
            k = min(self.k, max_new_tokens - len(out) - 1, room)
            ts = time.perf_counter()
            draft = self.drafter.propose(ctx, last, k) if k > 0 else _empty(last)
            d = int(draft.tokens.shape[0])
            if self.sync is not None and draft.probs is not None:
                self.sync()
            tv = time.perf_counter()
            tokens = torch.cat([last.view(1), draft.tokens]).view(1, -1)
            positions = torch.arange(cached, cached + d + 1, device=dev).view(1, -1)
            logits = m.step(tokens, positions, kv_len=cached + d + 1)[0]
            n, emitted = accept(draft.tokens, logits, self.sp, draft.probs, self.generator)
            host = torch.cat([n.view(1), emitted]).tolist()  # the step's one host sync
            te = time.perf_counter()
            st.draft_s += tv - ts
            st.verify_s += te - tv
            n, new = host[0], host[1:2 + host[0]]
            st.steps += 1
            st.drafted += d
            st.accepted += n
            st.k_sum += k
            for i in range(d):
                st.pos_tries[i] += 1
                st.pos_accepts[i] += int(i < n)
            for j, t in enumerate(new):                       # EOS inside the accepted run
                if t in self.eos:
                    new = new[:j + 1]
                    st.finish_reason = "eos"
                    break
            new = new[:max_new_tokens - len(out)]
            st.decode_tokens += len(new)
            out += new
            ctx += new
            last = emitted[len(new) - 1] if len(new) == n + 1 else torch.tensor(new[-1], device=dev)
            self.drafter.commit(cached + 1 + n)
            if on_tokens:
                on_tokens(new)
        st.decode_s = time.perf_counter() - t_dec
        st.new_tokens = len(out)
        if not st.finish_reason:
            st.finish_reason = "length"
        return out, st


def _empty(last):
    from .drafter import Draft
    return Draft(last.new_empty(0))
