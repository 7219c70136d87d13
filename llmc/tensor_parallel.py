"""`llmc.compile(..., tp=N)`: one compile, N rank artifacts.

The fusion pipeline runs on the whole graph; the shard pass (passes/shard.py) comes last, on the
forward and on the step function derived from the unsharded graph, so every rank runs the same
kernels and only the weights differ. `export(path)` writes `path/rank0 .. rank{N-1}`, each a
complete artifact with a "parallel" manifest section (tp, its rank, a fingerprint shared by the
ranks of this compile); `llmc generate/serve --tp N` starts one process per rank.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
import time
import uuid
from dataclasses import dataclass

import numpy as np

from .errors import LLMCError
from .passes.simplify import transposed_name


def fingerprint(programs: list, nonce: str) -> str:
    """The programs' hash and a compile's nonce: the rank folders of two compiles of one
    architecture have the same programs but other weights, and must not pair."""
    body = json.dumps(programs, sort_keys=True)
    return f"{hashlib.sha256(body.encode()).hexdigest()[:16]}-{nonce}"


def rank_dir(path: str | pathlib.Path, rank: int) -> pathlib.Path:
    return pathlib.Path(path) / f"rank{rank}"


@dataclass
class TensorParallelModel:
    """A model compiled for a tensor-parallel group: `forward` is rank 0's CompiledModel (its
    kernels are every rank's); `rank_weights[r]` the weights rank r's artifact stores."""

    forward: object
    rank_weights: tuple
    tp: int
    report: str = ""
    nonce: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex[:12])

    @property
    def manifest(self) -> dict:
        return self.forward.manifest

    @property
    def fingerprint(self) -> str:
        m = self.forward.manifest
        return fingerprint([m["program"], m.get("generation", {}).get("program"), self.tp], self.nonce)

    def __call__(self, *args, **kwargs):
        raise LLMCError(f"a model compiled with tp={self.tp} runs as {self.tp} processes, one per rank: "
                        f"export() it and run `llmc generate ART --tp {self.tp}` or `llmc serve ART --tp {self.tp}`")

    generate = __call__

    def export(self, path: str | pathlib.Path, weights: bool = True) -> pathlib.Path:
        path = pathlib.Path(path)
        fp = self.fingerprint
        for r, ws in enumerate(self.rank_weights):
            section = {"parallel": {"version": 1, "required": True, "tp": self.tp, "rank": r, "fingerprint": fp}}
            self.forward.export(rank_dir(path, r), weights=weights, _weights=ws, _sections=section)
        return path


def compile_tensor_parallel(graph, opts, gen, tp: int, tokenizer=None, stop_token_ids=()) -> TensorParallelModel:
    """`graph` as captured; `gen` a GenerateOptions (None: the forward alone)."""
    from .api import compile_graph
    from .generation import add_generation, check_shared_weights
    from .passes.pipeline import run_pipeline
    from .passes.shard import shard

    if not isinstance(tp, int) or isinstance(tp, bool) or tp < 2:
        raise LLMCError(f"tp must be an int >= 2 here, got {tp!r}")
    t = time.perf_counter()
    if opts.progress:
        opts.progress(f"tensor parallelism over {tp} ranks: fusing, then sharding")
    fused, _ = run_pipeline(graph, opts.pipeline(), opts.verify_each, opts.dump_dir)
    memo: dict = {}  # the forward and the step share their weights' shards
    fwd, fwd_report = shard(fused, tp, memo)
    forward = compile_graph(fwd.graph, opts, passes=[])
    forward.report += f"\n{fwd_report}"
    ranks = list(fwd.rank_params)
    if gen is not None:
        if tokenizer is not None and gen.tokenizer is None:
            gen.tokenizer = tokenizer
        if not gen.stop_token_ids:
            gen.stop_token_ids = tuple(stop_token_ids)
        b = add_generation(forward, opts, gen, graph=fused, shard_world=tp, shard_memo=memo)
        ranks = [check_shared_weights(dict(ranks[r]), dict(b.rank_weights[r])) for r in range(tp)]
        b.rank_weights = ()  # from here the ranks' arrays are held by `ranks` alone
        forward.generation = b
        forward.manifest = dict(forward.manifest, generation=b.section)
        forward.report += f"\ngeneration: {b.report}"
    del fwd, memo  # so each rank's untransposed shards go as soon as its transposes are made
    ranks = shard_weights_of(forward, _program_weights(forward), ranks, consume=True)
    if forward.generation is not None:
        forward.generation.weights = ranks[0]
    forward.manifest = dict(forward.manifest, weights=dict(forward.manifest["weights"], count=len(ranks[0])))
    forward.timings["tensor_parallel_s"] = time.perf_counter() - t
    return TensorParallelModel(forward, tuple(ranks), tp, forward.report)


def shard_weights_of(compiled, needed: dict, rank_params, consume: bool = False) -> tuple[dict, ...]:
    """Each shard's arrays of the weights `compiled` reads (`needed`: name -> rank 0's array, as the
    build stored it). The build may store a GEMM weight transposed ([N, K] for the CPU GEMM and the
    CUDA decode GEMV, passes/gemm_weight_layout.py) under `transposed_name` of the shard's name:
    each other rank gets its own shard transposed the same way (rank 0's is the build's array).
    An LLMCError when the build made any other weight of its own from a shard (a fold): it would be
    shard 0's on every rank. `consume`: `rank_params` is a list the caller gives up; each rank's
    entry is dropped once its weights are taken, so the build host frees a rank's untransposed
    shards before it makes the next rank's transposes (at the 8B shape, GBs)."""
    unknown = [k for k, a in needed.items() if k not in rank_params[0] and not _transposed_of(k, a, rank_params[0])]
    if unknown:
        raise LLMCError(f"tensor parallelism: the {compiled.manifest['target']['name']} build made weights "
                        f"{sorted(unknown)[:3]} the shard pass does not know; compile without tp")
    out = []
    for r in range(len(rank_params)):  # in the shard's order, then the build's transposed weights
        ws = rank_params[r]
        mine = {k: v for k, v in ws.items() if k in needed}
        for k, a in needed.items():
            if k not in mine:
                mine[k] = a if r == 0 else np.ascontiguousarray(np.asarray(ws[transposed_name(k)]).T)
        out.append(mine)
        if consume:
            rank_params[r] = None
    return tuple(out)


def _transposed_of(name: str, arr, shard: dict) -> bool:
    """`name` is the build's [N, K] copy of the shard's 2-D weight `transposed_name(name)`."""
    src = shard.get(transposed_name(name))
    return src is not None and np.ndim(arr) == 2 and tuple(np.shape(src))[::-1] == tuple(np.shape(arr))


def _program_weights(compiled) -> dict:
    """name -> array of the weights the forward and the step programs read (rank 0's)."""
    from .backends.artifact import weights_of

    names = weights_of(compiled.program)
    if compiled.generation is not None:
        for k, a in weights_of(compiled.generation.step.program).items():
            names.setdefault(k, a)
    return names


__all__ = ["TensorParallelModel", "compile_tensor_parallel", "fingerprint", "rank_dir", "shard_weights_of"]
