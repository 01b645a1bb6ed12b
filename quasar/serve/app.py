"""The HTTP API (FastAPI): OpenAI's /v1/completions, /v1/chat/completions (both with SSE
streaming) and /v1/models, plus /health and /metrics.

Every error is OpenAI-shaped, `{"error": {"message", "type", "param", "code"}}`, with the status
OpenAI's clients expect: 400 bad input (naming the field), 401 API key, 404 unknown model or
route, 503 queue full / loading / shutting down (with Retry-After). Tokenization and
detokenization run here, on the event loop; only the engine thread touches the model.
"""
from __future__ import annotations

import asyncio
import json
import logging
import secrets
from dataclasses import dataclass
from typing import AsyncIterator, Optional

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from quasar.engine.detokenizer import IncrementalDetokenizer
from quasar.errors import QuasarError
from quasar.spec_decode.sampling import SamplingParams
from . import protocol as P
from .async_engine import AsyncEngine, Output, QueueFull, Unavailable
from .metrics import CONTENT_TYPE, Metrics

log = logging.getLogger("quasar")


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None, headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers


def error_response(status: int, message: str, type: str, param=None, code=None, headers=None) -> JSONResponse:
    body = P.ErrorResponse(error=P.ErrorInfo(message=message, type=type, param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


@dataclass
class ServerState:
    engine: AsyncEngine
    metrics: Metrics
    model_name: str
    max_seq_len: int
    api_key: Optional[str] = None
    retry_after: int = 1
    sampling_defaults: object = None          # the deployment's SamplingConfig


# ---------------------------------------------------------------- request -> engine

def _llm(state: ServerState):
    e = state.engine
    if e.load_error:
        raise APIError(503, f"the model failed to load: {e.load_error}", "server_error",
                       headers={"Retry-After": str(state.retry_after)})
    if not e.ready.is_set() or e.draining:
        why = "the server is shutting down" if e.draining else "the model is still loading; retry when GET /health returns 200"
        raise APIError(503, why, "service_unavailable", headers={"Retry-After": str(state.retry_after)})
    return e.llm


def _check_common(state: ServerState, body: P._Sampling) -> None:
    if body.model != state.model_name:
        raise APIError(404, f"the model {body.model!r} does not exist; this server serves "
                            f"{state.model_name!r} (GET /v1/models)", param="model", code="model_not_found")
    bad = body.unsupported()
    if bad:
        raise APIError(400, bad[1], param=bad[0])


def _sampling(state: ServerState, body: P._Sampling, prompt_len: int, max_tokens: Optional[int]) -> SamplingParams:
    d = state.sampling_defaults
    S = state.max_seq_len
    room = S - prompt_len
    if max_tokens is not None and max_tokens > room:
        raise APIError(400, f"this model's maximum context length (max_seq_len) is {S} tokens; the prompt has "
                            f"{prompt_len} and max_tokens asks for {max_tokens} more ({prompt_len + max_tokens}); "
                            f"lower max_tokens to at most {room} or shorten the prompt",
                       param="max_tokens", code="context_length_exceeded")
    temperature = d.temperature if body.temperature is None else body.temperature
    seed = body.seed
    if seed is None:
        seed = secrets.randbits(31) if temperature > 0 else d.seed
    top_k = d.top_k if body.top_k is None else max(0, body.top_k)
    try:
        return SamplingParams(temperature=temperature, top_p=d.top_p if body.top_p is None else body.top_p,
                              top_k=top_k, seed=seed, max_tokens=max_tokens or min(d.max_new_tokens, room),
                              ignore_eos=body.ignore_eos)
    except ValueError as e:
        raise APIError(400, str(e)) from None


def _check_prompt(llm, ids: list[int], param: str) -> None:
    why = llm.check_prompt(ids, 1)
    if why:
        code = "context_length_exceeded" if ("max_seq_len" in why or "KV" in why) else None
        raise APIError(400, why, param=param, code=code)


def _submit(state: ServerState, ids: list[int], sp: SamplingParams):
    try:
        return state.engine.submit(ids, sp)
    except QueueFull as e:
        state.metrics.rejected.inc()
        raise APIError(503, str(e), "service_unavailable", headers={"Retry-After": str(state.retry_after)}) from None
    except Unavailable as e:
        state.metrics.rejected.inc()
        raise APIError(503, str(e), "service_unavailable", headers={"Retry-After": str(state.retry_after)}) from None


class Run:
    """One request's life on the handler side: its detokenizer, the tokens it produced (up to
    a stop string), and its end."""

    def __init__(self, state: ServerState, req, stop: list[str]):
        self.state, self.req = state, req
        self.detok = IncrementalDetokenizer(state.engine.llm.tokenizer, stop)
        self.token_ids: list[int] = []
        self.end: Optional[Output] = None

    async def events(self) -> AsyncIterator[tuple[str, list[int]]]:
        """(new text, new token ids) as they come; then one last (text, []) when it ends."""
        d = self.detok
        while True:
            out = await self.req.queue.get()
            if out.token_ids and d.stopped is None:
                if d.stop:                  # one at a time: the ids end at the one that completes a stop
                    new = []
                    for t in out.token_ids:
                        new.append(t)
                        if d.add([t]):
                            break
                else:
                    new = out.token_ids
                    d.add(new)
                self.token_ids += new
                if d.stopped is not None:
                    self.state.engine.abort(self.req, "stop")
                text = d.delta()
                if text or new:
                    yield text, new
            if out.finished:
                self.end = out
                if out.error is None and d.stopped is None:
                    d.finish()
                yield d.delta(final=True), []
                return

    def abort_if_running(self) -> None:
        if self.end is None:
            self.state.engine.abort(self.req, "abort")

    @property
    def finish_reason(self) -> str:
        if self.detok.stopped is not None:
            return "stop"
        return P.finish_reason(self.end.finish_reason)

    def usage(self) -> P.Usage:
        p, c = len(self.req.prompt_ids), len(self.token_ids)
        return P.Usage(prompt_tokens=p, completion_tokens=c, total_tokens=p + c)

    def error(self) -> Optional[APIError]:
        if self.end is not None and self.end.error:
            return APIError(500, self.end.error, "server_error")
        return None


async def _collect(run: Run, request: Request) -> str:
    """Wait for a non-streaming request's end; a client that goes away aborts it."""
    pieces = []
    agen = run.events()
    nxt = asyncio.ensure_future(agen.__anext__())
    try:
        while True:
            done, _ = await asyncio.wait({nxt}, timeout=1.0)
            if not done:
                if await request.is_disconnected():
                    raise APIError(499, "the client disconnected; the request was aborted")
                continue
            try:
                piece, _ = nxt.result()
            except StopAsyncIteration:
                break
            pieces.append(piece)
            nxt = asyncio.ensure_future(agen.__anext__())
    finally:
        if not nxt.done():
            nxt.cancel()
        run.abort_if_running()
    err = run.error()
    if err:
        raise err
    return "".join(pieces)


_OPTIONAL = ("token_ids", "prompt_token_ids", "usage", "role")


def _clean(obj) -> dict:
    """A response model as a dict, without the unset optional fields (extensions, usage before
    the end, a chunk's role after the first)."""
    def strip(x):
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if not (k in _OPTIONAL and v is None)}
        if isinstance(x, list):
            return [strip(v) for v in x]
        return x
    return strip(obj.model_dump())


def _json(obj) -> JSONResponse:
    return JSONResponse(_clean(obj))


def _sse(obj) -> str:
    return f"data: {json.dumps(_clean(obj), ensure_ascii=False)}\n\n"


def _sse_error(err: APIError) -> str:
    body = P.ErrorResponse(error=P.ErrorInfo(message=err.message, type=err.type, code=err.code))
    return f"data: {body.model_dump_json()}\n\n"


class ApiKeyMiddleware:
    """/v1/* needs the API key when one is set, checked before the body is read; /health and
    /metrics stay open (as in vLLM). A plain ASGI middleware: it does not wrap the response
    stream (starlette's BaseHTTPMiddleware does, at a cost on every streamed chunk)."""

    def __init__(self, app, key: Optional[str]):
        self.app, self.key = app, key

    async def __call__(self, scope, receive, send):
        if self.key is not None and scope["type"] == "http" and scope["path"].startswith("/v1"):
            got = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
            scheme, _, token = got.partition(" ")
            if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), self.key.encode()):
                r = error_response(401, "missing or incorrect API key: send the header `Authorization: Bearer <key>` "
                                        "with the key the server was started with (server.api_key / --api-key)",
                                   "authentication_error", code="invalid_api_key")
                await r(scope, receive, send)
                return
        await self.app(scope, receive, send)


