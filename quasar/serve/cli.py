"""python -m quasar.serve --config F.yaml [--host H] [--port P] [--api-key KEY] [--served-model-name NAME]

Starts the HTTP server at once (GET /health answers 503 while the model loads, then 200) and
loads the deployment in the engine thread. SIGTERM (or Ctrl-C) stops admitting requests, lets
those in flight finish for up to server.shutdown_timeout seconds, aborts the rest, and exits 0.
A config error, a missing checkpoint or a port in use is one line on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import threading
from pathlib import Path

from quasar import config as qcfg
from quasar.errors import ConfigError, require
from quasar.run import cli_call, positive_int

log = logging.getLogger("quasar")


def parse_args(argv=None) -> argparse.Namespace:
    prog = "quasar serve" if Path(sys.argv[0]).name == "quasar" else "python -m quasar.serve"
    ap = argparse.ArgumentParser(prog=prog, description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, help="YAML deployment config (its server: section sets the defaults below)")
    ap.add_argument("--host", help="address to listen on (server.host, default 127.0.0.1)")
    ap.add_argument("--port", type=int, help="TCP port (server.port, default 8000; 0 = a free one)")
    ap.add_argument("--api-key", help="require Authorization: Bearer KEY on /v1/* (server.api_key; env QUASAR_API_KEY)")
    ap.add_argument("--served-model-name", help="the model name clients send (server.served_model_name)")
    ap.add_argument("--max-waiting", type=positive_int, help="requests allowed to wait; more get 503 (server.max_waiting)")
    ap.add_argument("--shutdown-timeout", type=float, help="seconds SIGTERM waits for in-flight requests (server.shutdown_timeout)")
    ap.add_argument("--model", help="embedded model name, local HF directory or .gguf file")
    ap.add_argument("--device", help="auto | cpu | cuda | npu")
    ap.add_argument("--max-seq-len", type=int, help="static KV cache length per sequence")
    ap.add_argument("--max-batch-size", type=positive_int, help="sequences decoded together (runtime.max_batch_size)")
    ap.add_argument("--access-log", action="store_true", help="log every HTTP request")
    return ap.parse_args(argv)


def build_config(a: argparse.Namespace) -> qcfg.DeployConfig:
    cfg = qcfg.load(a.config) if a.config else qcfg.DeployConfig()
    return qcfg.override(cfg, {
        "model": a.model, "device": a.device, "max_seq_len": a.max_seq_len,
        "runtime.max_batch_size": a.max_batch_size,
        "server.host": a.host, "server.port": a.port,
        # the API key: --api-key, else the YAML's server.api_key, else $QUASAR_API_KEY
        "server.api_key": a.api_key or cfg.server.api_key or os.environ.get("QUASAR_API_KEY") or None,
        "server.served_model_name": a.served_model_name, "server.max_waiting": a.max_waiting,
        "server.shutdown_timeout": a.shutdown_timeout,
    })


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port} ({e.strerror}); pick another --port "
                          "(server.port), or stop what is using it") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def main(argv=None) -> int:
    return cli_call(_serve, parse_args(argv))


def _serve(a) -> int:
    for mod in ("fastapi", "uvicorn", "prometheus_client"):
        require(mod, "serve", "quasar serve")
    import asyncio
    import contextlib

    import uvicorn

    from quasar.engine import LLM
    from quasar.fetch import resolve_model
    from .app import ServerState, build_app
    from .async_engine import AsyncEngine
    from .metrics import Metrics

    cfg = build_config(a)
    srv = cfg.server
    path = resolve_model(cfg.model)          # a missing checkpoint fails here, before listening
    name = srv.served_model_name or cfg.model
    metrics = Metrics(name)
    engine = AsyncEngine(lambda: LLM(cfg, model_path=path), metrics, srv.max_waiting)
    state = ServerState(engine=engine, metrics=metrics, model_name=name, max_seq_len=cfg.max_seq_len,
                        api_key=srv.api_key, retry_after=srv.retry_after, sampling_defaults=cfg.sampling)
    sock = bind(srv.host, srv.port)
    host, port = sock.getsockname()[:2]
    server: uvicorn.Server

    def load_failed():
        server.should_exit = True

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start(asyncio.get_running_loop(), load_failed)
        yield
        engine.stop()

    app = build_app(state, lifespan)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            """SIGTERM / Ctrl-C: stop admitting at once; at the deadline abort what is left, so
            every client still gets a final response (finish_reason "abort") before the exit."""
            if not engine.draining:
                engine.draining = True
                log.info("shutting down: no new requests; up to %gs for those in flight", srv.shutdown_timeout)
                t = threading.Timer(srv.shutdown_timeout, engine.abort_all)
                t.daemon = True
                t.start()
            super().handle_exit(sig, frame)

    # uvicorn's own deadline comes later: the handlers of aborted requests send their end first
    config = uvicorn.Config(app, log_level="warning", access_log=a.access_log, lifespan="on",
                            timeout_graceful_shutdown=srv.shutdown_timeout + 5, timeout_keep_alive=5)
    server = Server(config)
    auth = "API key required" if srv.api_key else "no API key"
    print(f"quasar serve: {name} ({cfg.model}) at http://{host}:{port}/v1 ({auth}); "
          f"GET /health is 200 once loaded", file=sys.stderr, flush=True)
    # uvicorn re-raises the signal it caught once it has shut down; with these no-op handlers
    # installed first, that re-raise is harmless and a drained server exits 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server.run(sockets=[sock])
    if engine.load_error:
        print(f"error: {engine.load_error}", file=sys.stderr, flush=True)
        return 2
    print("quasar serve: stopped", file=sys.stderr, flush=True)
    return 0
