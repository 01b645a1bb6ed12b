"""The server's engine loop: one thread owns the LLM (and so the device) and steps the batched
engine; HTTP handlers, on the asyncio event loop, submit requests and read each request's
tokens from its own asyncio queue.

    handler --submit()--> [new] --+                      +--> request.queue (tokens, then the end)
    handler --abort()---> [aborts]+--> engine thread: admit, abort, engine.step() --+
                                                  (one call_soon_threadsafe per step)

The thread sleeps on a condition variable while there is no work. Nothing but this thread
touches the engine; the handlers only append to the two lists under the lock. A request that is
aborted (client gone, stop string matched, shutdown) leaves the batch and frees its KV blocks
before the next step.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from quasar.spec_decode.sampling import SamplingParams
from quasar.spec_decode.scheduler import Stats

log = logging.getLogger("quasar")


class QueueFull(Exception):
    """More than server.max_waiting requests wait for a batch slot."""


class Unavailable(Exception):
    """The model is not loaded yet, or the server is shutting down."""


@dataclass
class Output:
    """One delivery to a request: new token ids, or the end (finished)."""
    token_ids: list[int]
    finished: bool = False
    finish_reason: str = ""
    error: Optional[str] = None
    stats: Optional[Stats] = None


@dataclass
class Request:
    prompt_ids: list[int]
    sampling: SamplingParams
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    arrival: float = field(default_factory=time.monotonic)
    first_token: Optional[float] = None
    seq: object = None
    finished: bool = False             # the end was queued (engine side)


class AsyncEngine:
    def __init__(self, load: Callable[[], object], metrics, max_waiting: int):
        """load(): builds the LLM (run in the engine thread, which then owns the device)."""
        self._load = load
        self.metrics = metrics
        self.max_waiting = max_waiting
        self.llm = None
        self.ready = threading.Event()
        self.load_error: Optional[str] = None
        self.draining = False
        self.dead: Optional[str] = None           # an unrecoverable engine error
        self._cond = threading.Condition()
        self._new: list[Request] = []
        self._aborts: list[tuple[Request, str]] = []
        self._stop = False
        self._live: dict[int, Request] = {}
        self._out: list[tuple[Request, Output]] = []
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._thread: Optional[threading.Thread] = None

    # ------------------------------------------------------------------ lifecycle
    def start(self, loop: asyncio.AbstractEventLoop, on_load_error: Callable[[], None]) -> None:
        self._loop = loop
        self._on_load_error = on_load_error
        self._thread = threading.Thread(target=self._main, name="quasar-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Abort what is still in flight and end the thread."""
        with self._cond:
            self._stop = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def _main(self) -> None:
        try:
            self.llm = self._load()
        except BaseException as e:               # noqa: BLE001 - reported to the user, the server exits
            from quasar.errors import QuasarError
            self.load_error = str(e) if isinstance(e, QuasarError) else f"{type(e).__name__}: {e}"
            if not isinstance(e, QuasarError):
                log.exception("loading the model failed")
            self._on_load_error()
            return
        eng = self.llm.engine
        self.metrics.watch(running=lambda: len(eng.sched.running),
                           waiting=lambda: len(self._new) + len(eng.sched.waiting),
                           kv_used=lambda: eng.blocks.num_used, kv_total=lambda: eng.blocks.num_blocks,
                           preemptions=lambda: eng.sched.preemptions)
        self.ready.set()
        log.info("ready: %s on %s, verifier %s, drafter %s", self.llm.cfg.model, self.llm.device,
                 self.llm.model.scheme, self.llm.cfg.drafter.method)
        self._run()

    # ------------------------------------------------------------------ handler side
    def num_waiting(self) -> int:
        return len(self._new) + (len(self.llm.engine.sched.waiting) if self.llm else 0)

    def submit(self, prompt_ids: list[int], sampling: SamplingParams) -> Request:
        """Queue a request (call on the event loop). Raises Unavailable or QueueFull."""
        if self.draining or self._stop:
            raise Unavailable("the server is shutting down")
        if self.dead:
            raise Unavailable(f"the engine failed and cannot take requests ({self.dead}); restart the server")
        if not self.ready.is_set():
            raise Unavailable("the model is still loading; retry when GET /health returns 200")
        with self._cond:
            if self.num_waiting() >= self.max_waiting:
                raise QueueFull(f"{self.num_waiting()} requests are waiting (server.max_waiting "
                                f"{self.max_waiting}); retry later")
            r = Request(list(prompt_ids), sampling)
            self._new.append(r)
            self._cond.notify()
        return r

    def abort(self, r: Request, reason: str = "abort") -> None:
        """Stop a request (thread-safe, idempotent); its end is still delivered to its queue."""
        with self._cond:
            self._aborts.append((r, reason))
            self._cond.notify()

    # ------------------------------------------------------------------ engine thread
    def _run(self) -> None:
        eng = self.llm.engine
        while True:
            with self._cond:
                while not (self._new or self._aborts or self._stop or eng.has_work):
                    self._cond.wait()
                new, self._new = self._new, []
                aborts, self._aborts = self._aborts, []
                stop = self._stop
            try:
                for r in new:
                    self._admit(r)
                for r, reason in aborts:
                    self._abort(r, reason)
                if stop:
                    for r in list(self._live.values()):
                        self._abort(r, "abort")
                    self._flush()
                    return
                if eng.has_work:
                    for s in eng.step():
                        self._finish(self._live.pop(s.seq_id))
            except Exception as e:          # noqa: BLE001 - fail the batch, keep serving
                log.exception("engine step failed; failing the requests in flight")
                self._fail_all(f"internal error in the engine ({type(e).__name__}: {e}); the request was aborted")
            self._flush()

    def _fail_all(self, msg: str) -> None:
        """After an exception: every request in flight ends (with `msg`, unless it had already
        finished in the failed step) and its blocks are freed. If that fails too, the engine's
        state is broken: it is marked dead (/health 503, new requests refused)."""
        for r in list(self._live.values()):
            self._live.pop(r.seq.seq_id, None)
            try:
                if not r.seq.is_finished:       # (a finished one was freed by the step itself)
                    self.llm.engine.abort(r.seq, "error")
                    r.seq.error = msg
            except Exception:               # noqa: BLE001
                log.exception("could not free a failed request's blocks; the engine is marked dead")
                self.dead = msg
                r.seq.error = r.seq.error or msg
            self._finish(r)

    def abort_all(self, reason: str = "abort") -> None:
        """Abort every request in flight (thread-safe): the shutdown deadline."""
        with self._cond:
            self._aborts += [(r, reason) for r in list(self._live.values())]
            self._aborts += [(r, reason) for r in self._new]
            self._cond.notify()

    def _admit(self, r: Request) -> None:
        llm = self.llm
        r.seq = llm.sequence(r.prompt_ids, r.sampling, on_tokens=lambda toks, r=r: self._emit(r, toks))
        self.metrics.prompt_tokens.inc(len(r.prompt_ids))
        llm.engine.add(r.seq)
        if r.seq.is_finished:
            self._finish(r)
        else:
            self._live[r.seq.seq_id] = r

    def _abort(self, r: Request, reason: str) -> None:
        if r.finished or r.seq is None:     # (new requests are admitted before aborts are applied)
            return
        self.llm.engine.abort(r.seq, reason)
        self._live.pop(r.seq.seq_id, None)
        self._finish(r)

    def _emit(self, r: Request, tokens: list[int]) -> None:
        if r.first_token is None:
            r.first_token = time.monotonic()
        self._out.append((r, Output(list(tokens))))

    def _finish(self, r: Request) -> None:
        s = r.seq
        r.finished = True
        end = time.monotonic()
        n = len(s.output_ids)
        ttft = r.first_token - r.arrival if r.first_token is not None else None
        tpot = (end - r.first_token) / (n - 1) if r.first_token is not None and n > 1 else None
        self.metrics.finished(s.finish_reason, s.stats, ttft, end - r.arrival, tpot)
        self._out.append((r, Output([], True, s.finish_reason, s.error, s.stats)))

    def _flush(self) -> None:
        if self._out:
            batch, self._out = self._out, []
            try:
                self._loop.call_soon_threadsafe(_deliver, batch)
            except RuntimeError:                # the event loop closed (shutdown): nobody is reading
                pass


def _deliver(batch: list[tuple[Request, Output]]) -> None:
    for r, out in batch:
        r.queue.put_nowait(out)
