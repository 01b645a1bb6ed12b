"""Serving benchmark (after vLLM's benchmark_serving): streaming requests against any
OpenAI-compatible server, arriving as a Poisson process (or all at once, rate `inf`).

    python -m quasar.bench serve --url http://127.0.0.1:8000 --prompts-file benchmarks/data/specbench/question.jsonl \\
        --request-rate 1,4,16,64,inf --num-prompts 200 --label quasar --out results/serve

Per request: TTFT (arrival to the first chunk carrying text), ITL (gaps between text chunks:
with speculative decoding a chunk can carry several tokens), TPOT ((latency - TTFT) / (output
tokens - 1), output tokens from the final chunk's usage), end-to-end latency. Per rate: request
throughput and output tokens/s over the run's wall time, and mean / median / p99 of each
latency. tau comes from the server's /metrics when it has Quasar's counters (or vLLM's
spec-decode counters); otherwise it is left empty.

--out DIR keeps every run in DIR/serve.json (a rerun of the same label and rate replaces its
row), and rewrites DIR/serve.md (the table) and DIR/serve.png (TTFT / TPOT vs request rate per
label; needs matplotlib).
"""
from __future__ import annotations

import asyncio
import json
import math
import random
import re
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional


@dataclass
class RequestResult:
    ok: bool = False
    status: int = 0
    error: str = ""
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = float("nan")
    latency: float = float("nan")
    itl: list = field(default_factory=list)

    @property
    def tpot(self) -> float:
        if self.output_tokens > 1 and self.ttft == self.ttft:
            return (self.latency - self.ttft) / (self.output_tokens - 1)
        return float("nan")


def _sse_lines(chunk_text: str, buf: list[str]):
    """Complete `data:` payloads from a stream of text pieces."""
    buf.append(chunk_text)
    data = "".join(buf)
    *events, rest = data.split("\n\n")
    buf[:] = [rest]
    for ev in events:
        for line in ev.splitlines():
            if line.startswith("data:"):
                yield line[5:].strip()


async def one_request(client, url: str, body: dict, endpoint: str) -> RequestResult:
    res = RequestResult()
    t0 = time.perf_counter()
    last = None
    chunks = 0
    try:
        async with client.stream("POST", url, json=body) as r:
            res.status = r.status_code
            if r.status_code != 200:
                res.error = (await r.aread()).decode(errors="replace")[:300]
                return res
            buf: list[str] = []
            done = False
            async for piece in r.aiter_text():
                for payload in _sse_lines(piece, buf):
                    if payload == "[DONE]":
                        done = True
                        continue
                    obj = json.loads(payload)
                    if "error" in obj:
                        res.error = json.dumps(obj["error"])[:300]
                        return res
                    if obj.get("usage"):
                        res.output_tokens = obj["usage"].get("completion_tokens", 0)
                        res.prompt_tokens = obj["usage"].get("prompt_tokens", 0)
                    for ch in obj.get("choices") or []:
                        text = ch.get("text") if endpoint == "completions" else (ch.get("delta") or {}).get("content")
                        if text:
                            now = time.perf_counter()
                            if last is None:
                                res.ttft = now - t0
                            else:
                                res.itl.append(now - last)
                            last = now
                            chunks += 1
            res.latency = time.perf_counter() - t0
            res.ok = done
            if not res.output_tokens:
                res.output_tokens = chunks          # a server that sends no usage: one token per chunk
            if not done:
                res.error = "the stream ended without data: [DONE]"
    except Exception as e:          # noqa: BLE001 - a failed request is a result, not a crash
        res.error = f"{type(e).__name__}: {e}"
    return res


def read_metrics(client_sync, base: str) -> dict[str, float]:
    """Counter totals from /metrics (labels summed); {} when the server has none."""
    try:
        r = client_sync.get(base + "/metrics", timeout=10)
    except Exception:               # noqa: BLE001
        return {}
    if r.status_code != 200:
        return {}
    out: dict[str, float] = {}
    for line in r.text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        m = re.match(r"^([^\s{]+)(\{[^}]*\})?\s+(\S+)", line)
        if m:
            try:
                out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(3))
            except ValueError:
                pass
    return out


def tau_between(before: dict, after: dict) -> Optional[float]:
    """tau over the run: Quasar's emitted / verify-step counters, else vLLM's accepted / drafts."""
    d = lambda k: after.get(k, 0.0) - before.get(k, 0.0)        # noqa: E731
    steps = d("quasar:spec_decode_num_verify_steps_total")
    if steps > 0:
        return d("quasar:spec_decode_num_emitted_tokens_total") / steps
    drafts = d("vllm:spec_decode_num_drafts_total")
    if drafts > 0:
        return 1 + d("vllm:spec_decode_num_accepted_tokens_total") / drafts
    return None


