"""`llmc.compile`: frontend -> passes -> Program -> memory plan -> TVM build -> CompiledModel."""
from __future__ import annotations

import dataclasses
import os
import pathlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from .errors import LLMCError


@dataclass
class CompileOptions:
    target: Any = "llvm"
    dynamic_shapes: Any = None
    dim_bounds: dict | None = None  # {"batch": (1, 8), "seq": (1, 512)}
    fuse: bool = True  # run the fusion pipeline (False: one kernel per op)
    verify_each: bool = False  # run the IR verifier after every pass
    dump_dir: str | None = None  # write the printed IR after each pass here
    progress: Callable[[str], None] | None = None
    use_shim: bool = True  # CUDA: offload GEMMs/attention to the llmc shim (cuBLASLt, flash attention)
    use_blas: bool = True  # CPU: GEMMs (and attention) in llmc's kernel library / numpy's BLAS (backends/cpu_blas.py)
    quant: Any = None  # passes.quant.QuantScheme: weight-only quantization after fusion (None: none)
    calib_windows: Any = None  # token-id windows [T] for gptq/awq calibration (quant_setup makes them)
    learned_grid: Any = None  # passes.quant.learned.LearnedGrid: method "qat"'s scales (llmc.quant.convert)
    sparsity: Any = None  # passes.sparsify.SparsityScheme: 2:4 pruning after fusion, before quantize (None: none)
    # GEMM weights stored [N, K] (passes/gemm_weight_layout.py): fp32 on the CPU (llmc's CPU GEMM reads
    # them so), fp16/bf16 on CUDA with the shim (its decode GEMV, and norms / SwiGLUs fused into GEMMs).
    # (tensor-parallel ranks too: each rank's shards transposed as the build did rank 0's, tensor_parallel.py)
    gemm_weight_layout: bool = True

    def pipeline(self) -> list:
        """The pass list: the default fusion pipeline, then quantize when asked."""
        from .passes.pipeline import DEFAULT_PIPELINE

        passes = list(DEFAULT_PIPELINE)
        if self.sparsity is not None:
            from .passes.sparsify import sparsify

            passes.append(sparsify(self.sparsity, self.calib_windows or (), self.progress))
        if self.quant is not None:
            from .passes.quantize import quantize

            passes.append(quantize(self.quant, self.calib_windows or (), self.progress, self.learned_grid))
        return passes


def _cpu_executor(manifest, executable, weights, device: str = "cpu"):
    """An in-process CPU Executor over a build's TVM module and its CPU kernel library, if any."""
    from .runtime.cpu_gemm import load_sgemm
    from .runtime.executor import Executor

    return Executor(manifest, executable.mod, weights, device,
                    sgemm=load_sgemm(getattr(executable, "gemm_path", None)))


