"""`quasar serve`: the real server process, driven by the official `openai` client (and raw httpx
for malformed input). Oracle: the offline `LLM.generate` of the same deployment, token for
token (greedy), which the engine tests tie to transformers' `generate`.

A tiny random llama with SmolLM2's tokenizer serves most tests (fast, real byte-level BPE text);
the real SmolLM2 serves the completion and chat parity test.
"""
from __future__ import annotations

import asyncio
import json
import signal
import time

import httpx
import pytest

from serve_util import Server, tiny_with_tokenizer

openai = pytest.importorskip("openai", reason="the serve tests need the dev extra (openai client)")

NAME = "tiny"
PROMPTS = ["The quick brown fox", "Once upon a time", "def fibonacci(n):", "Grüße aus 東京 🚀"]


def tiny_cfg(model, **runtime):
    return {"model": str(model), "device": "cpu", "max_seq_len": 2048, "verifier": {"quant": "w8a8-int8"},
            "drafter": {"method": "ngram", "num_tokens": 4, "adaptive": False},
            "sampling": {"max_new_tokens": 24},
            "runtime": dict({"max_batch_size": 8}, **runtime),
            "server": {"served_model_name": NAME}}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, smollm2_dir):
    return tiny_with_tokenizer(tmp_path_factory.mktemp("serve_tiny"), smollm2_dir)


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    s = Server(tiny_cfg(tiny_model), tmp_path_factory.mktemp("srvA")).start()
    yield s
    assert s.stop() == 0, s.log()


@pytest.fixture(scope="module")
def offline(tiny_model):
    from quasar.config import from_dict
    from quasar.engine import LLM
    cfg = tiny_cfg(tiny_model)
    cfg.pop("server")
    return LLM(from_dict(cfg))


def sp(n, **kw):
    from quasar.spec_decode.sampling import SamplingParams
    return SamplingParams(max_tokens=n, **kw)


def client(s: Server, **kw):
    return openai.OpenAI(base_url=s.url + "/v1", api_key=kw.pop("api_key", "unused"), max_retries=0, **kw)


def extra(obj, key):
    return (obj.model_extra or {}).get(key)


# ---------------------------------------------------------------- parity with the offline engine

def test_completion_greedy_equals_offline(server, offline):
    c = client(server)
    for prompt in PROMPTS[:2]:
        want = offline.generate(prompt, sp(20), chat=False)
        r = c.completions.create(model=NAME, prompt=prompt, max_tokens=20, temperature=0,
                                 extra_body={"return_token_ids": True})
        assert r.choices[0].text == want.text
        assert extra(r.choices[0], "token_ids") == want.token_ids
        assert extra(r, "prompt_token_ids") == want.prompt_token_ids
        assert r.usage.prompt_tokens == len(want.prompt_token_ids)
        assert r.usage.completion_tokens == len(want.token_ids) == 20
        assert r.choices[0].finish_reason == "length"
        text, ids, last = "", [], None
        for ch in c.completions.create(model=NAME, prompt=prompt, max_tokens=20, temperature=0, stream=True,
                                       extra_body={"return_token_ids": True}):
            text += ch.choices[0].text
            ids += extra(ch.choices[0], "token_ids") or []
            last = ch
        assert (text, ids) == (want.text, want.token_ids)
        assert last.choices[0].finish_reason == "length" and last.usage.completion_tokens == 20


