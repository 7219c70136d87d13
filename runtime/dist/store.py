"""A tiny TCP key-value store for rendezvous, hosted by rank 0 (stdlib sockets and threads).

Every rank, rank 0 included, is a client of one server that rank 0 runs in a daemon thread.
Keys are strings, values bytes. `get` and `wait` block on the server until the keys exist or
the timeout passes, so a rank that never arrives turns into a `StoreTimeout` naming the
missing keys instead of a hang; `add` is an atomic counter (barriers, sequence numbers).

Wire format, both ways: `!II` (header length, body length), a JSON header, the body bytes.
The store is for small values (addresses, NCCL ids, per-rank info), not for tensors.
"""
from __future__ import annotations

import json
import socket
import struct
import threading
import time
from typing import Iterable

from .errors import DistError

_FRAME = struct.Struct("!II")
_GRACE = 5.0  # a reply may arrive this much after the server-side timeout before we give up
_MAX_HEADER = 1 << 20
_MAX_BODY = 64 << 20


class StoreTimeout(DistError):
    """Keys that did not appear in time; `.missing` lists them."""

    def __init__(self, message: str, missing: list[str]):
        super().__init__(message)
        self.missing = missing


def _recv_exact(sock: socket.socket, n: int, what: str) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            raise DistError(f"{what}: connection closed")
        got += k
    return bytes(buf)


def _send_frame(sock: socket.socket, header: dict, body: bytes = b"") -> None:
    h = json.dumps(header).encode()
    sock.sendall(_FRAME.pack(len(h), len(body)) + h + body)


def _recv_frame(sock: socket.socket, what: str) -> tuple[dict, bytes]:
    hlen, blen = _FRAME.unpack(_recv_exact(sock, _FRAME.size, what))
    if hlen > _MAX_HEADER or blen > _MAX_BODY:
        raise DistError(f"{what}: frame of {hlen}+{blen} bytes is not from an llmc store (wrong MASTER_PORT?)")
    header = json.loads(_recv_exact(sock, hlen, what))
    body = _recv_exact(sock, blen, what) if blen else b""
    return header, body


