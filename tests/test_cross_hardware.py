"""Cross-hardware regression suite: every backend present, the same oracles.

Backends (the `be` fixture):
  cpu     the reference backend, always;
  cuda    the compiled Triton kernels on a GPU when one is visible, otherwise the same kernels under
          Triton's interpreter on the CPU (`cuda-interpreter`);
  npu     real torch_npu on an Ascend device with QUASAR_NPU_REAL=1, otherwise the test-only
          emulation of the documented torch_npu ops on the CPU (`npu-emulation`). Emulation is not
          hardware: see docs/ascend.md for what has and has not run on an NPU.

Oracles, identical for every backend:
  1. fp32 logits == transformers' model classes (prefill, one-token decode, a k+1 verify chunk,
     a long chunk; rel <= 1e-4) for qwen3, OpenPangu-Embedded and llama (tied, MQA); bf16 logits
     (where the fused kernels run) no further from the fp32 result than the CPU reference's own
     bf16 rounding (1.5x + 5e-3);
  2. greedy n-gram speculation == greedy autoregressive output (bf16 scheme and W8A8 in fp32),
     with drafts accepted so the comparison could fail;
  3. each scheme's GEMM vs float64 dequantize-then-matmul (fp32, rel <= 1e-5; for activation-
     quantizing schemes, of the activation the reference quantizes), and its quantization error
     vs the unquantized float64 product within the scheme's bound;
  4. the golden greedy token ids (tests/golden/greedy_tiny.json, regenerated only by
     `python tests/golden.py --regenerate`) reproduced exactly in fp32: autoregressive, with
     n-gram drafts, and with drafts replaying the golden ids (one wrong token every third step),
     so verify chunks of k + 1 tokens are accepted in full, in part and rejected.
"""
from __future__ import annotations

import json
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")   # before anything imports triton

import golden
from npu_emulation import emulated_torch_npu, use_real_torch_npu
from quasar import backends
from quasar.engine import ModelRunner
from quasar.ops import reference as R
from quasar.quant import rtn
from quasar.quant.format import QActivation
from tiny import load_hf, make_tiny

pytestmark = pytest.mark.slow

HAS_CUDA = torch.cuda.is_available()
REAL_NPU = use_real_torch_npu()
BACKENDS = ["cpu", "cuda" if HAS_CUDA else "cuda-interpreter", "npu" if REAL_NPU else "npu-emulation"]


@pytest.fixture(params=BACKENDS)
def be(request):
    name = request.param
    if name == "cpu":
        yield backends.get("cpu")
    elif name == "cuda":
        yield backends.get("cuda")
    elif name == "cuda-interpreter":
        from quasar.backends.cuda import make_backend
        yield make_backend(interpret=True)
    elif name == "npu":  # pragma: no cover - Ascend hardware only
        backends.reset("npu")
        yield backends.get("npu")
    else:
        n = torch.get_num_threads()
        torch.set_num_threads(1)        # tiny CPU kernels: avoid OpenMP stalls on a loaded machine
        try:
            with emulated_torch_npu():
                yield backends.get("npu")
        finally:
            torch.set_num_threads(n)


def rel(a, b) -> float:
    a, b = a.detach().cpu().double(), b.detach().cpu().double()
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def build(path, be, quant=None, dtype=torch.float32, **vkw):
    from pathlib import Path

    from quasar.config import VerifierConfig
    from quasar.model.loader import build_model
    return build_model(Path(path), be, dtype, 128, VerifierConfig(quant=quant, **vkw))


def runner(path, be, quant=None, dtype=torch.float32, **vkw) -> ModelRunner:
    """The model of `build` with its own KV cache (eager steps)."""
    return ModelRunner(build(path, be, quant, dtype, **vkw))


# ------------------------------------------------------------------ 1. logits vs transformers

FAMILIES = [("qwen3", dict(head_dim=24)), ("pangu", {}), ("llama", dict(num_key_value_heads=1, tie=True))]


