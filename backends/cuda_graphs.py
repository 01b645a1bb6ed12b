"""CUDA graphs for the decode / draft / verify steps (issue: the step is launch-bound otherwise).

One graph per (mode, T): mode is "verify" or "draft" (QSpec runs the same layers in another
scheme), T the chunk length (1 for decode and drafting, d+1 <= k+1 for verification). Inputs go
through static buffers; the graph runs the attention over the whole static cache and the kernel
reads each query's visible length from the positions buffer on the device, so one capture serves
every context length. Captures happen once, before the first prefill (a warm-up forward writes
KV slots, which the prefill then overwrites), and share one memory pool.

The paged runtime's graphs (PagedGraphRunner) are keyed (mode, batch bucket, T) for chain steps
and (mode, batch bucket, T, "tree") for draft-tree steps of T nodes (ModelRunner's tree_lengths):
a tree graph's attention reads static tree_positions / tree_mask buffers, copied in at replay. A
chain graph never serves a tree step (its attention has no tree fields: the result would be the
causal chunk's, silently wrong); a tree step without a tree graph of its T runs eagerly.

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


class StaticPagedStepRunner:
    """The paged runtime's uniform steps through static buffers, padded to a batch bucket: what a
    captured graph of PagedGraphRunner replays, run eagerly (its CPU twin in tests, and its base
    class). One entry per (mode, batch-size bucket, chunk length T) for chain steps, and per
    (mode, bucket, T, "tree") for tree steps (quasar.spec_decode.tree: T nodes per sequence,
    tree_lengths), whose attention reads the static tree_positions / tree_mask buffers. A step of
    B sequences is padded to the smallest bucket >= B: padded rows read block 0 at position 0
    (tree rows: storage 0, mask 1, the root only) and write the scratch slot, and their logits are
    dropped. The block tables have their full width (max_seq_len / block size): the attention
    reads each row's visible length from its position, so one entry serves every context length.
    A tree step is never served by a chain entry (whose attention ignores the tree fields): it
    runs from a tree entry of its T or eagerly. Steps of other shapes (varlen prefill, B above the
    largest bucket) run eagerly."""

    def __init__(self, runner, buckets, chunk_lengths, modes=("verify",), tree_lengths=()):
        self.runner = runner
        self.buckets = sorted(set(buckets))
        self.lengths = sorted(set(chunk_lengths))
        self.tree_lengths = sorted(set(tree_lengths))
        self.modes = tuple(modes)
        dev = runner.device
        n_max = self.buckets[-1] * max(self.lengths + self.tree_lengths)
        self.ids = torch.zeros(n_max, dtype=torch.int64, device=dev)
        self.pos = torch.zeros(n_max, dtype=torch.int64, device=dev)
        self.slots = torch.full((n_max,), runner.scratch_slot, dtype=torch.int64, device=dev)
        self.tables = torch.zeros(self.buckets[-1], runner.max_blocks, dtype=torch.int64, device=dev)
        self.lens = torch.ones(self.buckets[-1], dtype=torch.int64, device=dev)
        # tree steps: storage indices and ancestor bitmasks (a padded row: storage 0, the root only)
        self.tree_pos = torch.zeros(n_max if self.tree_lengths else 0, dtype=torch.int64, device=dev)
        self.tree_mask = torch.ones(n_max if self.tree_lengths else 0, dtype=torch.int64, device=dev)
        self.graphs: dict = {}
        for key in self.keys():
            self.graphs[key] = self._prepare(key)

    def keys(self):
        """The entries, longest chunks and largest buckets first (a shared graph pool then reuses
        the largest capture's memory)."""
        for mode in self.modes:
            for t in reversed(self.lengths):
                for b in reversed(self.buckets):
                    yield (mode, b, t)
            for t in reversed(self.tree_lengths):
                for b in reversed(self.buckets):
                    yield (mode, b, t, "tree")

    def _ctx(self, b: int, t: int, tree: bool = False):
        from quasar.engine.context import StepContext
        n = b * t
        return StepContext(self.pos[:n], self.slots[:n], list(range(0, n + 1, t)), self.tables[:b],
                           self.lens[:b], t, tree_positions=self.tree_pos[:n] if tree else None,
                           tree_mask=self.tree_mask[:n] if tree else None)

    def _prepare(self, key):
        """What serving `key` needs (a captured graph in the subclass; nothing eagerly)."""
        return None

    def _run(self, key, entry):
        """The step on the static buffers: logits [bucket * T, V]."""
        mode, b, t = key[:3]
        return self.runner.run_eager(self.ids[:b * t], self._ctx(b, t, len(key) > 3), mode)

    def bucket(self, b: int):
        for x in self.buckets:
            if x >= b:
                return x
        return None

    def key(self, ctx, mode):
        """The entry that serves this step, or None (run it eagerly). A tree step (ctx.tree_mask)
        only ever maps to a tree entry: a chain entry's attention would ignore its tree."""
        t, b = ctx.chunk, ctx.num_seqs
        bb = self.bucket(b) if t else None
        if not bb:
            return None
        key = (mode, bb, t) if ctx.tree_mask is None else (mode, bb, t, "tree")
        return key if key in self.graphs else None

    def __call__(self, input_ids, ctx, mode):
        """Logits [N, V] of the step, or None when no entry fits it (the caller runs it eagerly)."""
        key = self.key(ctx, mode)
        if key is None:
            return None
        t, b, bb = ctx.chunk, ctx.num_seqs, key[1]
        n = b * t
        self.ids[:n].copy_(input_ids)
        self.pos[:n].copy_(ctx.positions)
        self.slots[:n].copy_(ctx.slot_mapping)
        w = ctx.block_tables.shape[1]
        self.tables[:b, :w].copy_(ctx.block_tables)
        self.lens[:b].copy_(ctx.context_lens)
        tree = len(key) > 3
        if tree:
            self.tree_pos[:n].copy_(ctx.tree_positions)
            self.tree_mask[:n].copy_(ctx.tree_mask)
        if bb > b:                                    # padded rows: harmless reads, scratch writes
            self.pos[n:bb * t].zero_()
            self.slots[n:bb * t].fill_(self.runner.scratch_slot)
            self.tables[b:bb].zero_()
            self.lens[b:bb].fill_(1)
            if tree:
                self.tree_pos[n:bb * t].zero_()
                self.tree_mask[n:bb * t].fill_(1)
        return self._run(key, self.graphs[key])[:n]


class PagedGraphRunner(StaticPagedStepRunner):
    """CUDA graphs of StaticPagedStepRunner's entries: one graph per (mode, batch-size bucket,
    chunk length T) and per (mode, bucket, T, "tree") for the tree sizes given, captured at
    construction into one memory pool; a step replays the graph of its entry."""

    def __init__(self, runner, buckets, chunk_lengths, modes=("verify",), tree_lengths=()):
        self.pool = torch.cuda.graph_pool_handle()
        super().__init__(runner, buckets, chunk_lengths, modes, tree_lengths)

    @torch.inference_mode()
    def _prepare(self, key):
        mode, b, t = key[:3]
        r = self.runner
        ctx, ids = self._ctx(b, t, len(key) > 3), self.ids[:b * t]
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
        return (g, out)

    def _run(self, key, entry):
        g, out = entry
        g.replay()
        return out
