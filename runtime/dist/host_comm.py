"""HostComm: collectives on numpy arrays between processes, over TCP (CPU tensor parallelism).

Correct rather than fast. At construction every member listens on a port, publishes it
through the store, and opens one connection to each other member (the higher group rank
dials the lower); the connections are kept for the communicator's life, so no call
reconnects. Collectives go through group rank 0: it sums (in rank order, so every rank gets
bit-identical results, as greedy decoding across ranks needs) or concatenates, then sends
the result back.

`send` blocks until the socket has taken the data, and a large message only goes once the
peer receives: order sends and receives as with blocking MPI (an exchange between two ranks:
one sends first, the other receives first).

Every message carries an op code and its byte count, so ranks that disagree about the call
(all_gather on one, all_reduce on another) or about shapes get a DistError instead of
reading garbage. A peer that exits closes its sockets: the others get a DistError at once;
a peer that hangs gives one after `timeout` seconds.
"""
from __future__ import annotations

import hashlib
import json
import socket
import struct
from typing import Sequence

import numpy as np

from .comm import GroupBase, check_gather_shapes, host_array
from .errors import DistError
from .rendezvous import DEFAULT_TIMEOUT, DistEnv, connect_store
from .store import Store

_MSG = struct.Struct("!BQ")  # op, payload bytes
_HELLO = struct.Struct("!I8s")  # dialing member's group rank, digest of the group name
OP_P2P, OP_ALL_REDUCE, OP_ALL_GATHER, OP_BROADCAST, OP_BARRIER = 1, 2, 3, 4, 5
_OP_NAMES = {OP_P2P: "send/recv", OP_ALL_REDUCE: "all_reduce", OP_ALL_GATHER: "all_gather",
             OP_BROADCAST: "broadcast", OP_BARRIER: "barrier"}


