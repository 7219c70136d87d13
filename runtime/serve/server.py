"""The OpenAI-compatible HTTP front of the serving engine (FastAPI + uvicorn, the `serve`
extra): /v1/completions, /v1/chat/completions (server-sent events when streamed),
/v1/models, /health, /metrics.

Each HTTP request becomes one engine request per prompt (n sequences each); events come
back through the asyncio loop. A client that goes away (stream closed, or a plain
request's connection dropped) aborts its engine requests, which frees their pages.
SIGTERM: intake stops (new requests get 503, uvicorn stops listening), requests in
flight finish, then the engine drains and the process exits.
"""
from __future__ import annotations

import asyncio
import json
import pathlib
import signal
import uuid
from typing import Any, AsyncIterator

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from ...errors import InputError, LLMCError
from ..engine.sampler import SamplingParams
from .chat import ChatTemplate, find_template
from .engine import Engine, EngineConfig, EngineStopped, QueueFull
from .openai_api import (ChatRequest, CompletionRequest, chat_logprobs, completion_logprobs, error_body, now,
                         usage)
from .sequence import Event

class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _status(e: LLMCError) -> int:
    if isinstance(e, QueueFull):
        return 429
    if isinstance(e, EngineStopped):
        return 503
    if isinstance(e, InputError):
        return 400
    return 500


class Group:
    """The engine requests of one HTTP request (one per prompt), their events merged."""

    def __init__(self, engine: Engine, prompts: list[list[int]], params: SamplingParams):
        self.engine, self.n = engine, params.n
        loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Event] = asyncio.Queue()

        def put(ev: Event) -> None:  # on the engine thread
            if not loop.is_closed():
                loop.call_soon_threadsafe(self.queue.put_nowait, ev)

        self.index: dict[str, int] = {}
        self.open = 0
        try:
            for i, ids in enumerate(prompts):
                self.index[engine.submit(ids, params, put, f"{uuid.uuid4().hex}-{i}")] = i
                self.open += params.n
        except LLMCError:
            self.cancel()  # the prompts before the refused one must not run for nobody
            raise

    async def events(self) -> AsyncIterator[tuple[int, Event]]:
        while self.open:
            ev = await self.queue.get()
            if ev.error:
                self.cancel()
                raise LLMCError(f"the engine failed: {ev.error}")
            if ev.finish_reason is not None:
                self.open -= 1
            yield self.index[ev.request_id] * self.n + ev.index, ev

    def cancel(self) -> None:
        if self.open or self.index:
            for rid in self.index:
                self.engine.abort(rid)  # a finished one is unknown to the engine by then: a no-op
            self.open = 0


async def _collect(group: Group, request: Request, choices: int) -> list[list[Event]]:
    """Every event of a non-streamed request, per choice; aborts if the client leaves."""
    out: list[list[Event]] = [[] for _ in range(choices)]

    async def gather():
        async for i, ev in group.events():
            out[i].append(ev)

    async def disconnected():
        # the body is read already: the next ASGI message can only be the client leaving
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task = asyncio.ensure_future(gather())
    watch = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            raise ApiError(499, "the client closed the connection")
        task.result()  # the engine's failure, if any, raises here
        return out
    finally:
        for t in (task, watch):
            if not t.done():
                t.cancel()
        group.cancel()


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj)}\n\n"