def _stats(xs: list[float]) -> dict:
    xs = sorted(x for x in xs if x == x)
    if not xs:
        return {"mean": None, "median": None, "p99": None}
    p99 = xs[min(len(xs) - 1, math.ceil(0.99 * len(xs)) - 1)]
    return {"mean": statistics.fmean(xs) * 1e3, "median": statistics.median(xs) * 1e3, "p99": p99 * 1e3}


async def run_rate(base: str, model: str, prompts: list[str], rate: float, *, endpoint: str, max_tokens: int,
                   api_key: Optional[str], ignore_eos: bool, seed: int, max_concurrency: Optional[int],
                   progress: bool = True) -> tuple[list[RequestResult], float]:
    import httpx
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    path = "/v1/completions" if endpoint == "completions" else "/v1/chat/completions"
    rng = random.Random(seed)
    sem = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(prompts), desc=f"rate {rate:g}", unit="req", leave=False)

    def body(p: str) -> dict:
        b = {"model": model, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
             "stream_options": {"include_usage": True}}
        if ignore_eos:
            b["ignore_eos"] = True
        if endpoint == "completions":
            b["prompt"] = p
        else:
            b["messages"] = [{"role": "user", "content": p}]
        return b

    limits = httpx.Limits(max_connections=max(len(prompts), 1), max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=base, headers=headers, limits=limits,
                                 timeout=httpx.Timeout(None, connect=30)) as client:
        async def go(p: str) -> RequestResult:
            if sem:
                async with sem:
                    r = await one_request(client, path, body(p), endpoint)
            else:
                r = await one_request(client, path, body(p), endpoint)
            if bar:
                bar.update(1)
            return r

        tasks = []
        t0 = time.perf_counter()
        for p in prompts:
            tasks.append(asyncio.create_task(go(p)))
            if rate != float("inf"):
                await asyncio.sleep(rng.expovariate(rate))
        results = await asyncio.gather(*tasks)
        wall = time.perf_counter() - t0
    if bar:
        bar.close()
    return list(results), wall


def summarize(results: list[RequestResult], wall: float, rate: float, tau: Optional[float], label: str) -> dict:
    ok = [r for r in results if r.ok]
    out_tok = sum(r.output_tokens for r in ok)
    itl = [x for r in ok for x in r.itl]
    errors = [r.error or f"HTTP {r.status}" for r in results if not r.ok]
    return {
        "label": label, "request_rate": rate, "num_requests": len(results), "completed": len(ok),
        "failed": len(errors), "errors": sorted(set(errors))[:5], "duration_s": wall,
        "request_throughput": len(ok) / wall, "output_tok_s": out_tok / wall,
        "total_output_tokens": out_tok, "total_prompt_tokens": sum(r.prompt_tokens for r in ok),
        "ttft_ms": _stats([r.ttft for r in ok]), "tpot_ms": _stats([r.tpot for r in ok]),
        "itl_ms": _stats(itl), "e2e_ms": _stats([r.latency for r in ok]), "tau": tau,
    }


def _f(x, nd=1) -> str:
    return "–" if x is None else f"{x:.{nd}f}"


