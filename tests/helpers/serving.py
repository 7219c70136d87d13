"""Real uvicorn servers over llmc's serving engine, on loopback ports, for the serving tests."""
from __future__ import annotations

import contextlib
import socket
import threading
import time


class Running:
    def __init__(self, engine, port: int, model: str):
        self.engine, self.port, self.model = engine, port, model
        self.base_url = f"http://127.0.0.1:{port}/v1"

    def metrics(self) -> dict[str, float]:
        import httpx

        text = httpx.get(f"http://127.0.0.1:{self.port}/metrics").text
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out


@contextlib.contextmanager
def serving(artifact, config=None, **build_kw):
    """A real uvicorn server (in a thread of this process) over a fresh engine."""
    import uvicorn

    from llmc.runtime.serve.engine import EngineConfig
    from llmc.runtime.serve.server import DrainingServer, build

    engine, api = build(artifact, config or EngineConfig(), **build_kw)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = DrainingServer(uvicorn.Config(api.app, log_level="warning"), engine)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield Running(engine, sock.getsockname()[1], api.model_name)
    finally:
        server.should_exit = True
        thread.join(30)
        engine.shutdown(drain=False, timeout=30)
        assert engine.failure is None, engine.failure


def metric(m: dict[str, float], name: str) -> float:
    return m.get(name, 0.0)


__all__ = ["serving", "Running", "metric"]
