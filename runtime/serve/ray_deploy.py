"""`llmc serve` replicas as a Ray Serve deployment, for replicas across hosts (the `cluster`
extra: `pip install 'llmc[cluster]'`). Ray is imported only when this is used.

Each Ray replica is an actor that runs one ordinary `llmc serve ARTIFACT` process on a
loopback port of its node (one engine; with `gpus`, on the GPUs Ray gave the actor, which
Ray names in CUDA_VISIBLE_DEVICES) and passes HTTP requests through to it, streams
included. Ray Serve does the rest with its own machinery, not ours: its HTTP proxy on each
node, its router (the replica with fewer ongoing requests of two picked at random), its
autoscaler (between `replicas` and `max_replicas` on ongoing requests per replica), and
its health checks (`check_health` below: the process must be alive and answer /health),
which replace a failed replica with a fresh one.

    llmc serve ART --ray --dp 2                   # a local Ray cluster, 2 replicas
    llmc serve ART --ray --ray-address auto --dp 2 --ray-max-replicas 8 --host 0.0.0.0
    # or from Python:  serve.run(build_app("/shared/ART", flags, replicas=2))

ARTIFACT must be readable at the same path on every node (a shared file system).
"""
from __future__ import annotations

import json
import signal
import threading
import time
from typing import Callable

import httpx

from .replica_process import ReplicaFailed, ReplicaProcess, describe_exit

DEPLOYMENT = "llmc"


class LlmcReplica:
    """The deployment's class (wrapped by `serve.deployment` in build_app): one `llmc serve`
    process and a pass-through to it."""

    def __init__(self, artifact: str, flags: list[str], startup_timeout: float = 900.0):
        from ray import serve

        self.tag = serve.get_replica_context().replica_tag
        self.proc = ReplicaProcess(0, artifact, flags, where=f"ray replica {self.tag}")
        self.proc.start()
        deadline = time.monotonic() + startup_timeout
        while True:  # the constructor is synchronous: Ray marks the replica running when it returns
            rc = self.proc.poll()
            if rc is not None:
                raise ReplicaFailed(f"{self.proc} {describe_exit(rc)} while starting")
            try:
                if httpx.get(f"{self.proc.url}/health", timeout=5.0).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.proc.kill()
                raise ReplicaFailed(f"{self.proc} did not answer /health within {startup_timeout:.0f} s")
            time.sleep(0.1)
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=10.0),
                                        limits=httpx.Limits(max_connections=None))

    async def __call__(self, request):
        from starlette.responses import JSONResponse, Response, StreamingResponse

        from .dp_front import FORWARDED, REPLICA_HEADER
        from .openai_api import error_body

        body = await request.body()
        headers = {k: v for k, v in request.headers.items() if k.lower() in FORWARDED}
        upstream = self.client.build_request(request.method, f"{self.proc.url}{request.url.path}", content=body,
                                             headers=headers)
        try:
            resp = await self.client.send(upstream, stream=True)
        except httpx.TransportError as e:
            return JSONResponse(error_body(502, self._why(e)), status_code=502)
        out_headers = {REPLICA_HEADER: self.tag}
        if resp.headers.get("content-type", "").startswith("text/event-stream"):
            async def relay():
                try:
                    async for chunk in resp.aiter_raw():
                        yield chunk
                except httpx.TransportError as e:
                    yield f"data: {json.dumps(error_body(502, self._why(e)))}\n\n"
                finally:
                    await resp.aclose()

            return StreamingResponse(relay(), status_code=resp.status_code, media_type="text/event-stream",
                                     headers=out_headers)
        try:
            content = await resp.aread()
        except httpx.TransportError as e:
            return JSONResponse(error_body(502, self._why(e)), status_code=502)
        finally:
            await resp.aclose()
        return Response(content, status_code=resp.status_code, headers=out_headers,
                        media_type=resp.headers.get("content-type"))

    def _why(self, e: Exception) -> str:
        rc = self.proc.poll()
        if rc is not None:
            return f"the llmc serve process of Ray replica {self.tag} {describe_exit(rc)} while serving this request"
        return f"the connection to Ray replica {self.tag}'s llmc serve broke ({type(e).__name__}: {e})"

    async def check_health(self) -> None:
        """Ray calls this every health_check_period_s; raising marks the replica unhealthy,
        and Ray replaces it."""
        rc = self.proc.poll()
        if rc is not None:
            raise ReplicaFailed(f"{self.proc} {describe_exit(rc)}")
        try:
            r = await self.client.get(f"{self.proc.url}/health", timeout=10.0)
        except httpx.TransportError as e:
            raise ReplicaFailed(f"{self.proc} does not answer /health ({type(e).__name__})") from None
        if r.status_code != 200:
            raise ReplicaFailed(f"{self.proc} /health answered {r.status_code}")

    def __del__(self):
        proc = getattr(self, "proc", None)
        if proc is not None and proc.poll() is None:
            proc.terminate()  # it drains what it has and exits (and dies with this actor regardless)