@dataclass
class CompiledModel:
    """A compiled model: call it like the original (numpy or torch inputs -> numpy outputs)."""

    program: Any
    executable: Any
    manifest: dict
    report: str = ""
    timings: dict = field(default_factory=dict)
    _executor: Any = None
    generation: Any = None  # generation.GenerationBuild for a causal LM compiled with its step function
    _llm: Any = None
    _pending_generation: Any = None  # (opts, GenerateOptions, recapture): built on first generate() or export()

    def ensure_generation(self) -> None:
        """Build the step function now if compile() deferred it (generate=None, the default)."""
        if self._pending_generation is not None:
            from .generation import build

            opts, gen, recapture = self._pending_generation
            self._pending_generation = None
            build(self, opts, gen, required=False, recapture=recapture)

    def _runner(self):
        from .runtime.manifest import Manifest

        device = self.manifest["target"]["device"]
        if device in ("rocm", "metal"):
            raise LLMCError(f"this model was compiled for {self.manifest['target']['name']}; it cannot run here. "
                            f"export() it and load it on that device")
        if self._executor is not None:
            return self._executor
        from .backends.artifact import weights_of

        typed = Manifest.from_json(self.manifest, "CompiledModel.manifest")  # the same checks as a load
        if typed.cpu is not None:  # built for another processor (llvm:<cpu>): refuse, never SIGILL
            from .runtime.cpu_features import check_cpu

            check_cpu(typed.cpu.triple, typed.cpu.mcpu, typed.cpu.features, "this compiled model")
        if device == "cuda":
            from .runtime.gpu import GpuExecutor, import_tvm_cuda

            tvm = import_tvm_cuda()
            ex = self.executable
            modules = {"tvm": ex.mod.mod if ex.mod is not None else None}
            if ex.shim_path is not None:
                modules["shim"] = tvm.runtime.load_module(str(ex.shim_path))
            self._executor = GpuExecutor(typed, modules, weights_of(self.program))
        else:
            self._executor = _cpu_executor(typed, self.executable, weights_of(self.program), device)
        return self._executor

    def __call__(self, *args, **kwargs) -> list[np.ndarray]:
        return self._runner()(*args, **kwargs)

    def generate(self, prompts, **kwargs):
        """Text generation (see runtime/engine/llm.py: LLM.generate), for a causal LM compiled
        with its step function (the default for one whose graph allows it)."""
        self.ensure_generation()
        if self.generation is None:
            raise LLMCError("this model was compiled without a step function (not a causal LM taking input_ids "
                            "alone, or compiled with generate=False), so it cannot generate")
        if self._llm is None:
            from .runtime.engine.llm import LLM
            from .runtime.manifest import Manifest

            typed = Manifest.from_json(self.manifest, "CompiledModel.manifest")
            forward = self._runner()
            ex = self.generation.step.executable
            if self.manifest["target"]["device"] == "cuda":
                from .runtime.gpu import GpuExecutor, import_tvm_cuda

                tvm = import_tvm_cuda()
                modules = {"tvm": ex.mod.mod if ex.mod is not None else None}
                if ex.shim_path is not None:
                    modules["shim"] = tvm.runtime.load_module(str(ex.shim_path))
                step = GpuExecutor(typed.step_manifest(), modules, self.generation.weights,
                                   shared_weights=forward.device_tensors())
            else:
                step = _cpu_executor(typed.step_manifest(), ex, self.generation.weights)
            self._llm = LLM(forward, step, typed.generation, self.generation.tokenizer)
        return self._llm.generate(prompts, **kwargs)

    @property
    def input_names(self) -> list[str]:
        return [i["name"] for i in self.manifest["program"]["inputs"]]

    @property
    def output_names(self) -> list[str]:
        return [o["name"] for o in self.manifest["program"]["outputs"]]

    def export(self, path: str | os.PathLike, weights: bool = True, keep_below: int = 1 << 16, *,
               _weights: dict | None = None, _sections: dict | None = None) -> pathlib.Path:
        """Write the artifact. `weights=False` writes a perf artifact: large float weights are
        left out (only their shapes and dtypes stay in the manifest, listed under
        weights.omitted) and the CUDA runtime fills them with random values (packed quantized
        weights with zeros); other integer ones and those under `keep_below` bytes (position
        ids, norms, biases) are kept."""
        from .backends.artifact import weights_of, write_artifact

        self.ensure_generation()
        # one weights file for the forward and the step function
        ws = weights_of(self.program) if self.generation is None else self.generation.weights
        if _weights is not None:  # one rank of a tensor-parallel model (llmc/tensor_parallel.py)
            ws = _weights
        extra = {}
        manifest = dict(self.manifest, **(_sections or {}))
        if not weights:
            from .compiler.ops import Op

            packed = {n.inputs[1].attrs.name for n in self.program.graph.nodes()
                      if n.op is Op.QMATMUL and n.inputs[1].op is Op.WEIGHT}
            omit = sorted(k for k, a in ws.items()
                          if (a.dtype.kind in "fV" or k in packed) and a.nbytes >= keep_below)
            ws = {k: a for k, a in ws.items() if k not in set(omit)}
            manifest = dict(manifest, weights=dict(manifest["weights"], omitted=omit))
        writer = self.executable.export_library
        if self.generation is not None:
            from .generation import STEP_LIBRARY, TOKENIZER_FILE

            extra[STEP_LIBRARY] = self.generation.step.executable.export_library
            if self.generation.tokenizer is not None:
                import shutil

                tok = self.generation.tokenizer
                extra[TOKENIZER_FILE] = lambda f: shutil.copyfile(tok, f)
        if self.manifest["target"]["device"] in ("rocm", "metal"):  # metal: a .tar of Mach-O objects
            from .backends.artifact import with_library
            from .backends.build_gpu_targets import library_file, library_writer
            from .backends.targets import parse_target

            spec = parse_target(self.manifest["target"]["name"])
            writer = library_writer(self.executable, spec)
            manifest = with_library(manifest, "tvm", library_file(spec))
        return write_artifact(path, writer, manifest, ws, extra_files=extra)


