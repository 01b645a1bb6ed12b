"""Speed benchmarks: `python -m quasar.bench speed --mode ops,step,batch,e2e,project`.

- ops:     GEMM per scheme and attention at Qwen3-8B / OpenPangu-7B shapes (quasar.bench.ops).
- step:    full-model step time, random weights of the real shapes: one-token bf16 decode and
           verify steps (k+1 tokens) for bf16 / w8a8-int8 / w8a8-fp8 / w4a16, and QSpec's w4a4
           draft step; contexts 512 and 4096. Each against its byte floor (weights + KV read once
           at the copy bandwidth measured in the same run).
- batch:   the batched runtime's paged steps (quasar.bench.batch): decode and verify of B
           sequences (--batches, --batch-ctx) per deployed verifier scheme and QSpec's draft, each
           against max(byte floor, compute floor); and the n-gram drafter's host cost at 64 x 8k.
- e2e --in-flight N: N requests submitted at once (continuous batching) per deployment, total
           tokens/s, against transformers' batched `generate` on the same prompts.
- e2e:     the real SmolLM2-135M-Instruct over Spec-Bench prompts (a fixed subset per task,
           greedy): AR bf16, AR w8a8-int8, ngram+bf16, Quasar (ngram + w8a8-int8), QSpec, and
           the peers transformers `generate` (greedy, and with prompt_lookup_num_tokens), on the
           same prompts in the same run.
- project: projected tokens/s at the real shapes = tau (measured on the real model) / step time
           (measured at the real shape); labelled as a projection, formula printed.

--smoke runs every mode's harness on a tiny random model on the CPU (CI keeps it working).
Results: markdown on stdout, JSON (and PNG plots when matplotlib is present) under --out.
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch

SHAPES = {
    "qwen3-8b": dict(model_type="qwen3", vocab_size=151936, hidden_size=4096, intermediate_size=12288,
                     num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                     rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=False),
    "openpangu-7b": dict(model_type="PanguEmbedded", architectures=["PanguEmbeddedForCausalLM"], bias=True,
                         vocab_size=153376, hidden_size=4096, intermediate_size=12800, num_hidden_layers=34,
                         num_attention_heads=32, num_key_value_heads=8, rope_theta=1.6e7, rms_norm_eps=1e-5,
                         tie_word_embeddings=False),
    "tiny": dict(model_type="qwen3", vocab_size=512, hidden_size=128, intermediate_size=256,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                 tie_word_embeddings=False),
}
# The systems compared end to end are the shipped YAML deployments of the small real model
# (configs/*.yaml name their schemes; this module names none).
E2E_FILES = ("ar-bf16-smollm2", "ar-w8a8-smollm2", "ngram-bf16-smollm2", "quasar-smollm2", "qspec-smollm2")
STEP_QSPEC_FILE = "qspec-qwen3-8b"      # QSpec's draft / verify schemes and k at the real shape


def _deployment(stem: str):
    from quasar import config as qcfg
    from quasar.run import REPO_ROOT
    return qcfg.load(REPO_ROOT / "configs" / f"{stem}.yaml")


def describe(cfg) -> str:
    """A system's label from its deployment: 'AR w8a8-int8', 'ngram k=5 + unquantized',
    'quantized_self w4a4 k=3 -> w4a16'."""
    from quasar import quant
    v = quant.canonical(cfg.verifier.quant or quant.default())
    d = cfg.drafter
    if d.method == "none":
        return f"AR {v}"
    if d.method == "quantized_self":
        return f"quantized_self {quant.canonical(d.scheme or quant.DEFAULT_DRAFT)} k={d.num_tokens} -> {v}"
    return f"{d.method} k={d.num_tokens} + {v}"


def e2e_configs() -> dict:
    """{label: (file stem, the verifier / drafter sections of its YAML)}."""
    out = {}
    for stem in E2E_FILES:
        cfg = _deployment(stem)
        out[f"{stem}: {describe(cfg)}"] = {"verifier": vars(cfg.verifier), "drafter": {
            **{k: v for k, v in vars(cfg.drafter).items() if k != "ngram"}, "ngram": vars(cfg.drafter.ngram)}}
    return out


def add_args(ap) -> None:
    ap.add_argument("--mode", default="e2e", help="comma-separated: ops, step, batch, e2e, project")
    ap.add_argument("--smoke", action="store_true", help="tiny random model on the CPU, a few steps")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--shapes", default="qwen3-8b,openpangu-7b")
    ap.add_argument("--contexts", default="512,4096")
    ap.add_argument("--k", type=int, default=5, help="drafted tokens per step for the verify chunk (T = k+1)")
    from quasar.run import DEFAULT_PROMPTS_REL, positive_int
    ap.add_argument("--iters", type=positive_int, default=50)
    ap.add_argument("--model", default="smollm2-135m-instruct", help="e2e: the real model")
    ap.add_argument("--prompts-file", type=Path, default=None,
                    help=f"e2e: JSONL, Spec-Bench format (default: the shipped {DEFAULT_PROMPTS_REL})")
    ap.add_argument("--per-category", type=positive_int, default=3, help="e2e: prompts per Spec-Bench task")
    ap.add_argument("--max-new-tokens", type=positive_int, default=256)
    ap.add_argument("--no-peers", action="store_true", help="e2e: skip the transformers peers")
    ap.add_argument("--configs", default=None, help="e2e: comma-separated subset of the config names")
    ap.add_argument("--cases", default=None,
                    help="step: comma-separated subset of the step cases, matched as substrings of their "
                         "labels (e.g. 'w4a16,decode bf16')")
    ap.add_argument("--batches", default="1,2,4,8,16,32,64", help="batch: batch sizes")
    ap.add_argument("--in-flight", type=positive_int, default=1,
                    help="e2e: requests submitted together (continuous batching, max_batch_size N); 1 = one at a time")
    ap.add_argument("--ignore-eos", action="store_true",
                    help="e2e --in-flight: every request generates --max-new-tokens (equal work; random weights)")
    ap.add_argument("--batch-ctx", type=positive_int, default=1024, help="batch: context length of every sequence")
    ap.add_argument("--threads", type=positive_int, default=None,
                    help="CPU threads for torch (step, and e2e's LLMs)")
    ap.add_argument("--out", type=Path, default=Path("bench_out"), metavar="DIR",
                    help="output directory (created): speed.json, bench_ops.json, plots; a path "
                         "ending in .json is rejected (default: bench_out)")


# ------------------------------------------------------------------ helpers

def _sync(backend):
    backend.synchronize()


def copy_bandwidth(backend, nbytes: int = 1 << 30, iters: int = 10) -> float:
    """Device-to-device copy bandwidth (bytes read + written per second). On an accelerator the
    copy is timed with device events (torch.Event: kernel time only; wall time plus a synchronize
    would add ~20 us of launch and sync to a ~0.7 ms copy, underestimate the bandwidth by a few
    percent and flatter every ratio to the floor). The CPU has no events: wall time there."""
    n = nbytes // 2
    x = torch.randn(n, device=backend.device, dtype=torch.float32).to(torch.bfloat16)
    y = torch.empty_like(x)
    sec = time_device(lambda: y.copy_(x), backend, iters, warmup=1)
    del x, y
    return 2 * n * 2 / sec


def time_device(fn, backend, iters: int, warmup: int = 3) -> float:
    """Median seconds of fn(): device events on an accelerator (kernel time, no launch-and-sync
    overhead), wall time on the CPU (which has no events)."""
    for _ in range(warmup):
        fn()
    _sync(backend)
    ts = []
    for _ in range(iters):
        if backend.device.type != "cpu":
            a = torch.Event(device=backend.device, enable_timing=True)
            b = torch.Event(device=backend.device, enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            ts.append(a.elapsed_time(b) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            _sync(backend)
            ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


SCALE_BYTES = 4      # fp32 scales and zero points: what the kernels read per group


def linear_bytes(m) -> int:
    """Bytes one step reads for one linear: the codes, plus a scale (and, asymmetric, a zero
    point) per output channel and group; or the dense weight in the model dtype."""
    n, k = m.out_features, m.in_features
    bits = m.scheme.weight_bits
    if bits == 16:
        return n * k * m.dtype.itemsize
    groups = 1 if m.group_size == -1 else k // m.group_size
    per_group = SCALE_BYTES * (1 if m.symmetric else 2)
    return n * k * bits // 8 + n * groups * per_group


def weight_bytes(model) -> int:
    """Bytes one step reads for the weights: every linear (codes + scales/zeros, or dense) once."""
    from quasar.quant import QuantLinear
    total = 0
    for name, m in model.named_modules():
        # a QSpec draft linear (".draft") reads its verifier's codes: count them once
        if isinstance(m, QuantLinear) and not name.endswith(".draft"):
            total += linear_bytes(m)
    a = model.args
    total += (2 * a.num_layers + 1) * a.hidden_size * 2          # norms
    return total


def kv_bytes(model, ctx: int) -> int:
    a = model.args
    return 2 * a.num_layers * a.num_kv_heads * a.head_dim * ctx * 2


def time_step(model, backend, t: int, ctx: int, mode: str, iters: int) -> float:
    """Median seconds of one step of t tokens at context ctx; model: a ModelRunner (graph replay
    when it captured the step)."""
    dev = model.device
    ids = torch.randint(0, model.model.args.vocab_size, (1, t), device=dev)
    pos = torch.arange(ctx, ctx + t, device=dev).view(1, -1)
    for _ in range(3):
        model.step(ids, pos, ctx + t, mode=mode)
    _sync(backend)
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        model.step(ids, pos, ctx + t, mode=mode)
        _sync(backend)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def random_step_model(hf: dict, backend, dtype, max_seq_len: int, verifier, draft_scheme=None):
    """A ModelRunner over a model of the shape `hf` with random weights and a random (full) KV
    cache, for timing steps (no capture yet: `capture(runner, t, mode)`)."""
    from quasar.engine import ModelRunner
    from quasar.model.loader import build_random_model
    m = build_random_model(hf, backend, dtype, max_seq_len, verifier, draft_scheme=draft_scheme)
    r = ModelRunner(m, graphs=False)
    r.cache.k.normal_()
    r.cache.v.normal_()
    return r


def capture(runner, t: int, mode: str) -> None:
    """(Re)capture the runner's step of t tokens in `mode` where the backend captures steps."""
    runner.captured = None
    if runner.device.type == "cuda":
        torch.cuda.empty_cache()
    runner.captured = runner.backend.graph_runner(runner.model, runner.cache, [t], (mode,))


