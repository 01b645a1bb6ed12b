"""python -m quasar.fidelity: how faithful is each verifier to the unquantized model?

For every prompt the reference (the unquantized checkpoint in `--dtype`) generates N greedy
tokens. Each variant then
- reads the same sequence (teacher forcing) and is compared position by position over the N
  generated positions: KL(p_ref || p_variant) and top-1 agreement;
- generates its own N greedy tokens: greedy-token agreement (the fraction of positions equal to
  the reference's, and the mean length of the common prefix).

Variants: RTN schemes (`--schemes`), compressed-tensors checkpoints (`--checkpoint NAME=DIR`),
structurally pruned verifiers that drop layers (`--prune N` drops N evenly spaced middle
layers; `--prune-layers 3,5,7` drops exactly those), and KV-cache representations of the
unquantized model (`--kv hierarchical-int4,hierarchical-int4-upper`: QuantSpec's cache read by
its verifier on both planes, or by its draft on the upper plane, with `--kv-group-size` and
`--kv-residual`; run on the paged runtime, so position p reads exactly what it reads in decoding). This reproduces the Quasar paper's finding:
quantized verifiers keep the distribution, layer-skipped ones do not.

    python -m quasar.fidelity --model smollm2-135m-instruct --per-category 4 --out fidelity.json

Every variant is checked (scheme names, group sizes against the model's in-features, checkpoint
directories, pruned layers) before anything runs. --out FILE.json is rewritten after each
variant, so an interrupted run keeps the variants that finished.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from quasar import backends
from quasar import quant
from quasar.config import VerifierConfig
from quasar.engine import ModelRunner, eos_ids, load_tokenizer, resolve_dtype
from quasar.errors import ConfigError
from quasar.fetch import resolve_model
from quasar.model.loader import build_model
from quasar.run import DEFAULT_PROMPTS_REL, cli_call, positive_int



def default_schemes() -> tuple[str, ...]:
    """Every registered quantized scheme (the registry is the list)."""
    return tuple(n for n in quant.SCHEMES if n != quant.default())


@dataclass
class Variant:
    name: str
    path: Path
    verifier: VerifierConfig
    skip_layers: tuple = ()
    kv: object = None             # a quasar.kv.Layout (paged runtime) or None (the dense cache)
    kv_view: str = "full"         # "upper": the draft's view of a hierarchical cache


KV_VARIANTS = {"hierarchical-int4": "full", "hierarchical-int4-upper": "upper"}


class PagedTeacher:
    """A model on the paged runtime with a KV representation, driven like a dense ModelRunner by
    this tool: teacher-forced logits of a whole sequence in one prefill step (each position reads
    the cache as it would in decoding), and its own greedy decode (the engine, alone)."""

    def __init__(self, model, layout, view: str, max_seq_len: int):
        from quasar.engine.model_runner import ModelRunner as MR
        blocks = -(-max_seq_len // layout.block_size) + 1
        self.model, self.layout, self.view = model, layout, view
        self.runner = MR(model, kv_blocks=blocks, block_size=layout.block_size, layout=layout, graphs=False)
        self.device = model.device

    def logits(self, seq: list[int], start: int) -> torch.Tensor:
        from quasar.engine.context import StepContext
        bs = self.layout.block_size
        table = list(range(-(-len(seq) // bs)))
        ctx = StepContext.build([table], [(0, len(seq))], bs, self.device)
        ids = torch.tensor(seq, device=self.device)
        out = self.runner.run(ids, ctx, "prefill")
        if self.view == "upper":        # the draft's read of the cache the verifier wrote (same weights)
            out = self.runner.run(ids, ctx, "draft")
        self.runner.cache.release_blocks(table)
        return out[start:]

    def greedy(self, prompt: list[int], n: int, eos: set[int]) -> list[int]:
        from quasar.engine.engine import Engine
        from quasar.engine.sequence import Sequence, StopConditions
        from quasar.spec_decode.drafter import Drafter
        e = Engine(self.runner, Drafter(), 0, max_batch_size=1, prefix_caching=False)
        s = Sequence(prompt, stop=StopConditions(n, frozenset(eos)))
        e.run([s])
        return s.output_ids


def pruned_layers(num_layers: int, n: int) -> tuple[int, ...]:
    """n layers evenly spaced over the middle half of the stack (first and last layers kept)."""
    if not 0 < n < num_layers - 1:
        raise ConfigError(f"--prune must be between 1 and {num_layers - 2} for a {num_layers}-layer model")
    lo, hi = num_layers // 4, num_layers - num_layers // 4
    span = list(range(lo, hi)) if hi - lo >= n else list(range(1, num_layers - 1))
    step = len(span) / n
    return tuple(sorted({span[int(i * step)] for i in range(n)}))


def in_features(args) -> dict[str, int]:
    """K of each decoder linear, from the model's ModelArgs."""
    return {"q/k/v, gate/up (hidden_size)": args.hidden_size,
            "o (num_heads x head_dim)": args.num_heads * args.head_dim,
            "down (intermediate_size)": args.intermediate_size}


