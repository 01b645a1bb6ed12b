"""Experiment: does an L2 prefetch issued during a latency-bound gap make the next GEMM faster?

One CUDA graph (quasar.bench_ops.graph_time) of 16 repetitions, each on its own weight copy
so that nothing stays in L2 between them, of: [prefetch of the weight] -> a busy-wait kernel (torch.cuda._sleep, no memory traffic:
the stand-in for RoPE/attention/norm) -> the GEMM. Reported per repetition, against the same
without the prefetch, the GEMM alone, the sleep alone and the prefetch alone. (The numbers in
BENCHMARKS.md were taken with an inline copy of the same event-timed graph loop, since replaced
by the shared one.)

    python tools/exp_prefetch_micro.py --out micro.json
"""
from __future__ import annotations

import argparse
import itertools
import json

import torch

from quasar.bench_ops import graph_time


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sleep-cycles", type=int, default=20000)
    ap.add_argument("--out", default="micro.json")
    a = ap.parse_args()
    from quasar.ops.triton import kernels
    from exp_prefetch import prefetch      # tools/ (this script's folder) is on sys.path
    from quasar.quant import rtn
    kn = kernels(False)
    g8, nq = kn.gemm_int8, kn.norm_quant
    dev = "cuda"
    res = {"gpu": torch.cuda.get_device_name(), "rows": []}
    side = torch.cuda.Stream()
    for label, n, k in (("o 4096x4096", 4096, 4096), ("gate_up 24576x4096", 24576, 4096)):
        reps = 16 if n == 4096 else 4
        for scheme in ("w8a8-int8", "bf16"):
            ws, mains = [], []
            for i in range(reps):
                wf = torch.randn(n, k, device=dev) * 0.02
                if scheme == "bf16":
                    w = wf.to(torch.bfloat16)
                    ws.append(w)
                    mains.append(w)
                else:
                    w = g8.pack_int8(rtn.int8_per_channel(wf))
                    ws.append(w)
                    mains.append(w.codes)
                del wf
            x = torch.randn(6, k, device=dev, dtype=torch.bfloat16)
            xa = nq.quantize_per_token(x, "int8")

            def gemm(i):
                if scheme == "bf16":
                    return g8.gemm_dense_stream(x, ws[i])
                return g8.gemm_w8a8_int8(xa, ws[i])

            def sleep(i):
                torch.cuda._sleep(a.sleep_cycles)

            def variant(name):
                def fn(i):
                    if name == "gemm":
                        gemm(i)
                    elif name == "sleep":
                        sleep(i)
                    elif name == "prefetch":
                        prefetch(mains[i], pdl=False)
                    elif name == "sleep+gemm":
                        sleep(i)
                        gemm(i)
                    elif name in ("pf bulk+sleep+gemm", "pf lines+sleep+gemm"):
                        prefetch(mains[i], lines="lines" in name, pdl=False)
                        sleep(i)
                        gemm(i)
                    elif name == "pf side+sleep+gemm":
                        side.wait_stream(torch.cuda.current_stream())
                        with torch.cuda.stream(side):
                            prefetch(mains[i], pdl=False)
                        sleep(i)
                        gemm(i)
                        torch.cuda.current_stream().wait_stream(side)
                return fn

            row = {"shape": label, "scheme": scheme, "MB": mains[0].numel() * mains[0].element_size() / 2**20}
            for name in ("gemm", "sleep", "prefetch", "sleep+gemm", "pf bulk+sleep+gemm",
                         "pf lines+sleep+gemm", "pf side+sleep+gemm"):
                fn, idx = variant(name), itertools.cycle(range(reps))
                try:      # one graph call per weight copy, reps of them per replay
                    row[name] = graph_time(lambda: fn(next(idx)), reps, 20)
                except Exception as e:  # report, keep going
                    row[name] = f"error: {type(e).__name__}: {e}"[:300]
            res["rows"].append(row)
            print(json.dumps(row), flush=True)
            del ws, mains
            torch.cuda.empty_cache()
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
