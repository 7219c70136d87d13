"""Who am I and who else runs: the standard rendezvous variables, and the info exchange.

The variables are the ones torchrun, Kubernetes' PyTorchJob and most launchers set:
RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT. Under Slurm's srun, when RANK is
not set, SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID stand in for RANK / WORLD_SIZE /
LOCAL_RANK (MASTER_ADDR and MASTER_PORT are still needed: the batch script sets them, e.g.
from `scontrol show hostnames`). This module is the one place that reads them.

`rendezvous(env, info)` has every rank publish a JSON-able dict (artifact fingerprint, tp,
pp, ...) through rank 0's store and return everyone's, in rank order; ranks that do not
arrive within the timeout are named in a RendezvousError. `check_consistent` then names the
rank and field that differ.
"""
from __future__ import annotations

import atexit
import json
import os
import threading
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from .errors import RendezvousError
from .store import Store, StoreTimeout

DEFAULT_TIMEOUT = 300.0  # seconds: ranks may still be loading weights when rank 0 arrives


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job. `source` says where it came from: "env" (RANK...),
    "slurm", or "single" (no variables: one process, rank 0 of 1)."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    local_world_size: int | None = None
    source: str = "env"

    @property
    def is_master(self) -> bool:
        return self.rank == 0

    @classmethod
    def single(cls) -> "DistEnv":
        return cls(0, 1, 0, "127.0.0.1", 0, 1, "single")

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> "DistEnv":
        """Parse the variables (os.environ by default). No variables at all: a single process.
        LOCAL_RANK defaults to 0 (one process per host or pod, as Kubernetes jobs run)."""
        e = os.environ if environ is None else environ
        if e.get("RANK", "") != "":
            names = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
            source = "env"
        elif e.get("SLURM_PROCID", "") != "":
            names = ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NTASKS_PER_NODE")
            source = "slurm"
        elif e.get("WORLD_SIZE", "") not in ("", "1"):
            raise RendezvousError(f"WORLD_SIZE={e['WORLD_SIZE']} is set but RANK is not: set RANK to this "
                                  f"process's index (0..WORLD_SIZE-1)")
        else:
            return cls.single()
        rank_v, world_v, local_v, local_world_v = names
        rank = _int(e, rank_v, lo=0)
        if e.get(world_v, "") == "":
            raise RendezvousError(f"{rank_v}={rank} is set but {world_v} is not: set it to the number of processes")
        world = _int(e, world_v, lo=1)
        if rank >= world:
            raise RendezvousError(f"{rank_v}={rank} is outside the world: {world_v}={world} allows ranks 0..{world - 1}")
        local = _int(e, local_v, lo=0) if e.get(local_v, "") != "" else 0
        local_world = None
        raw = e.get(local_world_v, "")
        if raw.isdigit():  # SLURM_NTASKS_PER_NODE may read "4(x2)": only a plain count is used
            local_world = int(raw)
        if world == 1:
            return cls(rank, 1, local, e.get("MASTER_ADDR") or "127.0.0.1",
                       _int(e, "MASTER_PORT", lo=0, hi=65535) if e.get("MASTER_PORT") else 0, local_world, source)
        addr = e.get("MASTER_ADDR", "").strip()
        if not addr:
            raise RendezvousError(f"MASTER_ADDR is not set: with {world_v}={world} every rank needs the host "
                                  f"name or address of rank 0")
        if e.get("MASTER_PORT", "") == "":
            raise RendezvousError(f"MASTER_PORT is not set: with {world_v}={world} every rank needs the TCP port "
                                  f"rank 0 listens on (any free port, the same for all ranks)")
        port = _int(e, "MASTER_PORT", lo=1, hi=65535)
        return cls(rank, world, local, addr, port, local_world, source)

    def variables(self) -> dict[str, str]:
        """The standard variables that describe this env (what a launcher sets for a child)."""
        out = {"RANK": str(self.rank), "WORLD_SIZE": str(self.world_size), "LOCAL_RANK": str(self.local_rank),
               "MASTER_ADDR": self.master_addr, "MASTER_PORT": str(self.master_port)}
        if self.local_world_size is not None:
            out["LOCAL_WORLD_SIZE"] = str(self.local_world_size)
        return out


