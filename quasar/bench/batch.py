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


def verifier_schemes() -> list[str]:
    """The verifier schemes of the shipped end-to-end deployments (the systems compared)."""
    from .speed import E2E_FILES, _deployment
    return list(dict.fromkeys(_deployment(stem).verifier.quant for stem in E2E_FILES))


def cases(k_values=(3, 5)) -> list:
    """(label, scheme, draft scheme, group size, hadamard, T, mode): decode and verify chunks of
    every deployed verifier scheme, and QSpec's draft step."""
    from quasar import quant
    from .speed import STEP_QSPEC_FILE, _deployment
    out = []
    for scheme in verifier_schemes():
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
        # cuBLASLt's int8 fast path wants B column-major ("TN"); a row-major B measured 128 TOPS
        # on the H100 (issue 17's first run), a tenth of its int8 tensor-core rate
        i8 = torch.randint(-8, 8, (n, n), device=device, dtype=torch.int8)
        i8t = torch.randint(-8, 8, (n, n), device=device, dtype=torch.int8).t()
        out["int8"] = 2 * n ** 3 / _event_time(lambda: torch._int_mm(i8, i8t), device, 3 if smoke else 10)
    except RuntimeError:
        out["int8"] = out["bf16"]
    # int8 MMAs run at twice the bf16 rate on Ampere / Hopper tensor cores: the floor uses the
    # larger of the measured int8 rate and 2x the measured bf16 rate
    out["int8"] = max(out["int8"], 2 * out["bf16"]) if device.type != "cpu" else out["int8"]
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


def project_batch(batch: dict, taus: dict) -> dict:
    """Projected tokens/s per batch size for each shipped deployment (E2E_FILES), from this run's
    step times and tau measured on the real model (taus: {deployment stem: tau at k}):
      AR:           B / t(decode, B)
      n-gram:       max(B / t(decode, B), B * tau / t(verify k+1, B))            (adaptive k: 0 or k)
      QSpec:        max(B / t(decode, B), B * tau / (k * t(draft, B) + t(verify k+1, B)))"""
    from .speed import E2E_FILES, _deployment
    rows = [r for r in batch["rows"] if "error" not in r]

    def t(case, b):
        x = next((r for r in rows if r["case"] == case and r["B"] == b), None)
        return x["ms"] / 1e3 if x else None
    draft_case = next((r["case"] for r in rows if r["case"].startswith("QSpec draft")), None)
    out = []
    for b in sorted({r["B"] for r in rows}):
        row = {"B": b}
        for stem in E2E_FILES:
            cfg = _deployment(stem)
            v, k = cfg.verifier.quant, cfg.drafter.num_tokens
            dec, ver = t(f"decode {v}", b), t(f"verify {v} k={k}", b)
            if not dec:
                continue
            ar = b / dec
            method = cfg.drafter.method
            if method == "none" or stem not in taus or not ver:
                row[stem], row[stem + " k"] = ar, 0
                continue
            extra = k * t(draft_case, b) if method == "quantized_self" and draft_case else 0.0
            spec = b * taus[stem] / (extra + ver)
            row[stem], row[stem + " k"] = max(ar, spec), (k if spec > ar else 0)
        out.append(row)
    return {"taus": taus, "rows": out, "formula": project_batch.__doc__}


# ------------------------------------------------------------------ end to end, many requests in flight