def markdown(rows: list[dict]) -> str:
    head = ("| label | rate (req/s) | done / sent | req/s | out tok/s | TTFT mean / med / p99 (ms) | "
            "TPOT mean / med / p99 (ms) | ITL mean / med / p99 (ms) | tau |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        t, p, i = r["ttft_ms"], r["tpot_ms"], r["itl_ms"]
        lines.append(
            f"| {r['label']} | {r['request_rate']:g} | {r['completed']} / {r['num_requests']} | "
            f"{r['request_throughput']:.2f} | {r['output_tok_s']:.1f} | "
            f"{_f(t['mean'])} / {_f(t['median'])} / {_f(t['p99'])} | {_f(p['mean'], 2)} / {_f(p['median'], 2)} / "
            f"{_f(p['p99'], 2)} | {_f(i['mean'], 2)} / {_f(i['median'], 2)} / {_f(i['p99'], 2)} | "
            f"{_f(r['tau'], 2)} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    finite = [r["request_rate"] for r in rows if r["request_rate"] != float("inf")]
    inf_x = 2 * max(finite) if finite else 1.0
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for label in dict.fromkeys(r["label"] for r in rows):
        rs = sorted((r for r in rows if r["label"] == label), key=lambda r: r["request_rate"])
        xs = [inf_x if r["request_rate"] == float("inf") else r["request_rate"] for r in rs]
        for ax, key, title in ((axes[0], "ttft_ms", "TTFT (ms)"), (axes[1], "tpot_ms", "TPOT (ms)")):
            line, = ax.plot(xs, [r[key]["median"] for r in rs], marker="o", label=f"{label} median")
            ax.plot(xs, [r[key]["p99"] for r in rs], ls="--", color=line.get_color(), label=f"{label} p99")
            ax.set_title(title)
        axes[2].plot(xs, [r["output_tok_s"] for r in rs], marker="o", label=label)
        axes[2].set_title("output tokens/s")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("request rate (req/s; rightmost = inf)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def parse_rates(text: str) -> list[float]:
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        v = float("inf") if part in ("inf", "infinity") else float(part)
        if not v > 0:
            raise ValueError(f"a request rate must be > 0 or inf, got {part!r}")
        out.append(v)
    return out


def main(a) -> int:
    import httpx

    from quasar.errors import ConfigError
    from quasar.run import default_prompts_file, read_prompts_file
    base = a.url.rstrip("/")
    if base.endswith("/v1"):
        base = base[:-3]
    try:
        rates = parse_rates(a.request_rate)
    except ValueError as e:
        raise ConfigError(f"--request-rate: {e}") from None
    recs = read_prompts_file(a.prompts_file or default_prompts_file())
    prompts = [recs[i % len(recs)]["prompt"] for i in range(a.num_prompts)]
    headers = {"Authorization": f"Bearer {a.api_key}"} if a.api_key else {}
    with httpx.Client(headers=headers, timeout=30) as h:
        try:
            models = h.get(base + "/v1/models")
        except httpx.HTTPError as e:
            raise ConfigError(f"cannot reach {base}/v1/models ({type(e).__name__}: {e}); is the server up?") from None
        if models.status_code != 200:
            raise ConfigError(f"{base}/v1/models answered {models.status_code}: {models.text[:200]}")
        model = a.model or models.json()["data"][0]["id"]
        label = a.label or model
        rows = []
        for rate in rates:
            before = read_metrics(h, base)
            results, wall = asyncio.run(run_rate(base, model, prompts, rate, endpoint=a.endpoint,
                                                 max_tokens=a.max_tokens, api_key=a.api_key,
                                                 ignore_eos=a.ignore_eos, seed=a.seed,
                                                 max_concurrency=a.max_concurrency))
            tau = tau_between(before, read_metrics(h, base))
            row = summarize(results, wall, rate, tau, label)
            row.update(model=model, endpoint=a.endpoint, max_tokens=a.max_tokens, url=base,
                       date=time.strftime("%Y-%m-%d"))
            rows.append(row)
            print(markdown([row]).splitlines()[-1], flush=True)
    print()
    print(markdown(rows))
    if a.out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        f = out / "serve.json"
        old = [dict(r, request_rate=float(r["request_rate"])) for r in json.loads(f.read_text())] if f.is_file() else []
        keep = [r for r in old if (r["label"], r["request_rate"]) not in {(x["label"], x["request_rate"]) for x in rows}]
        allrows = keep + rows
        # strict JSON: the rate inf is written as the string "inf"
        f.write_text(json.dumps([dict(r, request_rate=r["request_rate"] if r["request_rate"] != float("inf") else "inf")
                                 for r in allrows], indent=1, allow_nan=False))
        (out / "serve.md").write_text(markdown(allrows) + "\n")
        made = plot(allrows, out / "serve.png")
        print(f"wrote {f}, {out / 'serve.md'}" + (f", {out / 'serve.png'}" if made else " (no matplotlib: no plot)"))
    return 0 if all(r["completed"] for r in rows) else 1


def add_args(ap) -> None:
    from quasar.run import DEFAULT_PROMPTS_REL, positive_int
    ap.add_argument("--url", required=True, help="the server's base URL, e.g. http://127.0.0.1:8000")
    ap.add_argument("--prompts-file", type=Path, default=None,
                    help=f"JSONL, Spec-Bench format (default: the shipped {DEFAULT_PROMPTS_REL})")
    ap.add_argument("--request-rate", default="inf",
                    help="requests/s of the Poisson arrivals, comma-separated for a sweep (inf = all at once)")
    ap.add_argument("--num-prompts", type=positive_int, default=100, help="requests per rate (prompts cycle)")
    ap.add_argument("--max-tokens", type=positive_int, default=256)
    ap.add_argument("--endpoint", choices=("completions", "chat"), default="chat")
    ap.add_argument("--model", help="model name to send (default: the first of GET /v1/models)")
    ap.add_argument("--api-key", help="sent as Authorization: Bearer KEY")
    ap.add_argument("--ignore-eos", action="store_true", help="every request generates max_tokens (Quasar, vLLM)")
    ap.add_argument("--max-concurrency", type=positive_int, default=None, help="cap on requests in flight")
    ap.add_argument("--seed", type=int, default=0, help="seed of the arrival times")
    ap.add_argument("--label", help="name of this run in the table and plot (default: the model)")
    ap.add_argument("--out", type=Path, help="directory: serve.json (accumulated), serve.md, serve.png")