class StoreServer:
    """The server half: a dict guarded by a condition variable, a thread per connection."""

    def __init__(self, host: str, port: int):
        try:
            self._sock = socket.create_server((host, port), reuse_port=False)
        except OSError as e:
            raise DistError(f"rank 0 cannot host the rendezvous store on {host or '*'}:{port} ({e}); "
                            f"is MASTER_PORT in use by another job?") from None
        self.port = self._sock.getsockname()[1]
        self._data: dict[str, bytes] = {}
        self._cond = threading.Condition()
        self._conns: set[socket.socket] = set()
        self._closed = False
        self._thread = threading.Thread(target=self._accept_loop, name="llmc-store", daemon=True)
        self._thread.start()

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return  # closed
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._cond:
                self._conns.add(conn)
            threading.Thread(target=self._serve, args=(conn,), name="llmc-store-conn", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            while True:
                try:
                    header, body = _recv_frame(conn, "store client")
                except (DistError, OSError, ValueError):
                    return
                reply, out = self._handle(header, body)
                _send_frame(conn, reply, out)
        except OSError:
            return
        finally:
            with self._cond:
                self._conns.discard(conn)
                self._cond.notify_all()
            conn.close()

    def _handle(self, h: dict, body: bytes) -> tuple[dict, bytes]:
        op = h.get("op")
        with self._cond:
            if op == "set":
                self._data[h["key"]] = body
                self._cond.notify_all()
                return {"ok": True}, b""
            if op == "add":
                value = int(self._data.get(h["key"], b"0")) + int(h["n"])
                self._data[h["key"]] = str(value).encode()
                self._cond.notify_all()
                return {"ok": True, "value": value}, b""
            if op in ("get", "wait"):
                keys = [h["key"]] if op == "get" else list(h["keys"])
                self._cond.wait_for(lambda: all(k in self._data for k in keys), timeout=float(h["timeout"]))
                missing = [k for k in keys if k not in self._data]
                if missing:
                    return {"ok": False, "missing": missing}, b""
                return {"ok": True}, (self._data[keys[0]] if op == "get" else b"")
            if op == "wait_count":
                key, n = h["key"], int(h["n"])
                self._cond.wait_for(lambda: int(self._data.get(key, b"0")) >= n, timeout=float(h["timeout"]))
                value = int(self._data.get(key, b"0"))
                return ({"ok": True, "value": value} if value >= n else {"ok": False, "missing": [key]}), b""
            if op == "check":
                return {"ok": True, "present": [k for k in h["keys"] if k in self._data]}, b""
            if op == "delete":
                self._data.pop(h["key"], None)
                return {"ok": True}, b""
        return {"ok": False, "error": f"unknown op {op!r}"}, b""

    def connections(self) -> int:
        with self._cond:
            return len(self._conns)

    def close(self, linger: float = 0.0) -> None:
        """Stop serving: stop accepting (a rank that dials now retries, e.g. until the next
        store binds the port), wait up to `linger` s for the clients to disconnect (rank 0 may
        finish before the others have read what they need), then drop the rest."""
        self._closed = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        with self._cond:
            self._cond.wait_for(lambda: not self._conns, timeout=linger)
            for conn in list(self._conns):
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


class Store:
    """A client of the store (and on rank 0, its host). Thread-safe: requests are serialized.

    >>> store = Store("127.0.0.1", 29500, is_master=(rank == 0), timeout=60)
    >>> store.set("k", b"v"); store.get("k")
    """

    def __init__(self, host: str, port: int, *, is_master: bool, timeout: float = 60.0,
                 bind_host: str | None = None):
        self.host, self.timeout = host, float(timeout)
        self.server = None
        if is_master:
            self.server = StoreServer(_bind_host(host) if bind_host is None else bind_host, port)
            port = self.server.port
        self.port = port
        self._lock = threading.Lock()
        self._sock = self._connect(host, port, self.timeout)

    @staticmethod
    def _connect(host: str, port: int, timeout: float) -> socket.socket:
        deadline = time.monotonic() + timeout
        last: OSError | None = None
        while True:  # rank 0 may not be listening yet
            try:
                sock = socket.create_connection((host, port), timeout=max(0.1, min(5.0, deadline - time.monotonic())))
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                return sock
            except OSError as e:
                last = e
            if time.monotonic() >= deadline:
                raise StoreTimeout(f"could not reach the rendezvous store that rank 0 hosts at {host}:{port} "
                                   f"within {timeout:g} s ({last}): rank 0 did not arrive, or MASTER_ADDR / "
                                   f"MASTER_PORT differ between ranks", ["rank 0"])
            time.sleep(0.05)

    @property
    def closed(self) -> bool:
        return self._sock is None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def local_ip(self) -> str:
        """This host's address on the route to rank 0 (what other ranks can reach us on)."""
        return self._sock.getsockname()[0]

    def _request(self, header: dict, body: bytes = b"", wait: float = 0.0) -> tuple[dict, bytes]:
        with self._lock:
            if self._sock is None:
                raise DistError("the store client is closed")
            self._sock.settimeout(wait + _GRACE)
            try:
                _send_frame(self._sock, header, body)
                reply, out = _recv_frame(self._sock, f"rendezvous store at {self.address}")
            except socket.timeout:
                raise DistError(f"the rendezvous store at {self.address} did not answer within "
                                f"{wait + _GRACE:g} s") from None
            except (OSError, DistError) as e:
                raise DistError(f"lost the rendezvous store at {self.address} ({e}): "
                                f"did rank 0 exit?") from None
        if not reply.get("ok") and "error" in reply:
            raise DistError(f"store: {reply['error']}")
        return reply, out

    def set(self, key: str, value: bytes) -> None:
        self._request({"op": "set", "key": key}, bytes(value))

    def get(self, key: str, timeout: float | None = None) -> bytes:
        t = self.timeout if timeout is None else float(timeout)
        reply, out = self._request({"op": "get", "key": key, "timeout": t}, wait=t)
        if not reply["ok"]:
            raise StoreTimeout(f"store key {key!r} did not appear within {t:g} s", reply["missing"])
        return out

    def wait(self, keys: Iterable[str], timeout: float | None = None) -> None:
        keys = list(keys)
        t = self.timeout if timeout is None else float(timeout)
        reply, _ = self._request({"op": "wait", "keys": keys, "timeout": t}, wait=t)
        if not reply["ok"]:
            raise StoreTimeout(f"store keys {reply['missing']} did not appear within {t:g} s", reply["missing"])

    def add(self, key: str, n: int = 1) -> int:
        return int(self._request({"op": "add", "key": key, "n": int(n)})[0]["value"])

    def wait_count(self, key: str, n: int, timeout: float | None = None) -> int:
        """Block until the counter `key` (see `add`) reaches at least n; a barrier on the store."""
        t = self.timeout if timeout is None else float(timeout)
        reply, _ = self._request({"op": "wait_count", "key": key, "n": int(n), "timeout": t}, wait=t)
        if not reply["ok"]:
            raise StoreTimeout(f"counter {key!r} did not reach {n} within {t:g} s", [key])
        return int(reply["value"])

    def check(self, keys: Iterable[str]) -> list[str]:
        """The keys among `keys` that exist now (no waiting)."""
        return list(self._request({"op": "check", "keys": list(keys)})[0]["present"])

    def delete(self, key: str) -> None:
        self._request({"op": "delete", "key": key})

    def close(self, linger: float = 0.0) -> None:
        """Disconnect; rank 0 then waits up to `linger` s for the other ranks to disconnect
        before it stops the server."""
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None
        if self.server is not None:
            self.server.close(linger)
            self.server = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _bind_host(master_addr: str) -> str:
    """Listen on loopback only when rank 0 is named by a loopback address, else everywhere."""
    try:
        ip = socket.gethostbyname(master_addr)
    except OSError:
        return ""
    return ip if ip.startswith("127.") else ""
