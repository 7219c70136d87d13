"""Route "coll": a kernel that is one collective runs as a call into the rank's communicator
(runtime/dist: HostComm on the CPU, NcclComm on CUDA). The artifact says the group size; the
communicator the caller hands the runtime must be that big, or loading fails."""
from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import ArtifactError
from .manifest import KernelSpec


def collective_world(kernels) -> int | None:
    """The group size an artifact's collectives were compiled for (None: it has none)."""
    sizes = {int(k.scalars[0]) for k in kernels.values() if k.route == "coll"}
    if len(sizes) > 1:
        raise ArtifactError(f"collectives over groups of different sizes {sorted(sizes)} in one program")
    return sizes.pop() if sizes else None


def check_comm(kernels, comm: Any, what: str) -> None:
    """The communicator a rank's program was handed fits its calls: the pipeline group (the
    whole communicator, or a ParallelComm's `pipeline`) reaches every peer stage, the tensor
    group has the size the collectives were compiled for."""
    from .dist.comm import groups_of

    tensor, pipeline = groups_of(comm)
    peers = [int(k.scalars[0]) for k in kernels.values() if k.route == "p2p"]
    if peers and pipeline is None:
        raise ArtifactError(f"{what} is a pipeline stage: it needs its pipeline's communicator (`llmc generate "
                            f"ART` starts the stages; or pass comm=)")
    if peers and max(peers) >= getattr(pipeline, "world_size", 0):
        raise ArtifactError(f"{what} talks to stage {max(peers)}; the communicator has {pipeline.world_size} ranks")
    world = collective_world(kernels)
    if world is None:
        return
    comm = tensor
    if comm is None:
        raise ArtifactError(f"{what} is one rank of a tensor-parallel group of {world}: it needs a communicator "
                            f"(start it with `llmc serve --tp {world}` / `llmc generate --tp {world}`, or pass comm=)")
    size = getattr(comm, "world_size", None)
    if size != world:
        raise ArtifactError(f"{what} was compiled for a group of {world} ranks; the communicator has {size}")


class HostCollective:
    """CPU: (x, out) numpy arrays; out = the sum over the ranks, or every rank's x stacked."""

    def __init__(self, spec: KernelSpec, comm: Any):
        self.func, self.world, self.comm = spec.func, int(spec.scalars[0]), comm

    def __call__(self, args, env) -> None:
        x, out = args
        if self.func == "all_reduce":
            np.copyto(out, x)
            self.comm.all_reduce(out)
        else:  # out [world, *x.shape] is the ranks' x concatenated along axis 0 (x 0-d: as [1])
            src = np.ascontiguousarray(x).reshape((-1,) + tuple(x.shape[1:]) if x.ndim else (1,))
            self.comm.all_gather(src, out.reshape((self.world * src.shape[0],) + tuple(src.shape[1:])))

class HostPointToPoint:
    """CPU: send (x, out; out = x) or receive (out) from the peer stage."""

    def __init__(self, spec: KernelSpec, comm: Any):
        self.func, self.peer, self.comm = spec.func, int(spec.scalars[0]), comm

    def __call__(self, args, env) -> None:
        if self.func == "send":
            x, out = args
            np.copyto(out, x)
            self.comm.send(np.ascontiguousarray(out), self.peer)
        else:
            (out,) = args
            self.comm.recv(out, self.peer)


__all__ = ["HostCollective", "HostPointToPoint", "check_comm", "collective_world"]
