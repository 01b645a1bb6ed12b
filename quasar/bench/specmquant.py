"""`python -m quasar.bench specmquant`: what a tree costs to verify, per scheme, at a real shape with
random weights (no Qwen3 / OpenPangu weights exist here), and the projected throughput of chains,
trees and SpecMQuant's hierarchy.

For each config's verifier scheme (one sequence per batch entry, paged cache of `ctx` random
tokens, every step captured in a CUDA graph where the backend captures):
  - decode T = 1 and a chain verify T = k + 1;
  - tree verify steps of N nodes (a 4-ary tree in storage order: N = 16, 32, 64 by default), the
    tree mask on the attention;
  - for a hierarchical config, the intermediate's steps (the same weights in drafter.scheme):
    T = 1 and the stage-1 tree of drafter.tree.max_nodes nodes.
Each step against its byte floor (weights + KV read once at the copy bandwidth measured in the
same run; a tree reads what a chain reads, so its floor is the decode floor).

Projected speed-up over bf16 AR decoding (tau from the real model, --tau NAME=TAU; n-gram drafts
cost no device time):

    chain / tree:  tau * t_AR / t_verify(T)
    hierarchical:  tau * t_AR / (rounds * t_intermediate(tree) + t_verify(chain))

with `rounds` the intermediate's tree steps per target step (--rounds, measured on the real model).

    python -m quasar.bench specmquant --config configs/ar-bf16-qwen3-8b.yaml --config configs/quasar-qwen3-8b.yaml \\
        --config configs/specmquant-qwen3-8b.yaml --out DIR
"""
from __future__ import annotations

import json
from pathlib import Path

import torch


