"""Prometheus metrics of a server (prometheus_client, one registry per server).

Names follow vLLM's (`vllm:` -> `quasar:`) so existing dashboards map over. τ (mean accepted
length) is the architecture's definition: tokens emitted by verification steps / verification
steps, bonus token included; the counters behind it are exported too, so a dashboard can take
it over any window (rate(emitted) / rate(steps)).
"""
from __future__ import annotations

from typing import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15,
                0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 240.0, 480.0, 960.0)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    def __init__(self, model_name: str):
        r = self.registry = CollectorRegistry()
        lab = ["model_name"]
        self.model_name = model_name

        def gauge(name, doc):
            return Gauge(name, doc, lab, registry=r).labels(model_name)

        def counter(name, doc):
            return Counter(name, doc, lab, registry=r).labels(model_name)

        def hist(name, doc, buckets):
            return Histogram(name, doc, lab, buckets=buckets, registry=r).labels(model_name)

        self.running = gauge("quasar:num_requests_running", "Requests in the running batch")
        self.waiting = gauge("quasar:num_requests_waiting", "Requests waiting for a batch slot")
        self.kv_used = gauge("quasar:kv_blocks_used", "KV cache blocks held by requests")
        self.kv_total = gauge("quasar:kv_blocks_total", "KV cache blocks")
        self.kv_usage = gauge("quasar:kv_cache_usage_perc", "Fraction of KV cache blocks in use (0-1)")
        self.preemptions = gauge("quasar:num_preemptions", "Sequences preempted (recomputed) so far")
        self.tau = gauge("quasar:mean_accepted_length",
                         "tau: tokens emitted per verification step, bonus token included (finished requests)")
        self.acceptance = gauge("quasar:spec_decode_acceptance_rate", "Accepted / drafted tokens (finished requests)")
        self.prompt_tokens = counter("quasar:prompt_tokens", "Prompt tokens of admitted requests")
        self.generation_tokens = counter("quasar:generation_tokens", "Tokens generated")
        self.steps = counter("quasar:spec_decode_num_verify_steps", "Verification (decode) steps, summed over requests")
        self.emitted = counter("quasar:spec_decode_num_emitted_tokens", "Tokens emitted by verification steps")
        self.drafted = counter("quasar:spec_decode_num_draft_tokens", "Draft tokens proposed")
        self.accepted = counter("quasar:spec_decode_num_accepted_tokens", "Draft tokens accepted")
        self._success = Counter("quasar:request_success", "Finished requests by finish reason",
                                lab + ["finished_reason"], registry=r)
        self.rejected = counter("quasar:request_rejected", "Requests refused with 503 (queue full or draining)")
        self.ttft = hist("quasar:time_to_first_token_seconds", "Time to first token", TTFT_BUCKETS)
        self.tpot = hist("quasar:time_per_output_token_seconds", "Time per output token after the first", TPOT_BUCKETS)
        self.e2e = hist("quasar:e2e_request_latency_seconds", "Request latency, arrival to last token", E2E_BUCKETS)
        self._sums = {"steps": 0, "emitted": 0, "drafted": 0, "accepted": 0}
        self.tau.set_function(lambda: self._ratio("emitted", "steps"))
        self.acceptance.set_function(lambda: self._ratio("accepted", "drafted"))

    def _ratio(self, a: str, b: str) -> float:
        return self._sums[a] / self._sums[b] if self._sums[b] else float("nan")

    def watch(self, running: Callable[[], int], waiting: Callable[[], int], kv_used: Callable[[], int],
              kv_total: Callable[[], int], preemptions: Callable[[], int]) -> None:
        """Gauges read from the engine at scrape time."""
        self.running.set_function(running)
        self.waiting.set_function(waiting)
        self.kv_used.set_function(kv_used)
        self.kv_total.set_function(kv_total)
        self.kv_usage.set_function(lambda: kv_used() / max(1, kv_total()))
        self.preemptions.set_function(preemptions)

    def finished(self, reason: str, stats, ttft: float | None, e2e: float, tpot: float | None) -> None:
        """One request done (called from the engine thread)."""
        self._success.labels(self.model_name, reason).inc()
        self.generation_tokens.inc(stats.new_tokens)
        for key, counter, v in (("steps", self.steps, stats.steps), ("emitted", self.emitted, stats.decode_tokens),
                                ("drafted", self.drafted, stats.drafted), ("accepted", self.accepted, stats.accepted)):
            counter.inc(v)
            self._sums[key] += v
        if ttft is not None:
            self.ttft.observe(ttft)
        if tpot is not None:
            self.tpot.observe(tpot)
        self.e2e.observe(e2e)

    def render(self) -> bytes:
        return generate_latest(self.registry)
