"""Batched step benchmark (`python -m quasar.bench speed --mode batch`): the paged runtime's
decode (T = 1) and verify (T = k + 1) steps of B sequences at context `ctx`, random weights of a
real shape, B over the batch buckets, against each step's floor in the same run:

    floor = max(byte floor, compute floor)
    byte floor    = (weights once + every sequence's KV of ctx tokens) / measured copy bandwidth
    compute floor = 2 * (linear parameters) * B * T / measured dense tensor-core peak of the
                    GEMM's arithmetic (bf16 for bf16 / weight-only int4 / int8 weights after the
                    dequant; int8 for W8A8 and QSpec's W4A4 draft, which run int8 MMAs)

Each step is a CUDA graph replay (the engine's PagedGraphRunner) where the backend captures, timed
with device events (median). Also writes the projected throughput per batch size (`project_batch`)
from these step times and the acceptance measured on the real model.
"""
from __future__ import annotations

import statistics
import time

import torch

BATCHES = (1, 2, 4, 8, 16, 32, 64)


def cases(k_values=(3, 5)) -> list:
    """(label, scheme, draft scheme, group size, hadamard, T, mode)."""
    from quasar import quant
    from .speed import STEP_QSPEC_FILE, _deployment
    u = quant.default()
    out = []
    for scheme in (u, "w8a8-int8", "w4a16"):
        out.append((f"decode {scheme}", scheme, None, "auto", False, 1, "verify"))
        for k in k_values:
            out.append((f"verify {scheme} k={k}", scheme, None, "auto", False, k + 1, "verify"))
    q = _deployment(STEP_QSPEC_FILE)
    d = q.drafter.scheme or quant.DEFAULT_DRAFT
    out.append((f"QSpec draft {d}" + (" hadamard" if q.verifier.hadamard else ""), q.verifier.quant, d,
                q.verifier.group_size, q.verifier.hadamard, 1, "draft"))
    return out


def linear_params(model) -> int:
    from quasar.quant import QuantLinear
    return sum(m.out_features * m.in_features for n, m in model.named_modules()
               if isinstance(m, QuantLinear) and not n.endswith(".draft"))


def _event_time(fn, device, iters: int) -> float:
    fn()
    if device.type == "cpu":
        ts = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)
    torch.cuda.synchronize(device)
    ts = []
    for _ in range(iters):
        a = torch.Event(device=device, enable_timing=True)
        b = torch.Event(device=device, enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) / 1e3)
    return statistics.median(ts)


def peak_flops(device, smoke: bool = False) -> dict:
    """Dense tensor-core peaks measured here: a large bf16 matmul and an int8 one (torch._int_mm)."""
    n = 256 if smoke else 8192
    out = {}
    a = torch.randn(n, n, device=device).to(torch.bfloat16 if device.type != "cpu" else torch.float32)
    out["bf16"] = 2 * n ** 3 / _event_time(lambda: a @ a, device, 3 if smoke else 10)
    try:
        i8 = torch.randint(-8, 8, (n, n), device=device, dtype=torch.int8)
        out["int8"] = 2 * n ** 3 / _event_time(lambda: torch._int_mm(i8, i8), device, 3 if smoke else 10)
    except RuntimeError:
        out["int8"] = out["bf16"]
    return out