def _int(e: Mapping[str, str], name: str, lo: int, hi: int | None = None) -> int:
    raw = e.get(name, "")
    try:
        v = int(raw.strip())
    except ValueError:
        raise RendezvousError(f"{name}={raw!r} is not an integer") from None
    if v < lo or (hi is not None and v > hi):
        bound = f"between {lo} and {hi}" if hi is not None else f">= {lo}"
        raise RendezvousError(f"{name}={v} is out of range (must be {bound})")
    return v


_stores: dict[tuple[str, int, int], Store] = {}
_stores_lock = threading.Lock()


def connect_store(env: DistEnv, timeout: float = DEFAULT_TIMEOUT) -> Store:
    """This process's client of the job's store (rank 0 hosts it on MASTER_PORT), made on
    first use and kept for the process's life: rendezvous and every communicator share it.
    The store ends when rank 0 exits (or calls `close_store`); the exchanges made through it
    (rendezvous, communicator setup) return only once every rank has read what it needs, so
    that never cuts one short."""
    key = (env.master_addr, env.master_port, env.rank)
    with _stores_lock:
        store = _stores.get(key)
        if store is None or store.closed:
            store = _stores[key] = Store(env.master_addr, env.master_port, is_master=env.is_master, timeout=timeout)
            if len(_stores) == 1:
                atexit.register(_close_all)
        return store


def close_store(env: DistEnv, linger: float = 0.0) -> None:
    with _stores_lock:
        store = _stores.pop((env.master_addr, env.master_port, env.rank), None)
    if store is not None:
        store.close(linger)


def _close_all() -> None:
    with _stores_lock:
        stores = list(_stores.values())
        _stores.clear()
    for s in sorted(stores, key=lambda s: s.server is not None):  # clients first, hosts last
        s.close(0.0)


def rendezvous(env: DistEnv, info: Mapping[str, Any], timeout: float = DEFAULT_TIMEOUT, *,
               store: Store | None = None, tag: str = "main") -> list[dict]:
    """Publish this rank's `info` (a JSON-able dict) and return every rank's, in rank order.

    Raises RendezvousError naming the ranks that did not arrive within `timeout` s. The store
    is the process's (`connect_store`) unless one is given. Each call is a new round: the
    k-th call with a `tag` on every rank meet each other."""
    try:
        payload = json.dumps(dict(info), sort_keys=True).encode()
    except TypeError as e:
        raise RendezvousError(f"rendezvous info must be JSON-serializable: {e}") from None
    if env.world_size == 1:
        return [json.loads(payload)]
    store = connect_store(env, timeout) if store is None else store
    gen = store.add(f"rdzv/{tag}/generation/{env.rank}")  # a repeated rendezvous never reads an old one's keys
    keys = [f"rdzv/{tag}@{gen}/info/{r}" for r in range(env.world_size)]
    store.set(keys[env.rank], payload)
    try:
        store.wait(keys, timeout)
    except StoreTimeout:
        present = set(store.check(keys))
        missing = [r for r, k in enumerate(keys) if k not in present]
        raise RendezvousError(
            f"rendezvous {tag!r}: rank{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing))} of "
            f"{env.world_size} did not arrive within {timeout:g} s (store {store.address}; this is rank "
            f"{env.rank})") from None
    infos = [json.loads(store.get(k, timeout)) for k in keys]
    done = f"rdzv/{tag}@{gen}/done"
    store.add(done)
    store.wait_count(done, env.world_size, timeout)  # all have read: rank 0 may now exit
    return infos


def check_consistent(infos: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> None:
    """Raise RendezvousError unless every rank has the same value as rank 0 for each key,
    naming each rank and field that differ ("rank 1 has tp=4, rank 0 tp=2")."""
    if not infos:
        return
    ref = infos[0]
    problems = []
    for key in keys:
        if key not in ref:
            problems.append(f"rank 0 has no {key!r}")
            continue
        for r, info in enumerate(infos[1:], start=1):
            if key not in info:
                problems.append(f"rank {r} has no {key!r}, rank 0 {key}={ref[key]!r}")
            elif info[key] != ref[key]:
                problems.append(f"rank {r} has {key}={_show(info[key])}, rank 0 {key}={_show(ref[key])}")
    if problems:
        raise RendezvousError("ranks disagree: " + "; ".join(problems))


def _show(v: Any) -> str:
    return str(v) if isinstance(v, (int, float)) else repr(v)
