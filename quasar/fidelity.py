"""python -m quasar.fidelity: how faithful is each verifier to the unquantized model?

For every prompt the reference (the unquantized checkpoint in `--dtype`) generates N greedy
tokens. Each variant then
- reads the same sequence (teacher forcing) and is compared position by position over the N
  generated positions: KL(p_ref || p_variant) and top-1 agreement;
- generates its own N greedy tokens: greedy-token agreement (the fraction of positions equal to
  the reference's, and the mean length of the common prefix).

Variants: RTN schemes (`--schemes`), compressed-tensors checkpoints (`--checkpoint NAME=DIR`),
and structurally pruned verifiers that drop layers (`--prune N` drops N evenly spaced middle
layers; `--prune-layers 3,5,7` drops exactly those). This reproduces the Quasar paper's finding:
quantized verifiers keep the distribution, layer-skipped ones do not.

    python -m quasar.fidelity --model smollm2-135m-instruct --prompts-file ../shared/data/specbench/question.jsonl --per-category 4
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from quasar import backends
from quasar.config import VerifierConfig
from quasar.engine import eos_ids, load_tokenizer, resolve_dtype
from quasar.errors import ConfigError, QuasarError
from quasar.model.loader import build_model, resolve_model

DEFAULT_SCHEMES = ("w8a8-int8", "w8a16", "w4a16", "w4a4")


@dataclass
class Variant:
    name: str
    path: Path
    verifier: VerifierConfig
    skip_layers: tuple = ()


def pruned_layers(num_layers: int, n: int) -> tuple[int, ...]:
    """n layers evenly spaced over the middle half of the stack (first and last layers kept)."""
    if not 0 < n < num_layers - 1:
        raise ConfigError(f"--prune must be between 1 and {num_layers - 2} for a {num_layers}-layer model")
    lo, hi = num_layers // 4, num_layers - num_layers // 4
    span = list(range(lo, hi)) if hi - lo >= n else list(range(1, num_layers - 1))
    step = len(span) / n
    return tuple(sorted({span[int(i * step)] for i in range(n)}))


def variant_for_scheme(scheme: str, path: Path, group_size: int) -> Variant:
    if scheme == "w4a4":
        return Variant("w4a4 (hadamard)", path, VerifierConfig(quant="w4a4", group_size=-1, hadamard=True))
    if scheme == "w4a16":
        return Variant(f"w4a16 g{group_size}", path, VerifierConfig(quant="w4a16", group_size=group_size))
    return Variant(scheme, path, VerifierConfig(quant=scheme))


@torch.inference_mode()
def greedy(model, prompt: list[int], n: int, eos: set[int]) -> list[int]:
    from quasar.spec_decode.drafter import Drafter
    from quasar.spec_decode.sampling import SamplingParams
    from quasar.spec_decode.scheduler import Scheduler
    out, _ = Scheduler(model, Drafter(), SamplingParams(), 0, eos).generate(prompt, n)
    return out


@torch.inference_mode()
def teacher_forced_logits(model, seq: list[int], start: int) -> torch.Tensor:
    """Logits [len(seq) - start, V] predicting seq[start+1:] (and one past the end)."""
    ids = torch.tensor([seq], device=model.device)
    pos = torch.arange(len(seq), device=model.device).view(1, -1)
    return model(ids, pos, kv_len=len(seq))[0, start:]


def compare(ref_logits: torch.Tensor, logits: torch.Tensor) -> tuple[float, float]:
    lp_ref = ref_logits.double().log_softmax(-1)
    lp = logits.double().log_softmax(-1)
    kl = (lp_ref.exp() * (lp_ref - lp)).sum(-1)
    top1 = (ref_logits.argmax(-1) == logits.argmax(-1)).double()
    return kl.sum().item(), top1.sum().item()


def run(model_name: str, prompts: list[str], variants_spec: dict, device: str = "auto",
        dtype: str = "auto", n_tokens: int = 32, chat: bool = True, max_seq_len: int = 2048,
        progress: bool = True, own_greedy: bool = True) -> list[dict]:
    """own_greedy=False skips each variant's own generation (no greedy-token agreement)."""
    from tqdm.auto import tqdm
    dev = backends.resolve_device(device)
    be = backends.get(dev)
    dt = resolve_dtype(dtype, dev)
    path = resolve_model(model_name)
    tok = load_tokenizer(path)
    eos = eos_ids(path, tok)
    ids = []
    for p in prompts:
        if chat and getattr(tok, "chat_template", None):
            text = tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                           add_generation_prompt=True)
            ids.append(tok(text, add_special_tokens=False)["input_ids"])
        else:
            ids.append(tok(p)["input_ids"])
    ref = build_model(path, be, dt, max_seq_len, VerifierConfig(quant="bf16"))
    ref.new_cache(1)
    num_layers = ref.args.num_layers
    variants = []
    for s in variants_spec.get("schemes", ()):
        variants.append(variant_for_scheme(s, path, variants_spec.get("group_size", 128)))
    for name, d in variants_spec.get("checkpoints", {}).items():
        variants.append(Variant(name, resolve_model(d), VerifierConfig()))
    prune = variants_spec.get("prune")
    if prune:
        layers = pruned_layers(num_layers, prune)
        variants.append(Variant(f"pruned: drop {len(layers)}/{num_layers} layers", path,
                                VerifierConfig(quant="bf16"), layers))
    if variants_spec.get("prune_layers"):
        layers = tuple(variants_spec["prune_layers"])
        variants.append(Variant(f"pruned: drop layers {','.join(map(str, layers))}", path,
                                VerifierConfig(quant="bf16"), layers))
    # reference continuations and logits
    seqs, ref_logits = [], []
    for p in tqdm(ids, desc="reference", disable=not progress):
        cont = greedy(ref, p, n_tokens, eos)
        seqs.append((p, cont))
        ref_logits.append(teacher_forced_logits(ref, p + cont[:-1], len(p) - 1).float().cpu())
    del ref
    rows = []
    for v in variants:
        m = build_model(v.path, be, dt, max_seq_len, v.verifier, skip_layers=v.skip_layers)
        m.new_cache(1)
        kl = top1 = n = same = prefix = total = 0.0
        for (p, cont), rl in tqdm(list(zip(seqs, ref_logits)), desc=v.name, disable=not progress):
            lg = teacher_forced_logits(m, p + cont[:-1], len(p) - 1).float().cpu()
            a, b = compare(rl, lg)
            kl, top1, n = kl + a, top1 + b, n + rl.shape[0]
            if not own_greedy:
                continue
            own = greedy(m, p, n_tokens, eos)
            L = min(len(own), len(cont))
            eq = [own[i] == cont[i] for i in range(L)]
            same += sum(eq)
            total += max(len(own), len(cont))
            prefix += next((i for i, e in enumerate(eq) if not e), L)
        rows.append({"variant": v.name, "scheme": m.scheme, "kl": kl / n, "top1": top1 / n,
                     "greedy_agreement": same / total if total else None,
                     "greedy_prefix": prefix / len(seqs) if own_greedy else None,
                     "positions": int(n), "prompts": len(seqs)})
        del m
    return rows


