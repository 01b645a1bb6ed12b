"""The batched speculative engine: continuous batching over the paged KV cache.

    step():
      prefill step (new or preempted sequences, chunked)      varlen, one forward
        or
      decode step for every running sequence:
        K     = cost model + each sequence's acceptance        (adaptive k; 0 = plain decode)
        draft = drafter.propose_batch(seqs, k_b)               [B, K] tokens
        logits = verifier([last] + draft)                      one forward of B x (1 + max d_b)
        target = pick(logits)                                  the verifier's own tokens
        n_b = matching prefix of draft_b and target_b          on the device
        one host sync; each sequence commits target_b[:n_b + 1] (ragged)

Greedy rows take the argmax; sampled rows the Gumbel-max draw keyed by the request's seed and the
token's position (quasar.spec_decode.sampling.pick), so verification is an exact-match test in both
cases and every sequence's output is what the verifier alone gives it, whatever the batch, the
drafter or k. A sequence that drafted fewer tokens than the step's chunk pads its row with tokens
whose K/V go to the cache's scratch slot and whose logits are ignored.
"""
from __future__ import annotations

import time
from typing import Callable, Iterable, Optional

import torch

from quasar.errors import ContextLengthError
from quasar.spec_decode.drafter import Drafter
from .block_manager import BlockManager
from .context import StepContext
from .cost_model import StepCost, choose_k
from .model_runner import ModelRunner
from .scheduler import BatchScheduler
from .sequence import Sequence, Status