def build_app(artifact: str, flags: list[str], replicas: int = 1, max_replicas: int | None = None,
              gpus: int = 0, cpus_per_replica: float = 1.0, max_ongoing_requests: int = 256,
              target_ongoing_requests: float = 32.0, health_check_period_s: float = 10.0,
              health_check_timeout_s: float = 30.0):
    """The bound Ray Serve application: `replicas` of LlmcReplica (each asking Ray for `gpus`
    GPUs: 1, or a tensor-parallel artifact's group size), or (max_replicas above replicas)
    autoscaled between the two on ongoing requests per replica. A replica takes
    up to max_ongoing_requests at once: the engine batches them continuously, so Ray's
    small default would starve it."""
    from ray import serve

    from ...errors import LLMCError

    if replicas < 1 or (max_replicas is not None and max_replicas < replicas):
        raise LLMCError(f"Ray replicas: need 1 <= replicas <= max_replicas, got {replicas} and {max_replicas}")
    options = dict(ray_actor_options={"num_cpus": cpus_per_replica, "num_gpus": gpus},
                   max_ongoing_requests=max_ongoing_requests, health_check_period_s=health_check_period_s,
                   health_check_timeout_s=health_check_timeout_s)
    if max_replicas is not None and max_replicas > replicas:
        options["autoscaling_config"] = {"min_replicas": replicas, "initial_replicas": replicas,
                                         "max_replicas": max_replicas,
                                         "target_ongoing_requests": target_ongoing_requests}
    else:
        options["num_replicas"] = replicas
    return serve.deployment(LlmcReplica, name=DEPLOYMENT).options(**options).bind(artifact, flags)


def serve_ray(artifact: str, flags: list[str], replicas: int, max_replicas: int | None, host: str, port: int,
              address: str | None = None, gpus: int = 0, progress: Callable[[str], None] = print) -> int:
    """`llmc serve ART --ray`: deploy, then serve until SIGINT / SIGTERM."""
    from ...errors import LLMCError

    try:
        import ray
        from ray import serve
    except ImportError as e:
        raise LLMCError(f"llmc serve --ray needs the cluster extra (pip install 'llmc[cluster]'): {e}") from None
    progress(f"Ray: {'connecting to ' + address if address else 'starting a local cluster'}")
    ray.init(address=address, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": host, "port": port})
        progress(f"Ray Serve: deploying {replicas} replica(s)" +
                 (f", autoscaling up to {max_replicas}" if max_replicas and max_replicas > replicas else ""))
        serve.run(build_app(artifact, flags, replicas, max_replicas, gpus), name=DEPLOYMENT, route_prefix="/")
        progress(f"serving on http://{host}:{port} (Ray Serve; Ctrl-C stops)")
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        while not stop.wait(0.5):
            pass
        progress("stopping the deployment")
        serve.delete(DEPLOYMENT)
        serve.shutdown()
    finally:
        ray.shutdown()
    return 0


__all__ = ["LlmcReplica", "build_app", "serve_ray", "DEPLOYMENT"]