def markdown(rows: list[dict], title: str) -> str:
    lines = [f"### {title}", "",
             "| verifier | KL(p_ref ‖ p) | top-1 agreement | greedy-token agreement | mean common prefix |",
             "|---|---|---|---|---|"]
    for r in rows:
        g = "–" if r["greedy_agreement"] is None else f"{100 * r['greedy_agreement']:.1f}%"
        p = "–" if r["greedy_prefix"] is None else f"{r['greedy_prefix']:.1f}"
        lines.append(f"| {r['variant']} | {r['kl']:.4f} | {100 * r['top1']:.1f}% | {g} | {p} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    from quasar.run import read_prompts_file
    ap = argparse.ArgumentParser(prog="python -m quasar.fidelity", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--prompts-file", type=Path, required=True)
    ap.add_argument("--per-category", type=int, default=4, help="prompts per Spec-Bench task")
    ap.add_argument("--tokens", type=int, default=32, help="N generated tokens per prompt")
    ap.add_argument("--schemes", default=",".join(DEFAULT_SCHEMES), help="comma-separated RTN schemes")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--checkpoint", action="append", default=[], metavar="NAME=DIR",
                    help="a compressed-tensors checkpoint to compare (repeatable)")
    ap.add_argument("--prune", type=int, default=None, help="drop N evenly spaced middle layers")
    ap.add_argument("--prune-layers", default=None, help="drop exactly these layers (comma-separated)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--no-chat", action="store_true")
    ap.add_argument("--out", type=Path, help="write the JSON rows here")
    a = ap.parse_args(argv)
    try:
        from quasar.bench.acceptance import select
        recs = select(read_prompts_file(a.prompts_file), a.per_category)
        ckpts = {}
        for c in a.checkpoint:
            if "=" not in c:
                raise ConfigError(f"--checkpoint takes NAME=DIR, got {c!r}")
            k, v = c.split("=", 1)
            ckpts[k] = v
        spec = {"schemes": [s for s in a.schemes.split(",") if s], "group_size": a.group_size,
                "checkpoints": ckpts, "prune": a.prune if a.prune is not None else
                (None if a.prune_layers else max(1, _layers(a.model) // 4)),
                "prune_layers": [int(x) for x in a.prune_layers.split(",")] if a.prune_layers else None}
        rows = run(a.model, [r["prompt"] for r in recs], spec, a.device, a.dtype, a.tokens, not a.no_chat)
    except QuasarError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(markdown(rows, f"Fidelity vs the unquantized model: {a.model}, {len(recs)} prompts x {a.tokens} tokens"))
    if a.out:
        a.out.write_text(json.dumps(rows, indent=2))
    return 0


def _layers(model: str) -> int:
    from quasar.model.args import ModelArgs
    return ModelArgs.from_dir(resolve_model(model)).num_layers


if __name__ == "__main__":
    sys.exit(main())