def time_variants(model, backend, t: int, ctx: int, variants: dict, iters: int = 50, rounds: int = 3,
                  mode: str = "verify"):
    """A/B of a step in one process: for each round, for each variant, `variants[name]()` sets it
    up, the step runner is rebuilt (re-captured: CUDA graphs) and the step timed (time_step).
    Returns ({name: [ms per round]}, {name: fp32 logits of one fixed step, from round 0})."""
    times: dict = {v: [] for v in variants}
    logits: dict = {}
    dev = model.device
    for r in range(rounds):
        for name, setup in variants.items():
            setup()
            capture(model, t, mode)
            times[name].append(time_step(model, backend, t, ctx, mode, iters) * 1e3)
            if r == 0:
                ids = torch.arange(t, device=dev).view(1, -1) + 100
                pos = torch.arange(ctx, ctx + t, device=dev).view(1, -1)
                logits[name] = model.step(ids, pos, ctx + t, mode=mode).float().clone()
    model.captured = None
    return times, logits


# ------------------------------------------------------------------ step

def all_step_cases() -> list:
    """(label, scheme, draft scheme, group size, hadamard, T as a function of k, mode): the
    unquantized decode step, a verify chunk of k+1 tokens for every registered scheme (grouped
    schemes at group_size auto), and QSpec's draft step and verify chunk (its k, group size and
    Hadamard rotation) from its deployment."""
    from quasar import quant
    u = quant.default()
    cases = [(f"decode {u} (T=1)", u, None, "auto", False, lambda k: 1, "verify")]
    for name, s in quant.SCHEMES.items():
        cases.append((f"verify {name}" + (" g-auto" if s.grouped else ""), name, None, "auto", False,
                      lambda k: k + 1, "verify"))
    q = _deployment(STEP_QSPEC_FILE)
    v, d, kq = q.verifier.quant, q.drafter.scheme or quant.DEFAULT_DRAFT, q.drafter.num_tokens
    gs, had = q.verifier.group_size, q.verifier.hadamard
    tag = (" per-channel" if gs == -1 else "") + (" hadamard" if had else "")
    cases.append((f"QSpec draft {d}{' hadamard' if had else ''} (T=1)", v, d, gs, had, lambda k: 1, "draft"))
    cases.append((f"QSpec verify {v}{tag} (k={kq})", v, d, gs, had, lambda k, kq=kq: kq + 1, "verify"))
    return cases