def test_chat_greedy_equals_offline(server, offline):
    c = client(server)
    prompt = PROMPTS[3]
    want = offline.generate(prompt, sp(16), chat=True)
    r = c.chat.completions.create(model=NAME, messages=[{"role": "user", "content": prompt}], max_tokens=16,
                                  temperature=0, extra_body={"return_token_ids": True})
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == want.text
    assert extra(r.choices[0], "token_ids") == want.token_ids
    assert r.usage.prompt_tokens == len(want.prompt_token_ids)
    chunks = list(c.chat.completions.create(model=NAME, messages=[{"role": "user", "content": prompt}],
                                            max_tokens=16, temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == want.text
    assert all("\ufffd" not in (ch.choices[0].delta.content or "") for ch in chunks[:-1])
    assert chunks[-1].usage.total_tokens == len(want.prompt_token_ids) + len(want.token_ids)


def test_seeded_sampling_equals_offline(server, offline):
    """A sampled request with a seed draws the same tokens served or offline (position-keyed
    noise: independent of the batch)."""
    want = offline.generate(PROMPTS[2], sp(16, temperature=0.9, top_p=0.95, top_k=50, seed=1234), chat=False)
    r = client(server).completions.create(model=NAME, prompt=PROMPTS[2], max_tokens=16, temperature=0.9,
                                          top_p=0.95, seed=1234, extra_body={"top_k": 50, "return_token_ids": True})
    assert extra(r.choices[0], "token_ids") == want.token_ids


def test_stop_string_cuts_the_text(server, offline):
    want = offline.generate(PROMPTS[0], sp(24), chat=False)
    stop = want.text[8:11]                          # a piece from the middle of the greedy text
    assert stop and stop in want.text
    cut = want.text[:want.text.index(stop)]
    tok = offline.tokenizer
    upto = next(i + 1 for i in range(len(want.token_ids)) if stop in tok.decode(want.token_ids[:i + 1]))
    c = client(server)
    r = c.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=24, temperature=0, stop=[stop, "@@@@"],
                             extra_body={"return_token_ids": True})
    assert r.choices[0].text == cut and r.choices[0].finish_reason == "stop"
    assert extra(r.choices[0], "token_ids") == want.token_ids[:upto]     # up to the token completing the stop
    assert r.usage.completion_tokens == upto
    text = "".join(ch.choices[0].text for ch in c.completions.create(
        model=NAME, prompt=PROMPTS[0], max_tokens=24, temperature=0, stop=stop, stream=True))
    assert text == cut


def test_32_concurrent_streams_equal_offline(server, offline):
    prompts = [f"Request {i}: write about the number {i * 7}" for i in range(32)]
    want = offline.generate(prompts, sp(24), chat=False)

    async def one(c, p):
        text, ids = "", []
        stream = await c.completions.create(model=NAME, prompt=p, max_tokens=24, temperature=0, stream=True,
                                            extra_body={"return_token_ids": True})
        async for ch in stream:
            text += ch.choices[0].text
            ids += extra(ch.choices[0], "token_ids") or []
        return text, ids

    async def main():
        c = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        return await asyncio.gather(*(one(c, p) for p in prompts))

    got = asyncio.run(main())
    assert [g[1] for g in got] == [w.token_ids for w in want]
    assert [g[0] for g in got] == [w.text for w in want]
    m = server.metrics()
    assert m["quasar:num_requests_running"] == 0
    assert m["quasar:mean_accepted_length"] >= 1.0
    assert m["quasar:time_to_first_token_seconds_count"] >= 32


# ---------------------------------------------------------------- cancellation

def test_disconnect_aborts_and_frees_blocks(server):
    before = server.metrics()
    with httpx.Client(timeout=30) as h:
        with h.stream("POST", server.url + "/v1/completions",
                      json={"model": NAME, "prompt": "Count forever:", "max_tokens": 2000, "ignore_eos": True,
                            "stream": True}) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            got = [next(lines) for _ in range(6)]          # a few chunks in, then hang up
            assert any(x.startswith("data: {") for x in got)
    deadline = time.time() + 10
    while time.time() < deadline:
        m = server.metrics()
        if m.get("quasar:request_success_total:abort", 0) > before.get("quasar:request_success_total:abort", 0):
            break
        time.sleep(0.1)
    assert m.get("quasar:request_success_total:abort", 0) == before.get("quasar:request_success_total:abort", 0) + 1
    assert m["quasar:kv_blocks_used"] == 0 and m["quasar:num_requests_running"] == 0
    assert m["quasar:generation_tokens_total"] - before["quasar:generation_tokens_total"] < 2000


# ---------------------------------------------------------------- bad input

def post(s, path, body, headers=None):
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(s.url + path, content=data, headers={"Content-Type": "application/json", **(headers or {})},
                      timeout=30)


def assert_error(r, status, *words, param=None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"}
    for w in words:
        assert w in err["message"], err["message"]
    if param is not None:
        assert err["param"] == param
    assert "Traceback" not in r.text


def test_malformed_json_is_400(server):
    assert_error(post(server, "/v1/completions", b'{"model": "tiny", "prompt": '), 400, "not valid JSON")


def test_a_body_that_is_not_json_is_400(server):
    r = httpx.post(server.url + "/v1/completions", data={"model": NAME, "prompt": "hi"}, timeout=30)  # a form
    assert_error(r, 400, "JSON object", "Content-Type: application/json")
    assert_error(post(server, "/v1/completions", [1, 2]), 400, "JSON object")


def test_wrong_type_names_the_field(server):
    r = post(server, "/v1/completions", {"model": NAME, "prompt": "hi", "max_tokens": "many"})
    assert_error(r, 400, "max_tokens", param="max_tokens")
    r = post(server, "/v1/chat/completions", {"model": NAME, "messages": [{"role": "robot", "content": "x"}]})
    assert_error(r, 400, "role", param="messages.0.role")
    assert_error(post(server, "/v1/completions", {"model": NAME}), 400, "missing", "prompt", param="prompt")


def test_unknown_and_unsupported_parameters_are_400(server):
    assert_error(post(server, "/v1/completions", {"model": NAME, "prompt": "hi", "max_tokenz": 4}),
                 400, "max_tokenz", param="max_tokenz")
    with pytest.raises(openai.BadRequestError) as e:
        client(server).completions.create(model=NAME, prompt="hi", n=2)
    assert e.value.status_code == 400 and "n=2" in e.value.message
    assert_error(post(server, "/v1/completions", {"model": NAME, "prompt": "hi", "presence_penalty": 1.0}),
                 400, "presence_penalty", param="presence_penalty")


def test_prompt_over_max_seq_len_is_400(server):
    with pytest.raises(openai.BadRequestError) as e:
        client(server).completions.create(model=NAME, prompt=" hello" * 2100, max_tokens=4)
    assert "max_seq_len is 2048" in e.value.message
    r = post(server, "/v1/completions", {"model": NAME, "prompt": "hi", "max_tokens": 4000})
    assert_error(r, 400, "2048", "max_tokens", param="max_tokens")
    r = post(server, "/v1/completions", {"model": NAME, "prompt": [1, 2, 99999999]})
    assert_error(r, 400, "outside the vocabulary", param="prompt")


def test_unknown_model_is_404(server):
    with pytest.raises(openai.NotFoundError) as e:
        client(server).completions.create(model="gpt-5", prompt="hi")
    assert "gpt-5" in e.value.message and NAME in e.value.message
    assert_error(httpx.get(server.url + "/v1/nothing-here"), 404, "/v1/nothing-here")


def test_models_and_health(server):
    models = client(server).models.list().data
    assert [m.id for m in models] == [NAME]
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}


# ---------------------------------------------------------------- auth, overload, drain

@pytest.fixture(scope="module")
def guarded(tiny_model, tmp_path_factory):
    """A small server: 2 in the batch, 4 may wait, an API key, a short drain."""
    cfg = tiny_cfg(tiny_model, max_batch_size=2)
    cfg["drafter"] = {"method": "none"}             # one token per step: a long request stays long
    cfg["server"].update(api_key="sekret", max_waiting=4, shutdown_timeout=1.5)
    s = Server(cfg, tmp_path_factory.mktemp("srvB")).start()
    yield s
    s.stop()


def test_api_key(guarded):
    for key in (None, "wrong"):
        h = {"Authorization": f"Bearer {key}"} if key else {}
        assert_error(post(guarded, "/v1/completions", {"model": NAME, "prompt": "hi"}, h), 401, "API key")
    assert_error(post(guarded, "/v1/completions", b"{not json"), 401, "API key")     # before the body
    with pytest.raises(openai.AuthenticationError):
        client(guarded, api_key="wrong").models.list()
    r = client(guarded, api_key="sekret").completions.create(model=NAME, prompt="hi", max_tokens=3)
    assert r.usage.completion_tokens == 3
    assert httpx.get(guarded.url + "/health").status_code == 200       # open, like /metrics


def test_bounded_load_nothing_lost(guarded):
    """200 requests at once against 2 batch slots + 4 waiting: each gets a full response or a 503
    with Retry-After, and the counts add up (also in /metrics)."""
    before = guarded.metrics()
    N = 200

    async def one(h, i):
        r = await h.post("/v1/completions", json={"model": NAME, "prompt": f"item {i}", "max_tokens": 6,
                                                  "ignore_eos": True})
        return r.status_code, r.json(), r.headers.get("retry-after")

    async def main():
        async with httpx.AsyncClient(base_url=guarded.url, headers={"Authorization": "Bearer sekret"}, timeout=120,
                                     limits=httpx.Limits(max_connections=N)) as h:
            return await asyncio.gather(*(one(h, i) for i in range(N)))

    res = asyncio.run(main())
    ok = [b for st, b, _ in res if st == 200]
    busy = [(b, ra) for st, b, ra in res if st == 503]
    assert len(ok) + len(busy) == N, sorted({st for st, _, _ in res})
    assert ok and busy
    assert all(b["usage"]["completion_tokens"] == 6 and b["choices"][0]["finish_reason"] == "length" for b in ok)
    assert all(ra == "1" and "max_waiting" in b["error"]["message"] for b, ra in busy)
    m = guarded.metrics()
    assert m["quasar:request_success_total:length"] - before.get("quasar:request_success_total:length", 0) == len(ok)
    assert m["quasar:request_rejected_total"] - before.get("quasar:request_rejected_total", 0) == len(busy)


def test_sigterm_drains_then_exits_0(guarded):
    """SIGTERM: a short stream in flight finishes; one still running at the deadline
    (server.shutdown_timeout) ends with finish_reason "abort" and [DONE]; new requests are
    refused; the process exits 0."""
    started = {}

    async def stream(h, n):
        lines = []
        async with h.stream("POST", "/v1/completions", json={"model": NAME, "prompt": f"Drain {n}",
                                                              "max_tokens": n, "ignore_eos": True, "stream": True}) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    started[n] = True
                lines.append(line)
        return [json.loads(x[6:]) for x in lines if x.startswith("data: {")], lines

    async def main():
        async with httpx.AsyncClient(base_url=guarded.url, headers={"Authorization": "Bearer sekret"},
                                     timeout=60) as h:
            tasks = [asyncio.create_task(stream(h, n)) for n in (30, 2000)]
            while len(started) < 2:
                await asyncio.sleep(0.01)
            guarded.proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.3)
            try:                                    # refused: the listening socket is closed, or
                r2 = await h.post("/v1/completions", json={"model": NAME, "prompt": "x"})
                assert r2.status_code == 503        # a connection that got in is answered 503
            except httpx.TransportError:
                pass
            return await asyncio.gather(*tasks)

    (short, short_lines), (long, long_lines) = asyncio.run(main())
    assert short[-1]["choices"][0]["finish_reason"] == "length" and short[-1]["usage"]["completion_tokens"] == 30
    assert long[-1]["choices"][0]["finish_reason"] == "abort"
    assert 0 < long[-1]["usage"]["completion_tokens"] < 2000
    assert "data: [DONE]" in short_lines and "data: [DONE]" in long_lines
    assert guarded.proc.wait(30) == 0
    assert "stopped" in guarded.log()


