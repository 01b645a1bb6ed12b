"""python -m quasar.run: generate with a deployment (YAML + flag overrides).

With no arguments it runs the demo: the embedded default model on the best available device,
with a few built-in prompts. Flags override the YAML.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from quasar import config as qcfg
from quasar.errors import ConfigError, QuasarError

DEMO_PROMPTS = [
    "What is the capital of France?",
    "Write a Python function that returns the n-th Fibonacci number.",
    "Explain in two sentences why the sky is blue.",
]


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m quasar.run", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, help="YAML deployment config")
    ap.add_argument("--model", help="embedded model name, local HF directory or .gguf file")
    ap.add_argument("--device", help="auto | cpu | cuda | npu")
    ap.add_argument("--dtype", help="auto | float32 | bfloat16 | float16")
    ap.add_argument("--max-seq-len", type=int, help="static KV cache length")
    ap.add_argument("--verifier-quant", help="bf16 | w8a8-int8 | w8a8-fp8 | w8a16 | w4a16 | w4a4")
    ap.add_argument("--group-size", type=int, help="int4 group size (-1 = per channel)")
    ap.add_argument("--drafter", help="none | ngram | quantized_self | draft_model")
    ap.add_argument("--num-draft-tokens", type=int, help="k, tokens drafted per step")
    ap.add_argument("--draft-scheme", help="quantized_self: the scheme the draft runs (default w4a4)")
    ap.add_argument("--draft-model", help="draft_model: path or name of the draft model")
    ap.add_argument("--prompt", action="append", help="a prompt (repeat for several)")
    ap.add_argument("--prompts-file", type=Path, help="JSONL, Spec-Bench format (first turn used)")
    ap.add_argument("--limit", type=int, help="use only the first N prompts of --prompts-file")
    ap.add_argument("--max-new-tokens", type=int)
    ap.add_argument("--temperature", type=float)
    ap.add_argument("--top-p", type=float)
    ap.add_argument("--top-k", type=int)
    ap.add_argument("--seed", type=int)
    ap.add_argument("--no-chat", action="store_true", help="raw completion: no chat template")
    ap.add_argument("--json", action="store_true", help="one JSON object per prompt per line")
    return ap.parse_args(argv)


def build_config(a: argparse.Namespace) -> qcfg.DeployConfig:
    cfg = qcfg.load(a.config) if a.config else qcfg.DeployConfig()
    return qcfg.override(cfg, {
        "model": a.model, "device": a.device, "dtype": a.dtype, "max_seq_len": a.max_seq_len,
        "verifier.quant": a.verifier_quant, "verifier.group_size": a.group_size,
        "drafter.method": a.drafter, "drafter.num_tokens": a.num_draft_tokens,
        "drafter.scheme": a.draft_scheme, "drafter.model": a.draft_model,
        "sampling.max_new_tokens": a.max_new_tokens, "sampling.temperature": a.temperature,
        "sampling.top_p": a.top_p, "sampling.top_k": a.top_k, "sampling.seed": a.seed,
        "chat": False if a.no_chat else None,
    })


def read_prompts_file(path: Path, limit=None) -> list[dict]:
    """Spec-Bench JSONL ({"question_id", "category", "turns": [...]}) or {"prompt": ...} lines."""
    if not path.is_file():
        raise ConfigError(f"prompts file {path} does not exist")
    out = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{i}: not valid JSON ({e})") from None
        if isinstance(rec, dict) and isinstance(rec.get("turns"), list) and rec["turns"]:
            text = rec["turns"][0]
        elif isinstance(rec, dict) and isinstance(rec.get("prompt"), str):
            text = rec["prompt"]
        else:
            raise ConfigError(f"{path}:{i}: expected Spec-Bench format "
                              '{"question_id", "category", "turns": ["..."]} or {"prompt": "..."}')
        out.append({"prompt": text, "question_id": rec.get("question_id"), "category": rec.get("category")})
        if limit and len(out) >= limit:
            break
    if not out:
        raise ConfigError(f"prompts file {path} has no prompts")
    return out


def main(argv=None) -> int:
    a = parse_args(argv)
    try:
        return _run(a)
    except QuasarError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _run(a) -> int:
    cfg = build_config(a)
    if a.prompt:
        prompts = [{"prompt": p} for p in a.prompt]
    elif a.prompts_file:
        prompts = read_prompts_file(a.prompts_file, a.limit)
    else:
        prompts = [{"prompt": p} for p in DEMO_PROMPTS]
    from quasar.engine import LLM
    log = sys.stderr if a.json else sys.stdout
    llm = LLM(cfg)
    print(f"quasar: {cfg.model} on {llm.device} ({str(llm.dtype).replace('torch.', '')}), "
          f"verifier {llm.model.scheme}, drafter {cfg.drafter.method}"
          + (f" k={cfg.drafter.num_tokens}" if cfg.drafter.method != "none" else ""), file=log)
    totals = {"new_tokens": 0, "decode_tokens": 0, "steps": 0, "decode_s": 0.0, "prefill_s": 0.0}
    for i, rec in enumerate(prompts):
        r = llm.generate(rec["prompt"])
        s = r.stats
        for key in totals:
            totals[key] += getattr(s, key)
        if a.json:
            obj = {k: v for k, v in rec.items() if v is not None}
            obj.update(prompt_token_ids=r.prompt_token_ids, token_ids=r.token_ids, text=r.text,
                       stats=s.as_dict())
            print(json.dumps(obj, ensure_ascii=False), flush=True)
        else:
            print(f"\n[{i + 1}/{len(prompts)}] {rec['prompt']}\n{r.text}")
            print(f"-- {s.new_tokens} new tokens | prefill {s.prefill_s * 1e3:.1f} ms | decode "
                  f"{s.decode_tok_s:.1f} tok/s | tau {s.tau:.2f} | finish: {s.finish_reason}", flush=True)
    if len(prompts) > 1:
        tau = totals["decode_tokens"] / totals["steps"] if totals["steps"] else float("nan")
        tps = totals["decode_tokens"] / totals["decode_s"] if totals["decode_s"] else float("nan")
        print(f"\n== {len(prompts)} prompts | {totals['new_tokens']} new tokens | decode {tps:.1f} tok/s "
              f"| tau {tau:.2f} | prefill {totals['prefill_s']:.2f} s total", file=log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