def step_cases(a) -> list:
    """Every step case, or those whose label contains one of --cases' comma-separated strings."""
    every = all_step_cases()
    want = [w.strip() for w in (getattr(a, "cases", None) or "").split(",") if w.strip()]
    if not want:
        return every
    cases = [c for c in every if any(w in c[0] for w in want)]
    if not cases:
        raise SystemExit(f"--cases {a.cases!r} matches no step case; the cases are: "
                         + "; ".join(c[0] for c in every))
    return cases


def step_bench(a, backend, dtype) -> dict:
    from tqdm.auto import tqdm

    from quasar.config import VerifierConfig
    from quasar.errors import QuasarError
    shapes = ["tiny"] if a.smoke else a.shapes.split(",")
    contexts = [16, 48] if a.smoke else [int(c) for c in a.contexts.split(",")]
    iters = 3 if a.smoke else a.iters
    k = a.k
    bw = copy_bandwidth(backend, 1 << 24 if a.smoke else 1 << 30)
    rows = []
    for shape in shapes:
        hf = SHAPES[shape]
        for label, scheme, draft, gs, had, tfn, mode in tqdm(step_cases(a), desc=f"step {shape}"):
            try:
                vcfg = VerifierConfig(quant=scheme, group_size=gs, hadamard=had)
                m = random_step_model(hf, backend, dtype, max(contexts) + 2 * k + 8, vcfg, draft_scheme=draft)
                t = tfn(k)
                capture(m, t, mode)
                wb = weight_bytes_mode(m.model, mode)
                for ctx in contexts:
                    sec = time_step(m, backend, t, ctx, mode, iters)
                    floor_b = wb + kv_bytes(m.model, ctx)
                    rows.append({"shape": shape, "case": label, "scheme": scheme if mode == "verify" else draft,
                                 "T": t, "ctx": ctx, "ms": sec * 1e3, "weight_GB": wb / 1e9,
                                 "floor_ms": floor_b / bw * 1e3, "ratio_to_floor": sec / (floor_b / bw)})
                del m
            except QuasarError as e:
                rows.append({"shape": shape, "case": label, "error": str(e)})
            _partial(a, "step", rows)
            if backend.name == "cuda":
                torch.cuda.empty_cache()
    return {"copy_bandwidth_GBs": bw / 1e9, "k": k, "rows": rows}