def _say(opts: CompileOptions, msg: str) -> None:
    if opts.progress:
        opts.progress(msg)


def capture(model: Any, example_args: Sequence = (), example_kwargs: dict | None = None, opts: CompileOptions | None = None):
    """Frontend only: a model (torch module or .onnx path) -> llmc Graph."""
    opts = opts or CompileOptions()
    if isinstance(model, (str, os.PathLike)) and str(model).endswith(".onnx"):
        from .compiler.frontend.onnx import from_onnx

        return from_onnx(model, dim_bounds=opts.dim_bounds)
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is an extra
        raise LLMCError("compiling a PyTorch model needs torch (pip install torch==2.13.0)") from None
    if not isinstance(model, torch.nn.Module):
        raise LLMCError(f"llmc.compile expects a torch.nn.Module or a path to a .onnx file, got {type(model).__name__}")
    from .compiler.frontend.torch_export import from_torch

    return from_torch(model, tuple(example_args), example_kwargs, dynamic_shapes=opts.dynamic_shapes,
                      dim_bounds=opts.dim_bounds)


def compile_graph(graph, opts: CompileOptions, passes=None) -> CompiledModel:
    from .backends.artifact import build_manifest, weights_of
    from .backends.build_target import build_kernels, build_program_for, describe_kernel
    from .backends.targets import parse_target
    from .compiler.program import lower_to_program, one_op_per_kernel
    from .passes.pipeline import DEFAULT_PIPELINE, format_report
    from .passes.plan_memory import plan_memory

    target = parse_target(opts.target)
    timings: dict[str, float] = {}
    t = time.perf_counter()
    _say(opts, f"optimising {len(graph.nodes())} nodes" if opts.fuse else "lowering one op per kernel")
    if opts.quant is not None and not opts.fuse and passes is None:
        raise LLMCError("quantization runs after fusion: drop --no-fuse (fuse=False) or --quant")
    if opts.sparsity is not None and not opts.fuse and passes is None:
        raise LLMCError("2:4 sparsity runs after fusion: drop --no-fuse (fuse=False) or --sparsity")
    if opts.fuse or passes is not None:
        program, reports = build_program_for(target, opts.use_blas, opts.gemm_weight_layout, opts.use_shim)(
            graph, opts.pipeline() if passes is None else passes, opts.verify_each, opts.dump_dir)
    else:
        from .passes.index_bounds import bound_symbols_by_tables  # symbol bounds within the tables, fused or not

        graph, bounds_report = bound_symbols_by_tables(graph)
        program, reports = plan_memory(lower_to_program(graph, one_op_per_kernel)), [bounds_report]
    timings["passes_s"] = time.perf_counter() - t
    _say(opts, f"{len(program.kernels)} kernels, {len(program.calls)} calls; building for {target}")
    t = time.perf_counter()
    executable = build_kernels(program.kernels, target, progress=opts.progress, use_shim=opts.use_shim,
                               symbols=program.graph.symbols, use_blas=opts.use_blas)

    timings["build_s"] = time.perf_counter() - t
    weights = weights_of(program)
    from dataclasses import asdict

    from .passes.index_bounds import input_index_checks

    checks = [asdict(c) for c in input_index_checks(program.graph)]  # range-checked by the runtime
    manifest = build_manifest(program, target, sum(a.nbytes for a in weights.values()), describe_kernel,
                              input_checks=checks, cpu=target.cpu_section())
    if hasattr(executable, "update_manifest"):  # e.g. CUDA: per-kernel routes, the shim library
        manifest = executable.update_manifest(manifest)
        timings.update(getattr(executable, "timings", {}))
    report = format_report(reports, program.graph, program, source=graph)
    if opts.quant is not None and passes is None:
        manifest = dict(manifest, quantization=quant_section(opts.quant, reports, program.graph))
    return CompiledModel(program, executable, manifest, report, timings)