class ApiKeyCheck:
    """401 for /v1/ requests without `Authorization: Bearer KEY`, before the body is read.
    Plain ASGI (not BaseHTTPMiddleware, which would sit between a stream and its disconnect)."""

    def __init__(self, app, key: str):
        self.app, self.want = app, f"Bearer {key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            got = dict(scope["headers"]).get(b"authorization", b"")
            if got != self.want:
                await JSONResponse(error_body(401, "Incorrect API key provided."), status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class OpenAiApp:
    def __init__(self, engine: Engine, model_name: str, chat: ChatTemplate, api_key: str | None = None):
        self.engine, self.model_name, self.chat, self.api_key = engine, model_name, chat, api_key
        self.llm = engine.llm
        self.app = FastAPI(title="llmc serve", docs_url=None, redoc_url=None)
        self._routes()

    # --- shared checks
    def _model(self, name: str) -> None:
        if name != self.model_name:
            raise ApiError(404, f"The model `{name}` does not exist (this server has `{self.model_name}`).")

    def _max_tokens(self, asked: int | None, prompts: list[list[int]]) -> int:
        room = self.llm.limits.max_context - max(len(p) for p in prompts)
        if asked is None:
            if room < 1:
                raise InputError(f"the prompt fills the model's context of {self.llm.limits.max_context} tokens")
            return room
        if isinstance(asked, bool) or asked < 1:
            raise InputError(f"max_tokens must be >= 1, got {asked}")
        if asked > room:
            raise InputError(f"This model's maximum context length is {self.llm.limits.max_context} tokens; the "
                             f"prompt ({max(len(p) for p in prompts)} tokens) plus max_tokens ({asked}) exceeds it.")
        return asked

    def _params(self, body, max_tokens: int, logprobs: int | None) -> SamplingParams:
        try:
            return body.sampling(max_tokens, logprobs, tuple(self.llm.spec.stop_token_ids))
        except (TypeError, ValueError) as e:
            raise InputError(f"bad sampling parameter ({e})") from None

    # --- routes
    def _routes(self) -> None:
        app = self.app

        @app.exception_handler(ApiError)
        async def api_error(_: Request, e: ApiError):
            return JSONResponse(error_body(e.status, str(e)), status_code=e.status)

        @app.exception_handler(LLMCError)
        async def llmc_error(_: Request, e: LLMCError):
            status = _status(e)
            return JSONResponse(error_body(status, str(e)), status_code=status)

        @app.exception_handler(RequestValidationError)
        async def bad_body(_: Request, e: RequestValidationError):
            errs = e.errors()
            first = errs[0] if errs else {}
            where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
            return JSONResponse(error_body(400, f"{where}: {first.get('msg', 'invalid request')}", where or None),
                                status_code=400)

        if self.api_key is not None:
            app.add_middleware(ApiKeyCheck, key=self.api_key)

        @app.get("/health")
        async def health():
            ok = self.engine.alive and self.engine.accepting
            return JSONResponse({"status": "ok" if ok else "unavailable"}, status_code=200 if ok else 503)

        @app.get("/metrics")
        async def metrics():
            return PlainTextResponse(self.engine.metrics_text(), media_type="text/plain; version=0.0.4")

        @app.get("/v1/models")
        async def models():
            return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": now(),
                                                "owned_by": "llmc", "max_model_len": self.llm.limits.max_context,
                                                "vocab_size": self.llm.limits.vocab}]}

        @app.post("/v1/completions")
        async def completions(body: CompletionRequest, request: Request):
            return await self.completions(body, request)

        @app.post("/v1/chat/completions")
        async def chat(body: ChatRequest, request: Request):
            return await self.chat_completions(body, request)

    async def completions(self, body: CompletionRequest, request: Request):
        self._model(body.model)
        body.unsupported()
        prompts = [self.llm.encode(p, i) for i, p in enumerate(body.prompts())]
        params = self._params(body, self._max_tokens(body.max_tokens, prompts), body.logprobs)
        group = Group(self.engine, prompts, params)
        rid, created, choices = f"cmpl-{uuid.uuid4().hex}", now(), len(prompts) * params.n
        prompt_tokens = sum(len(p) for p in prompts)
        tok = self.llm.tokenizer
        want_lp = body.logprobs is not None

        if body.stream:
            async def stream():
                completion_tokens, offsets = 0, [0] * choices
                try:
                    async for i, ev in group.events():
                        lp = None
                        if ev.token_id is not None:
                            completion_tokens += 1
                            if want_lp:
                                lp = completion_logprobs(tok, [ev], offsets[i])
                                offsets[i] += sum(len(t) for t in lp["tokens"])
                        choice = {"index": i, "text": ev.text or "", "logprobs": lp,
                                  "finish_reason": ev.finish_reason}
                        if body.return_token_ids:
                            choice["token_ids"] = [] if ev.token_id is None else [ev.token_id]
                        yield _sse({"id": rid, "object": "text_completion", "created": created,
                                    "model": self.model_name, "choices": [choice]})
                    if body.include_usage:
                        yield _sse({"id": rid, "object": "text_completion", "created": created,
                                    "model": self.model_name, "choices": [],
                                    "usage": usage(prompt_tokens, completion_tokens)})
                    yield "data: [DONE]\n\n"
                except LLMCError as e:
                    yield _sse(error_body(500, str(e)))
                finally:
                    group.cancel()

            return StreamingResponse(stream(), media_type="text/event-stream")

        per_choice = await _collect(group, request, choices)
        out = []
        for i, evs in enumerate(per_choice):
            toks = [e for e in evs if e.token_id is not None]
            out.append({"index": i, "text": "".join(e.text or "" for e in evs),
                        "logprobs": completion_logprobs(tok, toks, 0) if want_lp else None,
                        "finish_reason": evs[-1].finish_reason})
            if body.return_token_ids:
                out[-1]["token_ids"] = [e.token_id for e in toks]
        completion_tokens = sum(1 for evs in per_choice for e in evs if e.token_id is not None)
        return {"id": rid, "object": "text_completion", "created": created, "model": self.model_name,
                "choices": out, "usage": usage(prompt_tokens, completion_tokens)}

    async def chat_completions(self, body: ChatRequest, request: Request):
        self._model(body.model)
        if self.llm.tokenizer is None:
            raise InputError("chat needs a tokenizer; this artifact has none (use /v1/completions with token ids)")
        text = self.chat.render([{"role": m.role, "content": m.text()} for m in body.messages])
        prompts = [self.llm.encode(text, 0)]
        asked = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        params = self._params(body, self._max_tokens(asked, prompts), body.logprob_count())
        group = Group(self.engine, prompts, params)
        rid, created, choices = f"chatcmpl-{uuid.uuid4().hex}", now(), params.n
        tok, want_lp = self.llm.tokenizer, body.logprobs
        prompt_tokens = len(prompts[0])

        if body.stream:
            async def stream():
                def chunk(choice: dict) -> str:
                    return _sse({"id": rid, "object": "chat.completion.chunk", "created": created,
                                 "model": self.model_name, "choices": [choice]})

                completion_tokens = 0
                try:
                    for i in range(choices):
                        yield chunk({"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                     "finish_reason": None})
                    async for i, ev in group.events():
                        lp = None
                        if ev.token_id is not None:
                            completion_tokens += 1
                            if want_lp:
                                lp = chat_logprobs(tok, [ev])
                        delta = {"content": ev.text} if ev.text else {}
                        if delta or lp or ev.finish_reason:
                            yield chunk({"index": i, "delta": delta, "logprobs": lp,
                                         "finish_reason": ev.finish_reason})
                    if body.include_usage:
                        yield _sse({"id": rid, "object": "chat.completion.chunk", "created": created,
                                    "model": self.model_name, "choices": [],
                                    "usage": usage(prompt_tokens, completion_tokens)})
                    yield "data: [DONE]\n\n"
                except LLMCError as e:
                    yield _sse(error_body(500, str(e)))
                finally:
                    group.cancel()

            return StreamingResponse(stream(), media_type="text/event-stream")

        per_choice = await _collect(group, request, choices)
        out = []
        for i, evs in enumerate(per_choice):
            toks = [e for e in evs if e.token_id is not None]
            out.append({"index": i, "message": {"role": "assistant", "content": "".join(e.text or "" for e in evs)},
                        "logprobs": chat_logprobs(tok, toks) if want_lp else None,
                        "finish_reason": evs[-1].finish_reason})
            if body.return_token_ids:
                out[-1]["token_ids"] = [e.token_id for e in toks]
        completion_tokens = sum(1 for evs in per_choice for e in evs if e.token_id is not None)
        return {"id": rid, "object": "chat.completion", "created": created, "model": self.model_name,
                "choices": out, "usage": usage(prompt_tokens, completion_tokens)}


class DrainingServer(uvicorn.Server):
    """uvicorn, but a SIGTERM / SIGINT first closes the engine's intake (requests that still
    reach us get 503) before uvicorn stops listening and waits for the open responses. The
    signal is not raised again once uvicorn is done (as uvicorn would), so the engine drains
    and the process exits with its own status."""

    def __init__(self, config: uvicorn.Config, engine: Engine):
        super().__init__(config)
        self.engine = engine

    def handle_exit(self, sig, frame) -> None:
        self.engine.stop_intake()
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True  # a second Ctrl-C: stop waiting for open responses
        self.should_exit = True


def build(artifact: str | pathlib.Path, config: EngineConfig, kv_memory: int | None = None,
          api_key: str | None = None, model_name: str | None = None, chat_template: str | None = None,
          llm=None) -> tuple[Engine, OpenAiApp]:
    """Load the artifact, start its engine, and make the app (not yet listening). `llm`: the
    artifact already loaded (rank 0 of a tensor-parallel group: runtime/tp_run.py)."""
    from ..artifact_files import read_manifest
    from ..executor import load

    path = pathlib.Path(artifact)
    device = read_manifest(path).device  # a CUDA artifact serves from the GPU (its pages on the device)
    if llm is None:
        llm = load(path, device=device, **({} if kv_memory is None else {"kv_memory": kv_memory}))
    if not hasattr(llm, "step_logits"):
        raise LLMCError(f"{artifact} has no step function (not a causal LM, or compiled with --no-generate)")
    source, _ = find_template(path, chat_template)
    tok = llm.tokenizer
    eos = tok.decode([llm.spec.stop_token_ids[0]], skip_special_tokens=False) \
        if tok is not None and llm.spec.stop_token_ids else ""
    engine = Engine(llm, config).start()
    return engine, OpenAiApp(engine, model_name or path.name, ChatTemplate(source, eos_token=eos), api_key)


def serve(artifact: str, host: str, port: int, config: EngineConfig, kv_memory: int | None = None,
          api_key: str | None = None, model_name: str | None = None, chat_template: str | None = None,
          log_level: str = "info", llm=None) -> int:
    engine, api = build(artifact, config, kv_memory, api_key, model_name, chat_template, llm)
    server = DrainingServer(uvicorn.Config(api.app, host=host, port=port, log_level=log_level,
                                           timeout_graceful_shutdown=None), engine)
    try:
        server.run()
    finally:
        engine.shutdown(drain=True)
    return 0 if engine.failure is None else 1


__all__ = ["OpenAiApp", "DrainingServer", "build", "serve", "Group"]