def weight_bytes_mode(model, mode: str) -> int:
    """Weight bytes a step in `mode` reads: a QSpec draft runs the verifier's codes, so the same."""
    return weight_bytes(model)


def step_markdown(res: dict) -> str:
    lines = [f"copy bandwidth measured in the same run: {res['copy_bandwidth_GBs']:.0f} GB/s "
             "(bytes read + written)", "",
             "| shape | step | T | ctx | ms | floor ms | ratio to floor |", "|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        if "error" in r:
            lines.append(f"| {r['shape']} | {r['case']} | | | error: {r['error'][:80]} | | |")
        else:
            lines.append(f"| {r['shape']} | {r['case']} | {r['T']} | {r['ctx']} | {r['ms']:.3f} | "
                         f"{r['floor_ms']:.3f} | {r['ratio_to_floor']:.2f}x |")
    return "\n".join(lines)


# ------------------------------------------------------------------ e2e

def _partial(a, key, value):
    """Save what is measured so far (a run cut off by a time limit keeps its rows)."""
    f = a.out / f"{key}_partial.json"
    f.write_text(json.dumps(value, indent=2, default=str))


def e2e_bench(a, backend, dtype) -> dict:
    from tqdm.auto import tqdm

    from quasar import config as qcfg
    from quasar.bench.acceptance import select, task_of
    from quasar.engine import LLM
    from quasar.run import read_prompts_file
    if a.smoke:
        prompts = [{"prompt": "one two three one two three one two", "category": "qa"},
                   {"prompt": "alpha beta gamma alpha beta", "category": "rag"}]
        n_new = 12
    else:
        if a.prompts_file is None:
            from quasar.errors import ConfigError
            raise ConfigError("e2e needs --prompts-file (Spec-Bench JSONL)")
        prompts = select(read_prompts_file(a.prompts_file), a.per_category)
        n_new = a.max_new_tokens
    configs = e2e_configs()
    names = list(configs) if not a.configs else [n for n in configs if any(
        w.strip() and w.strip() in n for w in a.configs.split(","))]
    if not names:
        from quasar.errors import ConfigError
        raise ConfigError(f"--configs {a.configs!r} matches none of: {'; '.join(configs)}")
    model_name = a.model
    if a.smoke:
        model_name = str(_smoke_model_dir())
    rows, outputs = [], {}
    dname = str(dtype).replace("torch.", "")
    for name in names:
        spec = configs[name]
        cfg = qcfg.from_dict({"model": model_name, "device": backend.name, "dtype": dname,
                              "max_seq_len": 2048 if not a.smoke else 128, **spec,
                              "sampling": {"max_new_tokens": n_new}})
        if a.smoke:
            cfg.chat = False
        llm = LLM(cfg)
        # warm-up: autotune / caches, and every prompt's prefill shape once (cuBLAS and SDPA pick
        # their kernels on a shape's first call; untimed, the first config would pay it for all)
        llm.generate(prompts[0]["prompt"], max_new_tokens=8)
        for rec in prompts:
            llm.generate(rec["prompt"], max_new_tokens=1)
        tot = {"new": 0, "decode_tokens": 0, "steps": 0, "prefill_s": 0.0, "decode_s": 0.0, "draft_s": 0.0}
        outs = []
        per_task: dict = {}
        for rec in tqdm(prompts, desc=name):
            r = llm.generate(rec["prompt"])
            s = r.stats
            tot["new"] += s.new_tokens
            tot["decode_tokens"] += s.decode_tokens
            tot["steps"] += s.steps
            tot["prefill_s"] += s.prefill_s
            tot["decode_s"] += s.decode_s
            tot["draft_s"] += s.draft_s
            t = per_task.setdefault(task_of(rec.get("category")), [0, 0])
            t[0] += s.decode_tokens
            t[1] += s.steps
            outs.append(r.token_ids)
        outputs[name] = outs
        rows.append({"config": name, "verifier": cfg.verifier.quant, "drafter": cfg.drafter.method,
                     "draft_scheme": llm.model.draft_scheme, "k": llm.k, "tok_s": tot["new"] / (tot["prefill_s"] + tot["decode_s"]),
                     "decode_tok_s": tot["decode_tokens"] / tot["decode_s"],
                     "tau": tot["decode_tokens"] / max(tot["steps"], 1), "new_tokens": tot["new"],
                     "draft_ms_per_step": 1e3 * tot["draft_s"] / max(tot["steps"], 1),
                     "tau_per_task": {k: v[0] / max(v[1], 1) for k, v in per_task.items()}})
        _partial(a, "e2e", rows)
        print(f"  {name}: {rows[-1]['tok_s']:.1f} tok/s, tau {rows[-1]['tau']:.2f}", flush=True)
        del llm
        if backend.name == "cuda":
            torch.cuda.empty_cache()
    peers = [] if a.no_peers else _peers(model_name, prompts, n_new, backend, dtype, a.smoke,
                                         lambda r: (_partial(a, "e2e", rows + r)))
    rows += peers
    from quasar import quant
    base = next((r for r in rows if r.get("drafter") == "none" and r.get("verifier") == quant.default()), None)
    pl = next((r for r in rows if r["config"].startswith("transformers prompt-lookup")), None)
    for r in rows:
        if base:
            r["speedup_vs_ar_bf16"] = r["tok_s"] / base["tok_s"]
        if pl:
            r["speedup_vs_hf_prompt_lookup"] = r["tok_s"] / pl["tok_s"]
    agree = None
    ng = next((r for r in rows if r.get("drafter") == "ngram" and r.get("verifier") == quant.default()), None)
    if base and ng:
        agree = sum(x == y for x, y in zip(outputs[base["config"]], outputs[ng["config"]]))
    return {"model": a.model, "prompts": len(prompts), "max_new_tokens": n_new, "dtype": dname,
            "rows": rows, "greedy_identical_ngram_vs_ar_bf16": agree}


def _peers(model_name, prompts, n_new, backend, dtype, smoke, save=lambda rows: None) -> list[dict]:
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM

    from quasar.engine import load_tokenizer
    from quasar.fetch import resolve_model
    path = resolve_model(model_name)
    tok = load_tokenizer(path)
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(backend.device).eval()
    rows = []
    for label, extra in (("transformers generate (greedy)", {}),
                         ("transformers prompt-lookup (k=5)", {"prompt_lookup_num_tokens": 5})):
        total_new, total_s = 0, 0.0
        for i, rec in enumerate(tqdm(prompts, desc=label)):
            if smoke:
                ids = tok(rec["prompt"])["input_ids"]
            else:
                text = tok.apply_chat_template([{"role": "user", "content": rec["prompt"]}], tokenize=False,
                                               add_generation_prompt=True)
                ids = tok(text, add_special_tokens=False)["input_ids"]
            x = torch.tensor([ids], device=backend.device)
            if i == 0:
                hf.generate(x, max_new_tokens=8, do_sample=False, **extra)
            _sync(backend)
            t0 = time.perf_counter()
            out = hf.generate(x, max_new_tokens=n_new, do_sample=False, **extra)
            _sync(backend)
            total_s += time.perf_counter() - t0
            total_new += out.shape[1] - len(ids)
        rows.append({"config": label, "tok_s": total_new / total_s, "new_tokens": total_new, "peer": True})
        save(rows)
        print(f"  {label}: {rows[-1]['tok_s']:.1f} tok/s", flush=True)
    del hf
    return rows


def e2e_markdown(res: dict) -> str:
    lines = [f"{res['prompts']} prompts, {res['max_new_tokens']} new tokens max, greedy, {res['dtype']}", "",
             "| config | tok/s (e2e) | decode tok/s | tau | vs AR bf16 | vs transformers prompt-lookup |",
             "|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['config']} | {r['tok_s']:.1f} | {r.get('decode_tok_s', float('nan')):.1f} | "
                     f"{r.get('tau', float('nan')):.2f} | {r.get('speedup_vs_ar_bf16', float('nan')):.2f}x | "
                     f"{r.get('speedup_vs_hf_prompt_lookup', float('nan')):.2f}x |")
    if res.get("greedy_identical_ngram_vs_ar_bf16") is not None:
        lines.append("")
        lines.append(f"bf16 greedy agreement, ngram+bf16 vs AR bf16: {res['greedy_identical_ngram_vs_ar_bf16']}"
                     f"/{res['prompts']} prompts identical")
    return "\n".join(lines)


# ------------------------------------------------------------------ project

def project(step: dict, e2e: dict, k: int) -> dict:
    """tokens/s at the real shape = tau / (time of one speculative step), per config: AR = the
    unquantized decode step; n-gram systems = their verifier's k+1 chunk + the measured n-gram
    draft time; quantized_self (QSpec) = k draft steps + its verify chunk."""
    from quasar import quant
    u = quant.default()
    systems = [r for r in e2e["rows"] if "tau" in r and "drafter" in r]
    out = []
    by = {}
    for r in step["rows"]:
        if "error" not in r:
            by[(r["shape"], r["case"], r["ctx"])] = r
    decode = f"decode {u} (T=1)"
    for (shape, case, ctx), _ in sorted(by.items()):
        if case != decode:
            continue
        ar = by[(shape, decode, ctx)]["ms"]

        def verify(scheme):
            return next((r["ms"] for (sh, c, cx), r in by.items() if sh == shape and cx == ctx
                         and c.startswith(f"verify {scheme}")), None)
        entries = []
        for r in systems:
            if r["drafter"] == "none" and r["verifier"] == u:
                entries.append((r["config"], 1.0, ar, f"t_decode_{u}"))
            elif r["drafter"] == "ngram" and verify(r["verifier"]) is not None:
                t = verify(r["verifier"]) + r["draft_ms_per_step"]
                entries.append((r["config"], r["tau"], t, f"t_verify_{r['verifier']}(T=k+1) + t_draft_ngram"))
            elif r["drafter"] == "quantized_self":
                d = next((row for (sh, c, cx), row in by.items() if sh == shape and cx == ctx
                          and c.startswith(f"QSpec draft {r['draft_scheme']}")), None)
                v = next((row for (sh, c, cx), row in by.items() if sh == shape and cx == ctx
                          and c.startswith(f"QSpec verify {r['verifier']}")), None)
                if d is not None and v is not None:
                    kq = r["k"]
                    entries.append((r["config"], r["tau"], kq * d["ms"] + v["ms"],
                                    f"{kq} x t_draft_{r['draft_scheme']}(T=1) + t_verify_{r['verifier']}(T={kq + 1})"))
        for name, tau, ms, formula in entries:
            out.append({"shape": shape, "ctx": ctx, "config": name, "tau": tau, "step_ms": ms,
                        "tok_s": 1e3 * tau / ms, "speedup_vs_ar": (tau / ms) / (1 / ar),
                        "formula": f"tok/s = tau / ({formula})"})
    return {"rows": out, "note": "PROJECTION: tau measured on SmolLM2-135M-Instruct (real weights, Spec-Bench); "
                                 "step times measured at the real shape with random weights. Verify steps are "
                                 "costed at T = k+1 even when fewer tokens were drafted (conservative)."}


def project_markdown(res: dict) -> str:
    lines = [res["note"], "", "| shape | ctx | config | tau | step ms | tok/s | vs AR (unquantized) | formula |",
             "|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['shape']} | {r['ctx']} | {r['config']} | {r['tau']:.2f} | {r['step_ms']:.3f} | "
                     f"{r['tok_s']:.1f} | {r['speedup_vs_ar']:.2f}x | {r['formula']} |")
    return "\n".join(lines)


# ------------------------------------------------------------------ plots

def plots(out: Path, results: dict) -> list[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    made = []
    ops = results.get("ops")
    if ops and ops.get("gemm"):
        bw = ops["copy"]["GBps"] * 1e3          # bytes per microsecond
        rows = [r for g in ops["gemm"].values() for r in g.get("rows", []) if r.get("us")]
        for (n, k) in sorted({(r["n"], r["k"]) for r in rows}):
            fig, ax = plt.subplots(figsize=(6, 4))
            for scheme in sorted({r["scheme"] for r in rows}):
                pts = sorted((r["m"], r["us"], (r["weight_bytes"] + r["act_bytes"]) / bw) for r in rows
                             if (r["n"], r["k"]) == (n, k) and r["scheme"] == scheme)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=scheme)
                    ax.plot([p[0] for p in pts], [p[2] for p in pts], ls="--", lw=0.8,
                            color=ax.lines[-1].get_color())
            ax.set_xlabel("M (rows)")
            ax.set_ylabel("µs (dashed: byte floor at the measured copy bandwidth)")
            ax.set_title(f"GEMM N={n} K={k}")
            ax.set_xscale("log", base=2)
            ax.legend(fontsize=7)
            f = out / f"gemm_{n}x{k}.png"
            fig.tight_layout()
            fig.savefig(f, dpi=110)
            plt.close(fig)
            made.append(str(f))
    e2e = results.get("e2e")
    if e2e:
        fig, ax = plt.subplots(figsize=(7, 4))
        names = [r["config"] for r in e2e["rows"]]
        vals = [r["tok_s"] for r in e2e["rows"]]
        colors = ["tab:gray" if r.get("peer") else "tab:blue" for r in e2e["rows"]]
        ax.barh(names, vals, color=colors)
        ax.set_xlabel("tokens/s (end to end)")
        ax.set_title(f"{e2e['model']}: Quasar configs (blue) vs peers (gray)")
        fig.tight_layout()
        f = out / "e2e_tok_s.png"
        fig.savefig(f, dpi=110)
        plt.close(fig)
        made.append(str(f))
    return made


def _smoke_model_dir() -> Path:
    """A tiny random Llama written once to the cache (the smoke run's 'real model'): built in a
    temporary directory and renamed into place, so an interrupted build leaves nothing half-made."""
    import shutil
    import tempfile
    from quasar.model.gguf import cache_root
    d = cache_root() / "smoke-tiny-llama"
    if (d / "config.json").is_file() and (d / "tokenizer_config.json").is_file():
        return d
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM  # noqa: F401

    from quasar.fetch import resolve_model
    real = resolve_model("smollm2-135m-instruct")        # reuse the real tokenizer (same vocabulary)
    d.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=d.parent, prefix=".smoke-tiny-llama-"))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                      eos_token_id=2, bos_token_id=1)
    LlamaForCausalLM(cfg).save_pretrained(str(tmp))
    AutoTokenizer.from_pretrained(str(real)).save_pretrained(str(tmp))
    shutil.rmtree(d, ignore_errors=True)
    try:
        tmp.rename(d)
    except OSError:            # another process made it meanwhile
        shutil.rmtree(tmp, ignore_errors=True)
    return d