def quant_section(scheme, reports, graph) -> dict:
    """The manifest's optional "quantization" section (informational: the program's own
    buffers and kernels carry the packed weights; `llmc inspect` prints it)."""
    from .compiler.ops import Op

    rep = next(r for r in reports if r.name == "quantize")
    q = [n for n in graph.nodes() if n.op is Op.QMATMUL]
    params = sum(int(n.inputs[0].shape[-1]) * int(n.shape[-1]) for n in q)
    return {"version": 1, "required": False, "scheme": scheme.kind, "group": scheme.group if scheme.kind == "int4" else 0,
            "symmetric": scheme.is_symmetric, "method": scheme.method, "description": scheme.describe(),
            "quantized_matmuls": rep.counts["quantized"], "quantized_params": params,
            "bytes_before": rep.counts["bytes_before"], "bytes_after": rep.counts["bytes_after"],
            "kept": [line for line in rep.lines if line.startswith("kept")],
            "quantized_embeddings": sum(n.op is Op.QTAKE for n in graph.nodes())}


def quant_setup(quant, group: int | None, method: str | None, calib, calib_samples: int | None, symmetric: bool,
                act_order: bool = False, lm_head: bool = False):
    """A QuantScheme from the compile keywords, with its calibration file checked (before any work)."""
    if quant is None:
        for name, v in (("group", group), ("method", method), ("calib", calib), ("calib_samples", calib_samples),
                        ("quant_lm_head", lm_head or None)):
            if v is not None:
                raise LLMCError(f"{name}= is a quantization option: pass quant='int8' or 'int4' with it")
        return None, None
    from .passes.quant.calibrate import check_calibration_file
    from .passes.quant.learned import LearnedGrid
    from .passes.quant.scheme import QuantScheme

    if isinstance(quant, LearnedGrid):  # QAT: the scheme the model was fine-tuned with
        if group is not None or method not in (None, "qat"):
            raise LLMCError("quant=<LearnedGrid> carries its own group and method (qat): drop group=/method=")
        scheme = quant.scheme
    elif isinstance(quant, QuantScheme) and quant.method != "qat":
        scheme = quant
    elif method == "qat" or isinstance(quant, QuantScheme):
        raise LLMCError("method 'qat' takes its scales from a fine-tuned model: pass quant=<the LearnedGrid "
                        "llmc.quant.convert returned> (docs/quantization.md, QAT)")
    else:
        kw = {"kind": quant, "method": method or "rtn", "symmetric": symmetric, "act_order": act_order,
              "quantize_lm_head": lm_head}
        if group is not None:
            kw["group"] = group
        if calib_samples is not None:
            kw["calib_samples"] = calib_samples
        scheme = QuantScheme(**kw)
    return scheme, check_calibration_file(calib, scheme.method)


def sparsity_setup(sparsity: str | None, method: str | None, calib, calib_samples: int | None, quant):
    """(SparsityScheme or None, the method left for quant_setup, the checked calibration file
    of sparsegpt or None), before any work. One `method` names either transform's method:
    magnitude / sparsegpt prune, the others quantize."""
    from .passes.sparsify import SPARSITY_METHODS, SparsityScheme

    if sparsity is None:
        if method in SPARSITY_METHODS:
            raise LLMCError(f"method {method!r} is a pruning method: pass sparsity='2:4' (--sparsity 2:4) with it")
        return None, method, None
    prune = method in SPARSITY_METHODS
    if not prune and method is not None and quant is None:
        raise LLMCError(f"method {method!r} is a quantization method (with quant=); 2:4 sparsity takes "
                        f"{' or '.join(SPARSITY_METHODS)}")
    if not prune and method == "gptq":
        raise LLMCError("2:4 sparsity with gptq: its error compensation would write the pruned weights back; "
                        "quantize with rtn or awq, or prune with sparsegpt (docs/quantization.md)")
    kw = {"pattern": str(sparsity), "method": method if prune else "magnitude"}
    if calib_samples is not None:
        kw["calib_samples"] = calib_samples
    scheme = SparsityScheme(**kw)
    calib_file = None
    if scheme.needs_calibration:
        if calib is None:
            raise LLMCError("--method sparsegpt needs calibration text: pass --calib FILE (a text file in the "
                            "model's domain; sparsegpt measures each layer's inputs on it)")
        from .passes.quant.calibrate import check_calibration_file

        calib_file = check_calibration_file(calib, "sparsegpt")
    return scheme, (None if prune else method), calib_file