def step_context(runner, batch: int, ctx: int, t: int, seed: int = 0):
    """B sequences of ctx cached tokens + a chunk of t at positions ctx..ctx+t-1, on block tables
    drawn from a shuffled free list (not contiguous runs)."""
    from quasar.engine.context import StepContext
    bs = runner.block_size
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(runner.num_blocks, generator=g).tolist()
    per = -(-(ctx + t) // bs)
    tables = [order[i * per:(i + 1) * per] for i in range(batch)]
    pos, slots = [], []
    for tb in tables:
        for p in range(ctx, ctx + t):
            pos.append(p)
            slots.append(tb[p // bs] * bs + p % bs)
    return StepContext.make(pos, slots, list(range(0, batch * t + 1, t)), tables, [ctx + t] * batch, t,
                            runner.device, runner.max_blocks)


def batch_bench(a, backend, dtype) -> dict:
    from tqdm.auto import tqdm

    from quasar.config import VerifierConfig
    from quasar.engine.model_runner import ModelRunner
    from quasar.errors import QuasarError
    from quasar.model.loader import build_random_model
    from .speed import SHAPES, copy_bandwidth, kv_bytes, weight_bytes_mode, _partial
    smoke = a.smoke
    shapes = ["tiny"] if smoke else a.shapes.split(",")
    ctx = 16 if smoke else a.batch_ctx
    batches = (1, 2, 4) if smoke else tuple(int(b) for b in a.batches.split(","))
    iters = 3 if smoke else a.iters
    bw = copy_bandwidth(backend, 1 << 24 if smoke else 1 << 30)
    peaks = peak_flops(backend.device, smoke)
    bs = 16
    want = [w.strip() for w in (getattr(a, "cases", None) or "").split(",") if w.strip()]
    todo = [c for c in cases() if not want or any(w in c[0] for w in want)]
    rows = []
    for shape in shapes:
        hf = SHAPES[shape]
        for label, scheme, draft, gs, had, t, mode in tqdm(todo, desc=f"batch {shape}"):
            try:
                m = build_random_model(hf, backend, dtype, ctx + 16, VerifierConfig(quant=scheme, group_size=gs,
                                                                                    hadamard=had),
                                       draft_scheme=draft)
                wb = weight_bytes_mode(m, mode)
                params = linear_params(m)
                from quasar import quant as Q
                s = Q.get(draft if mode == "draft" else scheme)
                peak = peaks["int8"] if s.act_qtype in ("int8", "int4") else peaks["bf16"]
                blocks = max(batches) * -(-(ctx + t) // bs) + 1
                r = ModelRunner(m, chunk_lengths=(t,), modes=(mode,), kv_blocks=blocks, block_size=bs,
                                buckets=batches, graphs=None)
                r.cache.k.normal_()
                r.cache.v.normal_()
                for b in batches:
                    c = step_context(r, b, ctx, t)
                    ids = torch.randint(0, hf["vocab_size"], (b * t,), device=r.device)
                    sec = _event_time(lambda: r.run(ids, c, mode), r.device, iters)
                    floor_b = (wb + b * kv_bytes(m, ctx)) / bw
                    floor_c = 2 * params * b * t / peak
                    floor = max(floor_b, floor_c)
                    rows.append({"shape": shape, "case": label, "scheme": s.name, "mode": mode, "B": b, "T": t,
                                 "ctx": ctx, "ms": sec * 1e3, "byte_floor_ms": floor_b * 1e3,
                                 "compute_floor_ms": floor_c * 1e3, "ratio_to_floor": sec / floor,
                                 "graphs": r.captured is not None})
                del r, m
            except QuasarError as e:
                rows.append({"shape": shape, "case": label, "error": str(e)})
            _partial(a, "batch", rows)
            if backend.device.type == "cuda":
                torch.cuda.empty_cache()
    return {"copy_bandwidth_GBs": bw / 1e9, "peak_TFLOPs": {k: v / 1e12 for k, v in peaks.items()},
            "ctx": ctx, "block_size": bs, "rows": rows}


def markdown(res: dict) -> str:
    rows = [r for r in res["rows"] if "error" not in r]
    if not rows:
        return "(no rows)"
    batches = sorted({r["B"] for r in rows})
    head = "| case | " + " | ".join(f"B={b}" for b in batches) + " |"
    lines = [f"ms per step (ratio to max(byte, compute) floor); ctx {res['ctx']}, copy bandwidth "
             f"{res['copy_bandwidth_GBs']:.0f} GB/s, peaks " +
             ", ".join(f"{k} {v:.0f} TFLOP/s" for k, v in res["peak_TFLOPs"].items()), "", head,
             "|" + "---|" * (len(batches) + 1)]
    for case in dict.fromkeys(r["case"] for r in rows):
        cells = []
        for b in batches:
            x = next((r for r in rows if r["case"] == case and r["B"] == b), None)
            cells.append(f"{x['ms']:.2f} ({x['ratio_to_floor']:.2f}x)" if x else "")
        lines.append(f"| {case} | " + " | ".join(cells) + " |")
    for r in res["rows"]:
        if "error" in r:
            lines.append(f"\n{r['case']}: {r['error']}")
    return "\n".join(lines)


def project_batch(batch: dict, taus: dict, k: int = 3) -> dict:
    """Projected tokens/s per batch size: B * E[tokens per step] / (step time), with
    E = tau measured on the real model for the system, the step times of this run, and adaptive
    k: a speculative system takes max over K in {0, k} of its rate (K = 0 is plain decoding in the
    same scheme). QSpec adds k draft steps: B * tau / (k * t_draft(B) + t_verify(B, k + 1)).
    taus: {"ngram": tau at k, "qspec": tau at k}."""
    rows = [r for r in batch["rows"] if "error" not in r]

    def t(case, b):
        x = next((r for r in rows if r["case"] == case and r["B"] == b), None)
        return x["ms"] / 1e3 if x else None
    from quasar import quant
    u = quant.default()
    out = []
    for b in sorted({r["B"] for r in rows}):
        row = {"B": b}
        for name, scheme in (("AR bf16", u), ("AR w8a8", "w8a8-int8"), ("AR w4a16", "w4a16")):
            d = t(f"decode {scheme}", b)
            row[name] = b / d if d else None
        dv, vv = t("decode w8a8-int8", b), t(f"verify w8a8-int8 k={k}", b)
        if dv and vv:
            row["Quasar (ngram + w8a8)"] = max(b / dv, b * taus["ngram"] / vv)
            row["Quasar k"] = 0 if b / dv >= b * taus["ngram"] / vv else k
        dq = next((t(r["case"], b) for r in rows if r["case"].startswith("QSpec draft")), None)
        d4, v4 = t("decode w4a16", b), t(f"verify w4a16 k={k}", b)
        if dq and d4 and v4:
            row["QSpec"] = max(b / d4, b * taus["qspec"] / (k * dq + v4))
            row["QSpec k"] = 0 if b / d4 >= b * taus["qspec"] / (k * dq + v4) else k
        out.append(row)
    return {"k": k, "taus": taus, "rows": out,
            "formula": "tokens/s = B * tau / (k * t_draft(B) + t_step(B, T=k+1)), maxed with plain decoding (K=0)"}