def main(a) -> int:
    import sys

    from quasar import backends, threads
    from quasar.engine import resolve_dtype
    from quasar.run import check_out_dir, default_prompts_file
    modes = [m.strip() for m in a.mode.split(",")]
    valid = ("ops", "step", "batch", "e2e", "project")
    unknown = [m for m in modes if m not in valid]
    if unknown:
        from quasar.errors import ConfigError
        raise ConfigError(f"--mode: unknown mode(s) {', '.join(map(repr, unknown))}; valid: {', '.join(valid)}")
    a.out = check_out_dir(a.out)
    threads.set_default(a.threads)
    threads.apply(a.threads)
    if a.smoke:
        a.device = "cpu"
    if "e2e" in modes and not a.smoke and a.prompts_file is None:
        a.prompts_file = default_prompts_file()
    dev = backends.resolve_device(a.device)
    backend = backends.get(dev)
    dtype = resolve_dtype("auto", backend) if not a.smoke else torch.float32
    results = {"device": dev, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    if dev == "cuda":
        results["gpu"] = torch.cuda.get_device_name()
        try:
            import triton
            results["triton"] = triton.__version__
        except ImportError:
            pass
    print(f"# quasar speed benchmark — {results.get('gpu', dev)}, torch {torch.__version__}, {results['date']}\n")
    failures = []
    if "ops" in modes:
        from quasar.bench import ops as bench_ops
        f = a.out / "bench_ops.json"
        f.unlink(missing_ok=True)
        rc = bench_ops.main(["--out", str(f)] + (["--smoke", "--ms", "6", "--budget", "60"] if a.smoke else []),
                            summary=False)
        results["ops"] = json.loads(f.read_text()) if f.is_file() else {"errors": [f"ops: exited with {rc}"]}
        failures += [f"ops: {bench_ops.one_line(e)}" for e in results["ops"].get("errors", [])
                     if not bench_ops.is_skip(e)]
        if rc and not failures:
            failures.append(f"ops: exited with {rc}")
    if "step" in modes:
        results["step"] = step_bench(a, backend, dtype)
        print("## step\n\n" + step_markdown(results["step"]) + "\n")
        failures += [f"step: {r.get('shape')} {r.get('case')}: {r['error']}"
                     for r in results["step"].get("rows", []) if "error" in r]
    if "batch" in modes:
        from quasar.bench import batch as bench_batch
        results["batch"] = bench_batch.batch_bench(a, backend, dtype)
        ng = bench_batch.ngram_bench(8 if a.smoke else 64, 512 if a.smoke else 8192, steps=5 if a.smoke else 50)
        results["batch"]["ngram_proposal"] = ng
        print("## batch\n\n" + bench_batch.markdown(results["batch"]) + "\n\n" +
              f"n-gram proposal, {ng['batch']} sequences x {ng['ctx']} tokens: {ng['propose_ms_median']:.2f} ms "
              f"per step (max {ng['propose_ms_max']:.2f}); indexing the prompts once: {ng['index_prompts_ms']:.0f} ms\n")
        failures += [f"batch: {r.get('shape')} {r.get('case')}: {r['error']}"
                     for r in results["batch"].get("rows", []) if "error" in r]
    if "e2e" in modes and a.in_flight > 1:
        from quasar.bench import batch as bench_batch
        results["e2e_batch"] = bench_batch.e2e_batch_bench(a, backend, dtype)
        print("## e2e, batched\n\n" + bench_batch.e2e_batch_markdown(results["e2e_batch"]) + "\n")
    elif "e2e" in modes:
        results["e2e"] = e2e_bench(a, backend, dtype)
        print("## e2e\n\n" + e2e_markdown(results["e2e"]) + "\n")
        failures += [f"e2e: {r.get('config', r.get('name', '?'))}: {r['error']}"
                     for r in results["e2e"].get("rows", []) if isinstance(r, dict) and "error" in r]
    if "project" in modes:
        step = results.get("step") or json.loads((a.out / "speed.json").read_text())["step"]
        e2e = results.get("e2e") or json.loads((a.out / "speed.json").read_text())["e2e"]
        results["project"] = project(step, e2e, a.k)
        print("## projection\n\n" + project_markdown(results["project"]) + "\n")
    prev = a.out / "speed.json"
    merged = json.loads(prev.read_text()) if prev.is_file() else {}
    merged.update(results)
    prev.write_text(json.dumps(merged, indent=2, default=str))
    made = plots(a.out, merged)
    print(f"wrote {prev}" + (f" and {', '.join(made)}" if made else ""))
    if failures:
        for line in failures:
            print(f"FAILED {' '.join(str(line).split())[:300]}", file=sys.stderr)
        print(f"error: {len(failures)} benchmark case(s) failed", file=sys.stderr)
        return 1
    return 0
