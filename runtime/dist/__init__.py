"""llmc.runtime.dist: processes, rendezvous and communicators for tensor / pipeline parallelism.

- rendezvous: DistEnv (RANK, WORLD_SIZE, ... or Slurm's), `rendezvous`, `check_consistent`
- store: the TCP key-value store rank 0 hosts
- comm: the Communicator protocol; host_comm.HostComm (numpy over TCP), nccl.NcclComm (GPU)
- launch: start and supervise one process per rank: `from llmc.runtime.dist.launch import launch`
  or `python -m llmc.runtime.dist.launch` (not imported here, so that `-m` runs the only copy)

See docs/parallel.md. Like the rest of the runtime, nothing here imports the compiler, torch
or cupy; NcclComm loads libnccl and libcudart through ctypes only when it is used.
"""
from .comm import DEVICE_DTYPES, Communicator, tp_pp_groups
from .errors import DistError, LaunchError, NcclError, RendezvousError
from .host_comm import HostComm
from .rendezvous import DistEnv, check_consistent, close_store, connect_store, rendezvous
from .store import Store, StoreTimeout


def __getattr__(name):  # NcclComm on first use: keeps `import llmc.runtime.dist` light
    if name == "NcclComm":
        from .nccl import NcclComm

        return NcclComm
    raise AttributeError(name)


__all__ = ["Communicator", "DEVICE_DTYPES", "DistEnv", "DistError", "HostComm", "LaunchError",
           "NcclComm", "NcclError", "RendezvousError", "Store", "StoreTimeout", "check_consistent",
           "close_store", "connect_store", "rendezvous", "tp_pp_groups"]