class ChunkFormat:
    """A stream's non-final chunks as preformatted strings (the same JSON that the pydantic
    chunk models give, built without them: they are on the per-token path)."""

    def __init__(self, obj_type: str, rid: str, model: str, chat: bool):
        head = json.dumps({"id": rid, "object": obj_type, "created": P.now(), "model": model})[:-1]
        field = '"delta":{"content":' if chat else '"text":'
        self.prefix = f'data: {head},"choices":[{{"index":0,{field}'
        self.suffix = ('}' if chat else '') + ',"finish_reason":null,"logprobs":null}]}\n\n'

    def __call__(self, text: str) -> str:
        return self.prefix + json.dumps(text, ensure_ascii=False) + self.suffix


def _stream(run: Run, fast: ChunkFormat, chunk, tids: bool, first=None) -> StreamingResponse:
    """A request's server-sent events: `first` (chat: the role), a chunk per piece of text (the
    preformatted fast path, or chunk(text, new_ids, final) -> a response model when token ids
    are asked for and for the final chunk), an error event if the request failed, then [DONE].
    A client that goes away aborts the request (the generator's finally)."""
    async def events():
        try:
            if first is not None:
                yield _sse(first)
            async for text, new in run.events():
                final = run.end is not None
                if not (text or (new and tids) or final):
                    continue
                if final and run.error():
                    yield _sse_error(run.error())
                    break
                yield fast(text) if not final and not tids else _sse(chunk(text, new, final))
            yield "data: [DONE]\n\n"
        finally:
            run.abort_if_running()
    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


