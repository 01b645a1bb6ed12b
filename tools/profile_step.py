"""Where a step's time goes: per-kernel GPU time of one CUDA-graph-replayed step at a real shape
(random weights), from torch.profiler, grouped into GEMM / activation quantization / attention /
other, against the step's byte floor.

    python tools/profile_step.py --shape qwen3-8b --ctx 512 --out profile.json

Run from outside the repository root on a GPU machine (the installed package must be the one
imported). Random weights: timing only.
"""
from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict

import torch



def cases(k: int) -> list:
    """The unquantized decode step, and a verify chunk of k+1 tokens for every registered scheme."""
    from quasar import quant
    out = [(f"decode {quant.default()} (T=1)", quant.default(), 1)]
    return out + [(f"verify {n} (T={k + 1})", n, k + 1) for n in quant.SCHEMES]


def group(name: str) -> str:
    n = name.lower()
    if "attn" in n:
        return "attention"
    if re.search(r"quant_kernel|rms_norm|silu", n):
        return "norm / SiLU / activation quantization"
    if re.search(r"int8_weight_kernel|int8_kernel|int4_kernel|gemm|cutlass|sm90|gemv|nvjet|scaled_mm|xmma", n):
        return "GEMM"
    return "other (rope, kv write, embedding, copies)"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="qwen3-8b")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--k", type=int, default=5, help="drafted tokens: verify chunks of k+1")
    ap.add_argument("--schemes", default=None, help="comma-separated subset of the schemes")
    ap.add_argument("--out", default="profile.json")
    a = ap.parse_args()
    from torch.profiler import ProfilerActivity, profile

    from quasar import backends
    from quasar.config import VerifierConfig
    from quasar.bench.speed import SHAPES, capture, copy_bandwidth, kv_bytes, random_step_model, weight_bytes
    be = backends.get("cuda")
    bw = copy_bandwidth(be, 1 << 30)
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "shape": a.shape,
               "ctx": a.ctx, "copy_bandwidth_GBs": bw / 1e9, "cases": []}
    want = None if not a.schemes else {s.strip() for s in a.schemes.split(",")}
    for label, scheme, t in cases(a.k):
        if want is not None and scheme not in want:
            continue
        m = random_step_model(SHAPES[a.shape], be, torch.bfloat16, a.ctx + 64,
                              VerifierConfig(quant=scheme, group_size="auto"))
        capture(m, t, "verify")
        ids = torch.randint(0, 1000, (1, t), device="cuda")
        pos = torch.arange(a.ctx, a.ctx + t, device="cuda").view(1, -1)
        for _ in range(5):
            m.step(ids, pos, a.ctx + t, mode="verify")
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(a.steps):
                m.step(ids, pos, a.ctx + t, mode="verify")
            torch.cuda.synchronize()
        per_kernel = defaultdict(float)
        for ev in prof.key_averages():
            if ev.device_time_total > 0 and not ev.key.startswith("cudaGraph"):
                per_kernel[ev.key] += ev.device_time_total / a.steps / 1e3     # ms per step
        groups = defaultdict(float)
        for k, v in per_kernel.items():
            groups[group(k)] += v
        floor = (weight_bytes(m.model) + kv_bytes(m.model, a.ctx)) / bw * 1e3
        top = sorted(per_kernel.items(), key=lambda kv: -kv[1])[:12]
        row = {"case": label, "floor_ms": floor, "kernel_ms": sum(per_kernel.values()),
               "groups_ms": dict(groups), "top_kernels_ms": top}
        results["cases"].append(row)
        print(f"\n## {label}: kernels {row['kernel_ms']:.3f} ms/step, floor {floor:.3f} ms")
        for g, v in sorted(groups.items(), key=lambda kv: -kv[1]):
            print(f"  {g:45s} {v:7.3f} ms")
        for k, v in top:
            print(f"    {v:7.3f} ms  {k[:110]}")
        del m
        torch.cuda.empty_cache()
    with open(a.out, "w") as f:
        json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
