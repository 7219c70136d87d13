"""Start one process per rank on this host, label their output, and supervise them.

    python -m llmc.runtime.dist.launch --nproc 2 -- python my_worker.py --flag
    python -m llmc.runtime.dist.launch --nproc 4 --nnodes 2 --node-rank 0 \\
        --master-addr node0 --master-port 29500 -- llmc serve ART --tp 8

Each rank gets the standard variables (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
MASTER_ADDR, MASTER_PORT), NCCL_NVLS_ENABLE=0 unless set, and with `devices` its own
CUDA_VISIBLE_DEVICES (else it picks the GPU LOCAL_RANK). Lines it prints come out prefixed
"[rank N]". When a rank exits non-zero or is killed, the launcher stops the others (SIGTERM
to each rank's process group, SIGKILL after `grace` seconds) and reports every rank: exit
code or signal, and the failing rank's last stderr lines. A rank stuck in rendezvous makes
the others' rendezvous time out (they exit naming it), which ends the job the same way; an
overall `timeout` stops a job that hangs anywhere else.

The launcher never imports the workers' code: a worker is a command line, or a top-level
Python function (run in the child by file and name).
"""
from __future__ import annotations

import argparse
import collections
import ctypes
import inspect
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence, TextIO

from .errors import DistError, LaunchError

POLL_S = 0.05


@dataclass
class RankStatus:
    rank: int
    pid: int
    returncode: int | None = None  # negative: killed by that signal
    stopped: bool = False  # the launcher stopped it (after another rank failed, or the timeout)
    ended_at: float | None = None  # seconds after the start
    stderr_tail: list[str] = field(default_factory=list)
    stdout_tail: list[str] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return self.returncode not in (0, None) and not self.stopped

    def describe(self) -> str:
        rc = self.returncode
        if rc is None:
            how = "still running"
        elif rc < 0:
            how = f"killed by signal {_signame(-rc)}"
        else:
            how = f"exit code {rc}"
        if self.stopped:
            return f"rank {self.rank} (pid {self.pid}): stopped by the launcher ({how})"
        when = f" after {self.ended_at:.1f} s" if self.ended_at is not None else ""
        return f"rank {self.rank} (pid {self.pid}): {how}{when}"


