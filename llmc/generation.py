"""Compiling the generation entry point of a causal LM: the step function beside the forward.

`add_generation(forward, opts, ...)` derives the step function from the forward's fused
graph (passes/serve/derive_step.py), builds it for the same target and returns the
manifest section and library that make the artifact a generation artifact. The weights
are the forward's own arrays (the step graph shares them), so the artifact stores them once.
"""
from __future__ import annotations

import pathlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from .errors import LLMCError

STEP_LIBRARY = "step_kernels.so"
TOKENIZER_FILE = "tokenizer.json"


@dataclass
class GenerateOptions:
    """`llmc.compile(..., generate=GenerateOptions(...))`; True means these defaults."""

    page_size: int = 16
    max_tokens: int = 256  # tokens per step: longer prompts are read in chunks of this many
    max_seqs: int = 32  # sequences per step
    max_context: int | None = None  # default: the captured sequence bound
    stop_token_ids: Sequence[int] = ()  # the model's end-of-sequence ids (generate() stops there by default)
    tokenizer: str | None = None  # a tokenizer.json (Hugging Face `tokenizers`) to carry in the artifact
    kv_cache_dtype: str | None = None  # "int8" / "fp8": a quantized KV cache; None: the model's float dtype

    def __post_init__(self) -> None:  # checked here, so a bad value fails the compile instead of dropping the step
        self.step_spec()

    def step_spec(self):
        from .compiler.dtypes import DType
        from .passes.serve import StepSpec
        from .runtime.engine.kv_codec import storage_name

        store = storage_name(self.kv_cache_dtype)
        return StepSpec(self.page_size, self.max_tokens, self.max_seqs, self.max_context,
                        None if store is None else DType(store))


@dataclass
class GenerationBuild:
    step: Any  # api.CompiledModel of the step function
    section: dict  # the manifest's "generation" section
    tokenizer: pathlib.Path | None = None
    report: str = ""
    weights: dict = field(default_factory=dict)  # every weight the artifact stores: the forward's and the step's
    rank_weights: tuple = ()  # tensor parallelism: the step's weights of each rank (rank 0's are step's own)


def eligible(graph) -> bool:
    """Worth trying derive_step: token ids [batch, seq] in, one [batch, seq, vocab] float out."""
    if len(graph.inputs) != 1 or len(graph.outputs) != 1:
        return False
    i, o = graph.inputs[0], graph.outputs[0]
    return i.dtype.is_int and len(i.shape) == 2 and len(o.shape) == 3 and o.dtype.is_float


def add_generation(forward, opts, gen: GenerateOptions, graph=None, shard_world: int = 1,
                   shard_memo: dict | None = None) -> GenerationBuild:
    """The step function of `graph` (a fused causal-LM graph taking token ids alone; default:
    the forward's own), built for the forward's target; with `shard_world` > 1, one rank's
    program of a tensor-parallel group (passes/shard.py), every rank's weights beside it."""
    from .api import compile_graph
    from .passes.serve import derive_step
    from .passes.simplify import simplify

    device = forward.manifest["target"]["device"]
    if device not in ("cpu", "cuda"):
        raise LLMCError(f"generation (the step function) is built for CPU and CUDA targets, not "
                        f"{forward.manifest['target']['name']}; compile with generate=False")
    spec = gen.step_spec()
    source = forward.program.graph if graph is None else graph
    step_graph, report = derive_step(source, spec)
    rank_weights: tuple = ()
    if shard_world > 1:  # simplified first: the shard pass comes last, so no later fold mixes ranks' weights
        from .passes.shard import shard

        sharded, shard_report = shard(simplify(step_graph)[0], shard_world, shard_memo)
        step = compile_graph(sharded.graph, opts, passes=[])
        rank_weights = sharded.rank_params
        report = f"{report}; {shard_report}"
    else:
        step = compile_graph(step_graph, opts, passes=[simplify])
    if "shim" in step.manifest.get("libraries", {}).get("roles", {}) and \
            "shim" not in forward.manifest.get("libraries", {}).get("roles", {}):
        raise LLMCError("the step function calls the CUDA shim library but the forward does not carry it")
    vocab = int(step.program.graph.outputs[0].shape[1])
    section, tok = step_section(step, spec, step_graph.symbols, vocab, spec.max_context or _seq_bound(source), gen)
    return GenerationBuild(step, section, tok, str(report), rank_weights=rank_weights)


