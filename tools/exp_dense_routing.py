"""Experiment: which dense (bf16) projections should run on the weight-streaming Triton kernel
rather than cuBLAS, judged in the whole CUDA-graph step rather than one GEMM at a time.

The ops sweep (`python -m quasar.bench_ops`) times one GEMM repeated in a graph; in a step,
Triton kernels also overlap their neighbours through programmatic dependent launch, which
cuBLAS kernels do not take part in. Here the routing table entries ("bf16", bucket, N, K) are
set per variant, the step is re-captured, and all variants are timed in one process.

    python tools/exp_dense_routing.py --out dense_routing.json
    python tools/exp_dense_routing.py --t 1 --only "lm_head,qkv bn128" --rounds 5 --out lm_head_t1.json
"""
from __future__ import annotations

import argparse
import functools
import json
import statistics

import torch


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="qwen3-8b")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--t", type=int, default=1)
    ap.add_argument("--out", default="dense_routing.json")
    ap.add_argument("--only", default="", help="comma-separated substrings of the variants to run")
    a = ap.parse_args()
    from quasar import backends
    from quasar.config import VerifierConfig
    from quasar.ops.triton import tuning
    from quasar.ops.triton.tuning import GemmConfig
    from quasar.speed import SHAPES, copy_bandwidth, kv_bytes, random_step_model, time_variants, weight_bytes
    be = backends.get("cuda")
    bw = copy_bandwidth(be, 1 << 30)
    hf = SHAPES[a.shape]
    hid, nh, nkv, hd = hf["hidden_size"], hf["num_attention_heads"], hf["num_key_value_heads"], hf.get("head_dim", 128)
    qkv = ((nh + 2 * nkv) * hd, hid)
    lm = (hf["vocab_size"], hid)
    tuning.load_default_table("cuda")
    bucket = tuning.m_bucket(a.t)
    variants = {
        "shipped table (qkv, lm_head on cuBLAS)": {},
        "qkv bn64 s4 bk256 w4 st3": {qkv: GemmConfig(64, 4, 256, 4, 3)},
        "qkv bn64 s2 bk256 w4 st4": {qkv: GemmConfig(64, 2, 256, 4, 4)},
        "qkv bn128 s4 bk128 w8 st4": {qkv: GemmConfig(128, 4, 128, 8, 4)},
        "qkv bn32 s4 bk256 w4 st3": {qkv: GemmConfig(32, 4, 256, 4, 3)},
        "lm_head bn64 s1 bk256 w4 st3": {lm: GemmConfig(64, 1, 256, 4, 3)},
        "lm_head bn64 s1 + qkv bn128 s4 bk128 w8 st4": {lm: GemmConfig(64, 1, 256, 4, 3),
                                                         qkv: GemmConfig(128, 4, 128, 8, 4)},
    }
    if a.only:
        first = next(iter(variants))
        variants = {k: v for k, v in variants.items() if k == first or any(o in k for o in a.only.split(","))}
    m = random_step_model(hf, be, torch.bfloat16, a.ctx + 64, VerifierConfig(quant="bf16"))
    floor = (weight_bytes(m) + kv_bytes(m, a.ctx)) / bw * 1e3
    base = dict(tuning.TABLE)

    def setup(extra):
        tuning.TABLE.clear()
        tuning.TABLE.update(base)
        for (n, k), cfg in extra.items():
            tuning.TABLE[("bf16", bucket, n, k)] = cfg
        # the routing sees the entries (the lm_head variant's logits come out bit-identical to
        # cuBLAS's: the call count below shows the streaming kernel does run)
        for (n, k) in extra:
            assert tuning.tuned("bf16", a.t, n, k, m.device) is not None, (n, k)

    calls = {}
    g8 = be.kernels.gemm_int8
    orig_stream = g8.gemm_dense_stream

    def counting_stream(x, w, *args, **kw):
        calls[tuple(w.shape)] = calls.get(tuple(w.shape), 0) + 1
        return orig_stream(x, w, *args, **kw)
    g8.gemm_dense_stream = counting_stream

    times, outs = time_variants(m, be, a.t, a.ctx, {name: functools.partial(setup, extra)
                                                    for name, extra in variants.items()}, a.iters, a.rounds)
    setup({})
    g8.gemm_dense_stream = orig_stream
    print("weight-streaming dense GEMM calls by weight shape (eager calls, all variants):", calls)
    ref = outs[next(iter(variants))]
    res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "shape": a.shape, "ctx": a.ctx,
           "T": a.t, "stream_calls": {str(k): v for k, v in calls.items()}, "copy_bandwidth_GBs": bw / 1e9, "floor_ms": floor, "rows": []}
    for name in variants:
        med = statistics.median(times[name])
        err = (outs[name] - ref).abs().max().item()
        res["rows"].append({"variant": name, "ms": med, "all_ms": times[name], "pct_bw": floor / med * 100,
                            "max_abs_logit_diff_vs_first": err})
        print(f"{name:40s} {med:7.3f} ms  {floor / med * 100:5.1f}% BW  rounds "
              f"{['%.3f' % x for x in times[name]]}  max|dlogit| {err:.3g}", flush=True)
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
