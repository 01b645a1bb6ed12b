"""Paged KV blocks: allocation per sequence, reference counts, prefix caching of full prompt blocks.

The KV cache is `num_blocks` fixed-size blocks of `block_size` slots. A sequence owns a block table
(block ids in order); the slot of its token at position p is `table[p // bs] * bs + p % bs`.
Speculative steps write up to k+1 slots past the committed length, so capacity is asked for in
slots (`ensure`) rather than one token at a time; rejected draft slots are simply overwritten.

Prefix caching (vLLM / nano-vllm style): a *full* prompt block whose KV has been computed is
registered under a hash chained over every token before it, so a later prompt that starts with
the same tokens maps those blocks into its own table (reference count + 1) and skips computing
them. A freed block keeps its hash until it is reused, so a finished request's prefix still hits.
Only prompt blocks are registered: generated tokens differ per request and their KV in a verify
chunk may be a draft's.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from quasar.errors import ContextLengthError


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: Optional[bytes] = None
    token_ids: tuple = ()


@dataclass
class BlockTable:
    """A sequence's blocks: ids in order, and how many leading prompt tokens were prefix hits."""
    blocks: list[int] = field(default_factory=list)
    num_cached_tokens: int = 0          # prompt tokens whose KV came from the prefix cache
    num_registered: int = 0             # full prompt blocks already registered for prefix caching


def chain_hash(prev: Optional[bytes], token_ids) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    if prev is not None:
        h.update(prev)
    h.update(np.asarray(token_ids, dtype=np.int64).tobytes())
    return h.digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks ({num_blocks}) and block_size ({block_size}) must be >= 1")
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # free blocks in LRU order: the least recently freed is reused first, so a cached prefix
        # survives as long as possible
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._by_hash: dict[bytes, int] = {}
        self.on_free = None          # called with the ids of blocks that became free

    # ------------------------------------------------------------------ accounting
    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    def blocks_for(self, num_slots: int) -> int:
        return -(-num_slots // self.block_size)

    # ------------------------------------------------------------------ prefix lookup
    def _prefix_hits(self, prompt: list[int]) -> list[int]:
        """Block ids that hold the KV of the prompt's leading full blocks (the last prompt token
        is always computed, so a prompt that is all hits still leaves its last block to compute)."""
        if not self.prefix_caching:
            return []
        bs, hits, h = self.block_size, [], None
        for i in range((len(prompt) - 1) // bs):
            toks = tuple(prompt[i * bs:(i + 1) * bs])
            h = chain_hash(h, toks)
            bid = self._by_hash.get(h)
            if bid is None or self.blocks[bid].token_ids != toks:
                break
            hits.append(bid)
        return hits

    def can_allocate(self, prompt: list[int], num_slots: int) -> bool:
        """Whether a new sequence of this prompt fits with `num_slots` slots reserved."""
        hits = self._prefix_hits(prompt)
        fresh = self.blocks_for(num_slots) - len(hits)
        reuse_free = sum(1 for b in hits if self.blocks[b].ref_count == 0)
        return fresh + reuse_free <= self.num_free

    # ------------------------------------------------------------------ allocation
    def _take_free(self) -> int:
        bid, _ = self._free.popitem(last=False)
        b = self.blocks[bid]
        if b.hash is not None and self._by_hash.get(b.hash) == bid:
            del self._by_hash[b.hash]           # its cached content is about to be overwritten
        b.hash, b.token_ids, b.ref_count = None, (), 1
        return bid

    def allocate(self, prompt: list[int], num_slots: int) -> BlockTable:
        """A block table for a new sequence covering `num_slots` slots (prompt + what the first
        step writes), with the prompt's cached prefix blocks shared. Raises ContextLengthError if
        the whole cache could never hold it; returns None if it does not fit now (caller waits)."""
        need = self.blocks_for(num_slots)
        if need > self.num_blocks:
            raise ContextLengthError(
                f"a sequence of {num_slots} slots needs {need} KV blocks of {self.block_size}; the cache "
                f"has {self.num_blocks} ({self.num_blocks * self.block_size} tokens): raise "
                "runtime.kv_cache_memory or shorten the prompt / max_new_tokens")
        if not self.can_allocate(prompt, num_slots):
            return None
        table = BlockTable()
        for bid in self._prefix_hits(prompt):
            b = self.blocks[bid]
            if b.ref_count == 0:
                del self._free[bid]
            b.ref_count += 1
            table.blocks.append(bid)
        table.num_cached_tokens = table.num_registered = len(table.blocks)
        table.num_cached_tokens *= self.block_size
        while len(table.blocks) < need:
            table.blocks.append(self._take_free())
        return table

    def ensure(self, table: BlockTable, num_slots: int) -> bool:
        """Grow the table to cover `num_slots` slots; False (and nothing taken) if the free
        blocks do not suffice (the caller preempts a sequence and tries again)."""
        need = self.blocks_for(num_slots) - len(table.blocks)
        if need <= 0:
            return True
        if need > self.num_free:
            return False
        for _ in range(need):
            table.blocks.append(self._take_free())
        return True

    def free(self, table: BlockTable) -> None:
        """Release a sequence's blocks (finished or preempted). Registered blocks stay findable by
        their hash until they are reused."""
        freed = []
        for bid in reversed(table.blocks):
            b = self.blocks[bid]
            b.ref_count -= 1
            if b.ref_count < 0:
                raise RuntimeError(f"block {bid} freed twice")
            if b.ref_count == 0:
                self._free[bid] = None
                freed.append(bid)
        table.blocks.clear()
        if freed and self.on_free is not None:
            self.on_free(freed)
        table.num_cached_tokens = table.num_registered = 0

    def register_prompt(self, table: BlockTable, prompt: list[int], num_computed: int) -> None:
        """After a (chunk of) prefill: register the prompt's full blocks whose KV is now computed
        (`num_computed` leading prompt tokens), for later requests to share."""
        if not self.prefix_caching:
            return
        bs = self.block_size
        full = min(num_computed, len(prompt)) // bs
        h = self.blocks[table.blocks[table.num_registered - 1]].hash if table.num_registered else None
        for i in range(table.num_registered, full):
            toks = tuple(prompt[i * bs:(i + 1) * bs])
            h = chain_hash(h, toks)
            b = self.blocks[table.blocks[i]]
            b.hash, b.token_ids = h, toks
            self._by_hash.setdefault(h, b.block_id)
        table.num_registered = max(table.num_registered, full)

    def slots(self, table: BlockTable, start: int, end: int) -> list[int]:
        """Cache slots of positions [start, end) of the sequence."""
        bs = self.block_size
        return [table.blocks[p // bs] * bs + p % bs for p in range(start, end)]

    def slots_at(self, table: BlockTable, positions: list[int]) -> list[int]:
        """Cache slots of the given positions of the sequence."""
        bs = self.block_size
        return [table.blocks[p // bs] * bs + p % bs for p in positions]

    def check(self) -> None:
        """Invariants (tests): every block is free xor referenced; the hash index points at blocks
        holding that hash."""
        for b in self.blocks:
            if (b.ref_count == 0) != (b.block_id in self._free):
                raise AssertionError(f"block {b.block_id}: ref_count {b.ref_count}, free {b.block_id in self._free}")
        for h, bid in self._by_hash.items():
            if self.blocks[bid].hash != h:
                raise AssertionError(f"hash index points block {bid} at a stale hash")
