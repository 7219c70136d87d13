"""`llmc.compile`: frontend -> passes -> Program -> memory plan -> TVM build -> CompiledModel."""
from __future__ import annotations

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


@dataclass
class CompiledModel:
    """A compiled model: call it like the original (numpy or torch inputs -> numpy outputs)."""

    program: Any
    executable: Any
    manifest: dict
    report: str = ""
    timings: dict = field(default_factory=dict)
    _executor: Any = None

    def _runner(self):
        if self._executor is None:
            from .backends.artifact import weights_of
            from .runtime.executor import Executor

            self._executor = Executor(self.manifest, self.executable.mod, weights_of(self.program),
                                      self.manifest["device"])
        return self._executor

    def __call__(self, *args, **kwargs) -> list[np.ndarray]:
        return self._runner()(*args, **kwargs)

    @property
    def input_names(self) -> list[str]:
        return [i["name"] for i in self.manifest["inputs"]]

    @property
    def output_names(self) -> list[str]:
        return [o["name"] for o in self.manifest["outputs"]]

    def export(self, path: str | os.PathLike) -> pathlib.Path:
        from .backends.artifact import weights_of, write_artifact

        return write_artifact(path, self.executable.export_library, self.manifest, weights_of(self.program))


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


def compile_graph(graph, opts: CompileOptions) -> CompiledModel:
    from .backends.artifact import build_manifest, weights_of
    from .backends.build_target import build_kernels, describe_kernel
    from .backends.targets import parse_target
    from .compiler.program import lower_to_program, one_op_per_kernel
    from .passes.pipeline import DEFAULT_PIPELINE, build_program, format_report
    from .passes.plan_memory import plan_memory

    target = parse_target(opts.target)
    timings: dict[str, float] = {}
    t = time.perf_counter()
    if opts.fuse:
        program, reports = build_program(graph, DEFAULT_PIPELINE, opts.verify_each, opts.dump_dir)
    else:
        program, reports = plan_memory(lower_to_program(graph, one_op_per_kernel)), []
    timings["passes_s"] = time.perf_counter() - t
    _say(opts, f"{len(program.kernels)} kernels, {len(program.calls)} calls; building for {target}")
    t = time.perf_counter()
    executable = build_kernels(program.kernels, target, progress=opts.progress)

    timings["build_s"] = time.perf_counter() - t
    weights = weights_of(program)
    manifest = build_manifest(program, target, sum(a.nbytes for a in weights.values()), describe_kernel)
    report = format_report(reports, program.graph, program)
    return CompiledModel(program, executable, manifest, report, timings)


def compile(model: Any, example_args: Sequence = (), example_kwargs: dict | None = None, *, target: Any = "llvm",
            dynamic_shapes: Any = None, dim_bounds: dict | None = None, fuse: bool = True,
            verify_each: bool = False, dump_dir: str | None = None,
            progress: Callable[[str], None] | None = None) -> CompiledModel:
    """Compile a torch.nn.Module (captured with torch.export) or an ONNX file.

    Returns a CompiledModel: call it with numpy arrays or torch tensors to get numpy
    outputs (flattened in the model's order), or `.export(path)` it as an artifact.
    """
    from .backends.targets import parse_target

    parse_target(target)  # fail fast on a bad target, before the slow capture
    opts = CompileOptions(target, dynamic_shapes, dim_bounds, fuse, verify_each, dump_dir, progress)
    t = time.perf_counter()
    _say(opts, "capturing the graph")
    graph = capture(model, example_args, example_kwargs, opts)
    capture_s = time.perf_counter() - t
    compiled = compile_graph(graph, opts)
    compiled.timings["capture_s"] = capture_s
    return compiled
