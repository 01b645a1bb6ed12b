"""The speculative scheduler: greedy speculative output == greedy autoregressive output of the
verifier (fp32, every drafter x verifier scheme), tau accounting, and the edge cases."""
import pytest
import torch

from quasar import backends
from quasar.config import VerifierConfig
from quasar.engine import ModelRunner
from quasar.model.loader import build_model
from quasar.spec_decode.draft_model import DraftModelDrafter
from quasar.spec_decode.drafter import Draft, Drafter
from quasar.spec_decode.ngram import NgramDrafter, lookup
from quasar.spec_decode.quantized_self import QuantizedSelfDrafter
from quasar.spec_decode.sampling import SamplingParams
from quasar.spec_decode.scheduler import Scheduler
from tiny import make_tiny

GREEDY = SamplingParams()
EOS = {255}
K = 4


def model(path, quant=None, draft_scheme=None, max_seq_len=160, **kw):
    """The verifier's ModelRunner (model + KV cache)."""
    return ModelRunner(build_model(path, backends.get("cpu"), torch.float32, max_seq_len,
                                   VerifierConfig(quant=quant, **kw), draft_scheme=draft_scheme))


def ar(m, prompt, n, eos=EOS):
    return Scheduler(m, Drafter(), GREEDY, 0, eos).generate(prompt, n)


