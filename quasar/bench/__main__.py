"""python -m quasar.bench: acceptance and speed benchmarks.

    python -m quasar.bench acceptance --config configs/quasar-smollm2.yaml --config configs/ngram-bf16-smollm2.yaml \\
        --per-category 10 --out acc.json
    python -m quasar.bench speed --mode e2e|step|ops|project [--smoke] --out DIR
    python -m quasar.bench.ops --out ops.json      (the GEMM / attention kernel sweeps; CUDA)

acceptance (quasar/bench/acceptance.py): runs each config over the prompts and prints tau per
Spec-Bench task. speed (quasar/bench/speed.py): ops, step, e2e, project; --smoke runs a tiny model
on the CPU.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from quasar.errors import QuasarError


def main(argv=None) -> int:
    from quasar.run import read_prompts_file

    from .acceptance import acceptance, acceptance_markdown, select
    ap = argparse.ArgumentParser(prog="python -m quasar.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    a1 = sub.add_parser("acceptance", help="tau per Spec-Bench task for each config")
    a1.add_argument("--config", type=Path, action="append", required=True)
    a1.add_argument("--prompts-file", type=Path, required=True)
    a1.add_argument("--per-category", type=int, default=None, help="prompts per Spec-Bench task")
    a1.add_argument("--max-new-tokens", type=int, default=None)
    a1.add_argument("--device", default=None)
    a1.add_argument("--dtype", default=None)
    a1.add_argument("--model", default=None, help="override every config's model")
    a1.add_argument("--out", type=Path)
    a2 = sub.add_parser("speed", help="ops / step / e2e / project speed benchmarks")
    from quasar.bench import speed
    speed.add_args(a2)
    a = ap.parse_args(argv)
    try:
        if a.cmd == "acceptance":
            recs = select(read_prompts_file(a.prompts_file), a.per_category)
            ov = {"sampling.max_new_tokens": a.max_new_tokens, "device": a.device, "dtype": a.dtype,
                  "model": a.model}
            out = a.out
            if out is not None:
                if out.is_dir() or not out.suffix:
                    out.mkdir(parents=True, exist_ok=True)
                    out = out / "acceptance.json"
                else:
                    out.parent.mkdir(parents=True, exist_ok=True)
            res = acceptance(a.config, recs, ov, out=out)
            print(acceptance_markdown(res))
            if out is not None:
                print(f"wrote {out}")
        else:
            return speed.main(a)
    except QuasarError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
