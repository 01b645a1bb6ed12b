#!/usr/bin/env python
"""EXPERIMENT (not used by the engine): a w4a16 kernel on a "natural" int4 layout, words [N, K/8]
with nibble j of word w = code(n, 8w + j) + 8, unpacked with one 3-D shift and a reshape into a
[BN, 128] tile per group of 128, one tl.dot per group (instead of the planar layout's 8 dots of
K = 32 per 256). Graph-timed against the engine's kernel at the Qwen3-8B shapes, M = 1 and 6.
GPU only: python tools/exp_int4.py"""
import itertools
import sys

import torch
import triton
import triton.language as tl

from quasar.bench_ops import graph_time
from quasar.ops.triton._common import gemm_finish


@triton.jit(do_not_specialize=["M", "NKB", "blocks_per_split", "split_k"])
def _nat_kernel(x_ptr, w_ptr, s_ptr, out_ptr, ws_ptr, cnt_ptr, M, N, K, NKB, blocks_per_split, split_k,
                stride_xm, stride_om, stride_on,
                SPLIT: tl.constexpr, BN: tl.constexpr, BM: tl.constexpr, GK: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_m = pid_m * BM + tl.arange(0, BM)
    n_mask = offs_n < N
    m_mask = offs_m < M
    WPG: tl.constexpr = GK // 8
    ow = tl.arange(0, WPG)
    ok = tl.arange(0, GK)
    shifts = tl.arange(0, 8) * 4
    acc = tl.zeros([BN, BM], dtype=tl.float32)
    b_start = pid_k * blocks_per_split
    b_end = tl.minimum(b_start + blocks_per_split, NKB)
    for b in range(b_start, b_end):
        words = tl.load(w_ptr + offs_n[:, None] * (K // 8) + b * WPG + ow[None, :], mask=n_mask[:, None], other=0)
        nib = (words[:, :, None] >> shifts[None, None, :]) & 0xF
        t = (nib | 0x4300).to(tl.int16).to(tl.bfloat16, bitcast=True)
        wt = tl.reshape(t, (BN, GK)) - 136.0
        xt = tl.load(x_ptr + offs_m[None, :] * stride_xm + (b * GK + ok)[:, None], mask=m_mask[None, :], other=0.0)
        part = tl.dot(wt.to(tl.bfloat16), xt)
        s = tl.load(s_ptr + b * N + offs_n, mask=n_mask, other=0.0)
        acc += part * s[:, None]
    gemm_finish(acc, offs_m, offs_n, m_mask, n_mask, M, N, pid_k, split_k, ws_ptr, cnt_ptr,
                s_ptr, s_ptr, s_ptr, out_ptr, stride_om, stride_on, SPLIT, False, False, False, False)


def pack_nat(codes):   # codes int8 [N, K] in [-8, 7]
    n, k = codes.shape
    u = (codes.to(torch.int64) + 8).view(n, k // 8, 8)
    w = (u << (torch.arange(8, device=codes.device) * 4)).sum(-1)
    return torch.where(w >= 2 ** 31, w - 2 ** 32, w).to(torch.int32).contiguous()


def run(x, words, scale_t, n, k, bn, split, warps, stages, cnt, gk=128):
    m = x.shape[0]
    nkb = k // gk
    split = max(1, min(split, nkb))
    per = triton.cdiv(nkb, split)
    split = triton.cdiv(nkb, per)
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    ws = torch.empty(split * m * n, dtype=torch.float32, device=x.device) if split > 1 else out
    grid = (triton.cdiv(n, bn), split, 1)
    _nat_kernel[grid](x, words, scale_t, out, ws, cnt if split > 1 else out, m, n, k, nkb, per, split,
                      x.stride(0), out.stride(0), out.stride(1), SPLIT=split > 1, BN=bn, BM=16, GK=gk,
                      num_warps=warps, num_stages=stages)
    return out


def main():
    from quasar.backends.cuda import make_backend
    from quasar.ops import reference as R
    from quasar.quant import rtn
    be = make_backend("cuda")
    g4, tuning = be.kernels.gemm_int4, be.kernels.tuning
    dev = be.device
    cnt = tuning.counters(dev)
    for (n, k) in [(6144, 4096), (4096, 4096), (24576, 4096), (4096, 12288)]:
        w = torch.randn(n, k, device=dev) * 0.02
        qw = rtn.int4(w, 128, symmetric=True)
        ref_w = be.prepare_weight("w4a16", qw)
        words = pack_nat(qw.codes)
        scale_t = qw.scale.float().t().contiguous()          # [G, N]
        copies = max(2, -(-150 * 2 ** 20 // (words.numel() * 4)))
        wl = [(words.clone(), scale_t.clone()) for _ in range(copies)]
        rl = [ref_w] + [g4.Int4Weight(ref_w.packed.clone(), ref_w.scale.clone(), None, n, k, 128) for _ in range(copies - 1)]
        for m in (1, 6):
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            ref = R.gemm_w4a16(x, qw, None).float()
            y = run(x, words, scale_t, n, k, 64, 4, 4, 3, cnt).float()
            err = ((y - ref).norm() / ref.norm()).item()
            st = {"i": 0}

            def cur():
                st["i"] = (st["i"] + 1) % copies
                return g4.gemm_w4a16(x, rl[st["i"]])
            t_cur = graph_time(cur, 16, 20)
            best = None
            for bn, split, warps, stages in itertools.product((32, 64, 128), (1, 2, 4, 8, 16), (4, 8), (2, 3, 4)):
                def nat(bn=bn, split=split, warps=warps, stages=stages):
                    st["i"] = (st["i"] + 1) % copies
                    ww, ss = wl[st["i"]]
                    return run(x, ww, ss, n, k, bn, split, warps, stages, cnt)
                try:
                    t = graph_time(nat, 16, 10)
                except Exception as e:  # noqa: BLE001
                    continue
                if best is None or t < best[0]:
                    best = (t, (bn, split, warps, stages))
            mb = (words.numel() * 4 + scale_t.numel() * 4) / 1e6
            print(f"{n}x{k} M={m}: current {t_cur:.2f} us | natural best {best[0]:.2f} us {best[1]} | "
                  f"{mb:.1f} MB -> {mb / best[0]:.2f} TB/s | rel err {err:.2e}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
