"""`python -m quasar.bench quantspec`: QuantSpec's steps at long contexts, at a real model shape with
random weights (no Qwen3 / OpenPangu weights exist here), each against its byte floor.

For each context (one sequence, batch 1, paged cache, CUDA graphs where the backend captures):
  - bf16 AR decode: T = 1 on the dense (bf16) paged cache, bf16 weights;
  - QuantSpec draft: T = 1 in draft mode: the W4A16 copy of the weights, the upper plane of the
    hierarchical cache;
  - QuantSpec verify: T = k + 1 on both planes, bf16 weights (the paper) or W8A8 (Quasar +
    QuantSpec);
  - the attention alone, one layer: dense paged, hierarchical upper, hierarchical both.
Floors: the bytes a step reads (weights once; the KV cache: codes, scales and the full-precision
tail) over the device copy bandwidth measured in the same run. The projection of tokens/s over
bf16 AR uses tau (tokens per verify step) measured on a real model:

    speedup = tau * t_AR / (k * t_draft + t_verify)

The cache is filled with random codes, scales and full-precision values directly (a real prefill
of 128k tokens would only add minutes): the step's reads are what is timed.

    python -m quasar.bench quantspec --config configs/quantspec-qwen3-8b.yaml \
        --config configs/quasar-quantspec-qwen3-8b.yaml --contexts 4096,16384,32768,65536,131072 --out DIR
"""
from __future__ import annotations

import json
from pathlib import Path

import torch