def auto_group_size(args) -> int:
    """The largest of 128, 64, 32, 16, 8 that divides every linear's in-features (-1 if none)."""
    ks = in_features(args).values()
    return next((g for g in (128, 64, 32, 16, 8) if all(k % g == 0 for k in ks)), -1)


def check_variants(spec: dict, args, model_name: str) -> None:
    """Reject a bad variant before anything runs (a run takes minutes; it used to fail after the
    reference and the earlier variants had finished)."""
    for s in spec.get("schemes", ()):
        if quant.canonical(s) not in quant.SCHEMES:
            valid = ", ".join(quant.SCHEMES)
            raise ConfigError(f"--schemes: unknown quantization scheme {s!r}; valid: {valid}")
    gs = spec.get("group_size", 128)
    grouped = any(quant.get(s).grouped for s in spec.get("schemes", ()))
    if grouped and gs != -1:
        if gs < 1 or gs % 8:
            raise ConfigError(f"--group-size must be auto, -1 (per channel) or a positive multiple of 8, got {gs}")
        bad = {name: k for name, k in in_features(args).items() if k % gs}
        if bad:
            raise ConfigError(
                f"--group-size {gs} does not divide the in-features of {model_name}'s linears: "
                + ", ".join(f"{n} = {k}" for n, k in bad.items())
                + f"; use --group-size auto (here {auto_group_size(args)}) or a divisor of all of them")
    for name, d in spec.get("checkpoints", {}).items():
        if not name:
            raise ConfigError(f"--checkpoint {name}={d}: the NAME is empty")
        p = Path(d).expanduser()
        if not (p.is_dir() and (p / "config.json").is_file()):
            raise ConfigError(f"--checkpoint {name}={d}: not a Hugging Face model directory (no config.json)")
    for k in spec.get("kv", ()):
        if k not in KV_VARIANTS:
            raise ConfigError(f"--kv: unknown KV variant {k!r}; valid: {', '.join(KV_VARIANTS)}")
    if spec.get("kv") and args.head_dim % min(spec.get("kv_group_size", 128), args.head_dim):
        raise ConfigError(f"--kv-group-size {spec['kv_group_size']} does not divide head_dim {args.head_dim} "
                          "(values are grouped over channels); use a divisor of it or a value >= it")
    n = args.num_layers
    if spec.get("prune"):                 # 0: no pruned variant
        pruned_layers(n, spec["prune"])
    bad_layers = [i for i in spec.get("prune_layers") or () if not 0 <= i < n]
    if bad_layers:
        raise ConfigError(f"--prune-layers: {bad_layers} out of range for a {n}-layer model (0..{n - 1})")


def variant_for_scheme(scheme: str, path: Path, group_size: int) -> Variant:
    """RTN at load: grouped schemes at `group_size`; int4-activation schemes (QSpec's draft mode)
    with the Hadamard rotation that keeps them usable."""
    s = quant.get(scheme)
    if s.act_qtype == "int4":
        return Variant(f"{s.name} (hadamard)", path, VerifierConfig(quant=s.name, group_size=-1, hadamard=True))
    if s.grouped:
        return Variant(f"{s.name} g{group_size}", path, VerifierConfig(quant=s.name, group_size=group_size))
    return Variant(s.name, path, VerifierConfig(quant=s.name))


