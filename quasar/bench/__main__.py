"""python -m quasar.bench: acceptance and speed benchmarks.

    python -m quasar.bench acceptance --config configs/quasar-smollm2.yaml --config configs/ngram-bf16-smollm2.yaml \\
        --per-category 10 --out acc.json
    python -m quasar.bench speed --mode e2e|step|ops|project [--smoke] --out DIR
    python -m quasar.bench.ops --out ops.json      (the GEMM / attention kernel sweeps; CUDA)
    python -m quasar.bench serve --url http://127.0.0.1:8000 --request-rate 1,4,inf --num-prompts 100
    python -m quasar.bench longctx --config configs/quantspec-smollm2.yaml --contexts 1024,8192 --out lc.json
    python -m quasar.bench quantspec --contexts 32768,131072 --out DIR          (QuantSpec steps; real shapes)
    python -m quasar.bench specmquant --trees 16,32,64 --tau chain=2.1 --out DIR (tree / chain / hierarchical steps)

Prompts: the Spec-Bench question set shipped in benchmarks/data/specbench/question.jsonl unless
--prompts-file names another. --out: a FILE.json for acceptance (and bench.ops, fidelity), a
directory for speed (it writes speed.json, bench_ops.json and plots there).

acceptance (quasar/bench/acceptance.py): runs each config over the prompts and prints tau per
Spec-Bench task. speed (quasar/bench/speed.py): ops, step, e2e, project; --smoke runs a tiny model
on the CPU. serve (quasar/bench/serve.py): streaming requests at Poisson request rates against
any OpenAI-compatible server (TTFT, TPOT, ITL, throughput; tau from /metrics).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv=None) -> int:
    from quasar.run import DEFAULT_PROMPTS_REL, cli_call, positive_int
    ap = argparse.ArgumentParser(prog="python -m quasar.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    a1 = sub.add_parser("acceptance", help="tau per Spec-Bench task for each config")
    a1.add_argument("--config", type=Path, action="append", required=True)
    a1.add_argument("--prompts-file", type=Path, default=None,
                    help=f"JSONL, Spec-Bench format (default: the shipped {DEFAULT_PROMPTS_REL})")
    a1.add_argument("--per-category", type=positive_int, default=None, help="prompts per Spec-Bench task")
    a1.add_argument("--max-new-tokens", type=positive_int, default=None)
    a1.add_argument("--device", default=None)
    a1.add_argument("--dtype", default=None)
    a1.add_argument("--model", default=None, help="override every config's model")
    a1.add_argument("--threads", type=positive_int, default=None,
                    help="CPU threads for torch (overrides every config's runtime.threads)")
    a1.add_argument("--out", type=Path, metavar="FILE.json",
                    help="write the results to this JSON file (rewritten after each config)")
    a2 = sub.add_parser("speed", help="ops / step / e2e / project speed benchmarks")
    from quasar.bench import speed
    speed.add_args(a2)
    a3 = sub.add_parser("serve", help="serving benchmark against an OpenAI-compatible server")
    from quasar.bench import serve as serve_bench
    serve_bench.add_args(a3)
    a4 = sub.add_parser("longctx", help="tau and acceptance at long contexts (multi-document prompts)")
    from quasar.bench import longctx
    longctx.add_args(a4)
    a5 = sub.add_parser("quantspec", help="QuantSpec's draft / verify steps at long contexts vs bf16 AR (real shapes)")
    from quasar.bench import quantspec
    quantspec.add_args(a5)
    a6 = sub.add_parser("specmquant", help="tree / chain / hierarchical verify steps per scheme (real shapes)")
    from quasar.bench import specmquant
    specmquant.add_args(a6)
    a = ap.parse_args(argv)
    if a.cmd == "quantspec":
        return cli_call(quantspec.main, a)
    if a.cmd == "specmquant":
        return cli_call(specmquant.main, a)
    if a.cmd == "longctx":
        return cli_call(longctx.main, a)
    if a.cmd == "acceptance":
        return cli_call(_acceptance, a)
    if a.cmd == "serve":
        return cli_call(serve_bench.main, a)
    return cli_call(speed.main, a)


def _acceptance(a) -> int:
    from quasar.run import check_out_file, default_prompts_file, read_prompts_file

    from .acceptance import acceptance, acceptance_markdown, select
    out = check_out_file(a.out)
    recs = select(read_prompts_file(a.prompts_file or default_prompts_file()), a.per_category)
    ov = {"sampling.max_new_tokens": a.max_new_tokens, "device": a.device, "dtype": a.dtype,
          "model": a.model, "runtime.threads": a.threads}
    res = acceptance(a.config, recs, ov, out=out)
    print(acceptance_markdown(res))
    if out is not None:
        print(f"wrote {out}")
    return 0

if __name__ == "__main__":
    sys.exit(main())