def kv_bytes_per_token(args, representation: str, view: str, G: int = 128, vg: int = 128) -> float:
    """Bytes per cached token read by one step (all layers): dense bf16 K and V, or the
    hierarchical planes (upper: one nibble per value; both: two) plus the key scale / min per
    channel per block of G tokens and the value scale / min per token per group of vg channels
    (2-byte scales)."""
    L, H, D = args.num_layers, args.num_kv_heads, args.head_dim
    if representation == "dense":
        return L * H * 2 * D * 2
    nib = 1 if view == "upper" else 2
    vg = min(vg, D)
    planes = 2 * D * nib / 2
    scales = 2 * D * 2 / G + 2 * (D // vg) * 2
    return L * H * (planes + scales)


def step_kv_bytes(args, ctx: int, representation: str, view: str, G: int, R: int) -> float:
    """KV bytes a step at position ctx reads: quantized blocks + the full-precision tail."""
    if representation == "dense":
        return ctx * kv_bytes_per_token(args, "dense", view)
    from quasar.kv.hierarchical import quantized_blocks
    nq = quantized_blocks(ctx, G, R) * G
    return nq * kv_bytes_per_token(args, representation, view, G) + (ctx - nq) * kv_bytes_per_token(args, "dense", view)


def _time(fn, backend, iters: int = 30) -> float:
    from quasar.bench.speed import time_device
    return time_device(fn, backend, iters)


class Step:
    """One sequence of `ctx` cached tokens on a paged runner whose cache holds random contents;
    `fn(t, mode)` returns a callable running the step of t tokens (a CUDA graph replay where the
    backend captures)."""

    def __init__(self, model, layout, ctx: int, t_max: int):
        from quasar.engine.context import StepContext
        from quasar.engine.model_runner import ModelRunner
        bs = layout.block_size
        nb = -(-(ctx + t_max) // bs)
        self.runner = ModelRunner(model, kv_blocks=nb, block_size=bs, layout=layout, graphs=False)
        self.ctx, self.bs, self.table = ctx, bs, list(range(nb))
        c = self.runner.cache
        g = torch.Generator(device=model.device).manual_seed(0)
        if layout.representation == "dense":
            c.k.normal_(generator=g)
            c.v.normal_(generator=g)
        else:
            for x in (c.k_hi, c.k_lo, c.v_hi, c.v_lo):
                x.copy_(torch.randint(0, 256, x.shape, device=x.device, dtype=torch.int32, generator=g).to(torch.uint8))
            for x in (c.k_scale, c.v_scale):
                x.fill_(0.1)
            for x in (c.k_min, c.v_min):
                x.fill_(-0.75)
            from quasar.kv.hierarchical import quantized_blocks
            for m in range(quantized_blocks(ctx, bs, layout.residual_tokens), nb):
                c._take(self.table[m])          # the full-precision tail holds pool slots
            c.k_fp.normal_(generator=g)
            c.v_fp.normal_(generator=g)
        self.StepContext = StepContext

    def ctx_for(self, t: int):
        return self.StepContext.build([self.table], [(self.ctx, t)], self.bs, self.runner.device)

    def fn(self, t: int, mode: str):
        r = self.runner
        dev = r.device
        ctx = self.ctx_for(t)
        ids = torch.randint(0, r.model.args.vocab_size, (t,), device=dev)
        assert r.cache.before_step(ctx, mode)
        if dev.type != "cuda":
            return lambda: r.run_eager(ids, ctx, mode)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                r.run_eager(ids, ctx, mode)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            r.run_eager(ids, ctx, mode)
        return graph.replay

    def attention_fn(self, upper: bool):
        """One layer's attention of a T = 1 step (a CUDA graph replay on a GPU: kernel time)."""
        r = self.runner
        a = r.model.args
        ctx = self.ctx_for(1)
        q = torch.randn(1, a.num_heads, a.head_dim, device=r.device, dtype=r.model.dtype)
        if r.cache.representation == "paged":
            fn = lambda: r.backend.paged_attention(q, r.cache, 0, ctx)      # noqa: E731
        else:
            fn = lambda: r.backend.hier_attention(q, r.cache, 0, ctx, upper)  # noqa: E731
        if r.device.type != "cuda":
            return fn
        fn()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return graph.replay


def run(shape: str, contexts: list[int], configs: list[Path], device: str, taus: dict, iters: int,
        progress: bool = True) -> dict:
    """Each config (a QuantSpec deployment: drafter.scheme, drafter.num_tokens, kv_cache, verifier.quant)
    at the shape's real size with random weights; the bf16 AR baseline with the unquantized scheme."""
    from quasar import config as qcfg, quant
    cfgs = [qcfg.load(p) for p in configs]
    c0 = cfgs[0]
    k, G, R = c0.drafter.num_tokens, c0.kv_cache.group_size, c0.kv_cache.residual_tokens
    for p, c in zip(configs, cfgs):
        if (c.drafter.num_tokens, c.kv_cache.group_size, c.kv_cache.residual_tokens) != (k, G, R) \
                or c.kv_cache.representation == "dense" or c.drafter.method != "quantized_self":
            from quasar.errors import ConfigError
            raise ConfigError(f"{p}: every config must be a QuantSpec deployment (quantized_self on a "
                              "hierarchical KV cache) with the same num_tokens, group_size and residual_tokens")
    unq = quant.default()
    verifiers = [(p.stem, c.verifier.quant or unq, c.drafter.scheme) for p, c in zip(configs, cfgs)]
    if not any(v == unq for _, v, _ in verifiers):
        verifiers.insert(0, ("bf16 AR baseline", unq, verifiers[0][2]))
    return _run(shape, contexts, k, G, R, verifiers, device, taus, iters, progress)


def _run(shape, contexts, k, G, R, verifiers, device, taus, iters, progress):
    from tqdm.auto import tqdm

    from quasar import backends, kv
    from quasar.bench.speed import SHAPES, copy_bandwidth, weight_bytes
    from quasar.config import VerifierConfig
    from quasar.model.loader import build_random_model
    be = backends.get(device)
    dtype = torch.bfloat16 if be.device.type != "cpu" else torch.float32
    hf = SHAPES[shape]
    bw = copy_bandwidth(be, 1 << 30 if be.device.type != "cpu" else 1 << 24)
    rows = []
    top = max(contexts) + k + 2
    hier = kv.Layout("hierarchical-int4", G, R, G, "upper", -(-(R + k + 1) // G) + 4)
    dense = kv.Layout("dense", 128)
    from quasar import quant
    unq = quant.default()
    for label, vq, draft in verifiers:
        model = build_random_model(hf, be, dtype, top, VerifierConfig(quant=vq, group_size=128), draft_scheme=draft)
        args = model.args
        w_verify = weight_bytes(model)
        w_draft = draft_weight_bytes(model)
        for ctx in tqdm(contexts, desc=f"{shape} {label}", disable=not progress):
            row = {"shape": shape, "config": label, "verifier": vq, "draft": draft, "context": ctx, "k": k}
            st = Step(model, hier, ctx, k + 1)
            row["draft_ms"] = _time(st.fn(1, "draft"), be, iters) * 1e3
            row["verify_ms"] = _time(st.fn(k + 1, "verify"), be, iters) * 1e3
            row["attn_upper_us"] = _time(st.attention_fn(True), be, iters) * 1e6
            row["attn_both_us"] = _time(st.attention_fn(False), be, iters) * 1e6
            row["draft_floor_ms"] = (w_draft + step_kv_bytes(args, ctx, "hier", "upper", G, R)) / bw * 1e3
            row["verify_floor_ms"] = (w_verify + step_kv_bytes(args, ctx, "hier", "both", G, R)) / bw * 1e3
            row["attn_upper_floor_us"] = step_kv_bytes(args, ctx, "hier", "upper", G, R) / args.num_layers / bw * 1e6
            row["attn_both_floor_us"] = step_kv_bytes(args, ctx, "hier", "both", G, R) / args.num_layers / bw * 1e6
            del st
            if vq == unq:        # bf16 AR on the dense cache (the baseline), with the same weights
                sd = Step(model, dense, ctx, k + 1)
                row["ar_ms"] = _time(sd.fn(1, "decode"), be, iters) * 1e3
                row["ar_floor_ms"] = (w_verify + step_kv_bytes(args, ctx, "dense", "", G, R)) / bw * 1e3
                row["attn_dense_us"] = _time(sd.attention_fn(False), be, iters) * 1e6
                row["attn_dense_floor_us"] = step_kv_bytes(args, ctx, "dense", "", G, R) / args.num_layers / bw * 1e6
                del sd
            rows.append(row)
            if be.device.type == "cuda":
                torch.cuda.empty_cache()
        del model
        if be.device.type == "cuda":
            torch.cuda.empty_cache()
    ar = {r["context"]: r for r in rows if "ar_ms" in r}
    for r in rows:
        base = ar.get(r["context"])
        if base is None:
            continue
        r["ar_ms"], r["ar_floor_ms"] = base["ar_ms"], base["ar_floor_ms"]
        for name, tau in taus.items():
            r[f"speedup_{name}"] = tau * base["ar_ms"] / (k * r["draft_ms"] + r["verify_ms"])
    return {"device": torch.cuda.get_device_name() if be.device.type == "cuda" else "cpu",
            "copy_bandwidth_GBs": bw / 1e9, "shape": shape, "k": k, "group_size": G, "residual_tokens": R,
            "taus": taus, "rows": rows,
            "kv_bytes_per_token": {"dense": kv_bytes_per_token(model_args(hf), "dense", ""),
                                   "hierarchical upper": kv_bytes_per_token(model_args(hf), "hier", "upper", G),
                                   "hierarchical both": kv_bytes_per_token(model_args(hf), "hier", "both", G)}}


def draft_weight_bytes(model) -> int:
    """Bytes a draft step reads for the weights: each linear's draft copy (W4A16) where it has one,
    else the linear itself (lm_head), plus the norms."""
    from quasar.bench.speed import linear_bytes
    from quasar.quant import QuantLinear
    total = 0
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear) and not name.endswith(".draft"):
            total += linear_bytes(m.draft if m.draft is not None else m)
    a = model.args
    return total + (2 * a.num_layers + 1) * a.hidden_size * 2


def model_args(hf: dict):
    from quasar.model.args import ModelArgs
    return ModelArgs.from_hf(hf, "shape")


def markdown(res: dict) -> str:
    lines = [f"{res['device']}, {res['shape']} shape (random weights), batch 1, k = {res['k']}, G = {res['group_size']}, "
             f"R = {res['residual_tokens']}; copy bandwidth {res['copy_bandwidth_GBs']:.0f} GB/s (same run). "
             "Each time with its byte floor and the ratio.", "",
             "| config (verifier) | ctx | bf16 AR ms (floor) | draft ms (floor) | verify ms (floor) | attn dense / upper / both µs (ratio to floor) | "
             + " | ".join(f"speedup τ={t:.2f} ({n})" for n, t in res["taus"].items()) + " |",
             "|---|---|---|---|---|---|" + "---|" * len(res["taus"])]
    for r in res["rows"]:
        att = []
        for key in ("dense", "upper", "both"):
            if f"attn_{key}_us" in r:
                att.append(f"{r[f'attn_{key}_us']:.0f} ({r[f'attn_{key}_us'] / r[f'attn_{key}_floor_us']:.2f}x)")
        sp = " | ".join(f"{r.get(f'speedup_{n}', float('nan')):.2f}x" for n in res["taus"])
        lines.append(f"| {r['config']} ({r['verifier']}) | {r['context']} | {r['ar_ms']:.2f} ({r['ar_floor_ms']:.2f}) | "
                     f"{r['draft_ms']:.2f} ({r['draft_floor_ms']:.2f}) | {r['verify_ms']:.2f} ({r['verify_floor_ms']:.2f}) | "
                     f"{' / '.join(att)} | {sp} |")
    kb = res["kv_bytes_per_token"]
    lines += ["", "KV bytes per token (all layers): " + ", ".join(f"{n} {v / 1024:.1f} KiB" for n, v in kb.items())]
    return "\n".join(lines)


def add_args(ap) -> None:
    from quasar.run import positive_int
    ap.add_argument("--shape", default="qwen3-8b")
    ap.add_argument("--config", type=Path, action="append", default=None,
                    help="QuantSpec deployments to time (default: configs/quantspec-qwen3-8b.yaml and "
                         "configs/quasar-quantspec-qwen3-8b.yaml): their schemes, k and cache at the shape")
    ap.add_argument("--contexts", default="4096,16384,32768,65536,131072")
    ap.add_argument("--tau", action="append", default=[], metavar="NAME=TAU",
                    help="a measured tau to project the speed-up with (repeatable)")
    ap.add_argument("--iters", type=positive_int, default=30)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", type=Path, metavar="DIR")


def main(a) -> int:
    from quasar.errors import ConfigError
    from quasar.bench.speed import SHAPES
    if a.shape not in SHAPES:
        raise ConfigError(f"--shape must be one of {', '.join(SHAPES)}, got {a.shape!r}")
    contexts = sorted({int(x) for x in a.contexts.split(",") if x.strip()})
    taus = {}
    for t in a.tau:
        name, _, val = t.partition("=")
        try:
            taus[name] = float(val)
        except ValueError:
            raise ConfigError(f"--tau takes NAME=TAU, got {t!r}") from None
    configs = a.config or [Path("configs/quantspec-qwen3-8b.yaml"), Path("configs/quasar-quantspec-qwen3-8b.yaml")]
    res = run(a.shape, contexts, configs, a.device, taus, a.iters)
    md = markdown(res)
    print(md)
    if a.out is not None:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "quantspec.json").write_text(json.dumps(res, indent=2))
        (a.out / "quantspec.md").write_text(md + "\n")
        print(f"wrote {a.out / 'quantspec.json'}")
    return 0
