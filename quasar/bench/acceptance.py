"""`python -m quasar.bench acceptance`: runs each config over the prompts (progress bar) and prints, per Spec-Bench task
(MT-bench's eight categories pooled, translation, summarization, qa, math_reasoning, rag), the
mean accepted length tau (tokens emitted / verification steps, bonus included) and the
acceptance rate per draft position; writes everything as JSON.
"""
from __future__ import annotations

import dataclasses
import json
from collections import OrderedDict
from pathlib import Path

MT_BENCH = ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities")
TASKS = ("mt_bench", "translation", "summarization", "qa", "math_reasoning", "rag")


def task_of(category) -> str:
    return "mt_bench" if category in MT_BENCH else (category or "other")


def select(recs: list[dict], per_task: int | None) -> list[dict]:
    """The first `per_task` prompts of each Spec-Bench task, in file order (all if None)."""
    if not per_task:
        return recs
    seen: dict[str, int] = {}
    out = []
    for r in recs:
        t = task_of(r.get("category"))
        if seen.get(t, 0) < per_task:
            seen[t] = seen.get(t, 0) + 1
            out.append(r)
    return out


def acceptance(configs: list[Path], prompts: list[dict], overrides: dict, progress: bool = True,
               out: Path | None = None) -> dict:
    """tau per task for each config; with `out`, the JSON is rewritten after every config, so an
    interrupted run keeps what it measured."""
    from tqdm.auto import tqdm

    from quasar import config as qcfg
    from quasar.engine import LLM
    results = OrderedDict()
    for path in configs:
        # tau at the config's own k: adaptive k would tune k to this machine's step costs
        cfg = qcfg.override(qcfg.load(path), {"drafter.adaptive": False, **overrides})
        llm = LLM(cfg)
        per = OrderedDict()
        for rec in tqdm(prompts, desc=path.stem, disable=not progress):
            r = llm.generate(rec["prompt"])
            s = r.stats
            t = task_of(rec.get("category"))
            agg = per.setdefault(t, {"prompts": 0, "steps": 0, "emitted": 0, "new_tokens": 0, "decode_s": 0.0,
                                     "tries": [], "accepts": []})
            agg["prompts"] += 1
            agg["steps"] += s.steps
            agg["emitted"] += s.decode_tokens
            agg["new_tokens"] += s.new_tokens
            agg["decode_s"] += s.decode_s
            for key, got in (("tries", s.pos_tries), ("accepts", s.pos_accepts)):
                agg[key] += [0] * (len(got) - len(agg[key]))       # tree depth / chain length seen
                for i, x in enumerate(got):
                    agg[key][i] += x
        k = max((len(a["tries"]) for a in per.values()), default=0)
        for agg in per.values():
            agg["tries"] += [0] * (k - len(agg["tries"]))
            agg["accepts"] += [0] * (k - len(agg["accepts"]))
        total = {"prompts": 0, "steps": 0, "emitted": 0, "new_tokens": 0, "decode_s": 0.0,
                 "tries": [0] * k, "accepts": [0] * k}
        for agg in per.values():
            for key in ("prompts", "steps", "emitted", "new_tokens", "decode_s"):
                total[key] += agg[key]
            total["tries"] = [a + b for a, b in zip(total["tries"], agg["tries"])]
            total["accepts"] = [a + b for a, b in zip(total["accepts"], agg["accepts"])]
        per["all"] = total
        for agg in per.values():
            agg["tau"] = agg["emitted"] / agg["steps"] if agg["steps"] else float("nan")
            agg["acceptance"] = [a / t if t else None for a, t in zip(agg["accepts"], agg["tries"])]
        results[path.stem] = {"config": str(path), "verifier": llm.model.scheme,
                              "drafter": cfg.drafter.method, "k": llm.k,
                              "tree": None if cfg.drafter.tree is None else dataclasses.asdict(cfg.drafter.tree),
                              "rounds_per_step": getattr(llm.drafter, "rounds_per_step", None), "device": llm.device,
                              "dtype": str(llm.dtype).replace("torch.", ""), "tasks": per}
        del llm
        if out is not None:
            out.write_text(json.dumps(results, indent=2))
    return results


def acceptance_markdown(results: dict) -> str:
    names = list(results)
    tasks = [t for t in TASKS if any(t in r["tasks"] for r in results.values())] + ["all"]
    lines = ["| task | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for t in tasks:
        cells = []
        for n in names:
            a = results[n]["tasks"].get(t)
            cells.append(f"{a['tau']:.2f}" if a else "–")
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Acceptance rate per draft position (all tasks):")
    lines.append("")
    for n in names:
        acc = results[n]["tasks"]["all"]["acceptance"]
        if acc:
            lines.append(f"- {n}: " + ", ".join("–" if a is None else f"{a:.2f}" for a in acc))
    return "\n".join(lines)