def heap_parents(n: int, fanout: int = 4) -> list[int]:
    """A tree of n nodes in storage order where node m's parent is (m - 1) // fanout."""
    return [-1] + [(m - 1) // fanout for m in range(1, n)]


class Steps:
    """`batch` sequences of `ctx` cached random tokens on a paged runner (dense cache)."""

    def __init__(self, model, ctx: int, t_max: int, batch: int, block_size: int = 16):
        from quasar.engine.context import StepContext
        from quasar.engine.model_runner import ModelRunner
        self.StepContext = StepContext
        nb = -(-(ctx + t_max) // block_size)
        self.runner = ModelRunner(model, kv_blocks=nb * batch, block_size=block_size, graphs=False)
        self.runner.cache.k.normal_()
        self.runner.cache.v.normal_()
        self.ctx, self.bs, self.batch = ctx, block_size, batch
        self.tables = [list(range(b * nb, (b + 1) * nb)) for b in range(batch)]

    def chain_ctx(self, t: int):
        return self.StepContext.build(self.tables, [(self.ctx, t)] * self.batch, self.bs, self.runner.device)

    def tree_ctx(self, parents: list[int]):
        from quasar.spec_decode import tree
        n = len(parents)
        pos, slots, qs, tpos, tmask = [], [], [0], [], []
        for table in self.tables:
            r = tree.rows(self.ctx, parents, n)
            pos += r.positions
            tpos += r.storage
            tmask += r.mask
            slots += [table[p // self.bs] * self.bs + p % self.bs for p in range(self.ctx, self.ctx + n)]
            qs.append(qs[-1] + n)
        return self.StepContext.make(pos, slots, qs, self.tables, [self.ctx + n] * self.batch, n,
                                     self.runner.device, 0, tpos, tmask)

    def fn(self, ctx, mode: str):
        r = self.runner
        dev = r.device
        ids = torch.randint(0, r.model.args.vocab_size, (ctx.positions.shape[0],), device=dev)
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


def run(shape: str, configs: list[Path], device: str, ctx: int, batches: list[int], trees: list[int],
        iters: int, progress: bool = True) -> dict:
    from tqdm.auto import tqdm

    from quasar import backends, config as qcfg, quant
    from quasar.bench.quantspec import draft_weight_bytes
    from quasar.bench.speed import SHAPES, copy_bandwidth, time_device, weight_bytes
    from quasar.config import VerifierConfig
    from quasar.model.loader import build_random_model
    from quasar.spec_decode import DRAFTERS
    be = backends.get(device)
    dtype = torch.bfloat16 if be.device.type != "cpu" else torch.float32
    hf = SHAPES[shape]
    bw = copy_bandwidth(be, 1 << 30 if be.device.type != "cpu" else 1 << 24)
    rows = []
    unq = quant.default()
    for path in configs:
        cfg = qcfg.load(path)
        d = cfg.drafter
        vq = cfg.verifier.quant or unq
        kind = DRAFTERS[d.method]
        inter = kind.draft_scheme(d) if d.method == "hierarchical" else None
        k = kind.step_tokens(d) if d.method != "none" and d.tree is None else 5
        vcfg = VerifierConfig(quant=vq, group_size=cfg.verifier.group_size, hadamard=cfg.verifier.hadamard)
        model = build_random_model(hf, be, dtype, ctx + 128, vcfg, draft_scheme=inter)
        args = model.args
        wv = weight_bytes(model)
        wi = draft_weight_bytes(model) if inter else 0
        for B in tqdm(batches, desc=f"{shape} {path.stem}", disable=not progress):
            st = Steps(model, ctx, max(trees + [k + 1, d.tree.max_nodes if d.tree else 0]) + 1, B)
            kv = 2 * args.num_layers * args.num_kv_heads * args.head_dim * ctx * 2 * B
            row = {"config": path.stem, "verifier": vq, "batch": B, "context": ctx, "k": k,
                   "floor_ms": (wv + kv) / bw * 1e3}
            row["decode_ms"] = time_device(st.fn(st.chain_ctx(1), "decode"), be, iters) * 1e3
            row["chain_ms"] = time_device(st.fn(st.chain_ctx(k + 1), "verify"), be, iters) * 1e3
            for n in trees:
                row[f"tree{n}_ms"] = time_device(st.fn(st.tree_ctx(heap_parents(n)), "verify"), be, iters) * 1e3
            if inter:
                n = d.tree.max_nodes
                row.update(intermediate=inter, inter_nodes=n, min_chain=d.min_chain,
                           inter_floor_ms=(wi + kv) / bw * 1e3)
                row["inter_decode_ms"] = time_device(st.fn(st.chain_ctx(1), "draft"), be, iters) * 1e3
                row["inter_tree_ms"] = time_device(st.fn(st.tree_ctx(heap_parents(n)), "draft"), be, iters) * 1e3
                row["hier_chain_ms"] = time_device(st.fn(st.chain_ctx(d.min_chain + 1), "verify"), be, iters) * 1e3
            rows.append(row)
            del st
            if be.device.type == "cuda":
                torch.cuda.empty_cache()
        del model
        if be.device.type == "cuda":
            torch.cuda.empty_cache()
    return {"device": torch.cuda.get_device_name() if be.device.type == "cuda" else "cpu",
            "copy_bandwidth_GBs": bw / 1e9, "shape": shape, "context": ctx, "trees": trees, "rows": rows}


def project(res: dict, taus: dict, rounds: float) -> list[dict]:
    """Speed-ups over bf16 AR per scheme and batch: chain, each tree, hierarchical (formula above).
    taus: 'chain', 'tree' and 'hierarchical' (measured on the real model)."""
    from quasar import quant
    ar = {r["batch"]: r["decode_ms"] for r in res["rows"] if r["verifier"] == quant.default()}
    out = []
    for r in res["rows"]:
        base = ar.get(r["batch"])
        if base is None:
            continue
        p = {"config": r["config"], "verifier": r["verifier"], "batch": r["batch"]}
        if "chain" in taus:
            p["chain"] = taus["chain"] * base / r["chain_ms"]
        if "tree" in taus:          # tau was measured with trees of up to 16 nodes: the smallest timed
            n = min(res["trees"])
            p["tree"], p["tree_nodes"] = taus["tree"] * base / r[f"tree{n}_ms"], n
        if "hierarchical" in taus and "inter_tree_ms" in r:
            p["hierarchical"] = taus["hierarchical"] * base / (rounds * r["inter_tree_ms"] + r["hier_chain_ms"])
        out.append(p)
    return out


def markdown(res: dict, proj: list[dict], taus: dict, rounds: float) -> str:
    trees = res["trees"]
    lines = [f"{res['device']}, {res['shape']} shape (random weights), context {res['context']}; copy bandwidth "
             f"{res['copy_bandwidth_GBs']:.0f} GB/s (same run). ms per step; ratio to the chain verify in brackets; "
             "floor = weights + KV once at the copy bandwidth.", "",
             "| config (verifier) | B | floor | decode T=1 | chain T=k+1 | " + " | ".join(f"tree {n}" for n in trees) + " |",
             "|---|---|---|---|---|" + "---|" * len(trees)]
    for r in res["rows"]:
        c = r["chain_ms"]
        lines.append(f"| {r['config']} ({r['verifier']}) | {r['batch']} | {r['floor_ms']:.2f} | {r['decode_ms']:.2f} | "
                     f"{c:.2f} (k={r['k']}) | " + " | ".join(f"{r[f'tree{n}_ms']:.2f} ({r[f'tree{n}_ms'] / c:.2f}x)" for n in trees) + " |")
    hier = [r for r in res["rows"] if "inter_tree_ms" in r]
    if hier:
        lines += ["", "Hierarchical stage costs (ms):", "",
                  "| config | B | intermediate | T=1 (floor) | tree of N (N) | target chain T=min_chain+1 |", "|---|---|---|---|---|---|"]
        for r in hier:
            lines.append(f"| {r['config']} | {r['batch']} | {r['intermediate']} | {r['inter_decode_ms']:.2f} "
                         f"({r['inter_floor_ms']:.2f}) | {r['inter_tree_ms']:.2f} ({r['inter_nodes']}) | {r['hier_chain_ms']:.2f} |")
    if proj:
        lines += ["", f"Projected speed-up over bf16 AR (tau {', '.join(f'{n} {t:.2f}' for n, t in taus.items())}; "
                      f"{rounds:.2f} intermediate rounds per step): chain/tree = tau x t_AR / t_verify; hierarchical = "
                      "tau x t_AR / (rounds x t_intermediate(tree) + t_verify(chain)).", "",
                  "| config (verifier) | B | chain | tree | hierarchical |", "|---|---|---|---|---|"]
        for p in proj:
            lines.append(f"| {p['config']} ({p['verifier']}) | {p['batch']} | {p.get('chain', float('nan')):.2f}x | "
                         f"{p.get('tree', float('nan')):.2f}x ({p.get('tree_nodes', '')}) | {p.get('hierarchical', float('nan')):.2f}x |")
    return "\n".join(lines)


def add_args(ap) -> None:
    from quasar.run import positive_int
    ap.add_argument("--shape", default="qwen3-8b")
    ap.add_argument("--config", type=Path, action="append", default=None,
                    help="deployments whose verifier schemes are timed (and a hierarchical one's intermediate); "
                         "default: the bf16 AR, Quasar and SpecMQuant Qwen3-8B configs")
    ap.add_argument("--context", type=positive_int, default=1024)
    ap.add_argument("--batches", default="1")
    ap.add_argument("--trees", default="16,32,64", help="tree sizes (nodes, root included) to verify")
    ap.add_argument("--tau", action="append", default=[], metavar="NAME=TAU",
                    help="chain=, tree=, hierarchical= tau measured on the real model (projection)")
    ap.add_argument("--rounds", type=float, default=2.0, help="intermediate tree steps per target step (hierarchical)")
    ap.add_argument("--iters", type=positive_int, default=30)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--results", type=Path, metavar="FILE.json",
                    help="re-project a saved run (its specmquant.json) with --tau / --rounds; times nothing")
    ap.add_argument("--out", type=Path, metavar="DIR")


def main(a) -> int:
    from quasar.bench.speed import SHAPES
    from quasar.errors import ConfigError
    if a.shape not in SHAPES:
        raise ConfigError(f"--shape must be one of {', '.join(SHAPES)}, got {a.shape!r}")
    taus = {}
    for t in a.tau:
        name, _, val = t.partition("=")
        try:
            taus[name] = float(val)
        except ValueError:
            raise ConfigError(f"--tau takes NAME=TAU, got {t!r}") from None
    trees = sorted({int(x) for x in a.trees.split(",") if x.strip()})
    if any(not 2 <= n <= 64 for n in trees):
        raise ConfigError(f"--trees: sizes must lie in [2, 64], got {trees}")
    configs = a.config or [Path(f"configs/{n}.yaml") for n in ("ar-bf16-qwen3-8b", "quasar-qwen3-8b", "specmquant-qwen3-8b")]
    if a.results is not None:
        if not a.results.is_file():
            raise ConfigError(f"--results: {a.results} does not exist (a specmquant.json written by --out)")
        res = json.loads(a.results.read_text())
    else:
        res = run(a.shape, configs, a.device, a.context, [int(b) for b in a.batches.split(",")], trees, a.iters)
    proj = project(res, taus, a.rounds)
    res["projection"] = {"taus": taus, "rounds": a.rounds, "rows": proj}
    md = markdown(res, proj, taus, a.rounds)
    print(md)
    if a.out is not None:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "specmquant.json").write_text(json.dumps(res, indent=2))
        (a.out / "specmquant.md").write_text(md + "\n")
        print(f"wrote {a.out / 'specmquant.json'}")
    return 0
