"""python -m quasar.run: generate with a deployment (YAML + flag overrides).

With no arguments it runs the demo: the embedded default model on the best available device,
with a few built-in prompts. Flags override the YAML. The installed `quasar` command is the same;
`quasar serve ...` starts the OpenAI-compatible server (python -m quasar.serve --help).

    python -m quasar.run --prompt "Write a limerick." --max-new-tokens 64
    python -m quasar.run --config configs/quasar-smollm2.yaml --prompts-file benchmarks/data/specbench/question.jsonl --limit 12 --json
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from quasar import config as qcfg
from quasar.errors import ConfigError, ContextLengthError, QuasarError

DEMO_PROMPTS = [
    "What is the capital of France?",
    "Write a Python function that returns the n-th Fibonacci number.",
    "Explain in two sentences why the sky is blue.",
]


# optional modules -> the extra (setup.py extras_require) that installs them
OPTIONAL_MODULES = {"triton": "cuda", "gguf": "gguf", "matplotlib": "plot", "llmcompressor": "quant",
                    "compressed_tensors": "quant", "torch_npu": "npu", "fastapi": "serve", "uvicorn": "serve",
                    "prometheus_client": "serve", "httpx": "serve"}


def cli_call(fn, *args, **kwargs) -> int:
    """Run a CLI's body: a QuasarError (or a missing optional module) becomes one line
    `error: ...` on stderr and exit status 2; Ctrl-C exits 130. Every quasar CLI's main uses it.
    The engine's log lines (logger "quasar": load-time choices such as the group size `auto` picks,
    backend notes) go to stderr."""
    log = logging.getLogger("quasar")
    if not log.handlers:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("quasar: %(message)s"))
        log.addHandler(h)
        log.setLevel(logging.INFO)
    try:
        rc = fn(*args, **kwargs)
        return 0 if rc is None else rc
    except QuasarError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:
        top = (e.name or "").split(".")[0]
        if top not in OPTIONAL_MODULES:
            raise
        extra = OPTIONAL_MODULES[top]
        print(f"error: the Python package {top!r} is not installed ({e}); it comes with the extra "
              f"'{extra}': pip install -e '.[{extra}]'", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PROMPTS_REL = "benchmarks/data/specbench/question.jsonl"


def default_prompts_file() -> Path:
    """The Spec-Bench question set shipped in the repository (the benchmarks' default prompts)."""
    p = REPO_ROOT / DEFAULT_PROMPTS_REL
    if not p.is_file():
        raise ConfigError(f"the default prompts file {p} is missing (it ships in the repository's "
                          f"{DEFAULT_PROMPTS_REL}; an install from a wheel does not include it); "
                          "pass --prompts-file FILE.jsonl")
    return p


def check_out_file(out):
    """--out of the commands that write one JSON file (bench acceptance, bench.ops, fidelity):
    a path ending in .json; its folder is created. Returns the Path (None stays None)."""
    if out is None:
        return None
    out = Path(out)
    if out.suffix != ".json" or out.is_dir():
        raise ConfigError(f"--out {out}: give a file name ending in .json (this command writes one "
                          "JSON file)")
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


def check_out_dir(out):
    """--out of `bench speed`, which writes several files (speed.json, bench_ops.json, plots): a
    directory, created if needed; a path ending in .json or an existing file is rejected."""
    out = Path(out)
    if out.suffix == ".json" or out.is_file():
        raise ConfigError(f"--out {out}: bench speed writes several files (speed.json, bench_ops.json, "
                          "plots); give a directory, e.g. --out bench_out")
    out.mkdir(parents=True, exist_ok=True)
    return out


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (for --limit, --threads, ...)."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {v}")
    return v


def group_size(text: str):
    return text if text == "auto" else int(text)


def parse_args(argv=None) -> argparse.Namespace:
    prog = "quasar" if Path(sys.argv[0]).name == "quasar" else "python -m quasar.run"
    ap = argparse.ArgumentParser(prog=prog, description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, help="YAML deployment config")
    ap.add_argument("--model", help="embedded model name, local HF directory or .gguf file")
    ap.add_argument("--device", help="auto | cpu | cuda | npu")
    ap.add_argument("--dtype", help="auto | float32 | bfloat16 | float16")
    ap.add_argument("--max-seq-len", type=int, help="static KV cache length")
    from quasar import quant
    ap.add_argument("--verifier-quant", metavar="SCHEME",
                    help=" | ".join(quant.names()) + " (bf16 = unquantized)")
    ap.add_argument("--group-size", type=group_size, help="int4 group size: auto, -1 (per channel), 32, 64, 128, ...")
    ap.add_argument("--drafter", help="none | ngram | quantized_self | draft_model")
    ap.add_argument("--num-draft-tokens", type=int, help="k, tokens drafted per step")
    ap.add_argument("--draft-scheme", metavar="SCHEME",
                    help=f"quantized_self: the scheme the draft runs (default {quant.DEFAULT_DRAFT})")
    ap.add_argument("--draft-model", help="draft_model: path or name of the draft model")
    ap.add_argument("--prompt", action="append", help="a prompt (repeat for several)")
    ap.add_argument("--prompts-file", type=Path,
                    help=f"JSONL, Spec-Bench format (first turn used), e.g. {DEFAULT_PROMPTS_REL}")
    ap.add_argument("--limit", type=positive_int, help="use only the first N prompts of --prompts-file")
    ap.add_argument("--max-new-tokens", type=int)
    ap.add_argument("--temperature", type=float)
    ap.add_argument("--top-p", type=float)
    ap.add_argument("--top-k", type=int)
    ap.add_argument("--seed", type=int)
    ap.add_argument("--no-chat", action="store_true", help="raw completion: no chat template")
    ap.add_argument("--threads", type=positive_int,
                    help="CPU threads for torch (runtime.threads; default: see README, 'CPU threads')")
    ap.add_argument("--max-batch-size", type=positive_int,
                    help="sequences decoded together (runtime.max_batch_size; continuous batching)")
    ap.add_argument("--json", action="store_true",
                    help="one JSON object per prompt per line (no streaming; a single prompt's text "
                         "is otherwise printed as it is generated)")
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
        "chat": False if a.no_chat else None, "runtime.threads": a.threads,
        "runtime.max_batch_size": a.max_batch_size,
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
        out.append({"prompt": text, "question_id": rec.get("question_id"), "category": rec.get("category"),
                    "where": f"{path}:{i} (prompt {len(out)})"})
        if limit and len(out) >= limit:
            break
    if not out:
        raise ConfigError(f"prompts file {path} has no prompts")
    return out


