"""Experiment: GEMM launch configurations judged in the whole CUDA-graph step.

The shipped tables (`ops/triton/tuned/`) come from `python -m quasar.bench_ops`, which times one
GEMM repeated in a graph. In a step, each GEMM also overlaps its neighbours through programmatic
dependent launch, so the best configuration in isolation need not be the best in the step. Here
each variant overrides table entries (kind, M bucket of T, N, K) -> GemmConfig, the step is
re-captured, and all variants are timed in one process, in alternating rounds.

    python tools/exp_step_configs.py --scheme w8a8-int8 --t 6 \\
        --variant "o bn32:4096x4096=32,4,256,4,3" --variant "o split8:4096x4096=64,8,256,4,3"

A variant is "name:NxK=bn,split_k,bk,warps,stages[;NxK=...]"; the first row is always the
shipped table. GPU only.
"""
from __future__ import annotations

import argparse
import functools
import json
import statistics

import torch


def parse_variant(spec: str):
    from quasar.ops.triton.tuning import GemmConfig
    name, _, body = spec.partition(":")
    entries = {}
    for part in body.split(";"):
        shape, _, cfg = part.partition("=")
        n, k = (int(v) for v in shape.lower().split("x"))
        bn, split, bk, warps, stages = (int(v) for v in cfg.split(","))
        entries[(n, k)] = GemmConfig(bn, split, bk, warps, stages)
    return name.strip(), entries


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="qwen3-8b")
    ap.add_argument("--scheme", default="w8a8-int8")
    ap.add_argument("--kind", default=None, help="table kind (default: the scheme's, e.g. w8a8_int8)")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--t", type=int, default=6)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--variant", action="append", default=[])
    ap.add_argument("--out", default="step_configs.json")
    a = ap.parse_args()
    from quasar import backends
    from quasar.config import VerifierConfig
    from quasar.ops.triton import tuning
    from quasar.speed import SHAPES, copy_bandwidth, kv_bytes, random_step_model, time_variants, weight_bytes
    be = backends.get("cuda")
    bw = copy_bandwidth(be, 1 << 30)
    kind = a.kind or a.scheme.replace("-", "_")
    bucket = tuning.m_bucket(a.t)
    tuning.load_default_table("cuda")
    base = dict(tuning.TABLE)
    variants = {"shipped table": {}}
    variants.update(parse_variant(v) for v in a.variant)
    m = random_step_model(SHAPES[a.shape], be, torch.bfloat16, a.ctx + 64,
                          VerifierConfig(quant=a.scheme, group_size=128))
    floor = (weight_bytes(m) + kv_bytes(m, a.ctx)) / bw * 1e3

    def setup(extra):
        tuning.TABLE.clear()
        tuning.TABLE.update(base)
        for (n, k), cfg in extra.items():
            tuning.TABLE[(kind, bucket, n, k)] = cfg

    times, outs = time_variants(m, be, a.t, a.ctx, {name: functools.partial(setup, extra)
                                                    for name, extra in variants.items()}, a.iters, a.rounds)
    setup({})
    ref = outs["shipped table"]
    res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "shape": a.shape, "scheme": a.scheme,
           "kind": kind, "ctx": a.ctx, "T": a.t, "copy_bandwidth_GBs": bw / 1e9, "floor_ms": floor, "rows": []}
    for name, extra in variants.items():
        med = statistics.median(times[name])
        err = (outs[name] - ref).abs().max().item()
        res["rows"].append({"variant": name, "entries": {f"{n}x{k}": c.as_dict() for (n, k), c in extra.items()},
                            "ms": med, "all_ms": times[name], "x_floor": med / floor, "max_abs_logit_diff": err})
        print(f"{name:36s} {med:7.3f} ms  {med / floor:5.3f}x floor  rounds {['%.3f' % x for x in times[name]]}  "
              f"max|dlogit| {err:.3g}", flush=True)
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
