"""Golden greedy token ids on tiny models, the cross-hardware regression anchor.

Every backend (cpu, cuda / its Triton interpreter, npu / its emulation) must reproduce these ids
exactly in fp32, through autoregressive decoding and through n-gram speculation
(tests/test_cross_hardware.py). The file is regenerated only by an explicit command, on the CPU
reference backend, after a deliberate change of semantics:

    python tests/golden.py --regenerate        # rewrites tests/golden/greedy_tiny.json
    python tests/golden.py                     # checks the file against the CPU backend

The tiny weights come from a seeded torch.Generator (not from transformers' initializers, which
may change between versions), written through transformers' own model classes. For each case the
file also records the smallest top-1 logit margin along the greedy path: regeneration refuses a
case whose margin is so small that fp32 rounding differences between backends could flip it.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

GOLDEN = Path(__file__).resolve().parent / "golden" / "greedy_tiny.json"
MIN_MARGIN = 1e-3
MAX_NEW = 24

# name -> (family, model seed, transformers-config overrides, verifier quant, verifier options)
CASES = {
    "qwen3-bf16": ("qwen3", 11, {}, None, {}),
    "pangu-bf16": ("pangu", 14, {}, None, {}),
    "llama-tied-mqa-bf16": ("llama", 13, dict(tie=True, num_key_value_heads=1), None, {}),
    "qwen3-w8a8-int8": ("qwen3", 11, {}, "w8a8-int8", {}),
    "pangu-w4a16-g32-asym": ("pangu", 12, {}, "w4a16", dict(group_size=32, symmetric=False)),
}


def prompt(seed: int, length: int = 30) -> list[int]:
    """A repetitive prompt (so n-gram drafts get accepted) of token ids < 200."""
    phrase = torch.randint(0, 200, (7,), generator=torch.Generator().manual_seed(seed)).tolist()
    return (phrase * (length // 7 + 1))[:length]


def tiny_model(root: Path, case: str) -> Path:
    """The case's tiny checkpoint under root (written once), weights from a seeded generator."""
    from safetensors.torch import load_file, save_file

    from tiny import make_tiny
    family, seed, over, _, _ = CASES[case]
    over = dict(over)
    tie = over.pop("tie", False)
    path = make_tiny(Path(root) / f"golden-{case}", family, tie=tie, seed=seed, **over)
    f = path / "model.safetensors"
    sd = load_file(str(f))
    g = torch.Generator().manual_seed(1000 + seed)
    for name in sorted(sd):
        t = sd[name]
        if name.endswith("inv_freq"):
            continue
        r = torch.randn(t.shape, generator=g, dtype=torch.float32)
        if name.endswith("norm.weight"):
            sd[name] = 1 + 0.1 * r
        elif name.endswith(".bias"):
            sd[name] = 0.1 * r
        else:
            sd[name] = 0.2 * r
    save_file(sd, str(f), metadata={"format": "pt"})
    return path


def case_prompt(case: str) -> list[int]:
    return prompt(CASES[case][1])


def replay_drafter(prompt_ids: list[int], expected: list[int]):
    """A drafter that proposes the expected continuation, with one wrong token every third step:
    verify chunks of k + 1 tokens then see full acceptance, partial acceptance and rejection."""
    from quasar.spec_decode.drafter import Draft, Drafter

    class Replay(Drafter):
        name = "replay"

        def begin(self, prompt):
            self.steps = 0

        def propose(self, ctx, last, k):
            done = len(ctx) - len(prompt_ids)
            toks = list(expected[done:done + k])
            self.steps += 1
            if toks and self.steps % 3 == 0:
                i = (self.steps // 3) % len(toks)
                toks[i] = (toks[i] + 1) % 200
            return Draft(torch.tensor(toks, dtype=torch.long, device=last.device))

    return Replay()


def greedy(model, ids: list[int], k: int = 0, drafter=None) -> tuple[list[int], object]:
    """Greedy ids: autoregressive (k = 0), n-gram speculation with k draft tokens, or `drafter`."""
    from quasar.spec_decode.drafter import Drafter
    from quasar.spec_decode.ngram import NgramDrafter
    from quasar.spec_decode.sampling import SamplingParams
    from quasar.spec_decode.scheduler import Scheduler
    from quasar.engine import ModelRunner
    runner = ModelRunner(model, graphs=False)          # a fresh KV cache
    if drafter is None:
        drafter = Drafter() if k == 0 else NgramDrafter(model.device, 1, 3)
    return Scheduler(runner, drafter, SamplingParams(), k, set()).generate(ids, MAX_NEW)


def build(path: Path, backend, case: str, dtype=torch.float32):
    from quasar.config import VerifierConfig
    from quasar.model.loader import build_model
    _, _, _, quant, vkw = CASES[case]
    return build_model(Path(path), backend, dtype, 128, VerifierConfig(quant=quant, **vkw))


def min_margin(model, ids: list[int], out: list[int]) -> float:
    """Smallest top-1 minus top-2 logit along the greedy path (one teacher-forced forward)."""
    seq = torch.tensor([ids + out], device=model.device)
    pos = torch.arange(seq.shape[1], device=model.device).view(1, -1)
    from quasar.engine import ModelRunner
    logits = ModelRunner(model, graphs=False)(seq, pos, seq.shape[1])[0, len(ids) - 1:-1].float().cpu()
    top = logits.topk(2, dim=-1).values
    return (top[:, 0] - top[:, 1]).min().item()


def compute(root: Path) -> dict:
    from quasar import backends
    cpu = backends.get("cpu")
    out = {}
    for case in CASES:
        m = build(tiny_model(root, case), cpu, case)
        ids = case_prompt(case)
        ar, _ = greedy(m, ids)
        out[case] = {"prompt_token_ids": ids, "token_ids": ar,
                     "min_top1_margin": round(min_margin(m, ids, ar), 6)}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--regenerate", action="store_true", help=f"rewrite {GOLDEN.name}")
    a = ap.parse_args()
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        got = compute(Path(d))
    if a.regenerate:
        thin = {c: r["min_top1_margin"] for c, r in got.items() if r["min_top1_margin"] < MIN_MARGIN}
        if thin:
            print(f"refusing: top-1 margin below {MIN_MARGIN} in {thin}; change the case's seed",
                  file=sys.stderr)
            return 1
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps({"max_new_tokens": MAX_NEW, "cases": got}, indent=1) + "\n")
        print(f"wrote {GOLDEN}")
        return 0
    want = json.loads(GOLDEN.read_text())["cases"]
    bad = [c for c in CASES if want.get(c, {}).get("token_ids") != got[c]["token_ids"]]
    print("golden file matches the CPU backend" if not bad else f"MISMATCH in {bad}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
