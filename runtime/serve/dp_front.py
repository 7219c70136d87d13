"""`llmc serve ART --dp K`: K replicas (each the ordinary `llmc serve` in a process of its
own, on a device of its own) behind one public HTTP front with the same OpenAI API.

The front parses nothing it does not need: it reads a request's body, prices it in tokens
(dp_cost), lets the router pick the replica with the least outstanding tokens, and passes
the request through byte for byte (streams relayed event by event as they come). What the
replicas answer goes back unchanged, so errors, streaming and the OpenAI shapes are theirs.

- 429 from a replica means it did not accept the request (its queue is full): the front
  tries the next best replica, and answers 429 only when every replica refused.
- A replica that dies mid-request: the client gets a 502 naming the replica and how it
  ended (a streamed response, whose 200 is already sent, gets an error event instead, as
  the single server does for an engine failure). A connection refused before the request
  was sent is not a failure of the request: it goes to the next replica.
- A client that leaves closes the upstream connection, and the replica aborts the request.
- SIGTERM / Ctrl-C: the front stops listening, waits for open responses, then stops the
  replicas (each drains and exits).
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import sys
from typing import Awaitable, Callable

import aiohttp
import httpx
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from .dp_cost import RequestCost
from .dp_metrics import front_lines, merge
from .dp_supervisor import DpConfig, Supervisor
from .openai_api import error_body
from .replica_process import ReplicaProcess

log = logging.getLogger("llmc.serve.dp")

FORWARDED = ("authorization", "content-type", "accept")  # request headers a replica needs
REPLICA_HEADER = "x-llmc-replica"  # which replica served a response (for tests and debugging)


class ClientGone(Exception):
    pass


async def _unless_client_leaves(work: Awaitable, request: Request):
    """The result of `work`, or ClientGone once the client closed the connection (the body
    is read already, so the next ASGI message can only be the disconnect)."""
    task = asyncio.ensure_future(work)

    async def disconnected():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watch = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            raise ClientGone()
        return task.result()
    finally:
        for t in (task, watch):
            if not t.done():
                t.cancel()


def _done(resp: aiohttp.ClientResponse) -> None:
    """A response read to its end keeps its connection for the next request; one left
    early (the client went away) closes it, which makes the replica abort the request."""
    if resp.content.at_eof():
        resp.release()
    else:
        resp.close()


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse(error_body(status, message), status_code=status)


class DpFront:
    def __init__(self, sup: Supervisor, cost: RequestCost, client: httpx.AsyncClient, relay: aiohttp.ClientSession):
        self.sup, self.cost = sup, cost
        self.client = client  # the control plane: /metrics scrapes
        self.relay = relay  # the data path (aiohttp: its C parser costs a quarter of httpx's CPU per token, measured)
        self.router = sup.router
        self.rejected = 0  # requests every replica refused (429)
        self.failed = 0  # requests lost to a replica's failure (502)
        self.app = FastAPI(title="llmc serve --dp", docs_url=None, redoc_url=None)
        self._routes()

    def _routes(self) -> None:
        app = self.app

        @app.get("/health")
        async def health():
            rows = [{"replica": r.index, "up": self.router.loads[r.index].up, "pid": r.pid, "port": r.port,
                     "outstanding_tokens": self.router.loads[r.index].outstanding,
                     "in_flight": self.router.loads[r.index].in_flight, "restarts": self.sup.restarts[r.index],
                     "last_exit": self.sup.last_exit[r.index]} for r in self.sup.replicas]
            up = sum(row["up"] for row in rows)
            ok = up > 0 and not self.sup.stopping
            return JSONResponse({"status": "ok" if ok else "unavailable", "replicas_up": up, "replicas": rows},
                                status_code=200 if ok else 503)

        @app.get("/metrics")
        async def metrics():
            return PlainTextResponse(await self.metrics_text(), media_type="text/plain; version=0.0.4")

        @app.get("/v1/models")
        async def models(request: Request):
            return await self.forward(request, b"", None)

        @app.post("/v1/completions")
        async def completions(request: Request):
            return await self.forward(request, await request.body(), request.url.path)

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            return await self.forward(request, await request.body(), request.url.path)

    async def metrics_text(self) -> str:
        async def scrape(r: ReplicaProcess) -> str:
            try:
                got = await self.client.get(f"{r.url}/metrics", timeout=10.0)
                return got.text if got.status_code == 200 else ""
            except httpx.TransportError:
                return ""

        up = [r for r in self.sup.replicas if self.router.loads[r.index].up]
        texts = await asyncio.gather(*(scrape(r) for r in up))
        loads = self.router.loads
        rows = {
            "replica_up": ("gauge", "1 while the replica serves", {x.index: int(x.up) for x in loads}),
            "replica_outstanding_tokens": ("gauge", "prompt tokens not yet read plus tokens still allowed to the "
                                                    "replica's requests in flight (what the router balances)",
                                           {x.index: x.outstanding for x in loads}),
            "replica_requests_in_flight": ("gauge", "requests the front has open on the replica",
                                           {x.index: x.in_flight for x in loads}),
            "replica_routed_requests_total": ("counter", "requests the router sent to the replica",
                                              {x.index: x.routed for x in loads}),
            "replica_restarts_total": ("counter", "times the replica was restarted",
                                       dict(enumerate(self.sup.restarts))),
            "replica_failures_total": ("counter", "times the replica's process ended unasked",
                                       dict(enumerate(self.sup.failures))),
        }
        front = ["# HELP llmc_front_rejected_total requests every replica refused (429)",
                 "# TYPE llmc_front_rejected_total counter", f"llmc_front_rejected_total {self.rejected}",
                 "# HELP llmc_front_failed_total requests lost to a replica's failure (502)",
                 "# TYPE llmc_front_failed_total counter", f"llmc_front_failed_total {self.failed}"]
        return merge(list(texts)) + front_lines(rows) + "\n".join(front) + "\n"

    async def forward(self, request: Request, body: bytes, priced: str | None) -> Response:
        """Send the request to the best replica that accepts it; `priced`: the path whose
        body the router prices (None: a GET that costs nothing and frees nothing)."""
        cost = self.cost.of(priced, body) if priced else None
        headers = {k: v for k, v in request.headers.items() if k.lower() in FORWARDED}
        tried: set[int] = set()
        refused: bytes | None = None
        while True:
            i = self.router.choose(tried)
            if i is None:
                break
            tried.add(i)
            rep = self.sup.replicas[i]
            incarnation = rep.incarnation
            ticket = self.router.admit(i, cost.prompt_tokens, cost.max_tokens) if cost else \
                self.router.admit(i, 0, 0)
            try:
                resp = await _unless_client_leaves(self.relay.request(
                    request.method, f"{rep.url}{request.url.path}", data=body, headers=headers), request)
            except aiohttp.ClientConnectorError:  # nothing was sent: the request is still ours to place
                ticket.close()
                continue
            except aiohttp.ClientError as e:
                ticket.close()
                return await self._lost(i, incarnation, e)
            except ClientGone:
                ticket.close()
                return Response(status_code=499)
            if resp.status == 429:  # not accepted there: the next replica may take it
                refused = await resp.read()
                resp.release()
                ticket.close()
                continue
            out_headers = {REPLICA_HEADER: str(i)}
            if resp.headers.get("content-type", "").startswith("text/event-stream"):
                return StreamingResponse(self._relay(resp, ticket, i, incarnation), status_code=resp.status,
                                         media_type="text/event-stream", headers=out_headers)
            try:
                content = await _unless_client_leaves(resp.read(), request)
            except aiohttp.ClientError as e:
                return await self._lost(i, incarnation, e)
            except ClientGone:
                return Response(status_code=499)
            finally:
                ticket.close()
                _done(resp)
            return Response(content, status_code=resp.status, headers=out_headers,
                            media_type=resp.headers.get("content-type"))
        if refused is not None:
            self.rejected += 1
            return _error(429, f"every replica's queue is full ({len(tried)} replicas tried)")
        return _error(503, "no replica is serving right now" + (" (shutting down)" if self.sup.stopping else ""))

    async def _why(self, i: int, incarnation: int, e: Exception) -> str:
        how = await self.sup.failure_of(i, incarnation)
        rep = self.sup.replicas[i]
        if how is not None:
            why = f"replica {i} {how} while serving this request"
        else:
            why = f"the connection to replica {i} (port {rep.port}) broke while serving this request " \
                  f"({type(e).__name__}: {e})"
        log.error("a request failed: %s", why)
        return why

    async def _lost(self, i: int, incarnation: int, e: Exception) -> Response:
        self.failed += 1
        return _error(502, await self._why(i, incarnation, e))

    async def _relay(self, resp: aiohttp.ClientResponse, ticket, i: int, incarnation: int):
        """The replica's server-sent events as they come; each event is about one token
        (a few are not: the role chunk, usage, [DONE]), which is close enough for the
        router's books."""
        try:
            async for chunk in resp.content.iter_any():
                ticket.produced(chunk.count(b"data: "))
                yield chunk
        except aiohttp.ClientError as e:
            self.failed += 1
            yield f"data: {json.dumps(error_body(502, await self._why(i, incarnation, e)))}\n\n"
        finally:
            ticket.close()
            _done(resp)