class HostComm(GroupBase):
    """A group of ranks exchanging numpy arrays over TCP.

    `HostComm.create(env)` makes the world group;
    `HostComm(store, global_rank, ranks, name)` makes a group of the given global ranks
    (called by its members only); `split(color, key)` makes sub-groups collectively."""

    def __init__(self, store: Store, global_rank: int, ranks: Sequence[int], name: str = "world",
                 timeout: float = DEFAULT_TIMEOUT):
        super().__init__(store, global_rank, ranks, name, timeout)
        self._peers: dict[int, socket.socket] = {}
        self._digest = hashlib.sha1(name.encode()).digest()[:8]
        if self.world_size > 1:
            self._connect()

    @classmethod
    def create(cls, env: DistEnv | None = None, timeout: float = DEFAULT_TIMEOUT, name: str = "world") -> "HostComm":
        """The world communicator of the job described by `env` (default: the environment),
        over the process's store. Give each world communicator of a job its own `name`."""
        env = DistEnv.from_environ() if env is None else env
        if env.world_size == 1:
            return cls(None, 0, [0], name, timeout)  # type: ignore[arg-type]
        return cls(connect_store(env, timeout), env.rank, range(env.world_size), name, timeout)

    def subgroup(self, ranks: Sequence[int], name: str) -> "HostComm":
        return HostComm(self.store, self.global_rank, ranks, name, self.timeout)

    # ---- setup -------------------------------------------------------------------------------
    def _connect(self) -> None:
        ip = self.store.local_ip()
        if ip.startswith("127.") and not _loopback(self.store.host):
            ip = self.store.host  # the store's own host (its name may resolve to 127.0.1.1 there): others reach it so
        listener = socket.create_server((ip if ip.startswith("127.") else "", 0), backlog=self.world_size)
        try:
            port = listener.getsockname()[1]
            addrs = [json.loads(v) for v in self.exchange_keys("addr", json.dumps([ip, port]).encode())]
            for peer in range(self.rank):  # dial the lower ranks: their listeners are up
                host, pport = addrs[peer]
                try:
                    sock = socket.create_connection((host, pport), timeout=self.timeout)
                except OSError as e:
                    raise DistError(f"communicator {self.name!r}: rank {self.global_rank} cannot reach rank "
                                    f"{self.ranks[peer]} at {host}:{pport} ({e}; did it exit?)") from None
                sock.sendall(_HELLO.pack(self.rank, self._digest))
                self._peers[peer] = sock
            listener.settimeout(self.timeout)
            for _ in range(self.rank + 1, self.world_size):  # and accept the higher ones
                try:
                    sock, _ = listener.accept()
                except socket.timeout:
                    waiting = [self.ranks[p] for p in range(self.rank + 1, self.world_size) if p not in self._peers]
                    raise DistError(f"communicator {self.name!r}: rank(s) {waiting} did not connect to rank "
                                    f"{self.global_rank} within {self.timeout:g} s") from None
                sock.settimeout(self.timeout)
                peer, digest = _HELLO.unpack(self._read(sock, _HELLO.size, None, "connect"))
                if digest != self._digest or not self.rank < peer < self.world_size or peer in self._peers:
                    sock.close()
                    raise DistError(f"communicator {self.name!r}: unexpected connection (group rank {peer})")
                self._peers[peer] = sock
        except BaseException:
            self._close_peers()
            raise
        finally:
            listener.close()
        for sock in self._peers.values():
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(self.timeout)

    # ---- messages ----------------------------------------------------------------------------
    def _read(self, sock: socket.socket, n: int, peer: int | None, what: str, into: memoryview | None = None) -> bytes:
        view = memoryview(bytearray(n)) if into is None else into
        got = 0
        try:
            while got < n:
                k = sock.recv_into(view[got:], n - got)
                if k == 0:
                    raise DistError(f"{what}: rank {self._who(peer)} closed its connection to rank "
                                    f"{self.global_rank} (did it exit?)")
                got += k
        except socket.timeout:
            raise DistError(f"{what}: rank {self.global_rank} got nothing from rank {self._who(peer)} within "
                            f"{self.timeout:g} s") from None
        except ConnectionError as e:
            raise DistError(f"{what}: rank {self._who(peer)} closed its connection to rank {self.global_rank} "
                            f"({e}; did it exit?)") from None
        return bytes(view) if into is None else b""

    def _who(self, peer: int | None) -> str:
        return "?" if peer is None else str(self.ranks[peer])

    def _send(self, peer: int, op: int, data: np.ndarray | None, what: str) -> None:
        payload = b"" if data is None else _bytes(data)
        try:
            self._peers[peer].sendall(_MSG.pack(op, len(payload)))
            if len(payload):
                self._peers[peer].sendall(payload)
        except socket.timeout:
            raise DistError(f"{what}: rank {self._who(peer)} did not take rank {self.global_rank}'s data within "
                            f"{self.timeout:g} s") from None
        except OSError as e:
            raise DistError(f"{what}: sending to rank {self._who(peer)} failed ({e}; did it exit?)") from None

    def _recv(self, peer: int, op: int, into: np.ndarray | None, what: str) -> None:
        got_op, nbytes = _MSG.unpack(self._read(self._peers[peer], _MSG.size, peer, what))
        want = 0 if into is None else into.nbytes
        if got_op != op:
            raise DistError(f"{what}: rank {self._who(peer)} is in {_OP_NAMES.get(got_op, got_op)} while rank "
                            f"{self.global_rank} is in {_OP_NAMES[op]} (ranks must make the same calls in order)")
        if nbytes != want:
            raise DistError(f"{what}: rank {self._who(peer)} sent {nbytes} bytes, rank {self.global_rank} expects "
                            f"{want} (shapes or dtypes differ between ranks)")
        if want:
            self._read(self._peers[peer], want, peer, what, into=_bytes(into))

    # ---- host collectives --------------------------------------------------------------------
    def send(self, buf: np.ndarray, peer: int) -> None:
        self._send(self._check_peer(peer, "send"), OP_P2P, host_array(buf, "send", writeable=False), "send")

    def recv(self, buf: np.ndarray, peer: int) -> None:
        self._recv(self._check_peer(peer, "recv"), OP_P2P, host_array(buf, "recv"), "recv")

    def all_reduce(self, buf: np.ndarray) -> None:
        host_array(buf, "all_reduce")
        if self.world_size == 1:
            return
        if self.rank == 0:
            tmp = np.empty_like(buf)
            for p in range(1, self.world_size):  # rank order: the same sum on every rank
                self._recv(p, OP_ALL_REDUCE, tmp, "all_reduce")
                np.add(buf, tmp, out=buf)
            for p in range(1, self.world_size):
                self._send(p, OP_ALL_REDUCE, buf, "all_reduce")
        else:
            self._send(0, OP_ALL_REDUCE, buf, "all_reduce")
            self._recv(0, OP_ALL_REDUCE, buf, "all_reduce")

    def all_gather(self, src: np.ndarray, dst: np.ndarray) -> None:
        host_array(src, "all_gather", writeable=False)
        host_array(dst, "all_gather")
        check_gather_shapes(src, dst, self.world_size)
        rows = dst.reshape(self.world_size, dst.size // self.world_size)
        if self.rank == 0:
            rows[0] = src.reshape(-1)
            for p in range(1, self.world_size):
                self._recv(p, OP_ALL_GATHER, rows[p], "all_gather")
            for p in range(1, self.world_size):
                self._send(p, OP_ALL_GATHER, dst, "all_gather")
        else:
            self._send(0, OP_ALL_GATHER, src, "all_gather")
            self._recv(0, OP_ALL_GATHER, dst, "all_gather")

    def broadcast(self, buf: np.ndarray, root: int = 0) -> None:
        host_array(buf, "broadcast")
        root = self._check_peer(root, "broadcast")
        if self.rank == root:
            for p in range(self.world_size):
                if p != root:
                    self._send(p, OP_BROADCAST, buf, "broadcast")
        else:
            self._recv(root, OP_BROADCAST, buf, "broadcast")

    def barrier(self) -> None:
        if self.world_size == 1:
            return
        if self.rank == 0:
            for p in range(1, self.world_size):
                self._recv(p, OP_BARRIER, None, "barrier")
            for p in range(1, self.world_size):
                self._send(p, OP_BARRIER, None, "barrier")
        else:
            self._send(0, OP_BARRIER, None, "barrier")
            self._recv(0, OP_BARRIER, None, "barrier")

    # ---- device calls: not here ---------------------------------------------------------------
    def _no_device(self, what: str):
        raise DistError(f"HostComm.{what}: HostComm moves host (numpy) arrays only; device buffers need NcclComm")

    def all_reduce_device(self, ptr, count, dtype, stream=0):
        self._no_device("all_reduce_device")

    def all_gather_device(self, src_ptr, dst_ptr, count, dtype, stream=0):
        self._no_device("all_gather_device")

    def send_device(self, ptr, count, dtype, peer, stream=0):
        self._no_device("send_device")

    def recv_device(self, ptr, count, dtype, peer, stream=0):
        self._no_device("recv_device")

    # ---- teardown ----------------------------------------------------------------------------
    def _close_peers(self) -> None:
        for sock in self._peers.values():
            sock.close()
        self._peers.clear()

    def close(self) -> None:
        self._close_peers()
        self._close_store()

    def __del__(self):
        if hasattr(self, "_peers"):
            self._close_peers()


def _loopback(host: str) -> bool:
    try:
        return socket.gethostbyname(host).startswith("127.")
    except OSError:
        return False


def _bytes(a: np.ndarray) -> memoryview:
    """The array's bytes, without a copy (works for dtypes the buffer protocol lacks, e.g. bfloat16)."""
    return memoryview(a.reshape(-1).view(np.uint8))