def repetitive_prompt(seed=0, length=48):
    g = torch.Generator().manual_seed(seed)
    phrase = torch.randint(0, 200, (8,), generator=g).tolist()
    return (phrase * (length // 8 + 1))[:length]


def random_prompt(seed=0, length=24):
    g = torch.Generator().manual_seed(100 + seed)
    return torch.randperm(200, generator=g)[:length].tolist()   # no repeated token: no n-gram hit


@pytest.fixture(scope="module")
def target(tiny_root):
    return make_tiny(tiny_root, "qwen3", seed=1, num_hidden_layers=2)


@pytest.fixture(scope="module")
def small(tiny_root):
    return make_tiny(tiny_root, "qwen3", seed=7, num_hidden_layers=1)


VERIFIERS = [("bf16", {}), ("w8a8-int8", {}), ("w4a16", dict(group_size=32)),
             ("w4a16", dict(group_size=-1)), ("w8a16", {}), ("w8a8-fp8", {})]


@pytest.mark.parametrize("quant,kw", VERIFIERS, ids=[f"{q}-{i}" for i, (q, _) in enumerate(VERIFIERS)])
@pytest.mark.parametrize("drafter", ["ngram", "quantized_self", "draft_model"])
def test_greedy_speculative_equals_autoregressive(target, small, quant, kw, drafter):
    draft_scheme = None
    if drafter == "quantized_self":
        draft_scheme = "w4a4" if quant == "w4a16" and kw["group_size"] == -1 else "w8a8-int8"
    m = model(target, quant, draft_scheme, **kw)
    if drafter == "ngram":
        d = NgramDrafter(m.device, 1, 3)
    elif drafter == "quantized_self":
        d = QuantizedSelfDrafter(m, GREEDY)
    else:
        d = DraftModelDrafter(model(small), GREEDY)
    taus = []
    for prompt in (repetitive_prompt(0), repetitive_prompt(1), random_prompt(0)):
        ref, _ = ar(m, prompt, 40)
        out, st = Scheduler(m, d, GREEDY, K, EOS).generate(prompt, 40)
        assert out == ref
        taus.append(st.tau)
    if drafter == "ngram":
        assert max(taus) > 1.0         # some drafts were accepted (so the check can fail)
    if drafter == "quantized_self":
        assert min(taus) > 1.5         # the same weights in another scheme mostly agree


def test_drafts_that_are_never_accepted_still_give_the_ar_output(target):
    m = model(target)

    class Wrong(Drafter):
        def propose(self, ctx, last, k):
            ref, _ = ar_ref
            return Draft(torch.full((k,), 254, dtype=torch.int64))   # never the greedy token

    prompt = repetitive_prompt(2)
    ar_ref = ar(m, prompt, 30)
    assert 254 not in ar_ref[0]
    out, st = Scheduler(m, Wrong(), GREEDY, K, EOS).generate(prompt, 30)
    assert out == ar_ref[0] and st.tau == 1.0 and st.accepted == 0 and st.drafted > 0


class Oracle(Drafter):
    """Proposes the verifier's own greedy continuation (known in advance)."""

    def __init__(self, prompt, continuation):
        self.full = prompt + continuation

    def propose(self, ctx, last, k):
        n = len(ctx)
        assert ctx == self.full[:n]
        return Draft(torch.tensor(self.full[n:n + k], dtype=torch.int64))


def test_tau_is_k_plus_1_for_an_oracle_and_1_for_an_always_wrong_drafter(target):
    m = model(target)
    prompt = random_prompt(3)
    steps = 6
    n_new = 1 + steps * (K + 1)               # the first token comes from the prefill
    ref, _ = ar(m, prompt, n_new, eos=set())
    out, st = Scheduler(m, Oracle(prompt, ref), GREEDY, K, set()).generate(prompt, n_new)
    assert out == ref
    assert st.steps == steps and st.tau == K + 1
    assert st.acceptance() == [1.0] * K

    class AlwaysWrong(Drafter):
        def propose(self, ctx, last, k):
            nxt = ref[len(ctx) - len(prompt)] if len(ctx) - len(prompt) < len(ref) else 0
            return Draft(torch.tensor([(nxt + 1) % 200] * k, dtype=torch.int64))

    out, st = Scheduler(m, AlwaysWrong(), GREEDY, K, set()).generate(prompt, 20)
    assert out == ref[:20] and st.tau == 1.0 and st.acceptance() == [0.0] * K


def test_eos_inside_the_accepted_draft_stops_there(target):
    m = model(target)
    prompt = random_prompt(4)
    ref, _ = ar(m, prompt, 30, eos=set())
    eos_tok = ref[7]                           # pretend this token is EOS: stop right after it
    first = ref.index(eos_tok)
    want, st_ar = ar(m, prompt, 30, eos={eos_tok})
    assert want == ref[:first + 1] and st_ar.finish_reason == "eos"
    out, st = Scheduler(m, Oracle(prompt, ref), GREEDY, K, {eos_tok}).generate(prompt, 30)
    assert out == want and st.finish_reason == "eos"


@pytest.mark.parametrize("max_new", [1, 2, 3])
def test_max_new_tokens_smaller_than_k_is_exact(target, max_new):
    m = model(target)
    prompt = repetitive_prompt(5)
    ref, _ = ar(m, prompt, max_new, eos=set())
    out, st = Scheduler(m, Oracle(prompt, ar(m, prompt, 40, eos=set())[0]), GREEDY, K, set()).generate(prompt, max_new)
    assert out == ref and len(out) == max_new and st.finish_reason == "length"


def test_prompt_shorter_than_n(target):
    m = model(target)
    for prompt in ([5], [5, 6]):
        ref, _ = ar(m, prompt, 12)
        out, _ = Scheduler(m, NgramDrafter(m.device, 1, 3), GREEDY, K, EOS).generate(prompt, 12)
        assert out == ref


def test_context_reaching_max_seq_len_stops_with_a_reason(target):
    m = model(target, max_seq_len=40)
    prompt = repetitive_prompt(6, length=30)
    out, st = Scheduler(m, NgramDrafter(m.device, 1, 3), GREEDY, K, set()).generate(prompt, 100)
    ref, st_ar = ar(m, prompt, 100, eos=set())
    assert st.finish_reason == "max_seq_len" and st_ar.finish_reason == "max_seq_len"
    assert out == ref and len(prompt) + len(out) == 40 + 1   # every slot used, the last token not cached


def test_prompt_longer_than_cache_is_a_clear_error(target):
    from quasar.errors import ContextLengthError
    m = model(target, max_seq_len=32)
    with pytest.raises(ContextLengthError, match="the prompt has 40 tokens but max_seq_len is 32"):
        ar(m, list(range(40)), 4)


def test_ngram_index_matches_the_plain_definition():
    g = torch.Generator().manual_seed(0)
    d = NgramDrafter("cpu", 1, 3)
    ctx = torch.randint(0, 6, (10,), generator=g).tolist()
    d.begin(ctx)
    for step in range(200):
        for k in (1, 3, 5):
            assert d.find(ctx, k) == lookup(ctx, k, 1, 3)
        ctx += torch.randint(0, 6, (int(torch.randint(1, 4, (1,), generator=g)),), generator=g).tolist()


def test_ngram_lookup_semantics():
    assert lookup([1, 2, 3, 9, 1, 2, 3], 2, 1, 3) == [9, 1]          # longest n first
    assert lookup([1, 2, 7, 5, 2, 8, 2], 3, 1, 3) == [8, 2]          # most recent occurrence of [2]
    assert lookup([1, 2, 3], 5, 1, 3) == []                          # no earlier occurrence
    assert lookup([4, 4], 5, 2, 3) == []                             # n=2 would need length 3
    assert lookup([4, 4], 5, 1, 3) == [4]