class FrontServer(uvicorn.Server):
    """uvicorn, but SIGTERM / SIGINT also tells the supervisor to stop (no restarts from
    here on), and the signal is not raised again once uvicorn is done, so the replicas are
    stopped and the process exits with its own status."""

    def __init__(self, config: uvicorn.Config, sup: Supervisor):
        super().__init__(config)
        self.sup = sup

    def handle_exit(self, sig, frame) -> None:
        self.sup.stopping = True
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True  # a second Ctrl-C: stop waiting for open responses
        self.should_exit = True


def _progress(msg: str) -> None:
    print(f"[llmc] {msg}", file=sys.stderr, flush=True)


def make_replicas(artifact: str, flags: list[str], envs: list[dict[str, str]], wheres: list[str]
                  ) -> list[ReplicaProcess]:
    return [ReplicaProcess(i, artifact, flags, env, where) for i, (env, where) in enumerate(zip(envs, wheres))]


async def run_front(replicas: list[ReplicaProcess], cost: RequestCost, host: str, port: int, config: DpConfig,
                    log_level: str = "info", progress: Callable[[str], None] = _progress) -> int:
    """Start the replicas, serve until a signal (0) or until the supervisor gives up (1)."""
    relay = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), auto_decompress=False,
                                  timeout=aiohttp.ClientTimeout(total=None, sock_connect=10))
    async with httpx.AsyncClient(timeout=httpx.Timeout(None, connect=10.0)) as client, relay:
        sup = Supervisor(replicas, config, client, progress)
        progress(f"starting {len(replicas)} replicas")
        await sup.start_all()
        front = DpFront(sup, cost, client, relay)
        server = FrontServer(uvicorn.Config(front.app, host=host, port=port, log_level=log_level,
                                            timeout_graceful_shutdown=None), sup)

        def give_up() -> None:
            server.should_exit = True

        sup.on_give_up = give_up
        watch = asyncio.ensure_future(sup.watch())
        try:
            await server.serve()
        finally:
            watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watch
            progress("stopping the replicas")
            await sup.stop_all()
        if sup.gave_up is not None:
            return 1
        return 0


def serve_dp(artifact: str, flags: list[str], envs: list[dict[str, str]], wheres: list[str], host: str, port: int,
             config: DpConfig, chat_template: str | None = None, log_level: str = "info",
             priced_from: str | None = None) -> int:
    """priced_from: the folder whose tokenizer prices requests (a tensor-parallel artifact's
    rank 0; default the artifact itself)."""
    cost = RequestCost.from_artifact(priced_from or artifact, chat_template)  # a bad artifact fails here
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[llmc] %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    replicas = make_replicas(artifact, flags, envs, wheres)
    try:
        return asyncio.run(run_front(replicas, cost, host, port, config, log_level))  # ReplicaFailed: an LLMCError
    finally:
        for r in replicas:  # only after an interrupted start can one still run here
            r.kill()
        log.removeHandler(handler)


__all__ = ["DpFront", "FrontServer", "run_front", "serve_dp", "make_replicas", "REPLICA_HEADER"]