# ---------------------------------------------------------------- the app

def build_app(state: ServerState, lifespan=None) -> FastAPI:
    app = FastAPI(title="Quasar", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.quasar = state

    app.add_middleware(ApiKeyMiddleware, key=state.api_key)

    v1 = APIRouter(prefix="/v1")

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return error_response(e.status, e.message, e.type, e.param, e.code, e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        errs = e.errors()
        first = errs[0] if errs else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        got = first.get("input")
        if first.get("type") == "json_invalid":
            msg = f"the request body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}"
            return error_response(400, msg, "invalid_request_error")
        if isinstance(got, (bytes, str)) and not loc:
            return error_response(400, "the request body must be a JSON object, sent with the header "
                                       "`Content-Type: application/json`", "invalid_request_error")
        if not loc:
            return error_response(400, f"the request body must be a JSON object, got {type(got).__name__}",
                                  "invalid_request_error")
        field = ".".join(loc)
        if first.get("type") == "extra_forbidden":
            msg = f"unknown parameter {field!r}"
        elif first.get("type") == "missing":
            msg = f"missing required parameter {field!r}"
        else:
            try:
                shown = json.dumps(got)[:80] if not isinstance(got, (dict, list)) else type(got).__name__
            except (TypeError, ValueError):
                shown = repr(got)[:80]
            msg = f"{field}: {first.get('msg', 'invalid value')} (got {shown})"
        if len(errs) > 1:
            msg += f" (and {len(errs) - 1} more problem{'s' if len(errs) > 2 else ''})"
        return error_response(400, msg, "invalid_request_error", param=field)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        msg = f"{request.method} {request.url.path}: {e.detail}"
        return error_response(e.status_code, msg, kind, headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):
        log.exception("request %s %s failed", request.method, request.url.path)
        return error_response(500, f"internal server error ({type(e).__name__}: {e})", "server_error")

    @app.get("/health")
    async def health():
        e = state.engine
        if e.load_error:
            return JSONResponse({"status": "failed", "error": e.load_error}, status_code=503)
        if e.dead:
            return JSONResponse({"status": "failed", "error": e.dead}, status_code=503)
        if e.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        if not e.ready.is_set():
            return JSONResponse({"status": "loading"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    @v1.get("/models")
    async def models():
        return P.ModelList(data=[P.ModelCard(id=state.model_name, max_model_len=state.max_seq_len)])

    @v1.post("/completions")
    async def completions(body: P.CompletionRequest, request: Request):
        llm = _llm(state)
        _check_common(state, body)
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            if len(prompt) != 1:
                raise APIError(400, f"prompt is a list of {len(prompt)} prompts; send one prompt per request",
                               param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            try:
                ids = llm.encode(prompt, chat=False)
            except Exception as e:      # noqa: BLE001 - the tokenizer's own error
                raise APIError(400, f"could not tokenize the prompt: {e}", param="prompt") from None
        else:
            ids = list(prompt)
        _check_prompt(llm, ids, "prompt")
        sp = _sampling(state, body, len(ids), body.max_tokens)
        run = Run(state, _submit(state, ids, sp), body.stop_strings())
        rid = P.new_id("cmpl")
        tids = body.return_token_ids

        if body.stream:
            def chunk(text, new, final):
                return P.CompletionResponse(
                    id=rid, model=state.model_name,
                    choices=[P.CompletionChoice(text=text, token_ids=new if tids else None,
                                                finish_reason=run.finish_reason if final else None)],
                    usage=run.usage() if final else None, prompt_token_ids=ids if tids and final else None)
            return _stream(run, ChunkFormat("text_completion", rid, state.model_name, chat=False), chunk, tids)

        text = await _collect(run, request)
        return _json(P.CompletionResponse(
            id=rid, model=state.model_name,
            choices=[P.CompletionChoice(text=text, finish_reason=run.finish_reason,
                                        token_ids=run.token_ids if tids else None)],
            usage=run.usage(), prompt_token_ids=ids if tids else None))

    @v1.post("/chat/completions")
    async def chat(body: P.ChatCompletionRequest, request: Request):
        llm = _llm(state)
        _check_common(state, body)
        messages = [dict(m.model_extra or {}, role=m.role, content=m.text()) for m in body.messages]
        try:
            ids = llm.encode_chat(messages)
        except QuasarError as e:
            raise APIError(400, str(e), param="messages") from None
        _check_prompt(llm, ids, "messages")
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        sp = _sampling(state, body, len(ids), max_tokens)
        run = Run(state, _submit(state, ids, sp), body.stop_strings())
        rid = P.new_id("chatcmpl")
        tids = body.return_token_ids

        if body.stream:
            def chunk(text, new, final):
                return P.ChatCompletionChunk(
                    id=rid, model=state.model_name,
                    choices=[P.ChatChunkChoice(delta=P.Delta(content=text), token_ids=new if tids else None,
                                               finish_reason=run.finish_reason if final else None)],
                    usage=run.usage() if final else None, prompt_token_ids=ids if tids and final else None)
            first = P.ChatCompletionChunk(id=rid, model=state.model_name, choices=[
                P.ChatChunkChoice(delta=P.Delta(role="assistant", content=""))])
            return _stream(run, ChunkFormat("chat.completion.chunk", rid, state.model_name, chat=True), chunk,
                           tids, first)

        text = await _collect(run, request)
        return _json(P.ChatCompletionResponse(
            id=rid, model=state.model_name,
            choices=[P.ChatChoice(message=P.AssistantMessage(content=text), finish_reason=run.finish_reason,
                                  token_ids=run.token_ids if tids else None)],
            usage=run.usage(), prompt_token_ids=ids if tids else None))

    app.include_router(v1)
    return app
