"""Logits parity with transformers' own model classes on tiny random configs (fp32, rel <= 1e-4):
GQA, tied/untied embeddings, explicit head_dim, prefill + decode and chunked (k+1) forwards
against one full forward, and OpenPangu via its Llama-with-biases oracle."""
import pytest
import torch

from tiny import load_hf, load_quasar, make_tiny

from quasar.engine import ModelRunner

CASES = [
    ("llama", dict(tie=True)),
    ("llama", dict(tie=False, num_key_value_heads=1)),
    ("qwen2", dict(tie=False)),
    ("qwen2", dict(tie=True, num_key_value_heads=4)),
    ("qwen3", dict(tie=False, head_dim=24)),      # head_dim != hidden / heads
    ("qwen3", dict(tie=True)),
    ("pangu", dict(tie=False)),
]


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("family,kw", CASES, ids=[f"{f}-{i}" for i, (f, _) in enumerate(CASES)])
def test_full_forward_matches_transformers(tiny_root, family, kw):
    path = make_tiny(tiny_root, family, **kw)
    hf, q = load_hf(path), ModelRunner(load_quasar(path))
    ids = torch.randint(0, 256, (1, 37), generator=torch.Generator().manual_seed(1))
    ref = hf(ids).logits
    pos = torch.arange(37).view(1, -1)
    out = q(ids, pos, kv_len=37)
    assert out.shape == ref.shape
    assert rel(out, ref) <= 1e-4


@pytest.mark.parametrize("family", ["llama", "qwen3", "pangu"])
def test_prefill_decode_and_chunks_match_one_full_forward(tiny_root, family):
    path = make_tiny(tiny_root, family, num_key_value_heads=1 if family != "qwen3" else 2)
    hf, q = load_hf(path), ModelRunner(load_quasar(path))
    n = 40
    ids = torch.randint(0, 256, (1, n), generator=torch.Generator().manual_seed(2))
    ref = hf(ids).logits[0]
    # prefill 20, then single-token decodes to 26, then chunks of k+1 = 6 and 4 (verify shape)
    got = [q(ids[:, :20], torch.arange(20).view(1, -1), kv_len=20)[0]]
    t = 20
    while t < 26:
        got.append(q(ids[:, t:t + 1], torch.tensor([[t]]), kv_len=t + 1)[0])
        t += 1
    for size in (6, 4, 4):
        got.append(q(ids[:, t:t + size], torch.arange(t, t + size).view(1, -1), kv_len=t + size)[0])
        t += size
    got = torch.cat(got)
    assert t == n
    assert rel(got, ref) <= 1e-4


def test_stale_cache_slots_beyond_the_chunk_are_ignored(tiny_root):
    """A rejected draft leaves stale KV behind; a verify chunk must not see it."""
    path = make_tiny(tiny_root, "qwen3")
    q = ModelRunner(load_quasar(path))
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(3))
    clean = q(ids, torch.arange(12).view(1, -1), kv_len=12)[0]
    q = ModelRunner(q.model)
    q(ids[:, :8], torch.arange(8).view(1, -1), kv_len=8)
    junk = torch.randint(0, 256, (1, 6))
    q(junk, torch.arange(8, 14).view(1, -1), kv_len=14)          # a "draft" that gets rejected
    again = q(ids[:, 8:], torch.arange(8, 12).view(1, -1), kv_len=14)[0]   # kv_len past the chunk
    assert rel(again, clean[8:]) <= 1e-5


def test_last_only_prefill_returns_the_last_row(tiny_root):
    path = make_tiny(tiny_root, "llama")
    q = ModelRunner(load_quasar(path))
    ids = torch.randint(0, 256, (1, 9))
    full = q(ids, torch.arange(9).view(1, -1), kv_len=9)[0, -1]
    q = ModelRunner(q.model)
    last = q(ids, torch.arange(9).view(1, -1), kv_len=9, last_only=True)[0, -1]
    assert rel(last, full) <= 1e-5