def e2e_batch_bench(a, backend, dtype) -> dict:
    """`--mode e2e --in-flight N`: the first N prompts submitted at once (continuous batching,
    max_batch_size N) for each config, total new tokens / wall time; the peer is transformers'
    batched `generate` (left padding, greedy) on the same prompts in the same run.
    --ignore-eos makes every request generate exactly max_new_tokens on both sides (equal work:
    used with random weights, where EOS is arbitrary)."""
    from quasar import config as qcfg
    from quasar.bench.acceptance import select
    from quasar.engine import LLM
    from quasar.run import read_prompts_file
    from quasar.spec_decode.sampling import SamplingParams
    from .speed import _partial, _smoke_model_dir, _sync, e2e_configs
    n = 4 if a.smoke else a.in_flight
    n_new = 12 if a.smoke else a.max_new_tokens
    model_name = str(_smoke_model_dir()) if a.smoke else a.model
    recs = read_prompts_file(a.prompts_file) if a.prompts_file else [
        {"prompt": p} for p in ("one two three one two", "alpha beta gamma alpha", "red green red", "x y z x y")]
    recs = (recs * (1 + n // len(recs)))[:n]
    configs = e2e_configs()
    names = list(configs) if not a.configs else [c for c in configs if any(
        w.strip() and w.strip() in c for w in a.configs.split(","))]
    dname = str(dtype).replace("torch.", "")
    rows, ids = [], None
    for name in names:
        cfg = qcfg.from_dict({"model": model_name, "device": backend.name, "dtype": dname,
                              "max_seq_len": 2048 if not a.smoke else 128, **configs[name],
                              "sampling": {"max_new_tokens": n_new},
                              "runtime": {"max_batch_size": n}})
        if a.smoke:
            cfg.chat = False
        llm = LLM(cfg)
        ids = [llm.encode(r["prompt"]) for r in recs]
        sp = SamplingParams(ignore_eos=a.ignore_eos, max_tokens=n_new)
        # warm-up: every prompt's prefill shape and the decode buckets (kernels compile for new
        # shapes on first use), on prompts shifted by one token so that the timed run gets no
        # prefix-cache hits from it
        llm.generate([[x[0]] + x for x in ids], SamplingParams(ignore_eos=True, max_tokens=4))
        if backend.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        _sync(backend)
        t0 = time.perf_counter()
        res = llm.generate(ids, sp)
        _sync(backend)
        wall = time.perf_counter() - t0
        e = llm.engine
        new = sum(len(r.token_ids) for r in res)
        steps = sum(r.stats.steps for r in res)
        rows.append({"config": name, "in_flight": n, "tok_s": new / wall, "new_tokens": new, "wall_s": wall,
                     "tau": sum(r.stats.decode_tokens for r in res) / max(steps, 1),
                     "k_hist": dict(sorted(e.k_hist.items())), "peak_kv_blocks": e.peak_blocks,
                     "kv_blocks": e.blocks.num_blocks, "preemptions": e.sched.preemptions,
                     "peak_mem_GB": torch.cuda.max_memory_allocated() / 1e9 if backend.device.type == "cuda" else None})
        print(f"  {name}: {rows[-1]['tok_s']:.1f} tok/s ({n} in flight): {rows[-1]}", flush=True)
        _partial(a, "e2e_batch", rows)
        del llm
        if backend.device.type == "cuda":
            torch.cuda.empty_cache()
    if not a.no_peers and ids is not None:
        rows.append(_hf_batched(model_name, ids, n_new, backend, dtype, a.ignore_eos))
        print(f"  {rows[-1]['config']}: {rows[-1]['tok_s']:.1f} tok/s: {rows[-1]}", flush=True)
    peer = rows[-1]["tok_s"] if rows and rows[-1].get("peer") else None
    for r in rows:
        if peer:
            r["vs_transformers_batched"] = r["tok_s"] / peer
    return {"model": model_name, "in_flight": n, "max_new_tokens": n_new, "ignore_eos": a.ignore_eos,
            "dtype": dname, "rows": rows}


def _hf_batched(model_name, ids, n_new, backend, dtype, ignore_eos) -> dict:
    from transformers import AutoModelForCausalLM

    from quasar.engine import eos_ids, load_tokenizer
    from quasar.fetch import resolve_model
    from .speed import _sync
    path = resolve_model(model_name)
    tok = load_tokenizer(path)
    eos = eos_ids(path, tok)
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(backend.device).eval()
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    width = max(len(x) for x in ids)
    x = torch.tensor([[pad] * (width - len(r)) + r for r in ids], device=backend.device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in ids], device=backend.device)
    kw = dict(max_new_tokens=n_new, do_sample=False, pad_token_id=pad)
    if ignore_eos:
        kw.update(eos_token_id=None, min_new_tokens=n_new)
    hf.generate(x[:2], attention_mask=mask[:2], **dict(kw, max_new_tokens=8, min_new_tokens=None))
    if backend.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    _sync(backend)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = hf.generate(x, attention_mask=mask, **kw)[:, width:].tolist()
    _sync(backend)
    wall = time.perf_counter() - t0
    new = 0
    for row in out:
        for j, t in enumerate(row):
            if not ignore_eos and t in eos:
                new += j + 1
                break
        else:
            new += len(row)
    del hf
    return {"config": f"transformers generate, batched ({len(ids)}, padded, greedy)", "tok_s": new / wall,
            "new_tokens": new, "wall_s": wall, "peer": True,
            "peak_mem_GB": torch.cuda.max_memory_allocated() / 1e9 if backend.device.type == "cuda" else None}


def e2e_batch_markdown(res: dict) -> str:
    lines = [f"{res['in_flight']} prompts in flight, {res['max_new_tokens']} new tokens"
             + (" each (EOS ignored)" if res["ignore_eos"] else " max") + f", greedy, {res['dtype']}", "",
             "| config | tok/s | vs transformers batched | tau | steps by k | peak KV blocks | peak mem GB |",
             "|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        pm = r.get("peak_mem_GB")
        lines.append(f"| {r['config']} | {r['tok_s']:.1f} | {r.get('vs_transformers_batched', float('nan')):.2f}x | "
                     f"{r.get('tau', float('nan')):.2f} | {r.get('k_hist', '')} | "
                     f"{r.get('peak_kv_blocks', '')}/{r.get('kv_blocks', '')} | {'' if pm is None else f'{pm:.1f}'} |")
    return "\n".join(lines)


# ------------------------------------------------------------------ the n-gram drafter's host cost

def ngram_bench(batch: int = 64, ctx: int = 8192, k: int = 5, steps: int = 50, seed: int = 0) -> dict:
    """Host time of one batched n-gram proposal (`NgramDrafter.propose_batch`) for `batch`
    sequences of `ctx` tokens each (Spec-Bench-like repetition: random text with repeated
    spans), after each step appends the step's tokens. vLLM issue #16883: its CPU matcher is a
    bottleneck on long prompts; ours is an incremental index (one dict look-up per n)."""
    import random

    from quasar.engine.sequence import Sequence, StopConditions
    from quasar.spec_decode.ngram import NgramDrafter
    rng = random.Random(seed)

    def text(n):
        out = []
        while len(out) < n:
            out += rng.sample(range(32000), 40) if rng.random() < 0.5 or len(out) < 64 else out[-rng.randrange(64, len(out)):][:40]
        return out[:n]

    class Eng:
        device = torch.device("cpu")
    d = NgramDrafter("cpu", 1, 3)
    seqs = [Sequence(text(ctx), stop=StopConditions(10 ** 6)) for _ in range(batch)]
    t0 = time.perf_counter()
    for s in seqs:
        d.start(s)
        s.drafter_state.find(s.context, k)          # index the prompt (once per request)
    first = time.perf_counter() - t0
    ts = []
    for _ in range(steps):
        t = time.perf_counter()
        d.propose_batch(seqs, [k] * batch, Eng)
        ts.append(time.perf_counter() - t)
        for s in seqs:
            s.append([rng.randrange(32000) for _ in range(rng.randint(1, k + 1))])
    return {"batch": batch, "ctx": ctx, "k": k, "index_prompts_ms": first * 1e3,
            "propose_ms_median": statistics.median(ts) * 1e3, "propose_ms_max": max(ts) * 1e3}