def step_section(step, spec, symbols, vocab: int, context: int, gen: GenerateOptions,
                 stage: tuple[int, int] | None = None) -> tuple[dict, pathlib.Path | None]:
    """The manifest's "generation" section for a compiled step function (and the tokenizer file
    it names); `stage`: (index, count) of a pipeline stage (llmc/pipeline_parallel.py)."""
    from .compiler.ops import Op
    from .runtime.engine.kv_codec import SCALE_BYTES as KV_SCALE_BYTES

    g = step.program.graph
    caches = [n for n in g.inputs if n.attrs.name.startswith("kv_cache.")]
    windows = {n.inputs[3].attrs.name: n.attrs.window for n in g.nodes() if n.op is Op.PAGED_ATTENTION}
    kv_dtype = caches[0].dtype.value if spec.kv_store is None else spec.kv_store.value
    extra = 0 if spec.kv_store is None else KV_SCALE_BYTES  # a quantized row: head_dim codes + its scale
    section = {
        "version": 1, "required": True,
        "program": step.manifest["program"], "library": STEP_LIBRARY,
        "input_checks": step.manifest.get("input_checks", {"version": 1, "checks": []}),
        "kv": {"page_size": spec.page_size, "dtype": kv_dtype,
               "layers": [[int(c.shape[3]), int(c.shape[4]) - extra, int(windows[c.attrs.name])] for c in caches]},
        "limits": {"max_tokens": symbols["tokens"].hi, "max_seqs": symbols["seqs"].hi,
                   "max_context": int(context), "vocab": vocab},
        "stop_token_ids": [int(t) for t in gen.stop_token_ids if 0 <= int(t) < vocab],
    }
    if stage is not None:
        section["stage"] = {"index": stage[0], "count": stage[1]}
    tok = None
    if gen.tokenizer is not None:
        tok = pathlib.Path(gen.tokenizer)
        if not tok.is_file():
            raise LLMCError(f"tokenizer file {tok} does not exist")
        section["tokenizer"] = TOKENIZER_FILE
    return section, tok


def _seq_bound(graph) -> int:
    seq = graph.inputs[0].shape[1]
    (name,) = seq.symbols
    return graph.symbols[name].hi


def check_shared_weights(forward: dict, step: dict) -> dict:
    """The union of both programs' weights; a shared name must be the same array."""
    out = dict(forward)
    for k, a in step.items():
        if k in out and not (out[k] is a or np.array_equal(out[k], a)):
            raise LLMCError(f"weight {k!r} differs between the forward and the step function")
        out.setdefault(k, a)
    return out


def eos_ids(model: Any) -> tuple[int, ...]:
    """The end-of-sequence ids a Hugging Face model declares (generation_config, else config)."""
    for holder in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        eos = getattr(holder, "eos_token_id", None)
        if eos is not None:
            return tuple(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]))
    return ()


def ids_only_capture(model: Any, args: Sequence, kwargs: dict | None, opts) -> Callable[[], Any] | None:
    """For a torch model compiled with more than token ids (an attention mask, say): a capture
    of it with the ids alone, from which the step function can still be derived (the mask of
    a padded batch has no place in a ragged step). None where there are no ids to keep."""
    kwargs = kwargs or {}
    ids = kwargs.get("input_ids", args[0] if args else None)
    if getattr(ids, "ndim", None) != 2 or len(args) + len(kwargs) < 2 or isinstance(model, (str, pathlib.Path)):
        return None

    def recapture():
        from .api import capture

        return capture(model, (), {"input_ids": ids}, opts)
    return recapture


def attach(compiled, opts, gen: GenerateOptions | None, required: bool, tokenizer: str | None = None,
           stop_token_ids: Sequence[int] = (), recapture: Callable[[], Any] | None = None) -> None:
    """The step function beside the forward, with `gen` (None: none). `required`: built now,
    and an LLMCError names what stops it; otherwise, for a graph that looks like a causal LM
    (or a model `recapture` can capture with token ids alone) on the CPU, it is built on the
    first generate() or export(), so compiling for forward calls costs nothing more."""
    if gen is None:
        return
    if tokenizer is not None and gen.tokenizer is None:
        gen.tokenizer = tokenizer
    if not gen.stop_token_ids:
        gen.stop_token_ids = tuple(stop_token_ids)
    if required:
        build(compiled, opts, gen, required=True, recapture=recapture)
    elif (eligible(compiled.program.graph) or recapture is not None) and \
            compiled.manifest["target"]["device"] in ("cpu", "cuda"):
        compiled._pending_generation = (opts, gen, recapture)


def build(compiled, opts, gen: GenerateOptions, required: bool, recapture: Callable[[], Any] | None = None) -> None:
    from .backends.artifact import weights_of

    t = time.perf_counter()
    if opts.progress:
        opts.progress("deriving the step function (paged KV cache) for generation")
    try:
        graph = None
        if not eligible(compiled.program.graph) and recapture is not None:
            from .passes.pipeline import run_pipeline

            graph = run_pipeline(recapture(), opts.pipeline())[0]  # the forward took a mask: ids alone (and quantized alike)
        b = add_generation(compiled, opts, gen, graph)
    except LLMCError as e:
        if required:
            raise
        compiled.report += f"\ngeneration: not built ({e})"
        return
    b.weights = check_shared_weights(weights_of(compiled.program), weights_of(b.step.program))
    compiled.generation = b
    compiled.manifest = dict(compiled.manifest, generation=b.section,
                             weights=dict(compiled.manifest["weights"], count=len(b.weights)))
    compiled.timings["generation_s"] = time.perf_counter() - t
    compiled.report += f"\ngeneration: {b.report}"


__all__ = ["GenerateOptions", "attach", "build", "eos_ids", "ids_only_capture", "GenerationBuild", "add_generation", "eligible", "STEP_LIBRARY", "TOKENIZER_FILE"]
