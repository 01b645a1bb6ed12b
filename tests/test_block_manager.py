"""The paged KV block manager (issue 17's foundation): allocation, growth for speculative steps,
free, reference counts, prefix-cache hits, and no leak after many random requests."""
import random

import pytest

from quasar.engine.block_manager import BlockManager
from quasar.engine.sequence import Sequence, Status, StopConditions
from quasar.errors import ContextLengthError


def test_allocate_ensure_free_and_slots():
    bm = BlockManager(num_blocks=8, block_size=4)
    t = bm.allocate(list(range(10)), num_slots=10 + 6)          # prompt + a k=5 verify chunk
    assert len(t.blocks) == 4 and bm.num_free == 4 and t.num_cached_tokens == 0
    assert bm.slots(t, 0, 5) == [t.blocks[0] * 4 + i for i in range(4)] + [t.blocks[1] * 4]
    assert bm.ensure(t, 17) and len(t.blocks) == 5 and bm.num_free == 3
    assert bm.ensure(t, 17) and bm.num_free == 3                  # already covered: nothing taken
    assert not bm.ensure(t, 100) and len(t.blocks) == 5           # does not fit: nothing taken
    bm.free(t)
    assert bm.num_free == 8 and not t.blocks
    bm.check()
    with pytest.raises(ContextLengthError, match="needs 9 KV blocks of 4; the cache has 8"):
        bm.allocate(list(range(3)), num_slots=33)
    full = [bm.allocate([1], 8) for _ in range(4)]
    assert bm.num_free == 0 and bm.allocate([1], 1) is None       # no room now: the caller waits
    for t in full:
        bm.free(t)
    bm.check()


def test_prefix_blocks_are_shared_with_reference_counts_and_survive_their_owner():
    bm = BlockManager(num_blocks=16, block_size=4)
    prompt = list(range(100, 111))                                 # 11 tokens: 2 full blocks + 3
    a = bm.allocate(prompt, 16)
    assert a.num_cached_tokens == 0
    bm.register_prompt(a, prompt, num_computed=11)
    b = bm.allocate(prompt[:8] + [7, 7, 7, 7], 16)                 # same first two blocks
    assert b.num_cached_tokens == 8 and b.blocks[:2] == a.blocks[:2]
    assert [bm.blocks[i].ref_count for i in a.blocks[:2]] == [2, 2]
    c = bm.allocate([100, 101, 102, 999] + prompt[4:], 16)        # diverges in block 0: no hit
    assert c.num_cached_tokens == 0
    bm.free(a)
    assert [bm.blocks[i].ref_count for i in b.blocks[:2]] == [1, 1]
    bm.free(b)
    bm.free(c)
    d = bm.allocate(prompt, 16)                                    # the finished prefix still hits
    assert d.num_cached_tokens == 8
    e = bm.allocate(prompt[:8], 12)                                # a prompt that is all hits keeps
    assert e.num_cached_tokens == 4                                # its last block to compute
    bm.free(d)
    bm.free(e)
    bm.check()
    off = BlockManager(num_blocks=16, block_size=4, prefix_caching=False)
    t = off.allocate(prompt, 16)
    off.register_prompt(t, prompt, 11)
    assert off.allocate(prompt, 16).num_cached_tokens == 0


def test_no_block_leaks_after_1000_random_requests():
    """Random admission, growth by speculative steps, preemption when blocks run out, finishing;
    at the end every block is free, and the invariants hold after every operation."""
    rng = random.Random(0)
    bm = BlockManager(num_blocks=64, block_size=8)
    prefixes = [[rng.randrange(1000) for _ in range(rng.randrange(8, 40))] for _ in range(6)]
    running: list[tuple[list[int], object, int]] = []
    admitted = finished = preempted = hits = 0
    while finished < 1000:
        if rng.random() < 0.5:
            prompt = rng.choice(prefixes)[:rng.randrange(1, 40)] + [rng.randrange(1000) for _ in range(rng.randrange(0, 12))]
            if not prompt:
                prompt = [1]
            t = bm.allocate(prompt, len(prompt) + 6)
            if t is not None:
                bm.register_prompt(t, prompt, len(prompt))
                running.append((prompt, t, len(prompt)))
                admitted += 1
                hits += t.num_cached_tokens > 0
        if running:
            i = rng.randrange(len(running))
            prompt, t, n = running[i]
            n += rng.randrange(1, 7)                                 # accepted tokens of a step
            if rng.random() < 0.15:
                bm.free(t)
                running.pop(i)
                finished += 1
            elif not bm.ensure(t, n + 6):
                victim = rng.randrange(len(running))                 # preempt someone, recompute later
                bm.free(running[victim][1])
                running.pop(victim)
                preempted += 1
            else:
                running[i] = (prompt, t, n)
        bm.check()
    for _, t, _ in running:
        bm.free(t)
    bm.check()
    assert bm.num_free == bm.num_blocks and admitted >= 1000 and preempted > 0 and hits > 100


def test_sequence_stop_conditions_and_preemption():
    s = Sequence([5, 6, 7], stop=StopConditions(max_new_tokens=6, eos_ids=frozenset({2}),
                                                 stop_token_ids=frozenset({9})))
    assert len(s) == 3 and s.last_token == 7 and s.status is Status.WAITING
    assert s.append([10, 11]) == [10, 11] and not s.is_finished
    assert s.append([12, 2, 13]) == [12, 2] and s.finish_reason == "eos" and s.is_finished
    t = Sequence([1], stop=StopConditions(max_new_tokens=3))
    assert t.append([4, 4, 4, 4, 4]) == [4, 4, 4] and t.finish_reason == "length"
    u = Sequence([1], stop=StopConditions(max_new_tokens=8, stop_token_ids=frozenset({9})))
    assert u.append([3, 9, 3]) == [3, 9] and u.finish_reason == "stop"
    v = Sequence([1], stop=StopConditions(eos_ids=frozenset({2}), ignore_eos=True))
    assert v.append([2, 2]) == [2, 2] and not v.is_finished
    v.num_computed = 3
    v.preempt()
    assert v.status is Status.WAITING and v.num_computed == 0 and v.context == [1, 2, 2]
    with pytest.raises(ValueError):
        Sequence([])


def test_a_requests_noise_depends_only_on_its_seed_and_position():
    """The batched runtime's sampling noise (Gumbel, keyed by seed and position): the same for a
    row alone or among others, different across seeds and positions."""
    import torch
    from quasar.spec_decode.sampling import gumbel
    alone = gumbel(torch.tensor([7]), torch.tensor([12]), 64)
    batch = gumbel(torch.tensor([3, 7, 7, 9]), torch.tensor([12, 12, 13, 12]), 64)
    assert torch.equal(alone[0], batch[1])
    assert not torch.equal(batch[0], batch[1]) and not torch.equal(batch[1], batch[2])