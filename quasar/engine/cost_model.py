"""Adaptive speculation: how many tokens to draft in the next step.

The step cost model is linear in the tokens of the step, t(N) = a + b N (a: reading the weights
and launching the step; b: the per-token compute and KV traffic), measured at start-up on the
runner itself (`calibrate`) and refined from the steps that actually run (`observe`, an
exponentially weighted least-squares fit). A device drafter (QSpec's quantized self-draft, a draft
model) costs K more steps of B tokens, at `draft_ratio` of a verifier step.

With per-token acceptance alpha_b (each sequence's running estimate), drafting K tokens yields
E_b(K) = 1 + alpha_b + ... + alpha_b^K tokens for sequence b; the step chooses
K = argmax_K  sum_b E_b(K) / (t(B (1 + K)) + K t_draft(B)),  K in 0..k.
K = 0 (plain decoding) wins when verification costs more than it saves: large, compute-bound
batches, or low acceptance. Greedy outputs do not depend on K (speculation is lossless).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch


@dataclass
class StepCost:
    a: float                      # seconds per step
    b: float                      # seconds per token in the step
    draft_ratio: float = 1.0      # a device drafter's step / a verifier step of the same tokens
    decay: float = 0.98
    # weighted sums for the online fit
    sw: float = 0.0
    sx: float = 0.0
    sy: float = 0.0
    sxx: float = 0.0
    sxy: float = 0.0

    def time(self, tokens: int) -> float:
        return self.a + self.b * tokens

    def observe(self, tokens: int, seconds: float) -> None:
        d = self.decay
        self.sw, self.sx, self.sy = self.sw * d + 1, self.sx * d + tokens, self.sy * d + seconds
        self.sxx, self.sxy = self.sxx * d + tokens * tokens, self.sxy * d + tokens * seconds
        var = self.sxx * self.sw - self.sx * self.sx
        if self.sw >= 8 and var > 1e-9 * max(1.0, self.sxx * self.sw):
            b = (self.sxy * self.sw - self.sx * self.sy) / var
            a = (self.sy - b * self.sx) / self.sw
            if a > 0 and b >= 0:
                self.a, self.b = a, b

    @classmethod
    def calibrate(cls, run, sizes: tuple[int, int], sync=None, draft_run=None, repeats: int = 2) -> "StepCost":
        """Time run(N) (a forward of N tokens) at two sizes (after a warm-up) and fit the line;
        draft_run(N), if given, gives the draft step's cost ratio."""
        def timed(fn, n):
            fn(n)
            best = float("inf")
            for _ in range(repeats):
                if sync:
                    sync()
                t0 = time.perf_counter()
                fn(n)
                if sync:
                    sync()
                best = min(best, time.perf_counter() - t0)
            return best
        n0, n1 = sizes
        t0, t1 = timed(run, n0), timed(run, n1)
        b = max(0.0, (t1 - t0) / max(1, n1 - n0))
        a = max(1e-6, t0 - b * n0)
        ratio = 1.0
        if draft_run is not None:
            ratio = timed(draft_run, n0) / max(t0, 1e-9)
        cost = cls(a, b, ratio)
        cost.observe(n0, t0)
        cost.observe(n1, t1)
        return cost


def expected_tokens(alpha: float, k: int) -> float:
    """1 + alpha + ... + alpha^k: tokens a step emits with k drafts at per-token acceptance alpha."""
    return float(k + 1) if alpha >= 1.0 else (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


def choose_k(alphas: list[float], k_max: int, cost: StepCost, device_drafter: bool) -> int:
    B = len(alphas)
    best_k, best_rate = 0, 0.0
    for k in range(k_max + 1):
        t = cost.time(B * (1 + k))
        if device_drafter:
            t += k * cost.draft_ratio * cost.time(B)
        rate = sum(expected_tokens(a, k) for a in alphas) / t
        if rate > best_rate * (1 + 1e-6):
            best_k, best_rate = k, rate
    return best_k


def calibrate_runner(runner, k: int, max_batch: int, sync=None, device_drafter: bool = False) -> StepCost:
    """The cost model of a paged runner: forwards of dummy tokens whose K/V go to the scratch slot."""
    from .context import StepContext

    def forward(n, mode="verify"):
        ctx = StepContext.make([0] * n, [runner.scratch_slot] * n, list(range(n + 1)),
                               [[runner.num_blocks]] * n, [1] * n, 1, runner.device, runner.max_blocks)
        ids = torch.zeros(n, dtype=torch.int64, device=runner.device)
        runner.run(ids, ctx, mode)

    hi = max(2, min(max_batch * (k + 1), 128))       # the line is fitted; the online fit refines it
    draft = (lambda n: forward(n, "draft")) if device_drafter else None
    return StepCost.calibrate(forward, (1, hi), sync, draft)
