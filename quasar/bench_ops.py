#!/usr/bin/env python
"""GPU micro-benchmark of the CUDA backend's kernels (written for an H100; random weights of the
real shapes, labelled as such).

    python -m quasar.bench_ops --out bench_ops.json           # the full run (< ~6 min on an H100)
    python -m quasar.bench_ops --smoke --out /tmp/b.json      # CPU: interpreter, tiny shapes
    (also: python -m quasar.bench speed --mode ops)

What it does
- measures the device's copy bandwidth in the same run (a large D2D copy; bytes read + written);
- per scheme (bf16 cuBLAS, w8a8-int8, w8a8-fp8, w4a16 g128, w4a4, w8a16) first checks the kernel
  against quasar.ops.reference at one shape (prints the max relative error), then, for the
  Qwen3-8B and OpenPangu-7B layer shapes (N x K: qkv 6144x4096, o 4096x4096, gate_up 24576x4096 /
  25600x4096, down 4096x12288 / 4096x12800) and M in {1, 2, 4, 6, 8, 16, 32}, times the GEMM with
  triton.testing.do_bench (median; several weight copies are rotated so that the 50 MB L2 never
  holds the weight) and reports the time, the effective bandwidth (weight bytes incl. scales +
  activation bytes in and out), its share of the copy bandwidth and the ratio to the byte floor;
- autotunes w4a16 and w8a8-int8: a few (BN, SPLIT_K, BK, warps, stages) per (M, shape), keeps
  the best in quasar.ops.triton.tuning.TABLE for the timing, and reports the winners (the JSON's
  "tuned" list loads back with tuning.load_table / QUASAR_TRITON_TUNING);
- times attention (decode T=1 and verify T=6 / 16) at ctx 512 and 4096 for Qwen3-8B's 32 q heads,
  8 kv heads, head_dim 128: kv_len = the context, and kv_len = the whole cache (the fixed grid of
  a CUDA graph), next to torch SDPA (the reference).
Each scheme runs in its own worker process, so one failing (or crashing) kernel does not stop the
others; errors are printed and kept in the JSON. Output: markdown tables on stdout, JSON at --out.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import fields, replace

MODELS = {
    "qwen3-8b": {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (24576, 4096), "down": (4096, 12288)},
    "openpangu-7b": {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (25600, 4096), "down": (4096, 12800)},
}
SMOKE_MODELS = {"tiny": {"qkv": (96, 256), "o": (64, 320), "gate_up": (128, 256), "down": (64, 512)}}
SCHEMES = ["bf16", "w8a8-int8", "w8a8-fp8", "w4a16", "w4a4", "w8a16"]
TUNED = {"w4a16", "w8a8-int8"}
L2_BYTES = 50 * 2 ** 20
# share of the total budget per worker (the rest is start-up slack)
SLICE = {"copy": 0.03, "bf16": 0.07, "w8a8-int8": 0.24, "w8a8-fp8": 0.06, "w4a16": 0.26,
         "w4a4": 0.09, "w8a16": 0.09, "attention": 0.08}


# ====================================================================== worker side

class Timer:
    def __init__(self, smoke: bool):
        self.smoke = smoke

    def __call__(self, fn, rep_ms: int = 50, warmup_ms: int = 10) -> float:
        """Median time of fn() in microseconds."""
        if self.smoke:
            fn()
            ts = []
            for _ in range(3):
                t = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t)
            return 1e6 * sorted(ts)[1]
        import triton.testing
        return 1e3 * triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")


def _rel(y, ref):
    y, ref = y.double(), ref.double()
    return {"max_rel": ((y - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item(),
            "norm_rel": ((y - ref).norm() / ref.norm().clamp_min(1e-30)).item()}


def _nbytes(obj) -> int:
    import torch
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    total = 0
    for f in fields(obj):
        v = getattr(obj, f.name)
        if isinstance(v, torch.Tensor):
            total += v.numel() * v.element_size()
    return total


def _clone(obj):
    import torch
    if isinstance(obj, torch.Tensor):
        return obj.clone()
    return replace(obj, **{f.name: getattr(obj, f.name).clone() for f in fields(obj)
                           if isinstance(getattr(obj, f.name), torch.Tensor)})


class Ctx:
    def __init__(self, args):
        import torch
        self.args = args
        self.smoke = args.smoke
        if self.smoke:
            os.environ["TRITON_INTERPRET"] = "1"
        from quasar.backends.cuda import make_backend
        self.be = make_backend("cuda", interpret=self.smoke)
        self.kn = self.be.kernels
        self.dev = self.be.device
        self.dtype = torch.bfloat16
        self.timer = Timer(self.smoke)
        self.deadline = time.time() + args.budget
        self.models = SMOKE_MODELS if self.smoke else MODELS
        self.ms = [int(m) for m in args.ms.split(",")]

    def left(self) -> float:
        return self.deadline - time.time()


def _make_weight(ctx, scheme, n, k, seed=0):
    """(canonical QuantizedWeight or dense tensor, prepared weight) of random N x K weights."""
    import torch
    from quasar.quant import rtn
    g = torch.Generator(device=ctx.dev).manual_seed(seed)
    w = torch.randn(n, k, device=ctx.dev, generator=g, dtype=torch.float32) * 0.02
    if scheme == "bf16":
        qw = w.to(ctx.dtype)
    elif scheme in ("w8a8-int8", "w8a16"):
        qw = rtn.int8_per_channel(w)
    elif scheme == "w8a8-fp8":
        qw = rtn.fp8_per_channel(w)
    elif scheme == "w4a16":
        qw = rtn.int4(w, 128 if k % 128 == 0 else -1, symmetric=True)
    elif scheme == "w4a4":
        qw = rtn.int4(w, -1, symmetric=True)
    else:
        raise ValueError(scheme)
    del w
    return qw, ctx.be.prepare_weight(scheme, qw)


def _activation(ctx, scheme, m, k, seed=1):
    """What the model hands the GEMM: a bf16 tensor, or a pre-quantized QActivation."""
    import torch
    from quasar.ops import reference as R
    g = torch.Generator(device=ctx.dev).manual_seed(seed)
    x = torch.randn(m, k, device=ctx.dev, generator=g, dtype=torch.float32).to(ctx.dtype)
    if scheme == "w8a8-int8":
        return x, ctx.be.quantize_per_token(x, "int8")
    if scheme == "w4a4":
        return x, ctx.be.quantize_per_token(x, "int4")
    if scheme == "w8a8-fp8":
        return x, R.quantize_per_token(x, "fp8")
    return x, x


def _act_bytes(scheme, m, n, k) -> int:
    a = {"w8a8-int8": 1, "w4a4": 1, "w8a8-fp8": 1}.get(scheme, 2)
    return m * k * a + m * n * 2 + (m * 4 if a == 1 else 0)


def _candidates(ctx, kind, m, n, k):
    """The heuristic's config plus a small sweep: BN in {64, 128, 256}, each with its own
    SM-filling split (and half / double it), 3 stages; 4 stages for the heuristic's BN; BK
    variants for the int8 kernel."""
    from quasar.ops.triton import tuning
    h = tuning.heuristic(kind, m, n, k, ctx.dev)
    kb = -(-k // tuning.KBLOCK)
    out = [h]
    for bn in (64, 128, 256):
        s0 = tuning.split_for(m, n, k, bn, ctx.dev)
        for split in sorted({max(1, s0 // 2), s0, min(kb, s0 * 2)}):
            out.append(tuning.GemmConfig(bn=bn, split_k=split, bk=h.bk, num_warps=8 if bn == 256 else 4,
                                         num_stages=3))
            if bn == h.bn:
                out.append(tuning.GemmConfig(bn=bn, split_k=split, bk=h.bk, num_warps=4, num_stages=4))
    if kind == "w8a8_int8":
        out += [replace(h, bk=256, num_stages=3), replace(h, bk=64, num_stages=5)]
    seen, uniq = set(), []
    for c in out:
        if c not in seen:
            seen.add(c)
            uniq.append(c)
    return uniq if not ctx.smoke else uniq[:3]


def _gemm_fn(ctx, scheme):
    kn = ctx.kn
    if scheme == "bf16":
        import torch.nn.functional as F
        return lambda a, w, cfg=None: F.linear(a, w)
    if scheme == "w8a8-int8":
        return lambda a, w, cfg=None: kn.gemm_int8.gemm_w8a8_int8(a, w, None, config=cfg)
    if scheme == "w8a16":
        return lambda a, w, cfg=None: kn.gemm_int8.gemm_w8a16(a, w, None, config=cfg)
    if scheme == "w4a16":
        return lambda a, w, cfg=None: kn.gemm_int4.gemm_w4a16(a, w, None, config=cfg)
    if scheme == "w4a4":
        return lambda a, w, cfg=None: kn.gemm_int4.gemm_w4a4(a, w, None, config=cfg)
    if scheme == "w8a8-fp8":
        return lambda a, w, cfg=None: ctx.be.gemm("w8a8-fp8", a, w, None)
    raise ValueError(scheme)


def work_gemm(ctx, scheme) -> dict:
    import torch
    from quasar.ops import reference as R
    from quasar.ops.triton import tuning
    res = {"rows": [], "tuned": [], "check": None, "errors": []}
    if scheme not in ctx.be.schemes:
        res["errors"].append(f"{scheme}: skipped: {ctx.be.notes.get(scheme, 'unsupported')}")
        return res
    kind = scheme.replace("-", "_")
    fn = _gemm_fn(ctx, scheme)
    # ---- correctness at one shape (qkv, M = 6)
    n, k = next(iter(ctx.models.values()))["qkv"]
    try:
        qw, w = _make_weight(ctx, scheme, n, k)
        x, a = _activation(ctx, scheme, 6, k)
        y = fn(a, w)
        ref = R.gemm_bf16(x, qw, None) if scheme == "bf16" else getattr(R, "gemm_" + kind)(a, qw, None)
        chk = _rel(y.float(), ref.float())
        chk.update(shape=[n, k], m=6)
        res["check"] = chk
        print(f"[{scheme}] check {n}x{k} M=6: max rel err {chk['max_rel']:.2e}, norm rel {chk['norm_rel']:.2e}",
              flush=True)
        del qw, w, y, ref
    except Exception as e:
        res["errors"].append(f"{scheme}: correctness check failed: {type(e).__name__}: {e}")
        traceback.print_exc()
        return res
    shapes = sorted({s for layers in ctx.models.values() for s in layers.values()})
    tune_until = ctx.deadline - 0.45 * ctx.args.budget     # keep ~45% for the timing
    for (n, k) in shapes:
        try:
            qw, w0 = _make_weight(ctx, scheme, n, k)
            del qw
            wbytes = _nbytes(w0)
            copies = 1 if ctx.smoke else int(min(16, max(2, math.ceil(3 * L2_BYTES / wbytes))))
            ws = [w0] + [_clone(w0) for _ in range(copies - 1)]
            state = {"i": 0}

            def rotating(a, cfg):
                def run():
                    state["i"] = (state["i"] + 1) % len(ws)
                    return fn(a, ws[state["i"]], cfg)
                return run

            for m in ctx.ms:
                x, a = _activation(ctx, scheme, m, k)
                cfg, tuned = None, False
                if scheme in TUNED and not ctx.args.no_tune and time.time() < tune_until:
                    best = None
                    for c in _candidates(ctx, kind, m, n, k):
                        try:
                            t = ctx.timer(rotating(a, c), rep_ms=15, warmup_ms=3)
                        except Exception as e:
                            res["errors"].append(f"{scheme} {n}x{k} M={m} config {c}: {type(e).__name__}: {e}")
                            continue
                        if best is None or t < best[0]:
                            best = (t, c)
                        if time.time() > tune_until:
                            break
                    if best is not None:
                        cfg, tuned = best[1], True
                        tuning.TABLE[(kind, tuning.m_bucket(m), n, k)] = cfg
                        res["tuned"].append({"kind": kind, "m_bucket": tuning.m_bucket(m), "m": m, "n": n,
                                             "k": k, "config": cfg.as_dict(), "us": round(best[0], 3)})
                if cfg is None and scheme != "bf16" and scheme != "w8a8-fp8":
                    cfg = tuning.pick(kind, m, n, k, ctx.dev)
                t_us = ctx.timer(rotating(a, cfg), rep_ms=40 if ctx.left() > 30 else 10)
                abytes = _act_bytes(scheme, m, n, k)
                res["rows"].append({"scheme": scheme, "n": n, "k": k, "m": m, "us": round(t_us, 3),
                                    "weight_bytes": wbytes, "act_bytes": abytes,
                                    "config": cfg.as_dict() if cfg is not None else None, "tuned": tuned})
            del ws, w0
            torch.cuda.empty_cache() if torch.cuda.is_available() else None
        except Exception as e:
            res["errors"].append(f"{scheme} {n}x{k}: {type(e).__name__}: {e}")
            traceback.print_exc()
        if ctx.left() < 0:
            res["errors"].append(f"{scheme}: time budget spent, remaining shapes skipped")
            break
    return res


def work_attention(ctx) -> dict:
    import torch
    from quasar.ops import reference as R
    from quasar.spec.kv_cache import KVCache
    res = {"rows": [], "errors": [], "check": None}
    h, hkv, d = (32, 8, 128) if not ctx.smoke else (8, 2, 32)
    s_max = 8192 if not ctx.smoke else 128
    ctxs = (512, 4096) if not ctx.smoke else (40, 100)
    cache = KVCache(1, 1, hkv, s_max, d, ctx.dtype, ctx.dev)
    cache.k.normal_()
    cache.v.normal_()
    attn = ctx.kn.attention
    for c in ctxs:
        for t in (1, 6, 16):
            try:
                pos = torch.arange(c - t, c, device=ctx.dev).view(1, t)
                q = torch.randn(1, t, h, d, device=ctx.dev, dtype=ctx.dtype)
                if res["check"] is None and t == 6:
                    chk = _rel(attn.attention(q, cache, 0, pos, s_max).float(),
                               R.attention(q, cache, 0, pos, c).float())
                    chk.update(ctx=c, t=t)
                    res["check"] = chk
                    print(f"[attention] check ctx={c} T={t} (kv_len = whole cache): max rel err "
                          f"{chk['max_rel']:.2e}", flush=True)
                kv_bytes = 2 * hkv * c * d * 2
                row = {"ctx": c, "t": t, "kv_bytes": kv_bytes}
                row["us"] = round(ctx.timer(lambda: attn.attention(q, cache, 0, pos, c), rep_ms=25), 3)
                row["us_full_cache"] = round(ctx.timer(lambda: attn.attention(q, cache, 0, pos, s_max),
                                                       rep_ms=25), 3)
                row["us_sdpa"] = round(ctx.timer(lambda: R.attention(q, cache, 0, pos, c), rep_ms=25), 3)
                res["rows"].append(row)
            except Exception as e:
                res["errors"].append(f"attention ctx={c} T={t}: {type(e).__name__}: {e}")
                traceback.print_exc()
    return res


def work_copy(ctx) -> dict:
    import torch
    nbytes = (1 << 30) if not ctx.smoke else (1 << 22)
    src = torch.empty(nbytes, dtype=torch.uint8, device=ctx.dev)
    dst = torch.empty_like(src)
    src.random_(0, 255) if ctx.smoke else src.fill_(1)
    t_us = ctx.timer(lambda: dst.copy_(src), rep_ms=100)
    info = {"bytes": 2 * nbytes, "us": t_us, "GBps": 2 * nbytes / t_us / 1e3}
    if torch.cuda.is_available() and not ctx.smoke:
        p = torch.cuda.get_device_properties(ctx.dev)
        info.update(device=p.name, sms=p.multi_processor_count, cc=f"{p.major}.{p.minor}")
    else:
        info.update(device="cpu (Triton interpreter)", sms=0, cc="-")
    return info


def worker(args) -> int:
    ctx = Ctx(args)
    try:
        if args.worker == "copy":
            out = work_copy(ctx)
        elif args.worker == "attention":
            out = work_attention(ctx)
        else:
            out = work_gemm(ctx, args.worker)
    except Exception as e:
        traceback.print_exc()
        out = {"errors": [f"{args.worker}: {type(e).__name__}: {e}"]}
    with open(args.result, "w") as f:
        json.dump(out, f)
    return 0


# ====================================================================== parent side

def run_worker(name, args, budget) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as tf:
        path = tf.name
    cmd = [sys.executable, "-m", "quasar.bench_ops", "--worker", name, "--result", path,
           "--budget", f"{budget:.1f}", "--ms", args.ms]
    if args.smoke:
        cmd.append("--smoke")
    if args.no_tune:
        cmd.append("--no-tune")
    t0 = time.time()
    print(f"--- {name} (budget {budget:.0f}s)", flush=True)
    try:
        p = subprocess.run(cmd, timeout=budget + 60, stdout=sys.stdout, stderr=subprocess.PIPE, text=True)
        err = p.stderr or ""
        if err.strip():
            sys.stderr.write(err[-4000:])
        if p.returncode != 0:
            out = {"errors": [f"{name}: worker exited with {p.returncode}: {err.strip()[-600:]}"]}
        else:
            with open(path) as f:
                out = json.load(f)
    except subprocess.TimeoutExpired:
        out = {"errors": [f"{name}: worker timed out after {budget + 60:.0f}s"]}
    except Exception as e:
        out = {"errors": [f"{name}: {type(e).__name__}: {e}"]}
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass
    out["wall_s"] = round(time.time() - t0, 1)
    for e in out.get("errors", []):
        print(f"ERROR {e}", flush=True)
    return out


def report(data: dict, ms: list[int], smoke: bool) -> str:
    bw = data["copy"].get("GBps") or float("nan")
    lines = [f"# Quasar CUDA kernels: {data['copy'].get('device', '?')} "
             f"(cc {data['copy'].get('cc', '?')}, {data['copy'].get('sms', '?')} SMs), random weights of the "
             f"real shapes", "",
             f"Measured copy bandwidth (D2D, read + write): **{bw:.0f} GB/s**. "
             "%BW = (weight + activation bytes) / time / copy bandwidth; floor = bytes / copy bandwidth.", ""]
    rows = [r for s in SCHEMES for r in data["gemm"].get(s, {}).get("rows", [])]
    by = {(r["scheme"], r["n"], r["k"], r["m"]): r for r in rows}
    models = SMOKE_MODELS if smoke else MODELS
    for model, layers in models.items():
        lines += [f"## {model}: GEMM time in us (%BW)", "",
                  "| layer | N x K | scheme | MB | " + " | ".join(f"M={m}" for m in ms) + " | t(16)/t(1) |",
                  "|---|---|---|---|" + "---|" * len(ms) + "---|"]
        for layer, (n, k) in layers.items():
            for s in SCHEMES:
                cells, t1, t16, mb = [], None, None, None
                for m in ms:
                    r = by.get((s, n, k, m))
                    if r is None:
                        cells.append("-")
                        continue
                    b = r["weight_bytes"] + r["act_bytes"]
                    mb = r["weight_bytes"] / 2 ** 20
                    pct = 100 * b / (r["us"] * 1e-6) / (bw * 1e9)
                    cells.append(f"{r['us']:.1f} ({pct:.0f}%)")
                    t1 = r["us"] if m == 1 else t1
                    t16 = r["us"] if m == 16 else t16
                flat = f"{t16 / t1:.2f}" if t1 and t16 else "-"
                if any(c != "-" for c in cells):
                    lines.append(f"| {layer} | {n}x{k} | {s} | {mb:.1f} | " + " | ".join(cells) + f" | {flat} |")
        lines.append("")
        lines += [f"### {model}: one decoder layer's linears (qkv + o + gate_up + down), us; x floor", "",
                  "| scheme | " + " | ".join(f"M={m}" for m in ms) + " |", "|---|" + "---|" * len(ms)]
        for s in SCHEMES:
            cells = []
            for m in ms:
                rs = [by.get((s, n, k, m)) for (n, k) in layers.values()]
                if any(r is None for r in rs):
                    cells.append("-")
                    continue
                t = sum(r["us"] for r in rs)
                floor = sum(r["weight_bytes"] + r["act_bytes"] for r in rs) / (bw * 1e3)
                cells.append(f"{t:.1f} (x{t / floor:.2f})")
            lines.append(f"| {s} | " + " | ".join(cells) + " |")
        lines.append("")
    tuned = [t for s in SCHEMES for t in data["gemm"].get(s, {}).get("tuned", [])]
    if tuned:
        lines += ["## Autotune winners (BN, SPLIT_K, BK, warps, stages)", "",
                  "| kind | N x K | M | config | us |", "|---|---|---|---|---|"]
        for t in tuned:
            c = t["config"]
            lines.append(f"| {t['kind']} | {t['n']}x{t['k']} | {t['m']} | {c['bn']}, {c['split_k']}, {c['bk']}, "
                         f"{c['num_warps']}, {c['num_stages']} | {t['us']:.1f} |")
        lines.append("")
    checks = [(s, data["gemm"].get(s, {}).get("check")) for s in SCHEMES] + [("attention", data["attention"].get("check"))]
    lines += ["## Correctness vs quasar.ops.reference", "", "| kernel | max rel err | norm rel err |", "|---|---|---|"]
    for s, c in checks:
        if c:
            lines.append(f"| {s} | {c['max_rel']:.2e} | {c['norm_rel']:.2e} |")
    lines.append("")
    att = data["attention"].get("rows", [])
    if att:
        lines += ["## Attention (32 q heads, 8 kv heads, D=128, bf16), us (%BW of K+V bytes)", "",
                  "| ctx | T | Triton, kv_len = ctx | Triton, kv_len = whole cache | torch SDPA |",
                  "|---|---|---|---|---|"]
        for r in att:
            def cell(us):
                return f"{us:.1f} ({100 * r['kv_bytes'] / (us * 1e-6) / (bw * 1e9):.0f}%)"
            lines.append(f"| {r['ctx']} | {r['t']} | {cell(r['us'])} | {cell(r['us_full_cache'])} | {cell(r['us_sdpa'])} |")
        lines.append("")
    errs = data.get("errors", [])
    if errs:
        lines += ["## Errors", ""] + [f"- {e}" for e in errs] + [""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="bench_ops.json", help="JSON output path")
    ap.add_argument("--ms", default="1,2,4,6,8,16,32", help="row counts M")
    ap.add_argument("--schemes", default=",".join(SCHEMES))
    ap.add_argument("--budget", type=float, default=330.0, help="total seconds (autotune stops early)")
    ap.add_argument("--no-tune", action="store_true", help="heuristic configs only")
    ap.add_argument("--no-attention", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="CPU + Triton interpreter, tiny shapes")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args)
    if not args.smoke:
        import torch
        if not torch.cuda.is_available():
            print("the ops benchmark needs a CUDA GPU (or --smoke for a CPU run under the Triton interpreter)")
            return 2
    t0 = time.time()
    schemes = [s for s in args.schemes.split(",") if s]
    data = {"argv": sys.argv[1:], "ms": [int(m) for m in args.ms.split(",")], "gemm": {}, "errors": []}
    data["copy"] = run_worker("copy", args, max(20.0, SLICE["copy"] * args.budget))
    data["errors"] += data["copy"].get("errors", [])
    for s in schemes:
        left = args.budget - (time.time() - t0)
        share = SLICE[s] / sum(SLICE[x] for x in schemes + ["attention"] if x in SLICE and
                               (x not in data["gemm"]))
        out = run_worker(s, args, max(15.0, min(left, share * left)))
        data["gemm"][s] = out
        data["errors"] += out.get("errors", [])
    if not args.no_attention:
        data["attention"] = run_worker("attention", args, max(20.0, args.budget - (time.time() - t0)))
        data["errors"] += data["attention"].get("errors", [])
    else:
        data["attention"] = {}
    data["tuned"] = [t for s in schemes for t in data["gemm"][s].get("tuned", [])]
    data["wall_s"] = round(time.time() - t0, 1)
    print()
    print(report(data, data["ms"], args.smoke))
    print(f"total {data['wall_s']}s")
    with open(args.out, "w") as f:
        json.dump(data, f, indent=1)
    print(f"JSON written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