def check_activation_quant(scheme, spec) -> None:
    """W8A8 / FP8 quantize activations at run time: the CPU kernels (TVM) and the CUDA shim
    (cuBLASLt int8 / float8 GEMMs, backends/cuda/shim/llmc_qgemm.cu) do; float8 tensor cores
    start at sm_89."""
    if scheme is None or not scheme.act_bits or spec.device == "cpu":
        return
    if spec.kind != "cuda":
        raise LLMCError(f"quant={scheme.kind!r} (quantized activations) runs on the CPU and CUDA backends; the "
                        f"{spec.kind} kernels take weight-only int8 / int4 (docs/quantization.md)")
    sm = int(spec.arch.removeprefix("sm_")) if spec.arch.startswith("sm_") and spec.arch[3:].isdigit() else 0
    if scheme.kind == "fp8" and sm and sm < 89:
        raise LLMCError(f"quant='fp8' needs float8 tensor cores (sm_89 or newer); the target is {spec.arch}")


def compression_setup(quant, sparsity, group, method, calib, calib_samples, symmetric, act_order: bool = False,
                      lm_head: bool = False):
    """(QuantScheme or None, SparsityScheme or None, calibration file or None), all checked
    before any work: the keywords of llmc.compile / the flags of llmc compile."""
    sp, qmethod, sp_calib = sparsity_setup(sparsity, method, calib, calib_samples, quant)
    q_calib = calib if quant is not None or sp is None else None
    q_samples = calib_samples if quant is not None or sp is None else None
    scheme, q_file = quant_setup(quant, group, qmethod, q_calib, q_samples, symmetric, act_order, lm_head)
    return scheme, sp, q_file or sp_calib


def compression_windows(scheme, sparsity, calib_file, graph, tokenizer) -> list | None:
    """The calibration windows the passes that need them share (sparsegpt, gptq, awq)."""
    need = [s for s in (sparsity, scheme) if s is not None and s.needs_calibration]
    return calibration_windows(need[0], calib_file, graph, tokenizer) if need else None


def calibration_windows(scheme, calib_file, graph, tokenizer) -> list | None:
    """Token windows of the calibration text, as long as the model's seq bound allows."""
    if calib_file is None:
        return None
    from .passes.quant.calibrate import token_windows

    window = scheme.calib_window
    ids = graph.inputs[0] if graph.inputs else None
    if ids is not None and ids.type.rank == 2 and not isinstance(ids.shape[1], int):
        (name,) = ids.shape[1].symbols
        window = min(window, graph.symbols[name].hi)
    return token_windows(calib_file, tokenizer, scheme.calib_samples, window)


def check_kv_cache_dtype(kv_cache_dtype: str | None, device: str, generate: bool) -> None:
    """Before any work: an int8/fp8 KV cache is a property of the step function (no step, no
    cache), whose paged attention reads quantized pages on the CPU and CUDA."""
    from .runtime.engine.kv_codec import storage_name

    if storage_name(kv_cache_dtype) is None:  # (raises for an unknown name)
        return
    if not generate:
        raise LLMCError(f"a {kv_cache_dtype} KV cache belongs to the step function, which generate=False / "
                        f"--no-generate skips")
    if device not in ("cpu", "cuda"):
        raise LLMCError(f"a {kv_cache_dtype} KV cache runs on the CPU and CUDA backends; the {device} step function "
                        f"is not built (docs/quantization.md)")