# ---------------------------------------------------------------- start-up errors

def test_bad_config_key_is_one_line(tiny_model, tmp_path):
    import subprocess
    import sys
    cfg = tiny_cfg(tiny_model)
    cfg["server"]["max_wating"] = 3
    p = tmp_path / "bad.yaml"
    import yaml
    p.write_text(yaml.safe_dump(cfg))
    r = subprocess.run([sys.executable, "-m", "quasar.serve", "--config", str(p)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "max_wating" in r.stderr and "max_waiting" in r.stderr and "Traceback" not in r.stderr


def test_port_in_use_is_one_line(server, tiny_model, tmp_path):
    import subprocess
    import sys
    port = server.url.rsplit(":", 1)[1]
    r = subprocess.run([sys.executable, "-m", "quasar.serve", "--model", str(tiny_model), "--device", "cpu",
                        "--port", port], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "cannot listen" in r.stderr and "--port" in r.stderr
    assert "Traceback" not in r.stderr


# ---------------------------------------------------------------- the real model

@pytest.mark.slow
def test_smollm2_served_equals_offline(smollm2_dir, tmp_path):
    from quasar.config import from_dict
    from quasar.engine import LLM
    cfg = {"model": "smollm2-135m-instruct", "device": "cpu", "max_seq_len": 512,
           "verifier": {"quant": "w8a8-int8"}, "drafter": {"method": "ngram", "num_tokens": 5, "adaptive": False},
           "runtime": {"max_batch_size": 4}}
    s = Server(dict(cfg, server={"served_model_name": "smollm2"}), tmp_path).start()
    try:
        llm = LLM(from_dict(cfg))
        c = client(s)
        q = "What is the capital of France? Answer in one sentence."
        want_chat = llm.generate(q, sp(24), chat=True)
        r = c.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": q}], max_tokens=24,
                                      temperature=0, extra_body={"return_token_ids": True})
        assert extra(r.choices[0], "token_ids") == want_chat.token_ids
        assert r.choices[0].message.content == want_chat.text and "Paris" in want_chat.text
        streamed = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": q}], max_tokens=24, temperature=0, stream=True))
        assert streamed == want_chat.text
        p = "The three primary colors are"
        want = llm.generate(p, sp(16), chat=False)
        r = c.completions.create(model="smollm2", prompt=p, max_tokens=16, temperature=0,
                                 extra_body={"return_token_ids": True})
        assert (r.choices[0].text, extra(r.choices[0], "token_ids")) == (want.text, want.token_ids)
        assert "".join(ch.choices[0].text for ch in c.completions.create(
            model="smollm2", prompt=p, max_tokens=16, temperature=0, stream=True)) == want.text
    finally:
        assert s.stop() == 0


# ---------------------------------------------------------------- the serving benchmark

def test_serving_benchmark_runs_against_the_server(server, tmp_path):
    import subprocess
    import sys
    out = tmp_path / "sb"
    r = subprocess.run([sys.executable, "-m", "quasar.bench", "serve", "--url", server.url, "--request-rate",
                        "40,inf", "--num-prompts", "6", "--max-tokens", "8", "--endpoint", "completions",
                        "--label", "t", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = json.loads((out / "serve.json").read_text())
    assert [row["request_rate"] for row in rows] == [40.0, "inf"]
    for row in rows:
        assert row["completed"] == 6 and row["failed"] == 0
        assert row["total_output_tokens"] == 6 * 8
        assert row["tau"] is not None and row["tau"] >= 1.0
        assert 0 < row["ttft_ms"]["median"] <= row["e2e_ms"]["median"]
    assert (out / "serve.md").read_text().count("\n| t |") == 2
    assert (out / "serve.png").stat().st_size > 1000


def test_health_is_503_until_loaded_then_200(tiny_model):
    """The app answers while the model loads: /health and /v1 are 503 (with Retry-After), then
    200 once the engine thread has built the LLM (in process, through starlette's TestClient)."""
    import contextlib
    import threading

    from fastapi.testclient import TestClient

    from quasar.config import from_dict
    from quasar.engine import LLM
    from quasar.serve.app import ServerState, build_app
    from quasar.serve.async_engine import AsyncEngine
    from quasar.serve.metrics import Metrics

    cfg = from_dict({k: v for k, v in tiny_cfg(tiny_model).items() if k != "server"})
    gate = threading.Event()

    def load():
        gate.wait(60)
        return LLM(cfg)

    eng = AsyncEngine(load, Metrics(NAME), max_waiting=8)
    state = ServerState(engine=eng, metrics=eng.metrics, model_name=NAME, max_seq_len=cfg.max_seq_len,
                        sampling_defaults=cfg.sampling)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        import asyncio
        eng.start(asyncio.get_running_loop(), lambda: None)
        yield
        eng.stop()

    with TestClient(build_app(state, lifespan)) as tc:
        r = tc.get("/health")
        assert r.status_code == 503 and r.json() == {"status": "loading"}
        r = tc.post("/v1/completions", json={"model": NAME, "prompt": "hi"})
        assert_error(r, 503, "loading")
        assert r.headers["retry-after"] == "1"
        gate.set()
        assert eng.ready.wait(120)
        eng.draining = True
        assert_error(tc.post("/v1/completions", json={"model": NAME, "prompt": "hi"}), 503, "shutting down")
        assert tc.get("/health").json() == {"status": "draining"}
        eng.draining = False
        assert tc.get("/health").status_code == 200
        r = tc.post("/v1/completions", json={"model": NAME, "prompt": "hi", "max_tokens": 3})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


@pytest.mark.parametrize("chat", [True, False])
def test_preformatted_chunks_equal_the_pydantic_models(chat):
    """The per-token fast path (ChunkFormat) writes the JSON the response models write."""
    from quasar.serve import protocol as P
    from quasar.serve.app import ChunkFormat, _sse
    text = 'multi\nline "quoted" \\ 東京 🚀'
    f = ChunkFormat("chat.completion.chunk" if chat else "text_completion", "rid-1", "m", chat)
    if chat:
        ref = P.ChatCompletionChunk(id="rid-1", model="m", choices=[P.ChatChunkChoice(delta=P.Delta(content=text))])
    else:
        ref = P.CompletionResponse(id="rid-1", model="m", choices=[P.CompletionChoice(text=text)])
    got, want = json.loads(f(text)[6:]), json.loads(_sse(ref)[6:])
    want["created"] = got["created"]
    assert got == want and f(text).endswith("\n\n") and f(text).startswith("data: {")
