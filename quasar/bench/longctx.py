"""`python -m quasar.bench longctx`: tau and the acceptance rate per drafted token at long contexts
(QuantSpec's setting: the KV cache is what a step reads).

Prompts are built from real text: the Spec-Bench summarization articles (CNN/DailyMail news,
shipped in benchmarks/data/specbench/question.jsonl) concatenated, in file order from a rotating
start, into one multi-document prompt cut to exactly `context` tokens, followed by an instruction
to summarize the last article. Each config runs each prompt with its own k (adaptive k off: tau is
a property of the drafter, not of this machine's step costs), greedy.

    python -m quasar.bench longctx --config configs/quantspec-smollm2.yaml \\
        --config configs/quasar-quantspec-smollm2.yaml --contexts 1024,2048,4096,8192 \\
        --prompts 2 --max-new-tokens 96 --out longctx.json
"""
from __future__ import annotations

import json
from pathlib import Path

INSTRUCTION = "\n\nSummarize the last article above in three sentences."


def articles(prompts_file: Path) -> list[str]:
    from quasar.run import read_prompts_file
    out = []
    for r in read_prompts_file(prompts_file):
        if r.get("category") == "summarization":
            text = r["prompt"]
            out.append(text[len("Summarize:"):].strip() if text.startswith("Summarize:") else text)
    if not out:
        raise ValueError(f"{prompts_file} has no summarization prompts to build long documents from")
    return out


def long_prompt(llm, docs: list[str], context: int, start: int) -> list[int]:
    """Token ids: articles docs[start], docs[start+1], ... as 'Article i:' sections, cut so that
    the prompt (the instruction after them, in the tokenizer's chat template when it has one) is
    `context` tokens (to within a few: re-encoding the cut text may merge tokens)."""
    tok = llm.tokenizer
    wrap = (lambda text: llm.encode_chat([{"role": "user", "content": text}])) if llm.has_chat_template \
        else (lambda text: tok(text, add_special_tokens=False)["input_ids"])
    overhead = len(wrap(INSTRUCTION))
    ids: list[int] = []
    i = 0
    while len(ids) < context:
        doc = docs[(start + i) % len(docs)]
        ids += tok(f"{chr(10) * 2 if ids else ''}Article {i + 1}: {doc}", add_special_tokens=False)["input_ids"]
        i += 1
    body = tok.decode(ids[:context - overhead])
    return wrap(body + INSTRUCTION)


def run(configs: list[Path], contexts: list[int], n_prompts: int, max_new: int, overrides: dict,
        prompts_file: Path, out: Path | None = None, progress: bool = True, label: str = "") -> list[dict]:
    from tqdm.auto import tqdm

    from quasar import config as qcfg
    from quasar.engine import LLM
    docs = articles(prompts_file)
    rows: list[dict] = []
    for path in configs:
        cfg = qcfg.override(qcfg.load(path), {"drafter.adaptive": False, "max_seq_len": max(contexts) + max_new + 64,
                                              "sampling.max_new_tokens": max_new, "runtime.max_batch_size": 1,
                                              **overrides})
        llm = LLM(cfg)
        for ctx in contexts:
            agg = {"config": path.stem + (f" ({label})" if label else ""), "context": ctx, "prompts": 0, "steps": 0, "emitted": 0, "drafted": 0,
                   "accepted": 0, "decode_s": 0.0, "k": cfg.drafter.num_tokens}
            for j in tqdm(range(n_prompts), desc=f"{path.stem} ctx {ctx}", disable=not progress):
                ids = long_prompt(llm, docs, ctx, 7 * j)
                s = llm.generate(ids).stats
                agg["prompts"] += 1
                agg["steps"] += s.steps
                agg["emitted"] += s.decode_tokens
                agg["drafted"] += s.drafted
                agg["accepted"] += s.accepted
                agg["decode_s"] += s.decode_s
            agg["tau"] = agg["emitted"] / max(agg["steps"], 1)
            agg["acceptance_rate"] = agg["accepted"] / max(agg["drafted"], 1)
            rows.append(agg)
            if out is not None:
                out.write_text(json.dumps(rows, indent=2))
        del llm
    return rows


def markdown(rows: list[dict]) -> str:
    ctxs = sorted({r["context"] for r in rows})
    lines = ["| config | k | " + " | ".join(f"τ @ {c}" for c in ctxs) + " | " +
             " | ".join(f"accept/draft @ {c}" for c in ctxs) + " |",
             "|---|---|" + "---|" * (2 * len(ctxs))]
    for name in dict.fromkeys(r["config"] for r in rows):
        by = {r["context"]: r for r in rows if r["config"] == name}
        k = next(iter(by.values()))["k"]
        taus = [f"{by[c]['tau']:.2f}" if c in by else "–" for c in ctxs]
        accs = [f"{100 * by[c]['acceptance_rate']:.1f}%" if c in by else "–" for c in ctxs]
        lines.append(f"| {name} | {k} | " + " | ".join(taus) + " | " + " | ".join(accs) + " |")
    return "\n".join(lines)


def add_args(ap) -> None:
    from quasar.run import DEFAULT_PROMPTS_REL, positive_int
    ap.add_argument("--config", type=Path, action="append", required=True)
    ap.add_argument("--contexts", default="1024,2048,4096,8192", help="prompt lengths in tokens (comma-separated)")
    ap.add_argument("--prompts", type=positive_int, default=2, help="prompts per context")
    ap.add_argument("--max-new-tokens", type=positive_int, default=96)
    ap.add_argument("--prompts-file", type=Path, default=None,
                    help=f"JSONL, Spec-Bench format, whose summarization articles make the documents "
                         f"(default: the shipped {DEFAULT_PROMPTS_REL})")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a dotted config override applied to every config, e.g. drafter.scheme=unquantized "
                         "(repeatable; YAML values; the label of each row names it)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--model", default=None)
    ap.add_argument("--threads", type=positive_int, default=None)
    ap.add_argument("--out", type=Path, metavar="FILE.json")


def main(a) -> int:
    from quasar.errors import ConfigError
    from quasar.run import check_out_file, default_prompts_file
    try:
        contexts = sorted({int(x) for x in a.contexts.split(",") if x.strip()})
    except ValueError:
        raise ConfigError(f"--contexts takes comma-separated token counts, got {a.contexts!r}") from None
    if not contexts or min(contexts) < 64:
        raise ConfigError(f"--contexts must be token counts >= 64, got {a.contexts!r}")
    out = check_out_file(a.out)
    import yaml
    overrides = {k: v for k, v in {"device": a.device, "model": a.model, "runtime.threads": a.threads}.items()
                 if v is not None}
    sets = {}
    for item in a.set:
        key, eq, val = item.partition("=")
        if not eq or not key:
            raise ConfigError(f"--set takes KEY=VALUE, got {item!r}")
        sets[key] = yaml.safe_load(val)
    rows = run(a.config, contexts, a.prompts, a.max_new_tokens, {**overrides, **sets},
               a.prompts_file or default_prompts_file(), out,
               label=" ".join(f"{k}={v}" for k, v in sets.items()))
    print(markdown(rows))
    if out is not None:
        print(f"wrote {out}")
    return 0
