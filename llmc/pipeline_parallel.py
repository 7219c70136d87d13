"""`llmc.compile(..., pp=M[, tp=N])`: one compile, M pipeline-stage artifacts (N x M with tp).

The step function is derived from the whole fused graph, then cut into stages by the stage_split
pass (passes/stage_split.py). Stage s's artifact runs its stage as its step function: the step
inputs of the whole model (each stage reads what it needs: token ids on the first, the page
metadata everywhere), its own layers' KV caches (kv_cache.0 .. of the stage), and a RECV / SEND of
the residual stream at its cuts; the last stage returns the logits. Its forward entry point is
the same program. `export(path)` writes `path/rank0 .. rank{M-1}` with a "parallel" section
(pp, stage) and a "stage" entry in the generation section; `llmc generate ART` runs them as M
processes (CPU, or one GPU each: NCCL send/recv inside the stages' CUDA graphs).
"""
from __future__ import annotations

import dataclasses
import pathlib
import uuid
from dataclasses import dataclass

from .errors import LLMCError
from .tensor_parallel import fingerprint, shard_weights_of


@dataclass
class PipelineModel:
    stages: list  # a CompiledModel per stage, its generation section set
    pp: int
    report: str = ""
    nonce: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex[:12])
    tp: int = 1
    shard_weights: tuple = ()  # tp > 1: per stage, each shard's weights (tuple of tp dicts)

    @property
    def fingerprint(self) -> str:
        return fingerprint([s.manifest["program"] for s in self.stages] + [self.tp], self.nonce)

    def __call__(self, *args, **kwargs):
        n = self.pp * self.tp
        raise LLMCError(f"a model compiled with pp={self.pp}" + (f", tp={self.tp}" if self.tp > 1 else "") +
                        f" runs as {n} processes: export() it and run `llmc generate ART` or `llmc serve ART`")

    generate = __call__

    def export(self, path: str | pathlib.Path, weights: bool = True) -> pathlib.Path:
        path = pathlib.Path(path)
        fp = self.fingerprint
        for s, cm in enumerate(self.stages):
            for r in range(self.tp):  # rank = stage * tp + shard: a stage's shards are consecutive ranks
                section = {"parallel": {"version": 1, "required": True, "tp": self.tp, "rank": r, "pp": self.pp,
                                        "stage": s, "fingerprint": fp}}
                ws = self.shard_weights[s][r] if self.tp > 1 else None
                cm.export(path / f"rank{s * self.tp + r}", weights=weights, _weights=ws, _sections=section)
        return path


def _as_step_stage(step, stage):
    """The stage graph with the whole step's inputs (STEP_INPUTS first) and its caches renamed
    kv_cache.0 .. in layer order, the signature every step function has."""
    from .compiler import ir
    from .compiler.ir import Graph
    from .passes.rewrite import substitute

    base = [i for i in step.inputs if not i.attrs.name.startswith("kv_cache.")]
    caches = [i for i in stage.inputs if i.attrs.name.startswith("kv_cache.")]
    renamed = {c.uid: ir.input_node(f"kv_cache.{k}", c.type) for k, c in enumerate(caches)}
    g = substitute(stage, renamed, stage.params) if renamed else stage
    return Graph(tuple(base) + tuple(renamed[c.uid] for c in caches), g.outputs, g.params, g.symbols,
                 g.output_names)


def compile_pipeline(graph, opts, gen, pp: int, tokenizer=None, stop_token_ids=(), tp: int = 1) -> PipelineModel:
    """The step function derived from the fused graph, sharded for `tp` ranks when tp > 1 (the
    shard pass, as for tensor parallelism: every shard runs the same kernels, only weights
    differ), then cut into `pp` stages: tp x pp rank artifacts, a stage's shards talking through
    collectives, a shard's stages through SEND / RECV."""
    from .api import compile_graph
    from .backends.artifact import weights_of
    from .generation import GenerationBuild, _seq_bound, step_section
    from .passes.pipeline import run_pipeline
    from .passes.serve import derive_step
    from .passes.simplify import simplify
    from .passes.stage_split import stage_split

    if not isinstance(pp, int) or isinstance(pp, bool) or pp < 2:
        raise LLMCError(f"pp must be an int >= 2 here, got {pp!r}")
    if not isinstance(tp, int) or isinstance(tp, bool) or tp < 1:
        raise LLMCError(f"tp must be a positive int, got {tp!r}")
    if gen is None:
        raise LLMCError("pipeline stages are built for generation (a causal LM taking token ids alone)")
    if opts.progress:
        opts.progress(f"pipeline parallelism over {pp} stages: fusing, deriving the step, cutting")
    gen.tokenizer = gen.tokenizer or tokenizer
    gen.stop_token_ids = tuple(gen.stop_token_ids) or tuple(stop_token_ids)
    fused, _ = run_pipeline(graph, opts.pipeline(), opts.verify_each, opts.dump_dir)
    spec = gen.step_spec()
    step, derive_report = derive_step(fused, spec)
    step = simplify(step)[0]
    shard_params: tuple = ()
    if tp > 1:  # the shard pass comes last before the cut, so no later fold mixes shards' weights
        from .passes.shard import shard

        sharded, shard_report = shard(step, tp)
        step, shard_params = sharded.graph, sharded.rank_params
        derive_report = f"{derive_report}\n{shard_report}"
    staged, report = stage_split(step, pp)
    vocab = int(step.outputs[0].shape[1])
    context = spec.max_context or _seq_bound(fused)
    stages, shard_weights = [], []
    for s, sg in enumerate(staged.stages):
        g = _as_step_stage(step, sg)
        cm = compile_graph(g, opts, passes=[])
        section, tok = step_section(cm, spec, step.symbols, vocab, context, gen, stage=(s, pp))
        names = weights_of(cm.program)
        cm.generation = GenerationBuild(cm, section, tok, str(report), weights=names)
        cm.manifest = dict(cm.manifest, generation=section)
        stages.append(cm)
        if tp > 1:
            shard_weights.append(shard_weights_of(cm, names, shard_params))
    return PipelineModel(stages, pp, f"{derive_report}\n{report}", tp=tp, shard_weights=tuple(shard_weights))


__all__ = ["PipelineModel", "compile_pipeline"]
