"""Experiment: L2 prefetch of the next GEMM's weights during the latency-bound kernels of a step.

Step time (CUDA-graph replay) at a real shape with random weights, for several prefetch plans,
all in one process (same GPU, same clocks), alternating plans over rounds:

  off      no prefetch
  o        after the qkv GEMM: o_proj's weights (the attention block leaves HBM idle)
  o+gu     o, plus the first GU_MB of gate_up's weights
  all      o+gu, plus the first DOWN_MB of down after gate_up, and the next layer's qkv
           (first QKV_MB) after down
  side-o, side-o+gu   o and o+gu issued on a side stream (a parallel branch of the graph,
           joined after the layer's down projection), so the main chain does not wait for them

    python tools/exp_prefetch.py --out prefetch.json

Run from outside the repository root on a GPU machine (the installed package is imported).
"""
from __future__ import annotations

import argparse
import functools
import json
import statistics

import torch

# ---- the prefetch kernel (kept here, not in the package: it did not pay off, see BENCHMARKS.md)
# L2 prefetch of weights (Hopper): a hint that starts the HBM reads of a GEMM's weights while the
# latency-bound kernels before it (RoPE, attention, norms) leave HBM idle.
#
# A decode or verify step is a chain of weight-streaming GEMMs separated by small kernels that
# read little memory; during those, HBM bandwidth goes unused. `prefetch(t, nbytes)` issues
# `cp.async.bulk.prefetch.L2` (TMA bulk prefetch, sm_90) over the first `nbytes` of `t` and
# returns at once; the GEMM that later streams `t` finds those lines in L2 (50 MB on an H100).
# The same idea as vllm-ascend's weight prefetch (torch_npu.npu_prefetch) on Ascend.
#
# It changes no values: off the GPU (CPU, the interpreter), or before sm_90, it does nothing.
#
# Kernel: program p covers bytes [p * PER * CHUNK, (p + 1) * PER * CHUNK) in PER bulk requests
# of CHUNK bytes (the last one shorter; sizes and addresses are multiples of 16). The requests are
# issued before griddepcontrol.wait: weights are never written by the kernels before it, so the
# prefetch starts as soon as the kernel launches, overlapping the previous kernel's tail.

import triton
import triton.language as tl

from quasar.ops.triton._common import INTERPRETED, pdl_kw

CHUNK = 16384        # bytes per bulk prefetch request
PER = 32             # requests per program (one per thread of one warp)


