"""Experiment: what each small per-layer kernel costs inside the CUDA-graph step (an upper bound on
what fusing it away could save).

Each variant replaces one backend op with a stand-in that launches no kernel (a view or an
uninitialised buffer of the right shape), re-captures the step and times it; the logits are then
garbage, only the time means something. All variants of a scheme run in one process, in
alternating rounds.

    python tools/exp_ablate.py --out ablate.json
    python tools/exp_ablate.py --only "combine,split,rope" --out ablate_attn.json
    python tools/exp_ablate.py --cases bf16:1,w8a8-int8:6 --only early --out early_by_kind.json
    python tools/exp_ablate.py --cases w4a16:6 --only "int4 GEMM" --out int4_pdl.json
    python tools/exp_ablate.py --cases bf16:1,w8a8-int8:6,w4a16:6,w4a4:1 --only "L2 prefetch" --out prefetch.json
    python tools/exp_ablate.py --cases bf16:1,w8a8-int8:6,w8a8-fp8:6,w4a16:6 --only "GEMMs only (no" --out gemms_only.json
    # the row-chunked norms (session 8, not adopted): git apply tools/exp_norm_chunks.patch first
    python tools/exp_ablate.py --cases bf16:1,w8a8-int8:6,w4a16:6 --only "norm chunks,norms one,no add_rms_norm" --rounds 4 --out norm_chunks.json
    # the fused attention (applies to 6f26654, the tree before the early loads):
    git checkout 6f26654 -- ops backends quasar/model tests && git apply tools/exp_fused_attention.patch
    python tools/exp_ablate.py --only "unfused,no attention"
"""
from __future__ import annotations

import argparse
import functools
import json
import statistics

