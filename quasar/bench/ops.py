#!/usr/bin/env python
"""GPU micro-benchmark of the CUDA backend's kernels (written for an H100; random weights of the
real shapes, labelled as such).

    python -m quasar.bench.ops --out bench_ops.json           # the full run (< ~6 min on an H100)
    python -m quasar.bench.ops --smoke --out /tmp/b.json      # CPU: interpreter, tiny shapes
    (also: python -m quasar.bench speed --mode ops)

What it does
- measures the device's copy bandwidth in the same run (a large D2D copy; bytes read + written);
- per scheme (bf16 cuBLAS, w8a8-int8, w8a8-fp8, w4a16 g128, w4a4, w8a16) first checks the kernel
  against quasar.ops.reference at one shape (prints the max relative error), then, for the
  Qwen3-8B and OpenPangu-7B layer shapes (N x K: qkv 6144x4096, o 4096x4096, gate_up 24576x4096 /
  25600x4096, down 4096x12288 / 4096x12800) and M in {1, 2, 4, 6, 8, 16, 32}, times the GEMM with
  CUDA graphs (16 back-to-back calls per graph, median over replays; several weight copies are
  rotated so that the 50 MB L2 never holds the weight: the kernel times a captured step sees,
  without the ~20 us Python launch overhead that eager timing of a Triton kernel measures) and
  reports the time, the effective bandwidth (weight bytes incl. scales + activation bytes in and
  out), its share of the copy bandwidth and the ratio to the byte floor;
- autotunes w8a8-int8, w4a16 and w4a4 (stage 1: BN x SPLIT_K around the heuristic; stage 2:
  warps, stages and BK around the best three), and for bf16 the weight-streaming Triton kernel
  against cuBLAS (a "bf16" entry only where it wins by >= 3%); the winners go to
  quasar.ops.triton.tuning.TABLE for the timing and to the JSON's "tuned" list (with the
  heuristic's time), which loads back with tuning.load_table / QUASAR_TRITON_TUNING; the shipped
  per-GPU tables in ops/triton/tuned/ are such lists;
- times attention (decode T=1 and verify T=6 / 16) at ctx 512 and 4096 for Qwen3-8B's 32 q heads,
  8 kv heads, head_dim 128: kv_len = the context, and kv_len = the whole cache (the fixed grid of
  a CUDA graph), next to the reference's torch SDPA path (eager: it is not capturable).
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
TUNED_KINDS = {"w8a8_int8", "int4_a16", "int4_a4"}        # the kernels whose launch tables are swept
INT8_LAYOUT_KINDS = {"w8a8_int8", "int8_a16", "bf16"}      # ... that also sweep BK (int8 / dense rows)
L2_BYTES = 50 * 2 ** 20


def schemes() -> list[str]:
    """Every registered scheme (the registry is the list)."""
    from quasar import quant
    return list(quant.SCHEMES)


def share(name: str) -> float:
    """A worker's share of the total budget: the swept kernels get most (the rest is start-up slack)."""
    fixed = {"copy": 0.03, "attention": 0.07}
    if name in fixed:
        return fixed[name]
    from quasar import quant
    cuda = quant.get(name).kernels.get("cuda", ())
    return 0.22 if cuda and cuda[0].tuning_kind in TUNED_KINDS else 0.05


# ====================================================================== worker side

class Timer:
    def __init__(self, smoke: bool):
        self.smoke = smoke

    def __call__(self, fn, rep_ms: int = 50, warmup_ms: int = 10, calls: int = 16, graph: bool = True) -> float:
        """Median time of one fn() in microseconds. On the GPU, `calls` back-to-back calls are
        captured in one CUDA graph and the graph is replayed: a step replays its kernels from a
        graph too, and timing eager launches would measure Triton's ~20 us of Python launch
        overhead instead of kernels that run in 3..30 us."""
        if self.smoke:
            fn()
            ts = []
            for _ in range(3):
                t = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t)
            return 1e6 * sorted(ts)[1]
        if not graph:     # eager (for what cannot be captured), CUDA-event timed
            import triton.testing
            return 1e3 * triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")
        return graph_time(fn, calls, rep_ms)


