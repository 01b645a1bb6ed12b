"""Per-step attention metadata of a batch on the paged KV cache (nano-vllm's Context): the step's
tokens are flattened (N = the sum of every sequence's chunk), and each carries its position and
its cache slot; each sequence carries its block table and visible KV length.

Slots are separate from positions: a padded token of a uniform step (a sequence that drafted
fewer tokens than the step's chunk) writes to the cache's scratch slot, and a later tree draft can
put several tokens at one position.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

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
    # a tree step (quasar.spec_decode.tree): sequence b's chunk holds the nodes of a draft tree in
    # storage order (a node after its parent). tree_positions [N] int64: each token's storage
    # index (its slot's logical position: the chunk's first token at s_b, node m at s_b + m; the
    # attention reads storage indices, RoPE reads `positions` = s_b + depth). tree_mask [N] int64:
    # bit m set = the token may attend to node m of its own chunk. None: a chain (causal) step.
    tree_positions: Optional[torch.Tensor] = None
    tree_mask: Optional[torch.Tensor] = None

    @property
    def attn_positions(self) -> torch.Tensor:
        """What the attention's visibility reads: storage indices (trees) or positions (chains)."""
        return self.positions if self.tree_positions is None else self.tree_positions

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
             context_lens: list[int], chunk: int, device, width: int = 0,
             tree_positions: Optional[list[int]] = None, tree_mask: Optional[list[int]] = None) -> "StepContext":
        """tree_positions / tree_mask (host lists, [N]): a tree step (see the fields)."""
        width = max(width, max((len(t) for t in tables), default=1), 1)
        # one host tensor for everything, one copy to the device (a step of 64 sequences would
        # otherwise make ~70 small tensors and 4 transfers)
        n, b = len(positions), len(tables)
        tree = tree_mask is not None
        flat = positions + slots + context_lens + (list(tree_positions) + _signed(tree_mask) if tree else [])
        for t in tables:
            flat += t
            flat += [0] * (width - len(t))
        host = torch.tensor(flat, dtype=torch.int64)
        dev = host.to(device)                    # no copy when `device` is the CPU
        pos, slot, lens = dev[:n], dev[n:2 * n], dev[2 * n:2 * n + b]
        o = 2 * n + b
        tpos = tmask = None
        if tree:
            tpos, tmask = dev[o:o + n], dev[o + n:o + 2 * n]
            o += 2 * n
        bt = dev[o:].view(b, width)
        return StepContext(pos, slot, list(query_start), bt, lens, chunk, max(context_lens, default=0),
                           positions, slots, tables, tpos, tmask)


def _signed(bits: list[int]) -> list[int]:
    """64-bit masks as int64 values (bit 63 set = negative), so torch.tensor takes them."""
    return [m - (1 << 64) if m >= 1 << 63 else m for m in bits]