@pytest.mark.parametrize("family,kw", FAMILIES, ids=[f for f, _ in FAMILIES])
def test_fp32_logits_match_transformers(be, tiny_root, family, kw):
    path = make_tiny(tiny_root, family, **kw)
    ids = torch.randint(0, 256, (1, 34), generator=torch.Generator().manual_seed(1))
    want = load_hf(path)(ids).logits[0]
    m = runner(path, be)
    got, t = [], 0
    for size in (9, 1, 6, 18):          # prefill, decode, verify chunk (k = 5), long chunk
        pos = torch.arange(t, t + size, device=m.device).view(1, -1)
        got.append(m(ids[:, t:t + size].to(m.device), pos, t + size)[0].cpu())
        t += size
    assert rel(torch.cat(got), want) <= 1e-4


# bf16 is where the backends' fused kernels run (the npu backend's fused attention / quant / GEMM
# ops take fp16/bf16 only, fp32 runs them composed): no further from the scheme's fp32 result than
# the CPU reference's own bf16 rounding.
@pytest.mark.parametrize("quant,kw", [(None, {}), ("w8a8-int8", {}), ("w4a16", dict(group_size=32))],
                         ids=["bf16", "w8a8-int8", "w4a16-g32"])
def test_bf16_kernels_no_worse_than_the_cpu_reference(be, tiny_root, quant, kw):
    path = make_tiny(tiny_root, "qwen3", seed=5)
    ids = torch.randint(0, 256, (1, 29), generator=torch.Generator().manual_seed(43))
    pos = torch.arange(29).view(1, -1)
    cpu = backends.get("cpu")
    truth = runner(path, cpu, quant, **kw)(ids, pos, 29)
    cpu16 = runner(path, cpu, quant, torch.bfloat16, **kw)(ids, pos, 29)
    m = runner(path, be, quant, torch.bfloat16, **kw)
    got = m(ids.to(m.device), pos.to(m.device), 29)
    assert rel(got, truth) <= 1.5 * rel(cpu16, truth) + 5e-3


# ------------------------------------------------------------------ 2. speculative == autoregressive

@pytest.mark.parametrize("quant", [None, "w8a8-int8"], ids=["bf16", "w8a8-int8"])
def test_speculative_equals_autoregressive_greedy(be, tiny_root, quant):
    m = build(make_tiny(tiny_root, "qwen3", seed=5), be, quant)
    taus = []
    for seed in (0, 1):
        ids = golden.prompt(seed, 28)
        want, _ = golden.greedy(m, ids, k=0)
        got, st = golden.greedy(m, ids, k=5)
        assert got == want
        taus.append(st.tau)
    assert max(taus) > 1.0          # drafts were accepted: the comparison could have failed


@pytest.mark.parametrize("quant", ["w8a8-int8"])
def test_batched_speculation_equals_each_sequence_alone(be, tiny_root, quant):
    """The batched runtime on this backend's paged ops (paged KV write, paged attention for the
    uniform verify chunks and the varlen prefill): 3 sequences of mixed lengths with n-gram drafts,
    2 in flight at a time with chunked prefill, each equal to its own greedy decode alone. W8A8
    (Quasar's verifier), whose int8 activation codes make any batch-dependent bit visible."""
    from quasar.engine.engine import Engine
    from quasar.engine.sequence import Sequence, StopConditions
    from quasar.spec_decode.ngram import NgramDrafter
    m = build(make_tiny(tiny_root, "qwen3", seed=5), be, quant)
    prompts = [golden.prompt(seed, n) for seed, n in ((0, 28), (1, 9), (4, 33))]
    want = [golden.greedy(m, p, k=0)[0] for p in prompts]
    e = Engine(ModelRunner(m, kv_blocks=64, block_size=16), NgramDrafter(m.device, 1, 3), 5, max_batch_size=2,
               max_prefill_tokens=24)
    seqs = [Sequence(p, stop=StopConditions(golden.MAX_NEW)) for p in prompts]
    e.run(seqs)
    assert [s.output_ids for s in seqs] == want
    assert sum(s.stats.accepted for s in seqs) > 0
    e.check()


