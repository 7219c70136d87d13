"""The communicator interface the runtime's collective calls go through, and what the two
implementations share (groups, splits, argument checks).

A communicator spans a group of ranks: the world, or a sub-group (a tensor-parallel group,
a pipeline stage pair) made by `split(color, key)` - a collective call over the parent in
which ranks with the same color form one group, ordered by key - or by constructing it with
the list of global ranks (only the members call that). Ranks inside a group are numbered
0..world_size-1 in that order; `peer` and `root` arguments are group ranks.

Host calls take C-contiguous numpy arrays and block until done. Device calls take a device
pointer (int), an element count, a dtype name (DEVICE_DTYPES) and a CUDA stream (int, 0 for
the default stream); they are enqueued on that stream and return at once, so they can be
captured into CUDA graphs. HostComm has no device calls (they raise DistError).

Like an NCCL communicator, one communicator is driven by one thread at a time, and every
member makes the same collective calls in the same order.
"""
from __future__ import annotations

import json
from typing import Protocol, Sequence, runtime_checkable

import numpy as np

from .errors import DistError, RendezvousError
from .store import Store, StoreTimeout

DEVICE_DTYPES = ("float32", "float16", "bfloat16", "int32", "int64", "float64", "int8", "uint8")


@runtime_checkable
class Communicator(Protocol):
    rank: int
    world_size: int

    def all_reduce(self, buf: np.ndarray) -> None:
        """In-place sum over the group; every rank ends with the same values."""

    def all_gather(self, src: np.ndarray, dst: np.ndarray) -> None:
        """dst = the ranks' src concatenated along axis 0, in rank order."""

    def broadcast(self, buf: np.ndarray, root: int = 0) -> None:
        """Every rank's buf = root's buf."""

    def send(self, buf: np.ndarray, peer: int) -> None: ...

    def recv(self, buf: np.ndarray, peer: int) -> None: ...

    def barrier(self) -> None: ...

    def split(self, color: int | None, key: int | None = None) -> "Communicator | None": ...

    def close(self) -> None: ...

    def all_reduce_device(self, ptr: int, count: int, dtype: str, stream: int = 0) -> None: ...

    def all_gather_device(self, src_ptr: int, dst_ptr: int, count: int, dtype: str, stream: int = 0) -> None: ...

    def send_device(self, ptr: int, count: int, dtype: str, peer: int, stream: int = 0) -> None: ...

    def recv_device(self, ptr: int, count: int, dtype: str, peer: int, stream: int = 0) -> None: ...


class GroupBase:
    """Membership, naming and splitting, common to HostComm and NcclComm.

    `ranks` are the members' global ranks (the store's numbering), in group order; `name`
    must be the same on every member and unique per group on the store (it prefixes the
    group's keys)."""

    def __init__(self, store: Store, global_rank: int, ranks: Sequence[int], name: str, timeout: float):
        ranks = [int(r) for r in ranks]
        if len(set(ranks)) != len(ranks):
            raise DistError(f"communicator {name!r}: ranks {ranks} repeat a rank")
        if global_rank not in ranks:
            raise DistError(f"communicator {name!r}: rank {global_rank} is not among its ranks {ranks}")
        self.store, self.ranks, self.name, self.timeout = store, ranks, name, float(timeout)
        self.global_rank = global_rank
        # the k-th communicator of this name on this rank meets the other ranks' k-th: keys of
        # an earlier one (same name, same job) are never read as this one's
        self._prefix = name if store is None else f"{name}@{store.add(f'{name}/generation/{global_rank}')}"
        self.rank = ranks.index(global_rank)
        self.world_size = len(ranks)
        self._splits = 0

    def _check_peer(self, peer: int, what: str) -> int:
        if not isinstance(peer, (int, np.integer)) or not 0 <= peer < self.world_size:
            raise DistError(f"{what}: peer/root {peer!r} is not a rank of this group of {self.world_size}")
        if peer == self.rank and what in ("send", "recv", "send_device", "recv_device"):
            raise DistError(f"{what}: rank {self.rank} cannot exchange with itself")
        return int(peer)

    def exchange_keys(self, what: str, value: bytes) -> list[bytes]:
        """Publish `value` under this group's `what` and return every member's (group order);
        members that do not arrive in time are named in a RendezvousError."""
        if self.world_size == 1:
            return [value]
        keys = [f"{self._prefix}/{what}/{r}" for r in range(self.world_size)]
        self.store.set(keys[self.rank], value)
        try:
            self.store.wait(keys, self.timeout)
        except StoreTimeout:
            present = set(self.store.check(keys))
            missing = [self.ranks[i] for i, k in enumerate(keys) if k not in present]
            raise RendezvousError(f"communicator {self.name!r} ({what}): rank(s) {missing} did not arrive within "
                                  f"{self.timeout:g} s (this is rank {self.global_rank})") from None
        values = [self.store.get(k, self.timeout) for k in keys]
        done = f"{self._prefix}/{what}/done"
        self.store.add(done)
        self.store.wait_count(done, self.world_size, self.timeout)  # all have read: rank 0 may exit
        return values

    def split_ranks(self, color: int | None, key: int | None) -> tuple[list[int] | None, str]:
        """Collective over this group: the global ranks of this rank's new group (None for
        color None / negative) and the group's name."""
        seq = self._splits
        self._splits += 1
        if color is not None and (not isinstance(color, (int, np.integer)) or color < 0):
            color = None
        mine = [None if color is None else int(color), self.rank if key is None else int(key)]
        pairs = [json.loads(v) for v in self.exchange_keys(f"split{seq}", json.dumps(mine).encode())]
        if color is None:
            return None, ""
        members = sorted((k, r) for r, (c, k) in enumerate(pairs) if c == color)
        return [self.ranks[r] for _, r in members], f"{self.name}/split{seq}/c{color}"

    def split(self, color: int | None, key: int | None = None):
        """Collective over this group: ranks that pass the same color form a new communicator
        of the same kind, ordered by key (default: their rank here); color None or negative:
        this rank joins none and gets None. E.g. with tp ranks per stage, TP groups are
        split(rank // tp) and pipeline groups split(rank % tp)."""
        ranks, name = self.split_ranks(color, key)
        if ranks is None:
            return None
        return self.subgroup(ranks, name)

    def subgroup(self, ranks: Sequence[int], name: str):
        raise NotImplementedError

    def _close_store(self) -> None:
        self.store = None  # the process's store outlives its communicators (rendezvous.connect_store)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        self._close_store()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, rank {self.rank} of {self.world_size}, global ranks {self.ranks})"