@triton.jit
def _prefetch_kernel(ptr, nbytes, CHUNK: tl.constexpr, PER: tl.constexpr, PDL: tl.constexpr,
                     LINES: tl.constexpr = False):
    pid = tl.program_id(0)
    base = ptr.to(tl.pointer_type(tl.uint8))
    if LINES:   # one prefetch.global.L2 per 128-byte line instead of bulk requests
        start = pid.to(tl.int64) * PER * CHUNK
        for i in range(0, CHUNK // 128):
            lo = start + (tl.arange(0, PER) * (CHUNK // 128) + i).to(tl.int64) * 128
            lo = tl.where(lo < nbytes, lo, 0)
            tl.inline_asm_elementwise("prefetch.global.L2::evict_last [$1];\n\tmov.u32 $0, 0;",
                                      "=r,l", [base + lo], dtype=tl.int32, is_pure=False, pack=1)
    else:
        offs = (pid * PER + tl.arange(0, PER)).to(tl.int64) * CHUNK
        size = tl.minimum(nbytes - offs, CHUNK)
        ok = size >= 16
        offs = tl.where(ok, offs, 0)
        size = tl.where(ok, size, 16).to(tl.int32)
        tl.inline_asm_elementwise("cp.async.bulk.prefetch.L2.global [$1], $2;\n\tmov.u32 $0, 0;",
                                  "=r,l,r", [base + offs, size], dtype=tl.int32, is_pure=False, pack=1)
    if PDL:
        # after the requests (they touch only weights): completion of this kernel must still
        # imply completion of the one before it, for the kernels after it
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


_OK: dict = {}


def supported(device) -> bool:
    device = torch.device(device)
    if INTERPRETED or device.type != "cuda":
        return False
    key = device.index if device.index is not None else torch.cuda.current_device()
    if key not in _OK:
        _OK[key] = torch.cuda.get_device_capability(key) >= (9, 0)
    return _OK[key]


def prefetch(t: torch.Tensor, nbytes: int | None = None, lines: bool = False, chunk: int = CHUNK,
             per: int = PER, pdl: bool = True) -> None:
    """Start moving the first `nbytes` (default: all) of `t` into L2; a no-op where unsupported."""
    if t is None or not supported(t.device):
        return
    total = t.numel() * t.element_size()
    n = total if nbytes is None else min(int(nbytes), total)
    n -= n % 16
    if n < 16 or t.data_ptr() % 16:
        return
    grid = (triton.cdiv(n, chunk * per),)
    kw = pdl_kw(t.device) if pdl else {"PDL": False}
    _prefetch_kernel[grid](t, n, CHUNK=chunk, PER=per, LINES=lines, num_warps=max(1, per // 32), **kw)

# ---- the step experiment

PLAN = {"name": "off"}


def main_tensor(lin):
    w = lin.weight
    for attr in ("codes", "packed"):
        if hasattr(w, attr):
            return getattr(w, attr)
    return w


def patch(gu_mb: float, down_mb: float, qkv_mb: float):
    from quasar.model import decoder
    mb = 1 << 20

    def attn_forward(self, h, cos, sin, positions, cache, kv_len, mask):
        a, B = self.args, self.B
        bsz, t = positions.shape
        qkv = self.qkv_proj(h).view(bsz, t, -1)
        p = PLAN["name"]
        if p.startswith("side"):
            # a parallel branch of the graph: the main chain does not wait for it
            side = PLAN.setdefault("stream", torch.cuda.Stream())
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                prefetch(main_tensor(self.o_proj), pdl=False, per=PLAN.get("per", 32))
                if p == "side-o+gu":
                    prefetch(main_tensor(self._gate_up), int(gu_mb * mb), pdl=False, per=PLAN.get("per", 32))
        elif p != "off":
            prefetch(main_tensor(self.o_proj))
            if p in ("o+gu", "all"):
                prefetch(main_tensor(self._gate_up), int(gu_mb * mb))
        q = B.rope_kv_write(qkv, self.q_norm, self.k_norm, a.rms_norm_eps, cos, sin, positions, cache,
                            self.layer_idx)
        o = B.attention(q, cache, self.layer_idx, positions, kv_len, mask)
        return self.o_proj(o.reshape(bsz * t, a.num_heads * a.head_dim))

    def mlp_forward(self, h):
        gu = self.gate_up_proj(h)
        if PLAN["name"] == "all":
            prefetch(main_tensor(self.down_proj), int(down_mb * mb))
        qtype = self.down_proj.fused_act_qtype
        act = self.B.silu_mul_quant(gu, qtype) if qtype else self.B.silu_mul(gu)
        y = self.down_proj(act)
        if PLAN["name"].startswith("side"):
            torch.cuda.current_stream().wait_stream(PLAN["stream"])
        if PLAN["name"] == "all" and self._next_qkv is not None:
            prefetch(main_tensor(self._next_qkv), int(qkv_mb * mb))
        return y

    decoder.Attention.forward = attn_forward
    decoder.MLP.forward = mlp_forward


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="qwen3-8b")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--gu-mb", type=float, default=16)
    ap.add_argument("--down-mb", type=float, default=8)
    ap.add_argument("--qkv-mb", type=float, default=8)
    ap.add_argument("--cases", default="bf16:1,w8a8-int8:6,w4a16:6")
    ap.add_argument("--plans", default="off,side-o,side-o+gu")
    ap.add_argument("--per", type=int, default=32)
    ap.add_argument("--out", default="prefetch.json")
    a = ap.parse_args()
    patch(a.gu_mb, a.down_mb, a.qkv_mb)
    PLAN["per"] = a.per
    from quasar import backends
    from quasar.config import VerifierConfig
    from quasar.speed import SHAPES, copy_bandwidth, kv_bytes, random_step_model, time_variants, weight_bytes
    be = backends.get("cuda")
    bw = copy_bandwidth(be, 1 << 30)
    res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "shape": a.shape, "ctx": a.ctx,
           "copy_bandwidth_GBs": bw / 1e9, "args": vars(a), "rows": []}
    plans = a.plans.split(",")
    for case in a.cases.split(","):
        scheme, t = case.split(":")
        t = int(t)
        m = random_step_model(SHAPES[a.shape], be, torch.bfloat16, a.ctx + 64,
                              VerifierConfig(quant=scheme, group_size=128))
        blocks = list(m.layers)
        for i, blk in enumerate(blocks):
            blk.attn._gate_up = blk.mlp.gate_up_proj
            blk.mlp._next_qkv = blocks[i + 1].attn.qkv_proj if i + 1 < len(blocks) else None
        floor = (weight_bytes(m) + kv_bytes(m, a.ctx)) / bw * 1e3
        times, outs = time_variants(m, be, t, a.ctx, {p: functools.partial(PLAN.__setitem__, "name", p)
                                                      for p in plans}, a.iters, a.rounds)
        same = all(torch.equal(outs[p], outs[plans[0]]) for p in plans)
        for p in plans:
            med = statistics.median(times[p])
            row = {"scheme": scheme, "T": t, "plan": p, "ms": med, "all_ms": times[p], "floor_ms": floor,
                   "ratio_to_floor": med / floor, "pct_bw": floor / med * 100, "logits_identical": same}
            res["rows"].append(row)
            print(f"{scheme:10s} T={t} {p:6s} {med:7.3f} ms  x{med / floor:.3f} floor ({floor / med * 100:.1f}% BW)"
                  f"  rounds {['%.3f' % x for x in times[p]]}  same={same}", flush=True)
        del m
        torch.cuda.empty_cache()
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
