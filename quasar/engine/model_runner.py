"""The ModelRunner owns a model's step: the KV cache (made here, the one place a cache is made for
a model) and, where the backend captures steps (CUDA graphs), the captured runner that wraps the
model. Mode (verify / draft) is an explicit argument of `step`, not a flag flipped by callers.

The scheduler, the drafters and the tools drive a model only through its runner. The batched
runtime (paged cache, continuous batching) grows here.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from quasar import kv
from quasar.errors import ConfigError


MODES = ("prefill", "decode", "draft", "verify")


class ModelRunner:
    def __init__(self, model, batch: int = 1, chunk_lengths: Sequence[int] = (),
                 modes: Sequence[str] = ("verify",), graphs: Optional[bool] = None,
                 kv_blocks: Optional[int] = None, block_size: int = 16, buckets: Sequence[int] = (),
                 layout: Optional["kv.Layout"] = None, tree_lengths: Sequence[int] = ()):
        """chunk_lengths / modes: the steps to capture (decode and verify chunk lengths; "draft"
        too for QSpec). graphs: None = capture where the backend can, True = must, False = never.
        kv_blocks: a paged cache of that many blocks of `block_size` (the batched runtime, `run`),
        plus one scratch block that padded tokens write to; None: the dense cache of `batch`
        sequences of max_seq_len (the single-sequence scheduler, `forward` / `step`). buckets: the
        batch sizes whose uniform steps (chunk_lengths x modes) the paged runner captures.
        Modes of the paged runner: prefill / decode / verify run the verifier's scheme, draft the
        draft scheme (QSpec); a captured graph of mode "verify" serves decode steps too. layout: the
        paged cache's representation (quasar.kv.Layout; None = dense blocks of block_size).
        tree_lengths: the draft-tree sizes (nodes per sequence, root included, <= tree.MAX_NODES)
        whose tree verify steps the paged runner captures too (x buckets x modes); a tree step of
        another size runs eagerly, never from a chain graph. Paged runners only."""
        from quasar.spec_decode.tree import MAX_NODES
        self.tree_lengths = tuple(sorted({int(t) for t in tree_lengths}))
        if any(not 1 <= t <= MAX_NODES for t in self.tree_lengths):
            raise ConfigError(f"tree_lengths must lie in [1, {MAX_NODES}] (nodes per tree), got {list(tree_lengths)}")
        if self.tree_lengths and kv_blocks is None:
            raise ConfigError("tree_lengths needs the paged KV cache (kv_blocks): draft trees run on the batched runtime")
        self.model = model
        self.backend = model.backend
        self.captured = None
        self.paged = kv_blocks is not None
        if self.paged:
            if layout is not None:
                self.backend.check_kv(layout.representation)
                block_size = layout.block_size
            self.cache = kv.allocate_paged(model.args, kv_blocks + 1, block_size, model.dtype, model.device, layout)
            self.num_blocks, self.block_size = kv_blocks, block_size
            self.scratch_slot = kv_blocks * block_size
            self.max_blocks = -(-model.max_seq_len // block_size)    # a block table's width
            if graphs is not False and (chunk_lengths or self.tree_lengths) and buckets:
                self.captured = self.backend.paged_graph_runner(self, buckets, list(chunk_lengths), tuple(modes),
                                                                self.tree_lengths)
            if graphs and self.captured is None:
                raise ConfigError(f"runtime.cuda_graphs is true but the {self.backend.name} backend on "
                                  f"{self.model.device} has no graph capture; set it to null or false")
            return
        self.cache = kv.allocate(model.args, batch, model.max_seq_len, model.dtype, model.device)
        if graphs is not False and chunk_lengths:
            self.captured = self.backend.graph_runner(model, self.cache, list(chunk_lengths), tuple(modes))
        if graphs and self.captured is None:
            raise ConfigError(f"runtime.cuda_graphs is true but the {self.backend.name} backend on "
                              f"{self.model.device} has no graph capture; set it to null or false")

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def max_seq_len(self) -> int:
        return self.model.max_seq_len

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_len: int,
                mask: Optional[torch.Tensor] = None, last_only: bool = False) -> torch.Tensor:
        """An eager forward over this runner's cache (prefill, or any chunk)."""
        return self.model.forward(input_ids, positions, self.cache, kv_len, mask=mask, last_only=last_only)

    __call__ = forward

    def run(self, input_ids: torch.Tensor, ctx, mode: str = "verify",
            rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One step of the batched runtime on the paged cache: input_ids [N] (every sequence's
        chunk, flattened), ctx its StepContext; mode: prefill / decode / verify run the verifier's
        scheme, draft the draft scheme (QSpec). Returns fp32 logits [N or len(rows), vocab]."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        graph_ok = self.cache.before_step(ctx, mode)
        if self.captured is not None and rows is None and graph_ok:
            out = self.captured(input_ids, ctx, "draft" if mode == "draft" else "verify")
            if out is not None:
                return out
        return self.run_eager(input_ids, ctx, mode, rows)

    def run_eager(self, input_ids: torch.Tensor, ctx, mode: str = "verify",
                  rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.model.run(input_ids, self.cache, ctx, rows, mode)

    def prefill(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_len: int) -> torch.Tensor:
        """Logits of the last position [B, 1, vocab]."""
        return self.forward(input_ids, positions, kv_len, last_only=True)

    def step(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_len: int,
             mode: str = "verify") -> torch.Tensor:
        """A decode / draft / verify step (a few tokens against the cache): replayed from the
        captured runner when there is one (static buffers; the attention reads the visible length
        from `positions`), else run eagerly in `mode`."""
        if self.captured is not None:
            return self.captured(input_ids, positions, mode)
        return self.model.forward(input_ids, positions, self.cache, kv_len, mode=mode)
