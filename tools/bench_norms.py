#!/usr/bin/env python
"""Graph-timed micro-benchmark of the row kernels a step runs per layer (RMSNorm, add+RMSNorm,
SiLU*mul, each plain and quantizing to int8) at the Qwen3-8B widths (4096, 12288), M in {1, 6},
for num_warps in {4, 8, 16, 32}: what the heuristic in norm_quant._warps picks vs the others.
GPU only. Usage: python tools/bench_norms.py [--out norms.json]"""
import argparse
import json

import torch

from quasar.backends.cuda import make_backend
from quasar.bench_ops import graph_time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    a = ap.parse_args()
    be = make_backend("cuda")
    nq = be.kernels.norm_quant
    dev, dt = be.device, torch.bfloat16
    default_warps = nq._warps
    rows = []
    for m in (1, 6):
        x = torch.randn(m, 4096, device=dev, dtype=dt)
        d = torch.randn(m, 4096, device=dev, dtype=dt)
        w = torch.randn(4096, device=dev, dtype=dt)
        gu = torch.randn(m, 2 * 12288, device=dev, dtype=dt)
        cases = {
            "rms_norm": lambda: nq.rms_norm(x, w, 1e-6),
            "add_rms_norm": lambda: nq.add_rms_norm(x, d, w, 1e-6),
            "add_rms_norm int8": lambda: nq.add_rms_norm(x, d, w, 1e-6, "int8"),
            "rms_norm int8": lambda: nq.rms_norm_quant(x, w, 1e-6, "int8"),
            "silu_mul": lambda: nq.silu_mul(gu),
            "silu_mul int8": lambda: nq.silu_mul_quant(gu, "int8"),
            "silu_mul + quantize int8": lambda: nq.quantize_per_token(nq.silu_mul(gu), "int8"),
            "quantize int8 (12288)": lambda: nq.quantize_per_token(gu[:, :12288], "int8"),
        }
        for name, fn in cases.items():
            res = {"m": m, "case": name}
            res["default_us"] = graph_time(fn, 32, 20)
            for nw in (4, 8, 16, 32):
                nq._warps = lambda blk, nw=nw: nw
                try:
                    res[f"w{nw}_us"] = graph_time(fn, 32, 20)
                except Exception as e:  # noqa: BLE001
                    res[f"w{nw}_us"] = f"{type(e).__name__}"
                finally:
                    nq._warps = default_warps
            rows.append(res)
            print(" | ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in res.items()),
                  flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