def graph_time(fn, calls: int, rep_ms: float) -> float:
    import torch
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()                          # compile / allocate outside the capture
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    g.replay()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    g.replay()
    torch.cuda.synchronize()
    once = time.perf_counter() - t0
    reps = int(max(5, min(200, rep_ms * 1e-3 / max(once, 1e-6))))
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) * 1e3 / calls)
    del g
    ts.sort()
    return ts[len(ts) // 2]


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


def _scheme(scheme):
    from quasar import quant
    return quant.get(scheme)


def _make_weight(ctx, scheme, n, k, seed=0):
    """(canonical weight, prepared weight, kernel) of random N x K weights, quantized by the scheme's
    RTN (grouped schemes at group_size auto) and prepared by the kernel the backend picks."""
    import torch
    from quasar.config import VerifierConfig
    s = _scheme(scheme)
    g = torch.Generator(device=ctx.dev).manual_seed(seed)
    w = torch.randn(n, k, device=ctx.dev, generator=g, dtype=torch.float32) * 0.02
    qw = s.quantize(w, VerifierConfig(group_size="auto" if s.grouped else -1))
    if isinstance(qw, torch.Tensor):
        qw = qw.to(ctx.dtype)
    del w
    kernel = s.choose_kernel(ctx.be, (n, k), ctx.dtype, qw)
    return qw, kernel.prepare(qw), kernel


def _activation(ctx, scheme, m, k, seed=1):
    """What the model hands the GEMM: a bf16 tensor, or a pre-quantized QActivation."""
    import torch
    g = torch.Generator(device=ctx.dev).manual_seed(seed)
    x = torch.randn(m, k, device=ctx.dev, generator=g, dtype=torch.float32).to(ctx.dtype)
    qtype = _scheme(scheme).act_qtype
    return x, (ctx.be.quantize_per_token(x, qtype) if qtype else x)


def _act_bytes(scheme, m, n, k) -> int:
    a = 1 if _scheme(scheme).act_qtype else 2
    return m * k * a + m * n * 2 + (m * 4 if a == 1 else 0)


def _stage1(ctx, kind, m, n, k):
    """The heuristic's config plus (BN, SPLIT_K) around it: BN in {32, 64, 128, 256}, each with
    its own SM-filling split, half, double and four times it (at default warps and stages)."""
    from quasar.ops.triton import tuning
    h = tuning.heuristic(kind, m, n, k, ctx.dev)
    out = [h]
    for bn in (32, 64, 128, 256):
        s0 = tuning.split_for(m, n, k, bn, ctx.dev)
        for split in sorted({max(1, s0 // 2), s0, min(16, s0 * 2), min(16, s0 * 4)}):
            out.append(tuning.GemmConfig(bn=bn, split_k=split, bk=h.bk, num_warps=8 if bn == 256 else 4,
                                         num_stages=3))
    return _uniq(out)[:3] if ctx.smoke else _uniq(out)


def _stage2(ctx, kind, best):
    """Warps, stages (and BK for the int8 kernel) around the best (BN, SPLIT_K) of stage 1."""
    out = []
    for c in best:
        for w in (4, 8):
            for st in (2, 3, 4, 5):
                for bk in ((128, 256) if kind in INT8_LAYOUT_KINDS else (c.bk,)):
                    if st == 5 and bk > 128:
                        continue
                    out.append(replace(c, num_warps=w, num_stages=st, bk=bk))
    return [] if ctx.smoke else _uniq(out)


def _uniq(cs):
    seen, out = set(), []
    for c in cs:
        if c not in seen:
            seen.add(c)
            out.append(c)
    return out


def _gemm_fn(kernel):
    """The GEMM as the backend runs it, with a launch config override for tunable kernels."""
    if kernel.tuning_kind is not None and not _dense(kernel):
        return lambda a, w, cfg=None: kernel.apply(a, w, None, config=cfg)
    if _dense(kernel):                      # cuBLAS itself (the streaming kernel is tuned apart)
        import torch.nn.functional as F
        return lambda a, w, cfg=None: F.linear(a, w)
    return lambda a, w, cfg=None: kernel.apply(a, w, None)


def _dense(kernel) -> bool:
    return kernel.scheme.weight_bits == 16


def work_gemm(ctx, scheme) -> dict:
    import torch
    from quasar.ops.triton import tuning
    res = {"rows": [], "tuned": [], "check": None, "errors": []}
    ok, why = ctx.be.supports(scheme, ctx.dtype)
    if not ok:
        res["errors"].append(f"{scheme}: skipped: {why}")
        return res
    s = _scheme(scheme)
    dense = s.weight_bits == 16
    # ---- correctness at one shape (qkv, M = 6)
    n, k = next(iter(ctx.models.values()))["qkv"]
    try:
        qw, w, kernel = _make_weight(ctx, scheme, n, k)
        kind = kernel.tuning_kind
        fn = _gemm_fn(kernel)
        x, a = _activation(ctx, scheme, 6, k)
        y = fn(a, w)
        ref = s.reference_gemm(a, qw, None)
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
    tune_until = ctx.deadline - 0.25 * ctx.args.budget     # keep ~25% for the timing
    for (n, k) in shapes:
        try:
            qw, w0, _ = _make_weight(ctx, scheme, n, k)
            del qw
            wbytes = _nbytes(w0)
            copies = 1 if ctx.smoke else int(min(16, max(2, math.ceil(3 * L2_BYTES / wbytes))))
            ws = [w0] + [_clone(w0) for _ in range(copies - 1)]
            state = {"i": 0}

            def rotating(a, cfg, f=fn):
                def run():
                    state["i"] = (state["i"] + 1) % len(ws)
                    return f(a, ws[state["i"]], cfg)
                return run

            for m in ctx.ms:
                x, a = _activation(ctx, scheme, m, k)
                cfg, tuned = None, False
                tkind, tfn = kind, fn
                if dense:      # cuBLAS vs the weight-streaming kernel on the dense weight
                    tfn = lambda a, w, cfg=None: kernel.stream(a, w, None, config=cfg)  # noqa: E731
                if ((kind in TUNED_KINDS and not dense) or (dense and m <= 16 and k % 256 == 0)) \
                        and not ctx.args.no_tune and time.time() < tune_until:
                    timed = []
                    for c in _stage1(ctx, tkind, m, n, k):
                        try:
                            timed.append((ctx.timer(rotating(a, c, tfn), rep_ms=10), c))
                        except Exception as e:
                            res["errors"].append(f"{scheme} {n}x{k} M={m} config {c}: {type(e).__name__}: {e}")
                        if time.time() > tune_until:
                            break
                    timed.sort(key=lambda tc: tc[0])
                    for c in _stage2(ctx, tkind, [tc[1] for tc in timed[:3]]):
                        if time.time() > tune_until or any(c == tc[1] for tc in timed):
                            continue
                        try:
                            timed.append((ctx.timer(rotating(a, c, tfn), rep_ms=10), c))
                        except Exception as e:
                            res["errors"].append(f"{scheme} {n}x{k} M={m} config {c}: {type(e).__name__}: {e}")
                    best = min(timed, key=lambda tc: tc[0]) if timed else None
                    h_us = next((t for t, c in timed if c == tuning.heuristic(tkind, m, n, k, ctx.dev)), None)
                    extra = {}
                    if best is not None and dense:
                        # the backend takes the Triton kernel only where it beats cuBLAS by 3%
                        t_cublas = ctx.timer(rotating(a, None), rep_ms=20)
                        extra = {"us_cublas": round(t_cublas, 3)}
                        if best[0] > 0.97 * t_cublas:
                            best = None
                    if best is not None:
                        cfg, tuned = best[1], True
                        tuning.TABLE[(tkind, tuning.m_bucket(m), n, k)] = cfg
                        res["tuned"].append({"kind": tkind, "m_bucket": tuning.m_bucket(m), "m": m, "n": n,
                                             "k": k, "config": cfg.as_dict(), "us": round(best[0], 3),
                                             "us_heuristic": None if h_us is None else round(h_us, 3), **extra})
                    if dense:
                        cfg = None
                if cfg is None and not dense and kind is not None:
                    cfg = tuning.pick(kind, m, n, k, ctx.dev)
                if dense and tuned:     # what the backend runs: the tuned Triton kernel
                    t_us = ctx.timer(rotating(a, tuning.TABLE[(kind, tuning.m_bucket(m), n, k)], tfn),
                                     rep_ms=40 if ctx.left() > 30 else 10)
                else:
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
    from quasar.kv import KVCache
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
                # eager: the reference path builds its mask from host tensors, which a CUDA graph
                # cannot capture (so this column includes launch overhead)
                row["us_sdpa"] = round(ctx.timer(lambda: R.attention(q, cache, 0, pos, c), rep_ms=25, graph=False), 3)
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
    # one large copy: launch overhead does not matter, so it is timed eagerly (like speed.py's)
    t_us = ctx.timer(lambda: dst.copy_(src), rep_ms=200, warmup_ms=25, graph=False)
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
    cmd = [sys.executable, "-m", "quasar.bench.ops", "--worker", name, "--result", path,
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
    rows = [r for s in schemes() for r in data["gemm"].get(s, {}).get("rows", [])]
    by = {(r["scheme"], r["n"], r["k"], r["m"]): r for r in rows}
    models = SMOKE_MODELS if smoke else MODELS
    for model, layers in models.items():
        lines += [f"## {model}: GEMM time in us (%BW)", "",
                  "| layer | N x K | scheme | MB | " + " | ".join(f"M={m}" for m in ms) + " | t(16)/t(1) |",
                  "|---|---|---|---|" + "---|" * len(ms) + "---|"]
        for layer, (n, k) in layers.items():
            for s in schemes():
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
        for s in schemes():
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
    tuned = [t for s in schemes() for t in data["gemm"].get(s, {}).get("tuned", [])]
    if tuned:
        lines += ["## Autotune winners (BN, SPLIT_K, BK, warps, stages)", "",
                  "| kind | N x K | M | config | us |", "|---|---|---|---|---|"]
        for t in tuned:
            c = t["config"]
            lines.append(f"| {t['kind']} | {t['n']}x{t['k']} | {t['m']} | {c['bn']}, {c['split_k']}, {c['bk']}, "
                         f"{c['num_warps']}, {c['num_stages']} | {t['us']:.1f} |")
        lines.append("")
    checks = [(s, data["gemm"].get(s, {}).get("check")) for s in schemes()] + [("attention", data["attention"].get("check"))]
    lines += ["## Correctness vs quasar.ops.reference", "", "| kernel | max rel err | norm rel err |", "|---|---|---|"]
    for s, c in checks:
        if c:
            lines.append(f"| {s} | {c['max_rel']:.2e} | {c['norm_rel']:.2e} |")
    lines.append("")
    att = data["attention"].get("rows", [])
    if att:
        lines += ["## Attention (32 q heads, 8 kv heads, D=128, bf16), us (%BW of K+V bytes)", "",
                  "| ctx | T | Triton, kv_len = ctx | Triton, kv_len = whole cache | torch SDPA (eager) |",
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


def is_skip(err) -> bool:
    """`NAME: skipped: why`: a case this device cannot run (FP8 under the interpreter), not a failure."""
    return str(err).split(":", 2)[1:2] == [" skipped"]


def one_line(err) -> str:
    """One line for an error kept in the JSON (a worker's error can carry a stderr tail)."""
    lines = [x.strip() for x in str(err).strip().splitlines() if x.strip()]
    text = lines[0] if len(lines) <= 1 else f"{lines[0]} ... {lines[-1]}"
    return text[:300]


def main(argv=None, summary: bool = True) -> int:
    """Exit status: 0 when every case ran (or was skipped), 1 when any failed (one `FAILED ...` line each on stderr
    when `summary`), 2 for a usage error."""
    ap = argparse.ArgumentParser(prog="python -m quasar.bench.ops", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench_ops.json", metavar="FILE.json",
                    help="JSON output file (default: bench_ops.json)")
    ap.add_argument("--ms", default="1,2,4,6,8,16,32", help="row counts M")
    ap.add_argument("--schemes", default=None, help="comma-separated schemes (default: every registered one)")
    ap.add_argument("--budget", type=float, default=330.0, help="total seconds (autotune stops early)")
    ap.add_argument("--no-tune", action="store_true", help="heuristic configs only")
    ap.add_argument("--no-attention", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="CPU + Triton interpreter, tiny shapes")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args)
    from quasar.run import cli_call
    return cli_call(_main, args, summary)


def _main(args, summary: bool = True) -> int:
    from quasar.errors import ConfigError
    from quasar.run import check_out_file
    out = check_out_file(args.out)
    from quasar import quant
    chosen = [quant.canonical(s) for s in (args.schemes or ",".join(schemes())).split(",") if s]
    unknown = [s for s in chosen if s not in quant.SCHEMES]
    if unknown:
        raise ConfigError(f"--schemes: unknown scheme(s) {', '.join(map(repr, unknown))}; valid: {', '.join(schemes())}")
    try:
        ms = [int(m) for m in args.ms.split(",")]
    except ValueError:
        raise ConfigError(f"--ms takes comma-separated integers, got {args.ms!r}") from None
    if not args.smoke:
        import torch
        if not torch.cuda.is_available():
            raise ConfigError("the ops benchmark needs a CUDA GPU (or --smoke for a CPU run under the "
                              "Triton interpreter)")
    t0 = time.time()
    data = {"argv": sys.argv[1:], "ms": ms, "gemm": {}, "errors": []}
    data["copy"] = run_worker("copy", args, max(20.0, share("copy") * args.budget))
    data["errors"] += data["copy"].get("errors", [])
    for s in chosen:
        left = args.budget - (time.time() - t0)
        part = share(s) / sum(share(x) for x in chosen + ["attention"] if x not in data["gemm"])
        res = run_worker(s, args, max(15.0, min(left, part * left)))
        data["gemm"][s] = res
        data["errors"] += res.get("errors", [])
    if not args.no_attention:
        data["attention"] = run_worker("attention", args, max(20.0, args.budget - (time.time() - t0)))
        data["errors"] += data["attention"].get("errors", [])
    else:
        data["attention"] = {}
    data["tuned"] = [t for s in chosen for t in data["gemm"][s].get("tuned", [])]
    data["wall_s"] = round(time.time() - t0, 1)
    print()
    print(report(data, data["ms"], args.smoke))
    print(f"total {data['wall_s']}s")
    with open(out, "w") as f:
        json.dump(data, f, indent=1)
    print(f"JSON written to {out}")
    failed = [e for e in data["errors"] if not is_skip(e)]
    if failed:
        if summary:
            for e in failed:
                print(f"FAILED {one_line(e)}", file=sys.stderr)
            print(f"error: {len(failed)} benchmark case(s) failed", file=sys.stderr)
        return 1
    return 0

if __name__ == "__main__":
    sys.exit(main())
