"""Continuous batching: which sequences run in the next step.

Waiting sequences are admitted while the block manager has room for their prefill and
`max_batch_size` allows; prompts are prefilled in chunks of at most `max_prefill_tokens` tokens per
step, so a long prompt does not stall the running sequences (the engine alternates prefill and
decode steps while both have work). Before a decode step every running sequence must have KV room
for its step (its last token and its drafts); when the blocks run out, the most recently admitted
sequence is preempted: its blocks are freed, it goes back to the front of the queue, and it is
recomputed (prompt + output so far) when it is admitted again. Nothing is lost and nothing
overflows the cache.
"""
from __future__ import annotations

from collections import deque

from quasar.errors import ContextLengthError
from .block_manager import BlockManager
from .sequence import Sequence, Status


class BatchScheduler:
    def __init__(self, blocks: BlockManager, max_batch_size: int, max_prefill_tokens: int):
        self.blocks = blocks
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.preemptions = 0
        self.failed: list[Sequence] = []       # finished with an error at admission (drained by the engine)

    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        self.waiting.append(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def ready(self) -> list[Sequence]:
        """Running sequences whose prefill is done: the next decode step's batch."""
        return [s for s in self.running if not s.prefilling]

    # ------------------------------------------------------------------ prefill
    def prefill_chunks(self) -> list[tuple[Sequence, int, int]]:
        """(sequence, first position, tokens) of the next prefill step: unfinished prefills
        first, then newly admitted sequences, within the step's token budget. Sequences that can
        never fit the cache are failed (their own error), not raised."""
        budget = self.max_prefill_tokens
        chunks = []
        for s in self.running:
            if s.prefilling and budget > 0:
                n = min(budget, s.prefill_target - s.num_computed)
                chunks.append((s, s.num_computed, n))
                budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_batch_size:
            s = self.waiting[0]
            tokens = s.context[:s.prefill_target]
            try:
                table = self.blocks.allocate(tokens, s.prefill_target + 1)
            except ContextLengthError as e:
                self.waiting.popleft()
                s.finish("error", str(e))
                self.failed.append(s)
                continue
            if table is None:
                break                               # no room now: wait for blocks to free up
            self.waiting.popleft()
            s.table = table
            s.num_computed = min(table.num_cached_tokens, s.prefill_target - 1)
            s.status = Status.RUNNING
            self.running.append(s)
            n = min(budget, s.prefill_target - s.num_computed)
            chunks.append((s, s.num_computed, n))
            budget -= n
        return chunks

    def prefilled(self, seq: Sequence, n: int) -> None:
        seq.num_computed += n
        self.blocks.register_prompt(seq.table, seq.prompt_ids, seq.num_computed)

    # ------------------------------------------------------------------ decode
    def reserve(self, seqs: list[Sequence], slots: list[int]) -> tuple[list[Sequence], list[Sequence]]:
        """Make sure each sequence's table covers its slots for this step, preempting the most
        recently admitted running sequences when the blocks run out. Returns the sequences that
        stay in the step (in order), and those finished because even the whole cache cannot hold
        them (a sequence alone that still does not fit: its own error, its tokens so far kept)."""
        keep, failed = [], []
        for s, n in zip(seqs, slots):
            if s.status is not Status.RUNNING:
                continue                            # preempted for an earlier sequence of this step
            while not self.blocks.ensure(s.table, n):
                if self.running == [s]:
                    cap = self.blocks.num_blocks * self.blocks.block_size
                    s.finish("error", f"the sequence needs {n} KV slots but the whole cache holds {cap} "
                                      f"tokens ({len(s.output_ids)} tokens were generated); raise "
                                      "runtime.kv_cache_memory or lower max_new_tokens")
                    self.finish(s)
                    failed.append(s)
                    break
                victim = self.running[-1]
                self.preempt(victim)
                if victim is s:
                    break
            if s.status is Status.RUNNING:
                keep.append(s)
        return keep, failed

    def preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free(seq.table)
        seq.preempt()
        self.waiting.appendleft(seq)
        self.preemptions += 1

    def abort(self, seq: Sequence) -> bool:
        """Drop a waiting or running sequence at once (its blocks are freed); False if it is not
        here (already finished)."""
        if seq in self.waiting:
            self.waiting.remove(seq)
            return True
        if seq in self.running:
            self.finish(seq)
            return True
        return False

    def finish(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        self.blocks.free(seq.table)