def compile(model: Any, example_args: Sequence = (), example_kwargs: dict | None = None, *, target: Any = "llvm",
            dynamic_shapes: Any = None, dim_bounds: dict | None = None, fuse: bool = True,
            verify_each: bool = False, dump_dir: str | None = None,
            progress: Callable[[str], None] | None = None, use_blas: bool = True,
            generate: Any = None, tokenizer: str | None = None, quant: Any = None, group: int | None = None,
            method: str | None = None, calib: str | os.PathLike | None = None, calib_samples: int | None = None,
            symmetric: bool = False, quant_lm_head: bool = False, kv_cache_dtype: str | None = None,
            sparsity: str | None = None,
            tp: int = 1, pp: int = 1) -> CompiledModel:
    """Compile a torch.nn.Module (captured with torch.export) or an ONNX file.

    Returns a CompiledModel: call it with numpy arrays or torch tensors to get numpy
    outputs (flattened in the model's order), or `.export(path)` it as an artifact.
    `use_blas=False` builds the CPU GEMMs and attention with TVM too, instead of calling libraries.

    A causal LM captured with token ids alone (logits out) also gets a step function over a
    paged KV cache, so the result has `.generate()`: `generate=None` tries (on the CPU) and
    notes why not in the report when the graph does not allow it; True requires it (an
    LLMCError names the node that prevents it); False skips it; a
    `llmc.generation.GenerateOptions` sets page size, step limits, stop ids and tokenizer.

    Quantization (docs/quantization.md): `quant="int8"|"int4"` (or a passes.quant.QuantScheme)
    with `group` (int4: 32, 64, 128), `method` ("rtn", "gptq", "awq"), `calib` (a text file;
    gptq and awq need it, with `tokenizer`), `calib_samples`, `symmetric` (int4) and
    `quant_lm_head` (the LM head too; a tied embedding then reads the same packed table); or
    `quant=grid`, the LearnedGrid of `llmc.quant.convert` (QAT: the fine-tuned scales).
    `sparsity="2:4"` prunes the same matmuls first (`method` "magnitude" or "sparsegpt",
    the latter with `calib`); with `quant` too, `method` names the pruning method or the
    quantization method (rtn / awq; gptq is refused with sparsity).

    `kv_cache_dtype="int8"|"fp8"` stores the step function's paged KV cache as codes with a
    scale per token and head (CPU and CUDA; runtime/engine/kv_codec.py).

    `tp=N` shards the model for N tensor-parallel ranks (passes/shard.py; docs/parallel.md) and
    returns a llmc.tensor_parallel.TensorParallelModel, whose export writes one artifact per rank;
    `pp=M` cuts the step function into M pipeline stages (passes/stage_split.py).
    """
    from .backends.targets import parse_target

    spec = parse_target(target)  # fail fast on a bad target, before the slow capture
    scheme, sp, calib_file = compression_setup(quant, sparsity, group, method, calib, calib_samples, symmetric,
                                               lm_head=quant_lm_head)
    check_activation_quant(scheme, spec)
    check_kv_cache_dtype(kv_cache_dtype, spec.device, generate is not False)
    for s in (scheme, sp):
        if s is not None and s.needs_calibration and tokenizer is None:
            raise LLMCError(f"method {s.method!r} tokenizes the calibration text: pass tokenizer=PATH (tokenizer.json)")
    opts = CompileOptions(target, dynamic_shapes, dim_bounds, fuse, verify_each, dump_dir, progress, use_blas=use_blas,
                          quant=scheme, learned_grid=quant if scheme is not None and scheme.method == "qat" else None,
                          sparsity=sp)  # (quant_setup admits method "qat" only as a LearnedGrid)
    t = time.perf_counter()
    _say(opts, "capturing the graph")
    graph = capture(model, example_args, example_kwargs, opts)
    opts.calib_windows = compression_windows(scheme, sp, calib_file, graph, tokenizer)
    capture_s = time.perf_counter() - t
    from .generation import GenerateOptions, attach, eos_ids, ids_only_capture

    gen = None if generate is False else generate if isinstance(generate, GenerateOptions) else GenerateOptions()
    if gen is not None and kv_cache_dtype is not None:
        gen = dataclasses.replace(gen, kv_cache_dtype=kv_cache_dtype)
    if pp != 1:
        from .pipeline_parallel import compile_pipeline

        return compile_pipeline(graph, opts, gen, pp, tokenizer, eos_ids(model), tp=tp)
    if tp != 1:
        from .generation import eligible
        from .tensor_parallel import compile_tensor_parallel

        if generate is None and not eligible(graph):
            gen = None  # not a causal LM taking ids alone: the forward only
        return compile_tensor_parallel(graph, opts, gen, tp, tokenizer, eos_ids(model))
    compiled = compile_graph(graph, opts)
    compiled.timings["capture_s"] = capture_s
    attach(compiled, opts, gen, required=generate is not None or kv_cache_dtype is not None, tokenizer=tokenizer,
           stop_token_ids=eos_ids(model),
           recapture=ids_only_capture(model, example_args, example_kwargs, opts))
    return compiled