def test_quantspec_equals_its_verifier_autoregressive(be, tiny_root):
    """QuantSpec on this backend's hierarchical-KV ops (issue 19): drafts by the same model on the
    4-bit upper plane with W4A16 weights, verified on both planes, batched with chunked prefill,
    equal to the verifier's own greedy decode of each sequence alone on the same cache (blocks of
    16, R = 0: the buffer flushes every block, and a verify chunk reads blocks it completes itself). On npu the representation has no documented
    torch_npu mapping: the backend refuses it, naming the alternative."""
    from pathlib import Path

    from quasar import kv
    from quasar.config import VerifierConfig
    from quasar.engine.engine import Engine
    from quasar.engine.sequence import Sequence, StopConditions
    from quasar.errors import UnsupportedError
    from quasar.model.loader import build_model
    from quasar.spec_decode.drafter import Drafter
    from quasar.spec_decode.quantized_self import QuantizedSelfDrafter
    from quasar.spec_decode.sampling import SamplingParams
    lay = kv.Layout("hierarchical-int4", 16, 0, 16, "upper", 64)
    if be.name == "npu":
        with pytest.raises(UnsupportedError, match="representation: dense"):
            be.check_kv(lay.representation)
        return
    m = build_model(Path(make_tiny(tiny_root, "qwen3", seed=5)), be, torch.float32, 128, VerifierConfig(),
                    draft_scheme="w4a16")
    prompts = [golden.prompt(seed, n) for seed, n in ((0, 20), (1, 9))]

    def run(drafter_fn, k, batch, ps):
        r = ModelRunner(m, kv_blocks=64, block_size=16, layout=lay)
        e = Engine(r, drafter_fn(r), k, max_batch_size=batch, max_prefill_tokens=16, prefix_caching=False)
        seqs = [Sequence(p, stop=StopConditions(14)) for p in ps]
        e.run(seqs)
        e.check()
        return seqs

    want = [run(lambda r: Drafter(), 0, 1, [p])[0].output_ids for p in prompts]
    seqs = run(lambda r: QuantizedSelfDrafter(r, SamplingParams()), 4, 2, prompts)
    assert [s.output_ids for s in seqs] == want
    assert sum(s.stats.accepted for s in seqs) > 0


def test_tree_drafts_and_hierarchical_verification_equal_autoregressive(be, tiny_root):
    """Tree drafts on this backend's tree-mask attention (issue 20): an EAGLE-2 tree grown by the
    target itself (its paths are accepted deep, on whichever branch holds them, so the tree mask,
    the node positions and the compaction of the accepted path all matter), and SpecMQuant's
    hierarchy (an n-gram trie verified by the W4A16 copy into a chain), batched with chunked
    prefill: greedy output equal to each sequence's own AR decode."""
    from pathlib import Path

    from quasar.config import TreeConfig, VerifierConfig
    from quasar.engine.engine import Engine
    from quasar.engine.sequence import Sequence, StopConditions
    from quasar.model.loader import build_model
    from quasar.spec_decode.draft_model import DraftModelDrafter
    from quasar.spec_decode.hierarchical import HierarchicalDrafter
    from quasar.spec_decode.sampling import SamplingParams
    path = Path(make_tiny(tiny_root, "qwen3", seed=5))
    m = build_model(path, be, torch.float32, 128, VerifierConfig(), draft_scheme="w4a16")
    prompts = [golden.prompt(seed, n) for seed, n in ((0, 20), (1, 9))]
    want = [golden.greedy(m, p, k=0)[0][:10] for p in prompts]
    tc = TreeConfig(depth=3, topk=2, max_nodes=8)

    def run(drafter, k):
        e = Engine(ModelRunner(m, kv_blocks=64, block_size=16), drafter, k, max_batch_size=2,
                   max_prefill_tokens=16, adaptive=False)
        seqs = [Sequence(p, stop=StopConditions(10)) for p in prompts]
        e.run(seqs)
        e.check()
        assert [s.output_ids for s in seqs] == want
        return sum(s.stats.accepted for s in seqs)

    draft = ModelRunner(build_model(path, be, torch.float32, 128, VerifierConfig()), kv_blocks=64, block_size=16)
    assert run(DraftModelDrafter(draft, SamplingParams(), tree=tc), tc.max_nodes - 1) > 8
    r = ModelRunner(m, kv_blocks=64, block_size=16)
    e = Engine(r, HierarchicalDrafter(r, "draft", tc, 4), 4 + tc.depth, max_batch_size=2,
               max_prefill_tokens=16, adaptive=False)
    seqs = [Sequence(p, stop=StopConditions(10)) for p in prompts]
    e.run(seqs)
    assert [s.output_ids for s in seqs] == want
    assert sum(s.stats.drafted for s in seqs) > 0