class TokenStream:
    """on_tokens callback that prints a completion as its tokens are accepted (incremental
    detokenization: no broken multi-byte character is printed, and what it prints equals the
    final decode)."""

    def __init__(self, tokenizer, out):
        from quasar.engine.detokenizer import IncrementalDetokenizer
        self.detok = IncrementalDetokenizer(tokenizer)
        self.out = out

    def __call__(self, new_ids) -> None:
        self.detok.add(new_ids)
        self.out.write(self.detok.delta())
        self.out.flush()

    def finish(self, text: str) -> None:
        """Print what is left (a trailing U+FFFD included) and end the line."""
        self.detok.finish()
        self.out.write(self.detok.delta(final=True) + "\n")
        self.out.flush()


def main(argv=None) -> int:
    a = parse_args(argv)
    return cli_call(_run, a)


def _tree(d) -> str:
    t = d.tree
    return f" (tree depth {t.depth}, top-{t.topk}, <= {t.max_nodes} nodes)"


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
          + (f" k={llm.k}" if llm.k else "") + (_tree(cfg.drafter) if cfg.drafter.tree else ""), file=log)
    totals = {"new_tokens": 0, "decode_tokens": 0, "steps": 0, "decode_s": 0.0, "prefill_s": 0.0}
    ids = [llm.encode(rec["prompt"]) for rec in prompts]
    bad = [f"{rec.get('where') or f'--prompt {i + 1}'}: {why}" for i, (rec, x) in enumerate(zip(prompts, ids))
           if (why := llm.check_prompt(x))]
    if bad:         # every prompt is checked before any runs
        raise ContextLengthError(f"{len(bad)} of {len(prompts)} prompts cannot run:\n  " + "\n  ".join(bad))
    stream = len(prompts) == 1 and not a.json
    if stream:
        print(f"\n[1/1] {prompts[0]['prompt']}", flush=True)
        printer = TokenStream(llm.tokenizer, sys.stdout)
        results = [llm.generate(ids[0], on_tokens=printer)]
        printer.finish(results[0].text)
    else:
        t0 = time.perf_counter()
        results = llm.generate(ids, progress=len(prompts) > 1)
        wall = time.perf_counter() - t0
    for i, (rec, r) in enumerate(zip(prompts, results)):
        s = r.stats
        for key in totals:
            totals[key] += getattr(s, key)
        if a.json:
            obj = {k: v for k, v in rec.items() if v is not None and k != "where"}
            obj.update(prompt_token_ids=r.prompt_token_ids, token_ids=r.token_ids, text=r.text,
                       stats=s.as_dict())
            if r.error:
                obj["error"] = r.error
            print(json.dumps(obj, ensure_ascii=False), flush=True)
        else:
            if not stream:
                print(f"\n[{i + 1}/{len(prompts)}] {rec['prompt']}\n{r.text}")
            if r.error:
                print(f"-- error: {r.error}", flush=True)
            print(f"-- {s.new_tokens} new tokens | prefill {s.prefill_s * 1e3:.1f} ms | decode "
                  f"{s.decode_tok_s:.1f} tok/s | tau {s.tau:.2f} | k {s.mean_k:.2f} | finish: {s.finish_reason}",
                  flush=True)
    if len(prompts) > 1:
        tau = totals["decode_tokens"] / totals["steps"] if totals["steps"] else float("nan")
        e = llm.engine
        print(f"\n== {len(prompts)} prompts, up to {cfg.runtime.max_batch_size} in flight | "
              f"{totals['new_tokens']} new tokens in {wall:.2f} s = {totals['new_tokens'] / wall:.1f} tok/s | "
              f"tau {tau:.2f} | steps by k: {dict(sorted(e.k_hist.items()))} | "
              f"peak KV blocks {e.peak_blocks}/{e.blocks.num_blocks} | preemptions {e.sched.preemptions}", file=log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
