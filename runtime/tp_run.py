"""One rank of a tensor- and/or pipeline-parallel model: join the job, load this rank's artifact, run.

    llmc generate ART --tp 2 --ids 1,2,3          # the CLI launches the ranks (runtime/dist/launch.py)
    python -m llmc.runtime.tp_run generate ART --ids 1,2,3   # one rank, under torchrun / Slurm / the launcher

ART is the folder `llmc compile --tp N` wrote (rank0 .. rank{N-1}); a rank reads RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT. Before loading, the ranks meet and compare their artifacts: ranks of
different compiles, or a job of another size than the artifact's group, stop with an error
naming the rank and the field. Every rank runs the same generation (the logits are all-gathered,
so each rank picks the same tokens); rank 0 prints them.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
from typing import Sequence

from ..errors import LLMCError
from .artifact_files import read_manifest
from .manifest import MANIFEST


def rank_path(art: str | pathlib.Path, rank: int) -> pathlib.Path:
    art = pathlib.Path(art)
    if (art / MANIFEST).exists():  # a rank folder itself
        return art
    path = art / f"rank{rank}"
    if not (path / MANIFEST).exists():
        raise LLMCError(f"{art}: no {path.name}/ (expected the folder `llmc compile --tp N` writes, "
                        f"with rank0 .. rank{{N-1}})")
    return path


def artifact_tp(art: str | pathlib.Path) -> int:
    """The processes a parallel artifact folder runs as (tp x pp; 1 for a whole model)."""
    m = read_manifest(rank_path(art, 0))
    return 1 if m.parallel is None else m.parallel.tp * m.parallel.pp


def join(art: str | pathlib.Path, device: str, timeout: float = 120.0):
    """(DistEnv, communicator, this rank's artifact folder)."""
    from .dist.rendezvous import DistEnv, check_consistent, rendezvous

    env = DistEnv.from_environ()
    path = rank_path(art, env.rank)
    par = read_manifest(path).parallel
    if par is None:
        raise LLMCError(f"{path} is a whole model (compiled without --tp / --pp): run it without a group")
    infos = rendezvous(env, {"fingerprint": par.fingerprint, "tp": par.tp, "pp": par.pp, "rank": par.rank},
                       timeout, tag="tp_load")
    check_consistent(infos, ["fingerprint", "tp", "pp"])
    if env.world_size != par.tp * par.pp:
        raise LLMCError(f"{path} belongs to a job of {par.tp * par.pp} ranks (tp {par.tp} x pp {par.pp}); this job "
                        f"has {env.world_size}")
    if device == "cpu":
        from .dist.host_comm import HostComm

        comm = HostComm.create(env, timeout)
    else:
        from .dist.nccl import NcclComm

        comm = NcclComm.create(env, device=_device_index(device), timeout=timeout)
    if par.tp > 1 and par.pp > 1:  # collectives within a stage, SEND / RECV along a shard's stages
        from .dist.comm import ParallelComm

        comm = ParallelComm.create(comm, par.tp, par.pp)
    return env, comm, path


def leave(comm, code: int = 0) -> None:
    """End a rank process. A host communicator closes; an NCCL one is left to the process's exit:
    ncclCommDestroy waits for work that CUDA graphs captured with the communicator still hold,
    and blocks for good once the graphs' peers have gone (seen on H100s)."""
    if getattr(comm, "device", None) is None:
        comm.close()
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _device_index(device: str) -> int | None:
    kind, _, index = device.partition(":")
    return int(index) if index else None


def _stage_runner(llm, path, comm, tokens=None, micro_batches: int | None = None) -> None:
    """A pipeline stage's LLM steps through a PipelineStep: its program (RECV the previous stage's
    activations, SEND its own on), then the last stage's logits broadcast to every stage; with a
    token channel (`tokens`, a host communicator of the job), `generate` keeps `micro_batches`
    steps in flight (default: one per stage) and only the sampled tokens travel back."""
    par = read_manifest(path).parallel
    if par.pp > 1:
        from .engine.pp_step import PipelineStep

        # the logits come from the last stage's first shard (rank = stage * tp + shard)
        llm.step = PipelineStep(llm.step, comm, par.stage, par.pp, llm.spec.vocab, root=(par.pp - 1) * par.tp,
                                tokens=tokens, micro_batches=par.pp if micro_batches is None else micro_batches)


def _generate(a: argparse.Namespace) -> int:
    from .executor import load

    device = a.device or read_manifest(rank_path(a.artifact, 0)).device
    env, comm, path = join(a.artifact, device)
    tokens = None
    try:
        options = {} if a.kv_memory is None else {"kv_memory": a.kv_memory}
        dev = device if device == "cpu" or ":" in device else f"cuda:{getattr(comm, 'device', 0)}"
        llm = load(path, device=dev, comm=comm, **options)
        if read_manifest(path).parallel.pp > 1:  # the sampled tokens' own channel (pp_loop.py says why)
            from .dist.host_comm import HostComm

            tokens = HostComm.create(env, name="pp_tokens")
        _stage_runner(llm, path, comm, tokens, a.micro_batches)  # every stage runs the loop
        prompts = [[int(t) for t in p.split(",") if t.strip()] for p in a.ids]
        outs = llm.generate(prompts, max_new_tokens=a.max_new_tokens, temperature=a.temperature, seed=a.seed,
                            stop_token_ids=())
        if env.rank == 0:
            print(json.dumps({"tp": comm.world_size, "token_ids": [o.token_ids for o in outs]}), flush=True)
    except BaseException:
        comm.close()
        raise
    finally:
        if tokens is not None:
            tokens.close()
    leave(comm)
    return 0


def _serve(a: argparse.Namespace) -> int:
    """Rank 0 serves HTTP with the engine, leading; the other ranks (tensor shards or later
    pipeline stages) follow its steps."""
    from .dist.host_comm import HostComm
    from .engine.tp_step import StepChannel, follow, lead
    from .executor import load

    device = a.device or read_manifest(rank_path(a.artifact, 0)).device
    env, comm, path = join(a.artifact, device)
    control = HostComm.create(env, name="tp_control")  # the leader's step inputs (host arrays)
    dev = device if device == "cpu" or ":" in device else f"cuda:{getattr(comm, 'device', 0)}"
    llm = load(path, device=dev, comm=comm)
    _stage_runner(llm, path, comm)  # pipeline stages: the leader is the first stage, as in generate
    channel = StepChannel(control)
    try:
        if env.rank != 0:
            follow(llm, channel)
            return 0
        from .serve.engine import EngineConfig
        from .serve.server import serve

        step = lead(llm, channel)
        config = EngineConfig(policy=a.policy, max_num_batched_tokens=a.max_num_batched_tokens,
                              max_num_seqs=a.max_num_seqs, chunked_prefill=not a.no_chunked_prefill,
                              prefix_cache=not a.no_prefix_cache, preemption="recompute", max_queue=a.max_queue)
        try:
            return serve(str(path), a.host, a.port, config, kv_memory=a.kv_memory, api_key=a.api_key,
                         model_name=a.served_model_name or pathlib.Path(a.artifact).name,
                         chat_template=a.chat_template, log_level=a.log_level, llm=llm)
        finally:
            step.stop()
    finally:
        control.close()
        leave(comm)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m llmc.runtime.tp_run", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="greedy or sampled generation on every rank; rank 0 prints JSON")
    g.add_argument("artifact")
    g.add_argument("--ids", action="append", required=True, help="a prompt's token ids, comma-separated (repeat)")
    g.add_argument("--max-new-tokens", type=int, default=16)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--seed", type=int)
    g.add_argument("--device", help="cpu | cuda[:N] (default: the artifact's)")
    g.add_argument("--kv-memory", type=int)
    g.add_argument("--micro-batches", type=int, help="pipeline stages: steps in flight, the prompts dealt into "
                   "this many groups (default: one per stage; 1 runs the stages in lockstep)")
    s = sub.add_parser("serve", help="rank 0 serves the OpenAI API, the other ranks follow its steps")
    s.add_argument("artifact")
    s.add_argument("--device")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--policy", default="fcfs")
    s.add_argument("--max-num-batched-tokens", type=int)
    s.add_argument("--max-num-seqs", type=int)
    s.add_argument("--kv-memory", type=int)
    s.add_argument("--max-queue", type=int, default=1024)
    s.add_argument("--api-key")
    s.add_argument("--served-model-name")
    s.add_argument("--chat-template")
    s.add_argument("--no-prefix-cache", action="store_true")
    s.add_argument("--no-chunked-prefill", action="store_true")
    s.add_argument("--log-level", default="info")
    a = p.parse_args(argv)
    try:
        return _serve(a) if a.cmd == "serve" else _generate(a)
    except LLMCError as e:
        print(f"llmc: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