# ------------------------------------------------------------------ 3. GEMM error bounds vs float64

# scheme -> (weight, activation qtype or None, bound on the quantization error vs unquantized)
N, K = 96, 320


def _weights():
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(30), dtype=torch.float64) * 0.1
    return w, {
        "w8a8-int8": (rtn.int8_per_channel(w.float()), "int8", 0.02),
        "w8a16": (rtn.int8_per_channel(w.float()), None, 0.01),
        "w4a16-g32-asym": (rtn.int4(w.float(), 32, symmetric=False), None, 0.10),
        "w4a16-chan": (rtn.int4(w.float(), -1), None, 0.15),
        "w4a4": (rtn.int4(w.float(), -1), "int4", 0.30),
    }


@pytest.mark.parametrize("case", ["w8a8-int8", "w8a16", "w4a16-g32-asym", "w4a16-chan", "w4a4"])
@pytest.mark.parametrize("m", [1, 6])
def test_gemm_vs_float64(be, case, m):
    w64, table = _weights()
    qw, qtype, bound = table[case]
    scheme = case if case in ("w8a8-int8", "w8a16", "w4a4") else "w4a16"
    if scheme not in be.schemes:
        with pytest.raises(Exception, match=scheme):
            be.check_scheme(scheme)
        pytest.skip(f"{scheme} is not supported on {be.name} (its clear error was checked)")
    x = torch.randn(m, K, generator=torch.Generator().manual_seed(31))
    bias = 0.1 * torch.randn(N, generator=torch.Generator().manual_seed(32))
    pw = be.prepare_weight(scheme, qw.to(be.device))
    got = be.gemm(scheme, x.to(be.device), pw, bias.to(be.device)).cpu()
    assert got.shape == (m, N) and got.dtype == torch.float32
    if qtype:       # the scheme's definition: the reference's quantized activation
        a = R.quantize_per_token(x, qtype)
        xq = a.q.double() * a.scale.double()
        pre = be.gemm(scheme, QActivation(a.q.to(be.device), a.scale.to(be.device), qtype, torch.float32),
                      pw, bias.to(be.device)).cpu()
        assert rel(pre, xq @ qw.dequantize(torch.float64).T + bias.double()) <= 1e-5
    else:
        xq = x.double()
    exact = xq @ qw.dequantize(torch.float64).T + bias.double()
    # dynamic quantization inside the backend may round an exact tie the other way: 1e-4
    assert rel(got, exact) <= (1e-4 if qtype else 1e-5)
    assert rel(got, x.double() @ w64.T + bias.double()) <= bound


# ------------------------------------------------------------------ 4. golden greedy ids

GOLD = json.loads(golden.GOLDEN.read_text())


def test_golden_file_is_complete():
    assert set(GOLD["cases"]) == set(golden.CASES) and GOLD["max_new_tokens"] == golden.MAX_NEW
    for case, r in GOLD["cases"].items():
        assert r["prompt_token_ids"] == golden.case_prompt(case)
        assert len(r["token_ids"]) == golden.MAX_NEW and r["min_top1_margin"] >= golden.MIN_MARGIN


@pytest.mark.parametrize("case", list(golden.CASES))
def test_golden_greedy_ids(be, tiny_root, case):
    want = GOLD["cases"][case]
    m = golden.build(golden.tiny_model(tiny_root, case), be, case)
    ar, _ = golden.greedy(m, want["prompt_token_ids"], k=0)
    assert ar == want["token_ids"]
    spec, _ = golden.greedy(m, want["prompt_token_ids"], k=4)           # n-gram drafts
    assert spec == want["token_ids"]
    drafter = golden.replay_drafter(want["prompt_token_ids"], want["token_ids"])
    spec, st = golden.greedy(m, want["prompt_token_ids"], k=4, drafter=drafter)
    assert spec == want["token_ids"]            # verify chunks accept, half-accept and reject
    assert st.tau > 2.0 and st.accepted < st.drafted