@dataclass
class LaunchResult:
    ranks: list[RankStatus]
    first_failure: int | None  # index into `ranks` of the rank that failed first, if any
    timed_out: bool
    elapsed: float

    @property
    def ok(self) -> bool:
        return self.first_failure is None and not self.timed_out

    @property
    def exit_code(self) -> int:
        """0, the first failing rank's exit code, 128 + its signal, or 124 for the timeout."""
        if self.first_failure is not None:
            rc = self.ranks[self.first_failure].returncode or 1
            return rc if rc > 0 else 128 - rc
        return 124 if self.timed_out else 0

    def report(self) -> str:
        lines = []
        if self.first_failure is not None:
            st = self.ranks[self.first_failure]
            lines.append(f"rank {st.rank} failed first: {st.describe().split(': ', 1)[1]}")
            tail = st.stderr_tail or st.stdout_tail
            if tail:
                lines.append(f"  last {'stderr' if st.stderr_tail else 'stdout'} lines of rank {st.rank}:")
                lines += [f"    | {t}" for t in tail]
        elif self.timed_out:
            lines.append(f"the job did not finish within its timeout ({self.elapsed:.1f} s); all ranks stopped")
        else:
            lines.append(f"all {len(self.ranks)} ranks exited 0 ({self.elapsed:.1f} s)")
        lines += ["  " + st.describe() for i, st in enumerate(self.ranks) if i != self.first_failure]
        return "\n".join(lines)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` now (a small race with other binders is possible)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def launch(target: Sequence[str] | Callable[[], object], world_size: int, *, env: Mapping[str, str] | None = None,
           master_addr: str = "127.0.0.1", master_port: int | None = None, devices: Sequence[int | str] | None = None,
           nnodes: int = 1, node_rank: int = 0, cwd: str | None = None, timeout: float | None = None,
           grace: float = 5.0, label: bool = True, stdout: TextIO | None = None, stderr: TextIO | None = None,
           tail_lines: int = 20, check: bool = True) -> LaunchResult:
    """Run `target` as `world_size` processes on this host (ranks node_rank * world_size ..
    with `nnodes` hosts) and supervise them until all exit 0, one fails, or `timeout` passes.

    target: a command line (argv list), or a top-level Python function (called with no
    arguments in each child; it reads its rank from the environment). env: variables added
    to this process's environment for the children. devices: one CUDA_VISIBLE_DEVICES value
    per local rank (e.g. [0, 1] or ["0,1", "2,3"]). stdout/stderr: where the labeled lines go
    (default: this process's); label=False passes lines through unprefixed. check: raise
    LaunchError (with `.result`) when a rank fails or the timeout passes, else return."""
    if world_size < 1 or nnodes < 1 or not 0 <= node_rank < nnodes:
        raise DistError(f"launch: need world_size >= 1 and 0 <= node_rank < nnodes, got {world_size}, "
                        f"{node_rank}, {nnodes}")
    if devices is not None and len(devices) < world_size:
        raise DistError(f"launch: {len(devices)} devices given for {world_size} ranks")
    if master_port is None:
        if nnodes > 1:
            raise DistError("launch: with several hosts, master_port must be given (the same on every host)")
        master_port = free_port(master_addr)
    argv = _argv(target)
    base = dict(os.environ)
    base.update(env or {})
    base.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast can take a shared host's GPUs down
    base["PYTHONUNBUFFERED"] = "1"
    total = world_size * nnodes
    out, err = stdout or sys.stdout, stderr or sys.stderr
    lock = threading.Lock()
    procs: list[subprocess.Popen] = []
    status: list[RankStatus] = []
    readers: list[threading.Thread] = []
    start = time.monotonic()
    first, timed_out = None, False
    try:
        for local in range(world_size):
            rank = node_rank * world_size + local
            child = dict(base, RANK=str(rank), WORLD_SIZE=str(total), LOCAL_RANK=str(local),
                         LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR=master_addr, MASTER_PORT=str(master_port))
            if devices is not None:
                child["CUDA_VISIBLE_DEVICES"] = str(devices[local])
            try:
                p = subprocess.Popen(argv, env=child, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=_die_with_parent)
            except OSError as e:
                raise DistError(f"launch: cannot start {argv[0]!r} for rank {rank}: {e}") from None
            st = RankStatus(rank, p.pid)
            procs.append(p)
            status.append(st)
            prefix = f"[rank {rank}] " if label else ""
            for pipe, sink, tail_name in ((p.stdout, out, "stdout_tail"), (p.stderr, err, "stderr_tail")):
                t = threading.Thread(target=_pump, args=(pipe, sink, prefix, lock, st, tail_name, tail_lines),
                                     daemon=True)
                t.start()
                readers.append(t)
        while True:
            running = False
            for i, p in enumerate(procs):
                rc = p.poll()
                if rc is None:
                    running = True
                elif status[i].returncode is None:
                    status[i].returncode, status[i].ended_at = rc, time.monotonic() - start
                    if rc != 0 and first is None:
                        first = i
            if first is not None or not running:
                break
            if timeout is not None and time.monotonic() - start > timeout:
                timed_out = True
                break
            time.sleep(POLL_S)
    finally:  # a failure, the timeout, or this process interrupted: nothing is left running
        _stop(procs, status, grace)
        for t in readers:
            t.join(timeout=2.0)
    result = LaunchResult(status, first, timed_out, time.monotonic() - start)
    if check and not result.ok:
        raise LaunchError(result.report(), result)
    return result


def _argv(target) -> list[str]:
    if callable(target):
        name = getattr(target, "__qualname__", "")
        if not name or "<" in name:
            raise DistError(f"launch: {target!r} is not a top-level function (a child cannot import it)")
        try:
            path = inspect.getfile(target)
        except TypeError:
            raise DistError(f"launch: cannot find the source file of {target!r}") from None
        return [sys.executable, "-m", "llmc.runtime.dist.call", os.path.abspath(path), name]
    argv = [str(a) for a in target]
    if not argv:
        raise DistError("launch: empty command")
    return argv


def _pump(pipe, sink: TextIO, prefix: str, lock: threading.Lock, st: RankStatus, tail_name: str, n: int) -> None:
    tail: collections.deque[str] = collections.deque(maxlen=n)
    try:
        for raw in iter(pipe.readline, b""):
            line = raw.decode(errors="replace").rstrip("\n")
            tail.append(line)
            setattr(st, tail_name, list(tail))
            with lock:
                sink.write(prefix + line + "\n")
                sink.flush()
    except (OSError, ValueError):
        pass  # the pipe closed under us while stopping
    finally:
        pipe.close()


def _stop(procs: list[subprocess.Popen], status: list[RankStatus], grace: float) -> None:
    alive = [(p, s) for p, s in zip(procs, status) if p.poll() is None]
    for p, s in alive:
        s.stopped = True
        _signal_group(p, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for p, s in alive:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _signal_group(p, signal.SIGKILL)
            p.wait()
    for p, s in zip(procs, status):
        if s.returncode is None:
            s.returncode = p.poll()
        _signal_group(p, signal.SIGKILL)  # whatever the rank itself started


def _signal_group(p: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(p.pid, sig)  # start_new_session: the rank's pid is its process group
    except (ProcessLookupError, PermissionError):
        pass


def _find_prctl():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None).prctl
    except (OSError, AttributeError):
        return None


_prctl = _find_prctl()  # looked up here: the child between fork and exec should do little


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM if the launcher dies, so a killed launcher
    leaves no ranks behind."""
    if _prctl is not None:
        _prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG


def _signame(n: int) -> str:
    try:
        return signal.Signals(n).name
    except ValueError:
        return str(n)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m llmc.runtime.dist.launch",
                                 description="Start one process per rank on this host and supervise them "
                                             "(the command follows --).")
    ap.add_argument("--nproc", "--nproc-per-node", type=int, required=True, help="ranks on this host")
    ap.add_argument("--nnodes", type=int, default=1, help="hosts in the job (run the launcher on each)")
    ap.add_argument("--node-rank", type=int, default=0, help="this host's index among them")
    ap.add_argument("--master-addr", default="127.0.0.1", help="host of rank 0 (default 127.0.0.1)")
    ap.add_argument("--master-port", type=int, default=None, help="its rendezvous port (default: a free one; "
                                                                  "required with --nnodes > 1)")
    ap.add_argument("--devices", default=None,
                    help="comma-separated CUDA_VISIBLE_DEVICES value per rank, e.g. 0,1 (default: unset; ranks "
                         "pick the GPU LOCAL_RANK)")
    ap.add_argument("--timeout", type=float, default=None, help="stop everything after this many seconds")
    ap.add_argument("--grace", type=float, default=5.0, help="seconds between SIGTERM and SIGKILL when stopping")
    ap.add_argument("--no-label", action="store_true", help="do not prefix output lines with [rank N]")
    ap.add_argument("cmd", nargs=argparse.REMAINDER, help="-- command [args...]")
    args = ap.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        ap.error("give the command after --")
    devices = args.devices.split(",") if args.devices else None
    signal.signal(signal.SIGTERM, _raise_interrupt)  # stopped ourselves: stop the ranks too
    try:
        result = launch(cmd, args.nproc, master_addr=args.master_addr, master_port=args.master_port,
                        devices=devices, nnodes=args.nnodes, node_rank=args.node_rank, timeout=args.timeout,
                        grace=args.grace, label=not args.no_label, check=False)
    except DistError as e:
        print(f"launch: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("launch: interrupted; all ranks stopped", file=sys.stderr)
        return 130
    if not result.ok:
        print("launch: " + result.report(), file=sys.stderr)
    return result.exit_code


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
