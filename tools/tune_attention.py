#!/usr/bin/env python
"""Graph-timed sweep of the Triton decode/verify attention's launch parameters (splits, BS,
warps, stages) at Qwen3-8B's heads (32 q, 8 kv, D = 128), ctx 512 / 4096, T = 1 / 6, with
kv_len = the whole cache (the fixed grid of a CUDA graph). Prints the default's time and the
best. GPU only: python tools/tune_attention.py [--out attn.json]"""
import argparse
import itertools
import json

import torch

from quasar.bench_ops import graph_time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    a = ap.parse_args()
    from quasar.backends.cuda import make_backend
    from quasar.spec.kv_cache import KVCache
    be = make_backend("cuda")
    attn = be.kernels.attention
    dev = be.device
    s_max = 4114
    cache = KVCache(1, 1, 8, s_max, 128, torch.bfloat16, dev)
    cache.k.normal_()
    cache.v.normal_()
    rows = []
    for ctx, t in itertools.product((512, 4096), (1, 6)):
        pos = torch.arange(ctx - t, ctx, device=dev).view(1, t)
        q = torch.randn(1, t, 32, 128, device=dev, dtype=torch.bfloat16)
        ref = attn.attention(q, cache, 0, pos, s_max).float()
        default = graph_time(lambda: attn.attention(q, cache, 0, pos, s_max), 32, 20)
        best = None
        for ns, bs, w, st in itertools.product((4, 8, 16, 17, 32), (32, 64, 128), (2, 4, 8), (1, 2, 3)):
            def f(ns=ns, bs=bs, w=w, st=st):
                return attn.attention(q, cache, 0, pos, s_max, num_splits=ns, block_s=bs, num_warps=w, num_stages=st)
            try:
                y = f().float()
                if not torch.allclose(y, ref, atol=2e-2, rtol=2e-2):
                    continue
                tt = graph_time(f, 32, 10)
            except Exception:  # noqa: BLE001
                continue
            if best is None or tt < best[0]:
                best = (tt, dict(num_splits=ns, block_s=bs, num_warps=w, num_stages=st))
        rows.append({"ctx": ctx, "t": t, "default_us": default, "best_us": best[0], "best": best[1]})
        print(rows[-1], flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
