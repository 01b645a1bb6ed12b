"""Per-step attention metadata of a batch on the paged KV cache (nano-vllm's Context): the step's
tokens are flattened (N = the sum of every sequence's chunk), and each carries its position and
its cache slot; each sequence carries its block table and visible KV length.

Slots are separate from positions: a padded token of a uniform step (a sequence that drafted
fewer tokens than the step's chunk) writes to the cache's scratch slot, and a later tree draft can
put several tokens at one position.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class StepContext:
    positions: torch.Tensor          # [N] int64: the position of each token in its sequence
    slot_mapping: torch.Tensor       # [N] int64: the cache slot each token's K/V is written to
    query_start: list[int]           # B + 1 offsets: sequence b's tokens are [query_start[b], query_start[b+1])
    block_tables: torch.Tensor       # [B, max_blocks] int64, padded with 0 past a sequence's blocks
    context_lens: torch.Tensor       # [B] int64: KV slots visible to sequence b (its last position + 1)
    chunk: int = 0                   # T when every sequence has T tokens (decode / verify), else 0
    max_context: int = 0             # max(context_lens) on the host (0 = unknown: read it from the device)
    # the same metadata on the host (what the cache's before_step bookkeeping reads; no device sync)
    host_positions: list = None
    host_slots: list = None
    host_tables: list = None

    @property
    def num_seqs(self) -> int:
        return len(self.query_start) - 1

    @staticmethod
    def build(tables: list[list[int]], chunks: list[tuple[int, int]], block_size: int, device,
              width: int = 0) -> "StepContext":
        """tables: each sequence's block ids; chunks: each sequence's (first position, tokens) of
        this step. Slots follow positions here (chains); trees map their own slots. width: the
        block tables' padded width (0 = the longest table)."""
        pos, slots, qs = [], [], [0]
        for table, (start, n) in zip(tables, chunks):
            for p in range(start, start + n):
                pos.append(p)
                slots.append(table[p // block_size] * block_size + p % block_size)
            qs.append(qs[-1] + n)
        lens = [start + n for start, n in chunks]
        sizes = {n for _, n in chunks}
        return StepContext.make(pos, slots, qs, tables, lens, sizes.pop() if len(sizes) == 1 else 0,
                                device, width)

    @staticmethod
    def make(positions: list[int], slots: list[int], query_start: list[int], tables: list[list[int]],
             context_lens: list[int], chunk: int, device, width: int = 0) -> "StepContext":
        width = max(width, max((len(t) for t in tables), default=1), 1)
        # one host tensor for everything, one copy to the device (a step of 64 sequences would
        # otherwise make ~70 small tensors and 4 transfers)
        n, b = len(positions), len(tables)
        flat = positions + slots + context_lens
        for t in tables:
            flat += t
            flat += [0] * (width - len(t))
        host = torch.tensor(flat, dtype=torch.int64)
        dev = host.to(device)                    # no copy when `device` is the CPU
        pos, slot, lens = dev[:n], dev[n:2 * n], dev[2 * n:2 * n + b]
        bt = dev[2 * n + b:].view(b, width)
        return StepContext(pos, slot, list(query_start), bt, lens, chunk, max(context_lens, default=0),
                           positions, slots, tables)
