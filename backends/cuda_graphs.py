"""CUDA graphs for the decode / draft / verify steps (issue: the step is launch-bound otherwise).

One graph per (mode, T): mode is "verify" or "draft" (QSpec runs the same layers in another
scheme), T the chunk length (1 for decode and drafting, d+1 <= k+1 for verification). Inputs go
through static buffers; the graph runs the attention over the whole static cache and the kernel
reads each query's visible length from the positions buffer on the device, so one capture serves
every context length. Captures happen once, before the first prefill (a warm-up forward writes
KV slots, which the prefill then overwrites), and share one memory pool.

The runner wraps the model and the KV cache it was given (by the engine's ModelRunner, which owns
both); the model knows nothing of it. Capture hygiene: the cyclic GC is collected before and
disabled during each capture. Otherwise a collection that happens to run mid-capture can free
another model's graphs, whose reset is not permitted while a stream captures and invalidates the
capture (cudaErrorStreamCaptureInvalidated, seen once in the step benchmark, which builds one
model after another).
"""
from __future__ import annotations

import gc

import torch



class StaticStepRunner:
    """Static input buffers and a whole-cache attention (kv_len = max_seq_len, visibility from
    `positions`): everything a captured graph does, run eagerly. It is the CPU twin of the graph
    runner in tests, and its base class."""

    def __init__(self, model, cache, chunk_lengths, modes=("verify",)):
        self.model, self.cache = model, cache
        dev = model.device
        t_max = max(chunk_lengths)
        self.ids = torch.zeros(1, t_max, dtype=torch.int64, device=dev)
        # warm-up/capture positions: the last slots of the cache, distinct per token
        self.pos = torch.arange(model.max_seq_len - t_max, model.max_seq_len, device=dev).view(1, -1)
        self.lengths = sorted(set(chunk_lengths), reverse=True)
        self.modes = tuple(modes)

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, mode: str = "verify") -> torch.Tensor:
        t = input_ids.shape[1]
        if mode not in self.modes or t not in self.lengths:
            raise RuntimeError(f"no step prepared for mode={mode!r}, T={t}")
        self.ids[:, :t].copy_(input_ids)
        self.pos[:, :t].copy_(positions)
        m = self.model
        return m.forward(self.ids[:, :t], self.pos[:, :t], self.cache, kv_len=m.max_seq_len, mode=mode)


class GraphRunner(StaticStepRunner):
    def __init__(self, model, cache, chunk_lengths, modes=("verify",)):
        super().__init__(model, cache, chunk_lengths, modes)
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict = {}
        for mode in modes:
            for t in self.lengths:
                self._capture(mode, t)

    @torch.inference_mode()
    def _capture(self, mode: str, t: int) -> None:
        m = self.model
        ids, pos = self.ids[:, :t], self.pos[:, :t]
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):                      # compile / autotune outside the capture
                m.forward(ids, pos, self.cache, kv_len=m.max_seq_len, mode=mode)
        torch.cuda.current_stream().wait_stream(s)
        gc.collect()                 # free dead graphs now, not in the middle of the capture
        enabled = gc.isenabled()
        gc.disable()
        try:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=self.pool):
                out = m.forward(ids, pos, self.cache, kv_len=m.max_seq_len, mode=mode)
        finally:
            if enabled:
                gc.enable()
        self.graphs[(mode, t)] = (g, out)

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, mode: str = "verify") -> torch.Tensor:
        t = input_ids.shape[1]
        entry = self.graphs.get((mode, t))
        if entry is None:
            raise RuntimeError(f"no CUDA graph captured for mode={mode!r}, T={t}; captured: {sorted(self.graphs)}")
        self.ids[:, :t].copy_(input_ids)
        self.pos[:, :t].copy_(positions)
        g, out = entry
        g.replay()
        return out


class PagedGraphRunner:
    """CUDA graphs for the batched runtime's uniform steps on the paged cache: one graph per
    (mode, batch-size bucket, chunk length T). A step of B sequences is padded to the smallest
    bucket >= B: padded rows read block 0 at position 0 and write the scratch slot, and their
    logits are dropped. The block tables are captured at their full width (max_seq_len / block
    size): the attention kernel reads each row's visible length from its position, so one graph
    serves every context length. Steps of other shapes (varlen prefill, B above the largest
    bucket) run eagerly."""

    def __init__(self, runner, buckets, chunk_lengths, modes=("verify",)):
        self.runner = runner
        self.buckets = sorted(set(buckets))
        self.lengths = sorted(set(chunk_lengths))
        self.modes = tuple(modes)
        dev = runner.device
        n_max = self.buckets[-1] * self.lengths[-1]
        self.ids = torch.zeros(n_max, dtype=torch.int64, device=dev)
        self.pos = torch.zeros(n_max, dtype=torch.int64, device=dev)
        self.slots = torch.full((n_max,), runner.scratch_slot, dtype=torch.int64, device=dev)
        self.tables = torch.zeros(self.buckets[-1], runner.max_blocks, dtype=torch.int64, device=dev)
        self.lens = torch.ones(self.buckets[-1], dtype=torch.int64, device=dev)
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict = {}
        for mode in self.modes:
            for t in reversed(self.lengths):
                for b in reversed(self.buckets):
                    self._capture(mode, b, t)

    def _ctx(self, b: int, t: int):
        from quasar.engine.context import StepContext
        n = b * t
        return StepContext(self.pos[:n], self.slots[:n], list(range(0, n + 1, t)), self.tables[:b],
                           self.lens[:b], t)

    @torch.inference_mode()
    def _capture(self, mode: str, b: int, t: int) -> None:
        r = self.runner
        ctx, ids = self._ctx(b, t), self.ids[:b * t]
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                r.run_eager(ids, ctx, mode)
        torch.cuda.current_stream().wait_stream(s)
        gc.collect()
        enabled = gc.isenabled()
        gc.disable()
        try:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=self.pool):
                out = r.run_eager(ids, ctx, mode)
        finally:
            if enabled:
                gc.enable()
        self.graphs[(mode, b, t)] = (g, out)

    def bucket(self, b: int):
        for x in self.buckets:
            if x >= b:
                return x
        return None

    def __call__(self, input_ids, ctx, mode):
        """Logits [N, V] of the step, or None when no graph fits it (the caller runs it eagerly)."""
        t, b = ctx.chunk, ctx.num_seqs
        bb = self.bucket(b) if t else None
        entry = self.graphs.get((mode, bb, t)) if bb else None
        if entry is None:
            return None
        n = b * t
        self.ids[:n].copy_(input_ids)
        self.pos[:n].copy_(ctx.positions)
        self.slots[:n].copy_(ctx.slot_mapping)
        w = ctx.block_tables.shape[1]
        self.tables[:b, :w].copy_(ctx.block_tables)
        self.lens[:b].copy_(ctx.context_lens)
        if bb > b:                                    # padded rows: harmless reads, scratch writes
            self.pos[n:bb * t].zero_()
            self.slots[n:bb * t].fill_(self.runner.scratch_slot)
            self.tables[b:bb].zero_()
        g, out = entry
        g.replay()
        return out[:n]