class Engine:
    def __init__(self, runner: ModelRunner, drafter: Drafter, k: int, *, max_batch_size: int = 64,
                 max_prefill_tokens: int = 2048, prefix_caching: bool = True, adaptive: bool = True,
                 sync: Optional[Callable] = None, cost: Optional[StepCost] = None):
        if not runner.paged:
            raise ValueError("the batched engine runs on a paged KV cache (ModelRunner(kv_blocks=...))")
        self.runner, self.drafter, self.k = runner, drafter, k
        self.device = runner.device
        self.max_seq_len = runner.max_seq_len
        self.bs = runner.block_size
        self.blocks = BlockManager(runner.num_blocks, runner.block_size,
                                   prefix_caching and runner.cache.prefix_caching)
        self.blocks.on_free = runner.cache.release_blocks      # a representation's per-block state
        self.sched = BatchScheduler(self.blocks, max_batch_size, max_prefill_tokens)
        self.adaptive = adaptive and k > 0
        self.sync = sync
        self.cost = cost
        self._last_kind = "decode"
        # the current decode step (read by the drafters)
        self.last: Optional[torch.Tensor] = None
        self.cached: list[int] = []
        self.k_hist: dict[int, int] = {}          # steps per K chosen (stats)
        self.peak_blocks = 0
        self.prefill_tokens = 0                   # tokens prefilled (prompts, and recomputes after preemption)

    # ------------------------------------------------------------------ requests
    def capacity_tokens(self) -> int:
        return self.blocks.num_blocks * self.bs

    def capacity_error(self, prompt_len: int) -> Optional[str]:
        """Why a prompt of this length can never run in this cache (None if it can)."""
        if prompt_len >= self.max_seq_len:
            return (f"the prompt has {prompt_len} tokens but max_seq_len is {self.max_seq_len}; raise "
                    "max_seq_len or shorten the prompt")
        need = prompt_len + 1 + self.k
        if need > self.capacity_tokens():
            return (f"the prompt needs {need} KV slots but the whole KV cache holds {self.capacity_tokens()} "
                    "tokens; raise runtime.kv_cache_memory or shorten the prompt")
        return None

    def add(self, seq: Sequence) -> None:
        """Queue a request; one that can never run is finished at once with its own error."""
        why = self.capacity_error(len(seq.prompt_ids))
        if why:
            seq.finish("error", why)
            return
        self.sched.add(seq)

    def abort(self, seq: Sequence, reason: str = "abort") -> None:
        """Stop a request now (a client that went away, a stop string matched): it leaves the
        queue or the batch and its KV blocks are freed before the next step. Its tokens so far
        are kept."""
        if seq.is_finished:
            return
        self.sched.abort(seq)
        seq.finish(reason)

    @property
    def has_work(self) -> bool:
        return self.sched.has_work

    def run(self, seqs: Iterable[Sequence], on_finish: Optional[Callable[[Sequence], None]] = None) -> list[Sequence]:
        """Run requests to completion (continuous batching); returns them in input order."""
        seqs = list(seqs)
        for s in seqs:
            self.add(s)
            if s.is_finished and on_finish:
                on_finish(s)
        while self.has_work:
            for s in self.step():
                if on_finish:
                    on_finish(s)
        return seqs

    # ------------------------------------------------------------------ one step
    def step(self) -> list[Sequence]:
        """One prefill or decode step; returns the sequences that finished in it."""
        ready = self.sched.ready()
        want_prefill = bool(self.sched.waiting) or any(s.prefilling for s in self.sched.running)
        finished: list[Sequence] = []
        if want_prefill and (self._last_kind == "decode" or not ready):
            chunks = self.sched.prefill_chunks()
            finished += self.sched.failed                  # failed at admission (their own error)
            self.sched.failed = []
            if chunks:
                self._last_kind = "prefill"
                finished += self._prefill(chunks)
                return finished
        self._last_kind = "decode"
        if ready:
            finished += self._decode(ready)
        return finished

    def _done(self, seq: Sequence, finished: list) -> None:
        self.sched.finish(seq)
        finished.append(seq)

    # ------------------------------------------------------------------ prefill
    def _prefill(self, chunks) -> list[Sequence]:
        t0 = time.perf_counter()
        self.prefill_tokens += sum(n for _, _, n in chunks)
        tables, pos, slots, qs, lens = [], [], [], [0], []
        ids: list[int] = []
        sample_rows, sample_seqs = [], []
        for s, start, n in chunks:
            ctx_tokens = s.context
            ids += ctx_tokens[start:start + n]
            pos += range(start, start + n)
            slots += self.blocks.slots(s.table, start, start + n)
            qs.append(qs[-1] + n)
            tables.append(s.table.blocks)
            lens.append(start + n)
            if start + n == s.prefill_target and not s.output_ids:
                sample_rows.append(qs[-1] - 1)
                sample_seqs.append(s)
        sizes = {n for _, _, n in chunks}
        ctx = StepContext.make(pos, slots, qs, tables, lens, sizes.pop() if len(sizes) == 1 else 0,
                               self.device, self.runner.max_blocks)
        dev = self.device
        rows = torch.tensor(sample_rows, dtype=torch.int64, device=dev) if sample_rows else None
        logits = self.runner.run(torch.tensor(ids, dtype=torch.int64, device=dev), ctx, "prefill",
                                 rows if rows is not None else torch.zeros(0, dtype=torch.int64, device=dev))
        first = self.pick(logits, sample_seqs, [len(s.prompt_ids) for s in sample_seqs]).tolist() if sample_seqs else []
        dt = time.perf_counter() - t0
        finished = []
        for s, start, n in chunks:
            self.sched.prefilled(s, n)
            s.stats.prefill_s += dt
        for s, tok in zip(sample_seqs, first):
            kept = s.append([tok])
            if s.on_tokens and kept:
                s.on_tokens(kept)
        for s, _, _ in chunks:
            if not s.prefilling:
                self.drafter.start(s)
            if s.is_finished:
                self._done(s, finished)
        self.peak_blocks = max(self.peak_blocks, self.blocks.num_used)
        return finished

    # ------------------------------------------------------------------ decode (speculative)
    def _room(self, s: Sequence) -> int:
        """Tokens this sequence may still draft: by max_new_tokens and by max_seq_len."""
        cached = len(s) - 1
        return max(0, min(s.stop.max_new_tokens - len(s.output_ids) - 1, self.max_seq_len - cached - 1))

    def _decode(self, seqs: list[Sequence]) -> list[Sequence]:
        finished: list[Sequence] = []
        for s in list(seqs):                                   # out of positions: finish
            if len(s) - 1 >= self.max_seq_len:
                s.finish("max_seq_len")
                self._done(s, finished)
        seqs = [s for s in seqs if not s.is_finished]
        if not seqs:
            return finished
        K = self.choose_k(seqs)
        ks = [min(K, self._room(s)) for s in seqs]
        kept, failed = self.sched.reserve(seqs, [len(s) + self.drafter.storage(k) for s, k in zip(seqs, ks)])
        finished += failed
        if len(kept) < len(seqs):
            ks = [k for s, k in zip(seqs, ks) if s in kept]
            seqs = kept
            if not seqs:
                return finished
        t0 = time.perf_counter()
        dev = self.device
        self.cached = [len(s) - 1 for s in seqs]
        self.last = torch.tensor([s.last_token for s in seqs], dtype=torch.int64, device=dev)
        draft = self.drafter.propose_batch(seqs, ks, self)
        if self.sync is not None and self.drafter.on_device:
            self.sync()
        t1 = time.perf_counter()
        verify = self._verify_chain if draft.parents is None else self._verify_tree
        accepted, tries, T = verify(seqs, draft)            # the step's one host sync is in here
        t2 = time.perf_counter()
        B = len(seqs)
        if self.cost is not None:
            self.cost.observe(B * T, t2 - t1)
        self.k_hist[K] = self.k_hist.get(K, 0) + 1
        for s, c, d, k, new, tried in zip(seqs, self.cached, draft.counts, ks, accepted, tries):
            na = len(new) - 1
            st = s.stats
            st.steps += 1
            st.drafted += d
            st.accepted += na
            st.k_sum += k
            st.draft_s += t1 - t0
            st.verify_s += t2 - t1
            st.decode_s += t2 - t0
            if len(st.pos_tries) < tried:
                st.pos_tries += [0] * (tried - len(st.pos_tries))
                st.pos_accepts += [0] * (tried - len(st.pos_accepts))
            for i in range(tried):
                st.pos_tries[i] += 1
                st.pos_accepts[i] += int(i < na)
            s.observe(tried, na)
            got = s.append(new)
            st.decode_tokens += len(got)
            if s.on_tokens and got:
                s.on_tokens(got)
            s.num_computed = c + 1 + na                # last + the accepted drafts now hold KV
            self.drafter.commit_seq(s, c + 1 + na)
            if not s.is_finished and len(s) - 1 >= self.max_seq_len:
                s.finish("max_seq_len")
            if s.is_finished:
                self._done(s, finished)
        self.peak_blocks = max(self.peak_blocks, self.blocks.num_used)
        return finished

    def _verify_chain(self, seqs: list[Sequence], draft) -> tuple[list[list[int]], list[int], int]:
        """Verify chain drafts: one causal chunk of T = 1 + max d_b tokens per sequence. Returns
        each sequence's new tokens (accepted drafts + the verifier's next), its drafted depth, T."""
        dev = self.device
        counts = draft.counts
        T = 1 + max(counts, default=0)
        B = len(seqs)
        ids = torch.zeros(B, T, dtype=torch.int64, device=dev)
        ids[:, 0] = self.last
        if T > 1:
            ids[:, 1:] = draft.tokens[:, :T - 1]
        pos, slots, qs, lens = [], [], [0], []
        for s, c, d in zip(seqs, self.cached, counts):
            real = self.blocks.slots(s.table, c, c + d + 1)
            pos += list(range(c, c + d + 1)) + [c + d] * (T - 1 - d)
            slots += real + [self.runner.scratch_slot] * (T - 1 - d)
            qs.append(qs[-1] + T)
            lens.append(c + d + 1)
        ctx = StepContext.make(pos, slots, qs, [s.table.blocks for s in seqs], lens, T, dev, self.runner.max_blocks)
        logits = self.runner.run(ids.view(-1), ctx, "verify" if T > 1 else "decode")
        rows_seqs = [s for s in seqs for _ in range(T)]
        target = self.pick(logits, rows_seqs, [p + 1 for p in pos]).view(B, T)
        if T > 1:
            cnt = torch.tensor(counts, device=dev)
            match = (target[:, :T - 1] == draft.tokens[:, :T - 1]) & (torch.arange(T - 1, device=dev)[None] < cnt[:, None])
            n = match.long().cumprod(1).sum(1)
        else:
            n = torch.zeros(B, dtype=torch.int64, device=dev)
        host = torch.cat([n[:, None], target], 1).tolist()     # the step's one host sync
        return [row[1:2 + row[0]] for row in host], list(counts), T

    def tree_width(self, n: int) -> int:
        """The verify chunk of a tree step whose largest tree has n nodes: the smallest of the
        runner's captured tree sizes that holds it (n itself when none does)."""
        return min((w for w in getattr(self.runner, "tree_lengths", ()) if w >= n), default=n)

    def _verify_tree(self, seqs: list[Sequence], draft) -> tuple[list[list[int]], list[int], int]:
        """Verify tree drafts (quasar.spec_decode.tree): node m of sequence b at storage c_b + m and
        position c_b + depth, attending to its ancestors through the step's tree mask; the
        accepted path is read on the host after the step's one sync, and its K/V moved to the
        positions AR decoding would have written (one cache move for the whole step)."""
        from quasar.spec_decode import tree
        dev = self.device
        B = len(seqs)
        T = self.tree_width(1 + max(draft.counts, default=0))
        ids = torch.zeros(B, T, dtype=torch.int64, device=dev)
        ids[:, 0] = self.last
        w = min(draft.tokens.shape[1], T - 1)
        if w > 0:
            ids[:, 1:1 + w] = draft.tokens[:, :w]
        pos, slots, qs, lens, tpos, tmask = [], [], [0], [], [], []
        scratch = self.runner.scratch_slot
        for s, c, par in zip(seqs, self.cached, draft.parents):
            n = len(par)
            r = tree.rows(c, par, T)
            pos += r.positions
            tpos += r.storage
            tmask += r.mask
            slots += self.blocks.slots(s.table, c, c + n) + [scratch] * (T - n)
            qs.append(qs[-1] + T)
            lens.append(c + n)
        ctx = StepContext.make(pos, slots, qs, [s.table.blocks for s in seqs], lens, T, dev,
                               self.runner.max_blocks, tpos, tmask)
        logits = self.runner.run(ids.view(-1), ctx, "verify" if T > 1 else "decode")
        rows_seqs = [s for s in seqs for _ in range(T)]
        target = self.pick(logits, rows_seqs, [p + 1 for p in pos]).view(B, T)
        host = torch.cat([target, ids], 1).tolist()           # the step's one host sync
        out, tries, src, dst = [], [], [], []
        for s, c, par, row in zip(seqs, self.cached, draft.parents, host):
            tg, tok = row[:T], row[T:]
            path = tree.accepted_path(tok[:len(par)], par, tg)
            out.append([tok[a] for a in path[1:]] + [tg[path[-1]]])
            tries.append(max(tree.depths(par)))
            moved = [(a, i) for i, a in enumerate(path) if a != i]
            if moved:
                src += self.blocks.slots_at(s.table, [c + a for a, _ in moved])
                dst += self.blocks.slots_at(s.table, [c + i for _, i in moved])
        if src:
            self.runner.cache.move_slots(torch.tensor(src, dtype=torch.int64, device=dev),
                                         torch.tensor(dst, dtype=torch.int64, device=dev))
        return out, tries, T

    def choose_k(self, seqs: list[Sequence]) -> int:
        if not self.adaptive or self.cost is None:
            return self.k
        return choose_k([s.alpha for s in seqs], self.k, self.cost, self.drafter.on_device)

    # ------------------------------------------------------------------ helpers for drafters
    def pick(self, logits: torch.Tensor, seqs: list[Sequence], positions: list[int]) -> torch.Tensor:
        """The verifier's (or a coupled drafter's) token per row: greedy or the request's
        seeded Gumbel-max draw at that position."""
        from quasar.spec_decode.sampling import pick
        params = [s.sampling for s in seqs]
        if all(p.greedy for p in params):
            return logits.argmax(-1)
        dev = logits.device
        seeds = torch.tensor([p.seed for p in params], dtype=torch.int64, device=dev)
        return pick(logits, params, seeds, torch.tensor(positions, dtype=torch.int64, device=dev))

    def token_ctx(self, seqs: list[Sequence], positions: list[int], real: list[bool]) -> StepContext:
        """One token per sequence at `positions`; a token not `real` writes to the scratch slot
        (a draft step past a sequence's own k) at a position clamped into the rope table."""
        pos, slots = [], []
        for s, p, r in zip(seqs, positions, real):
            if r:
                pos.append(p)
                slots += self.blocks.slots(s.table, p, p + 1)
            else:
                pos.append(min(p, self.max_seq_len - 1, len(s.table.blocks) * self.bs - 1))
                slots.append(self.runner.scratch_slot)
        return StepContext.make(pos, slots, list(range(len(seqs) + 1)), [s.table.blocks for s in seqs],
                                [p + 1 for p in pos], 1, self.device, self.runner.max_blocks)

    def catch_up_ctx(self, seqs: list[Sequence], starts: list[int]):
        """A varlen step over each sequence's tokens [starts[b], cached_b] (the last one
        included): (ctx, input ids, the row of each sequence's last token)."""
        pos, slots, qs, lens, ids, rows = [], [], [0], [], [], []
        for s, a, c in zip(seqs, starts, self.cached):
            toks = s.context
            ids += toks[a:c + 1]
            pos += range(a, c + 1)
            slots += self.blocks.slots(s.table, a, c + 1)
            qs.append(qs[-1] + c + 1 - a)
            lens.append(c + 1)
            rows.append(qs[-1] - 1)
        sizes = {qs[i + 1] - qs[i] for i in range(len(seqs))}
        ctx = StepContext.make(pos, slots, qs, [s.table.blocks for s in seqs], lens,
                               sizes.pop() if len(sizes) == 1 else 0, self.device, self.runner.max_blocks)
        dev = self.device
        return ctx, torch.tensor(ids, dtype=torch.int64, device=dev), torch.tensor(rows, dtype=torch.int64, device=dev)

    def check(self) -> None:
        """Invariants (tests): blocks are accounted for; nothing leaks once all is done."""
        self.blocks.check()
        if not self.has_work:
            held = sum(b.ref_count for b in self.blocks.blocks)
            if held:
                raise AssertionError(f"{held} block references still held with no sequence running")