import torch


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="qwen3-8b")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cases", default="bf16:1,w8a8-int8:6",
                    help="scheme:T, comma-separated; w4a4:1 is QSpec's draft step")
    ap.add_argument("--out", default="ablate.json")
    ap.add_argument("--only", default="", help="comma-separated substrings of the variants to run")
    a = ap.parse_args()
    from quasar import backends
    from quasar.config import VerifierConfig
    from quasar.quant.format import QActivation
    from quasar.speed import SHAPES, copy_bandwidth, kv_bytes, random_step_model, time_variants, weight_bytes
    be = backends.get("cuda")
    bw = copy_bandwidth(be, 1 << 30)
    hf = SHAPES[a.shape]
    orig = dict(be.ops)

    def empty_qact(m, k, qtype, dtype, dev):
        dt = torch.float8_e4m3fn if qtype == "fp8" else torch.int8
        return QActivation(torch.empty((m, k), dtype=dt, device=dev), torch.empty((m, 1), device=dev), qtype, dtype)

    def no_silu(x):
        return x[..., : x.shape[-1] // 2]

    def no_silu_q(x, qtype):
        x2 = x.reshape(-1, x.shape[-1])
        return empty_qact(x2.shape[0], x2.shape[1] // 2, qtype, x.dtype, x.device)

    def no_rope(qkv, q_norm, k_norm, eps, cos, sin, positions, cache, layer):
        bsz, t, w = qkv.shape
        d = cache.k.shape[-1]
        h = w // d - 2 * cache.k.shape[2]
        return torch.empty((bsz, t, h, d), dtype=qkv.dtype, device=qkv.device)

    def no_attn(q, cache, layer, positions, kv_len, mask=None):
        if q.shape[1] > 16:
            return orig["attention"](q, cache, layer, positions, kv_len, mask)
        return torch.empty_like(q)

    def no_rope_attn(qkv, q_norm, k_norm, eps, cos, sin, positions, cache, layer, kv_len, mask=None):
        if qkv.shape[1] > 16:
            return orig["rope_attention"](qkv, q_norm, k_norm, eps, cos, sin, positions, cache, layer, kv_len, mask)
        return no_rope(qkv, q_norm, k_norm, eps, cos, sin, positions, cache, layer)

    def no_norm(x, delta, w, eps, qtype=None):
        if qtype:
            x2 = x.reshape(-1, x.shape[-1])
            return empty_qact(x2.shape[0], x2.shape[1], qtype, x.dtype, x.device), x
        return x, x

    def no_quant(x, qtype):
        x2 = x.reshape(-1, x.shape[-1])
        return empty_qact(x2.shape[0], x2.shape[1], qtype, x.dtype, x.device)

    attn = be.kernels.attention
    attn_attention = attn.attention

    class _NoLaunch:
        def __getitem__(self, grid):
            return lambda *args, **kw: None

    def splits(n):
        return {"default_splits": lambda bh, kv_len, dev: n}

    def splits64(bh, kv_len, dev):      # the default with 64 instead of 128 slots per split
        from quasar.ops.triton.tuning import sm_count
        return int(max(1, min(-(-2 * sm_count(dev) // bh), -(-kv_len // 64), 64)))

    variants = {"shipped": {}}
    if "rope_attention" in orig:
        # the fused attention of tools/exp_fused_attention.patch (git apply it first): against the
        # shipped composition (rope kernel, attention kernel, combine kernel) in the same process
        from quasar.ops.reference import rope_attention_with
        rope_k = be.kernels.rope.rope_kv_write
        variants["unfused: rope kernel, attention, combine kernel"] = {
            "rope_attention": rope_attention_with(rope_k, functools.partial(attn.attention, combine="kernel"))}
        variants["unfused: rope kernel, attention with merge"] = {
            "rope_attention": rope_attention_with(rope_k, attn.attention)}
        variants["no attention (rope, attention, merge)"] = {"rope_attention": no_rope_attn}
    else:
        variants["no rope_kv_write"] = {"rope_kv_write": no_rope}
        variants["no attention (both kernels)"] = {"attention": no_attn}
        variants["no attention combine kernel"] = {"@attn": {"_attn_combine_kernel": _NoLaunch()}}
        variants["attention 1 split (no combine)"] = {"@attn": splits(1)}
        variants["attention 9 splits (1 block each)"] = {"@attn": splits(9)}
        variants["attention 16 splits (engine cache 2048)"] = {"@attn": splits(16)}
        variants["no combine, no rope"] = {"rope_kv_write": no_rope,
                                          "@attn": {"_attn_combine_kernel": _NoLaunch()}}
    variants["early loads off (QUASAR_EARLY=0)"] = {"@common": {"gemm_q": False, "gemm_f": False, "attention": False}}
    variants["early loads: 8-bit GEMMs only"] = {"@common": {"gemm_f": False, "attention": False}}
    variants["early loads: float GEMMs only"] = {"@common": {"gemm_q": False, "attention": False}}
    variants["early loads: attention only"] = {"@common": {"gemm_q": False, "gemm_f": False}}
    variants["early loads: 8-bit GEMMs and attention"] = {"@common": {"gemm_f": False}}
    variants["attention BS 128"] = {"@attn": {"attention": functools.partial(attn_attention, block_s=128)}}
    variants["attention BS 128, 8 warps"] = {"@attn": {"attention": functools.partial(attn_attention, block_s=128,
                                                                                    num_warps=8)}}
    variants["attention 64 slots per split"] = {"@attn": {"default_splits": splits64}}
    variants["int4 GEMM without PDL"] = {"@int4_pdl": False}
    variants["int4 GEMM pure-Triton dequantization"] = {"@set": {("gemm_int4", "ASM_DEQUANT"): False}}
    # L2 prefetch before the PDL wait (shipped: one block in every Triton GEMM)
    pf8 = ("gemm_int8", "PREFETCH")
    variants["L2 prefetch off (QUASAR_PREFETCH=0)"] = {"@set": {pf8: {"gemm_q": 0, "gemm_f": 0},
                                                                ("gemm_int4", "PREFETCH"): 0}}
    variants["L2 prefetch: none in the float GEMMs"] = {"@set": {pf8: {"gemm_q": 1, "gemm_f": 0}}}
    variants["L2 prefetch 2 blocks, float GEMMs"] = {"@set": {pf8: {"gemm_q": 1, "gemm_f": 2}}}
    variants["L2 prefetch 2 blocks, 8-bit GEMMs"] = {"@set": {pf8: {"gemm_q": 2, "gemm_f": 1}}}
    variants["L2 prefetch 2 blocks, int4 GEMM"] = {"@set": {("gemm_int4", "PREFETCH"): 2}}
    # the norms on a step's few rows, with tools/exp_norm_chunks.patch applied: row-chunked (the
    # patch's default: chunks of 1024) or one program per row (what ships); skipped without it
    nqc = ("norm_quant", "CHUNK")
    variants["norms one program per row (norm chunks off)"] = {"@set": {nqc: 0}}
    variants["norm chunks of 512"] = {"@set": {nqc: 512}}
    variants["norm chunks of 2048"] = {"@set": {nqc: 2048}}
    variants["no silu_mul(_quant)"] = {"silu_mul": no_silu, "silu_mul_quant": no_silu_q}
    variants["no add_rms_norm"] = {"add_rms_norm": no_norm}
    variants["no o_proj input quant"] = {"quantize_per_token": no_quant}
    # the lower bound of one kernel per GEMM: every other per-layer kernel replaced by a stand-in
    # (norms, RoPE + KV write, attention, SiLU·mul, activation quantization); what remains is the
    # chain of GEMM launches (+ the final norm, embedding gather and the step's copies)
    variants["GEMMs only (no norms/rope/attention/silu/quant)"] = {
        "add_rms_norm": no_norm, "rope_kv_write": no_rope, "attention": no_attn,
        "silu_mul": no_silu, "silu_mul_quant": no_silu_q, "quantize_per_token": no_quant}
    if a.only:
        variants = {k: v for k, v in variants.items() if k == "shipped" or any(o in k for o in a.only.split(","))}
    attn_orig = {k: getattr(attn, k) for k in ("_attn_combine_kernel", "default_splits", "attention")}
    common = be.kernels._common
    early = dict(getattr(common, "EARLY", {}))
    int4_pdl = getattr(common, "INT4_PDL", False)
    # module attributes the "@set" variants change, with their shipped values
    saved = {key: getattr(getattr(be.kernels, key[0]), key[1]) for v in variants.values()
             for key in v.get("@set", {}) if hasattr(getattr(be.kernels, key[0]), key[1])}
    variants = {k: v for k, v in variants.items() if all(key in saved for key in v.get("@set", {}))}
    if not hasattr(common, "INT4_PDL"):
        variants = {k: v for k, v in variants.items() if "@int4_pdl" not in v}
    if not early:       # an older tree (the fused-attention patch): no early loads to switch
        variants = {k: v for k, v in variants.items() if "@common" not in v}
    res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "shape": a.shape, "ctx": a.ctx,
           "copy_bandwidth_GBs": bw / 1e9, "cases": []}
    for case in a.cases.split(","):
        scheme, t = case.split(":")
        t = int(t)
        if scheme == "w4a4":       # QSpec's draft step: w4a4 over the w4a16 (per-channel) weights
            m = random_step_model(hf, be, torch.bfloat16, a.ctx + 64, VerifierConfig(quant="w4a16", group_size=-1),
                                  draft_scheme="w4a4")
            mode = "draft"
        else:
            m = random_step_model(hf, be, torch.bfloat16, a.ctx + 64, VerifierConfig(quant=scheme, group_size=128))
            mode = "verify"
        floor = (weight_bytes(m) + kv_bytes(m, a.ctx)) / bw * 1e3

        def setup(patch):
            be.ops.clear()
            be.ops.update(orig)
            be.ops.update({k: v for k, v in patch.items() if not k.startswith("@")})
            for k, v in attn_orig.items():
                setattr(attn, k, v)
            for k, v in patch.get("@attn", {}).items():
                setattr(attn, k, v)
            if early:
                common.EARLY = {**early, **patch.get("@common", {})}
            if hasattr(common, "INT4_PDL"):
                common.INT4_PDL = patch.get("@int4_pdl", int4_pdl)
            for (mod, attr), v in saved.items():
                setattr(getattr(be.kernels, mod), attr, patch.get("@set", {}).get((mod, attr), v))

        times, logits = time_variants(m, be, t, a.ctx, {name: functools.partial(setup, patch)
                                                        for name, patch in variants.items()}, a.iters, a.rounds,
                                      mode)
        outs = {name: o for name, o in logits.items() if not name.startswith("no ")}
        be.ops.clear()
        be.ops.update(orig)
        for k, v in attn_orig.items():
            setattr(attn, k, v)
        if early:
            common.EARLY = dict(early)
        if hasattr(common, "INT4_PDL"):
            common.INT4_PDL = int4_pdl
        for (mod, attr), v in saved.items():
            setattr(getattr(be.kernels, mod), attr, v)
        base = statistics.median(times["shipped"])
        for name, o in outs.items():
            print(f"{name}: max |logit - shipped| {(o - outs['shipped']).abs().max().item():.3g}, "
                  f"argmax equal {bool((o.argmax(-1) == outs['shipped'].argmax(-1)).all())}", flush=True)
        rows = []
        for name in variants:
            med = statistics.median(times[name])
            rows.append({"variant": name, "ms": med, "all_ms": times[name], "saved_ms": base - med,
                         "saved_us_per_layer": (base - med) * 1e3 / m.args.num_layers, "x_floor": med / floor})
            print(f"{scheme:10s} T={t} {name:30s} {med:7.3f} ms  saves {base - med:6.3f} ms "
                  f"({(base - med) * 1e3 / m.args.num_layers:5.2f} us/layer)  {med / floor:.3f}x floor  "
                  f"{['%.3f' % x for x in times[name]]}", flush=True)
        res["cases"].append({"scheme": scheme, "T": t, "floor_ms": floor, "rows": rows})
        del m
        torch.cuda.empty_cache()
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