def host_array(buf, what: str, writeable: bool = True) -> np.ndarray:
    if not isinstance(buf, np.ndarray):
        raise DistError(f"{what} takes a numpy array, got {type(buf).__name__}")
    if not buf.flags.c_contiguous or (writeable and not buf.flags.writeable):
        raise DistError(f"{what}: the array must be C-contiguous{' and writeable' if writeable else ''}")
    return buf


def check_gather_shapes(src: np.ndarray, dst: np.ndarray, world: int, what: str = "all_gather") -> None:
    want = (world * (src.shape[0] if src.ndim else 1),) + tuple(src.shape[1:])
    if src.dtype != dst.dtype or tuple(dst.shape) != want:
        raise DistError(f"{what}: dst must be {src.dtype}{want} for {world} ranks' {src.dtype}{tuple(src.shape)}, "
                        f"got {dst.dtype}{tuple(dst.shape)}")


def check_device_args(ptr: int, count: int, dtype: str, what: str) -> None:
    if dtype not in DEVICE_DTYPES:
        raise DistError(f"{what}: dtype {dtype!r} is not one of {', '.join(DEVICE_DTYPES)}")
    if not isinstance(count, (int, np.integer)) or count < 0:
        raise DistError(f"{what}: count must be a non-negative int, got {count!r}")
    if count and (not isinstance(ptr, (int, np.integer)) or ptr <= 0):
        raise DistError(f"{what}: {ptr!r} is not a device pointer")


def tp_pp_groups(world, tp: int, pp: int = 1):
    """Collective over `world` (a HostComm or NcclComm of tp * pp ranks): (tensor-parallel group,
    pipeline group) of this rank, with ranks laid out `rank = stage * tp + tp_rank` (a TP group
    is tp consecutive ranks, on one host when tp <= its GPUs). pp == 1: the pipeline group is
    this rank alone."""
    if tp < 1 or pp < 1 or tp * pp != world.world_size:
        raise DistError(f"tp={tp} x pp={pp} does not match the {world.world_size} ranks of the job")
    return world.split(world.rank // tp), world.split(world.rank % tp)


class ParallelComm:
    """One rank of a tp x pp job as the runtime sees it: the job's communicator (`world`: rank,
    size, the broadcasts of step inputs and logits), the tensor-parallel group of its stage
    (`tensor`: the collectives of route coll) and the pipeline group of its shard (`pipeline`:
    SEND / RECV of route p2p, whose peer is a stage index, the group's rank order). With tp or pp
    equal to 1 the job's communicator serves for both and no ParallelComm is needed."""

    def __init__(self, world, tensor, pipeline):
        self.world, self.tensor, self.pipeline = world, tensor, pipeline
        self.rank, self.world_size = world.rank, world.world_size
        self.device = getattr(world, "device", None)

    @classmethod
    def create(cls, world, tp: int, pp: int) -> "ParallelComm":
        return cls(world, *tp_pp_groups(world, tp, pp))

    def broadcast(self, buf: np.ndarray, root: int = 0) -> None:
        self.world.broadcast(buf, root)

    def barrier(self) -> None:
        self.world.barrier()

    def close(self) -> None:
        for c in (self.tensor, self.pipeline, self.world):
            c.close()


def groups_of(comm):
    """(communicator of the collectives, communicator of the point-to-point calls) of a rank:
    a ParallelComm's two groups, or any other communicator (or None) for both."""
    if isinstance(comm, ParallelComm):
        return comm.tensor, comm.pipeline
    return comm, comm