def drop_layers(model, layers) -> None:
    """The structurally pruned verifier of the fidelity study: the decoder without `layers`
    (their cache slots stay allocated and unused)."""
    drop = set(layers)
    model.layers = torch.nn.ModuleList(b for i, b in enumerate(model.layers) if i not in drop)


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
        progress: bool = True, own_greedy: bool = True, on_row=None) -> list[dict]:
    """own_greedy=False skips each variant's own generation (no greedy-token agreement).
    Every variant is validated before anything runs; on_row(rows) is called after each variant."""
    from tqdm.auto import tqdm
    dev = backends.resolve_device(device)
    be = backends.get(dev)
    dt = resolve_dtype(dtype, be)
    path = resolve_model(model_name)
    from quasar.model.args import ModelArgs
    margs = ModelArgs.from_dir(path)
    if variants_spec.get("group_size") in (None, "auto"):
        variants_spec = {**variants_spec, "group_size": auto_group_size(margs)}
    check_variants(variants_spec, margs, model_name)
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
    unq = quant.default()
    ref = ModelRunner(build_model(path, be, dt, max_seq_len, VerifierConfig(quant=unq)), graphs=False)
    num_layers = ref.model.args.num_layers
    variants = []
    for s in variants_spec.get("schemes", ()):
        variants.append(variant_for_scheme(s, path, variants_spec.get("group_size", 128)))
    for name, d in variants_spec.get("checkpoints", {}).items():
        variants.append(Variant(name, resolve_model(d), VerifierConfig()))
    prune = variants_spec.get("prune")
    if prune:
        layers = pruned_layers(num_layers, prune)
        variants.append(Variant(f"pruned: drop {len(layers)}/{num_layers} layers", path,
                                VerifierConfig(quant=unq), layers))
    if variants_spec.get("prune_layers"):
        layers = tuple(variants_spec["prune_layers"])
        variants.append(Variant(f"pruned: drop layers {','.join(map(str, layers))}", path,
                                VerifierConfig(quant=unq), layers))
    from quasar import kv as kvmod
    for k in variants_spec.get("kv", ()):
        g, r = variants_spec.get("kv_group_size", 128), variants_spec.get("kv_residual", 128)
        view = KV_VARIANTS[k]
        lay = kvmod.Layout("hierarchical-int4", g, r, g, view, -(-max_seq_len // g) + 2)
        what = "draft view: upper plane" if view == "upper" else "verifier view: both planes"
        variants.append(Variant(f"KV hierarchical-int4 G{g} R{r} ({what})", path, VerifierConfig(quant=unq),
                                kv=lay, kv_view=view))
    # reference continuations and logits
    seqs, ref_logits = [], []
    for p in tqdm(ids, desc="reference", disable=not progress):
        cont = greedy(ref, p, n_tokens, eos)
        seqs.append((p, cont))
        ref_logits.append(teacher_forced_logits(ref, p + cont[:-1], len(p) - 1).float().cpu())
    del ref
    rows = []
    for v in variants:
        model = build_model(v.path, be, dt, max_seq_len, v.verifier)
        drop_layers(model, v.skip_layers)
        m = ModelRunner(model, graphs=False) if v.kv is None else PagedTeacher(model, v.kv, v.kv_view, max_seq_len)
        kl = top1 = n = same = prefix = total = 0.0
        for (p, cont), rl in tqdm(list(zip(seqs, ref_logits)), desc=v.name, disable=not progress):
            if v.kv is None:
                lg = teacher_forced_logits(m, p + cont[:-1], len(p) - 1).float().cpu()
            else:
                lg = m.logits(p + cont[:-1], len(p) - 1).float().cpu()
            a, b = compare(rl, lg)
            kl, top1, n = kl + a, top1 + b, n + rl.shape[0]
            if not own_greedy or v.kv_view == "upper":      # the draft view is not a decoder of its own
                continue
            own = greedy(m, p, n_tokens, eos) if v.kv is None else m.greedy(p, n_tokens, eos)
            L = min(len(own), len(cont))
            eq = [own[i] == cont[i] for i in range(L)]
            same += sum(eq)
            total += max(len(own), len(cont))
            prefix += next((i for i, e in enumerate(eq) if not e), L)
        rows.append({"variant": v.name, "scheme": model.scheme, "kl": kl / n, "top1": top1 / n,
                     "greedy_agreement": same / total if total else None,
                     "greedy_prefix": prefix / len(seqs) if own_greedy and total else None,
                     "positions": int(n), "prompts": len(seqs)})
        del m, model
        if on_row is not None:
            on_row(rows)
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
    ap = argparse.ArgumentParser(prog="python -m quasar.fidelity", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--prompts-file", type=Path, default=None,
                    help=f"JSONL, Spec-Bench format (default: the shipped {DEFAULT_PROMPTS_REL})")
    ap.add_argument("--per-category", type=positive_int, default=4, help="prompts per Spec-Bench task")
    ap.add_argument("--tokens", type=positive_int, default=32, help="N generated tokens per prompt")
    ap.add_argument("--schemes", default=",".join(default_schemes()), help="comma-separated RTN schemes")
    ap.add_argument("--group-size", type=_group_size, default="auto",
                    help="int4 group size: auto (the largest of 128..8 dividing every in-features), "
                         "-1 (per channel) or a multiple of 8")
    ap.add_argument("--checkpoint", action="append", default=[], metavar="NAME=DIR",
                    help="a compressed-tensors checkpoint to compare (repeatable)")
    ap.add_argument("--prune", type=int, default=None, help="drop N evenly spaced middle layers (0: no pruned variant)")
    ap.add_argument("--prune-layers", default=None, help="drop exactly these layers (comma-separated)")
    ap.add_argument("--kv", default="", help="KV-cache variants of the unquantized model (comma-separated): "
                    + ", ".join(KV_VARIANTS))
    ap.add_argument("--kv-group-size", type=positive_int, default=128, help="hierarchical KV: key group (block) size")
    ap.add_argument("--kv-residual", type=int, default=128, help="hierarchical KV: recent tokens at full precision")
    ap.add_argument("--max-seq-len", type=positive_int, default=2048, help="the cache length (prompt + tokens)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--no-chat", action="store_true")
    ap.add_argument("--threads", type=positive_int, default=None, help="CPU threads for torch")
    ap.add_argument("--out", type=Path, metavar="FILE.json",
                    help="write the JSON rows to this file (rewritten after each variant)")
    a = ap.parse_args(argv)
    return cli_call(_main, a)


def _group_size(text: str):
    if text == "auto":
        return "auto"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto or an integer, got {text!r}") from None


def _main(a) -> int:
    from quasar import threads
    from quasar.bench.acceptance import select
    from quasar.run import check_out_file, default_prompts_file, read_prompts_file
    threads.set_default(a.threads)
    threads.apply(a.threads)
    out = check_out_file(a.out)
    recs = select(read_prompts_file(a.prompts_file or default_prompts_file()), a.per_category)
    ckpts = {}
    for c in a.checkpoint:
        if "=" not in c:
            raise ConfigError(f"--checkpoint takes NAME=DIR, got {c!r}")
        k, v = c.split("=", 1)
        ckpts[k] = v
    spec = {"schemes": [s for s in a.schemes.split(",") if s], "group_size": a.group_size,
            "checkpoints": ckpts, "prune": a.prune if a.prune is not None else
            (None if a.prune_layers else max(1, _layers(a.model) // 4)),
            "prune_layers": [int(x) for x in a.prune_layers.split(",")] if a.prune_layers else None,
            "kv": [k for k in a.kv.split(",") if k], "kv_group_size": a.kv_group_size, "kv_residual": a.kv_residual}

    def save(rows):
        if out is not None:
            out.write_text(json.dumps(rows, indent=2))
    rows = run(a.model, [r["prompt"] for r in recs], spec, a.device, a.dtype, a.tokens, not a.no_chat,
               max_seq_len=a.max_seq_len, on_row=save)
    print(markdown(rows, f"Fidelity vs the unquantized model: {a.model}, {len(recs)} prompts x {a.tokens} tokens"))
    if out is not None:
        save(rows)
        print(f"wrote {out}")
    return 0


def _layers(model: str) -> int:
    from quasar.model.args import ModelArgs
    return ModelArgs.from_dir(resolve_model(model)).num_layers


if __name__ == "__main__":
    sys.exit(main())
