"""Executor: runs an artifact's kernel call list over planned buffers.

Per distinct input shape the executor binds the symbolic dims, then resolves every
buffer to an array: inputs and weights as given, temporaries as views into an arena
(offsets from the compile-time memory plan) or, for unplanned programs, their own
allocations; reshape aliases as views of their source. Program outputs get fresh
arrays each call so results stay valid after the next call.

Concurrency: one Executor may be called from many threads at once. Each call borrows a
workspace (an arena plus its per-shape views) from a small pool and gives it back at the
end, so concurrent calls never share working memory; a single-threaded caller keeps
reusing one workspace (no extra cost). The pool grows to the peak number of concurrent
calls (one arena each) and keeps them.
"""
from __future__ import annotations

import pathlib
import sys
import threading
from collections import OrderedDict
from typing import Any, Mapping, Sequence

import numpy as np

from ..errors import ArtifactError, InputError, LLMCError
from .blas import Gemm
from .cpu_attention import AttentionCall
from .cpu_gemm import Sgemm, load_sgemm
from .collective_call import HostCollective, HostPointToPoint, check_comm
from .dist.comm import groups_of
from .engine.paged_attention import PagedAttentionCall
from .manifest import Manifest, eval_dim
from .tvm_runtime import import_tvm

ALIGN = 64  # TVM kernels assume aligned data; a 4-byte misaligned pointer crashes them


def aligned_empty(shape: Sequence[int], dtype) -> np.ndarray:
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + ALIGN, np.uint8)
    pad = (-raw.ctypes.data) % ALIGN
    return raw[pad:pad + nbytes].view(dtype).reshape(shape)


def aligned(a: np.ndarray) -> np.ndarray:
    """`a` itself if TVM can take it (contiguous, aligned, writeable: DLPack has no
    read-only flag), else an aligned copy."""
    if a.flags.c_contiguous and a.flags.writeable and a.ctypes.data % ALIGN == 0:
        return a
    out = aligned_empty(a.shape, a.dtype)
    out[...] = a
    return out


def numpy_dtype(name: str) -> np.dtype:
    if name in ("bfloat16", "float8_e4m3fn"):
        import ml_dtypes

        return np.dtype(getattr(ml_dtypes, name))
    if name == "int4x2":
        return np.dtype(np.uint8)
    return np.dtype(name)


class _DLPackAs:
    """A numpy array passed to TVM with another DLPack dtype code: numpy's DLPack export has
    no bfloat16 (ml_dtypes arrays are refused), so bf16 buffers travel as their uint16 words
    with the dtype code patched to kDLBfloat (4). DLTensor layout: data, device, ndim, dtype."""

    _DTYPE_CODE_OFFSET = 8 + 8 + 4

    def __init__(self, a: np.ndarray, code: int = 4):
        self.a = a.view(np.uint16)
        self.code = code

    def __dlpack__(self, *args, **kwargs):
        import ctypes

        get = ctypes.pythonapi.PyCapsule_GetPointer
        get.restype, get.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
        cap = self.a.__dlpack__()
        ctypes.c_uint8.from_address(get(cap, b"dltensor") + self._DTYPE_CODE_OFFSET).value = self.code
        return cap

    def __dlpack_device__(self):
        return (1, 0)


def _is_bf16(a) -> bool:
    return isinstance(a, np.ndarray) and a.dtype.name == "bfloat16"


def _to_numpy(x: Any, name: str) -> np.ndarray:
    if type(x) is np.ndarray:
        return x
    if isinstance(x, np.ndarray):  # subclasses (masked arrays, matrices) carry other semantics
        raise InputError(f"input {name!r}: expected a plain numpy array, got {type(x).__name__}")
    if hasattr(x, "detach") and hasattr(x, "numpy"):  # a torch tensor, without importing torch
        try:
            return x.detach().cpu().numpy()
        except TypeError as e:  # e.g. torch.bfloat16, which numpy lacks
            raise InputError(f"input {name!r}: cannot convert this torch tensor to numpy ({e}); pass a numpy "
                             f"array (ml_dtypes.bfloat16 for bf16)") from None
    if isinstance(x, (list, tuple, int, float)) and not isinstance(x, bool):
        try:
            return np.asarray(x)
        except ValueError as e:  # ragged nesting
            raise InputError(f"input {name!r}: not an array ({e})") from None
    raise InputError(f"input {name!r}: expected a numpy array or torch tensor, got {type(x).__name__}")


def check_index_inputs(manifest: Manifest, arrays: Mapping[str, Any]) -> None:
    """Every index input within its table (manifest section input_checks), before any kernel
    runs: an id past the embedding table would read memory outside it."""
    for c in manifest.input_checks:
        a = arrays[c.input]
        if a.size == 0:
            continue
        lo, hi = a.min(), a.max()
        if lo >= c.lo and hi < c.hi:
            continue
        bad = np.argwhere((a < c.lo) | (a >= c.hi))[0]
        value = a[tuple(bad)]
        raise InputError(f"input {c.input!r}: value {int(value)} at index {tuple(int(i) for i in bad)} is outside "
                         f"[{c.lo}, {c.hi}) (the rows of {c.table!r})")


def match_inputs(names: Sequence[str], args: tuple, kwargs: dict) -> dict[str, Any]:
    """Map positional and keyword call arguments onto the artifact's input names."""
    if len(args) > len(names):
        raise InputError(f"expected at most {len(names)} inputs {list(names)}, got {len(args)}")
    values = dict(zip(names, args))
    for k, v in kwargs.items():
        if k not in names:
            raise InputError(f"unknown input {k!r}; inputs are {list(names)}")
        if k in values:
            raise InputError(f"input {k!r} given twice")
        values[k] = v
    missing = [n for n in names if n not in values]
    if missing:
        raise InputError(f"missing inputs {missing}")
    return values


def take_program(runner, manifest: Manifest) -> None:
    """The program facts both executors (CPU here, CUDA in gpu.py) read on every call."""
    p = manifest.program
    runner.manifest = manifest
    runner._program = p
    runner.input_names = manifest.input_names
    runner.output_names = manifest.output_names
    runner._buffers = p.buffers
    runner._symbols = p.symbol_bounds
    runner._output_ids = p.output_buffers
    runner._out_set = set(p.output_buffers)
    runner._envs = {}  # shapes of the inputs -> bound symbols (Executor._bind)


MAX_BOUND_SHAPES = 256  # shape tuples whose symbol values an executor keeps (Executor._bind)


def bind_shapes(specs, bounds: Mapping[str, tuple[int, int]], shapes: Sequence[tuple[int, ...]]) -> dict[str, int]:
    """Symbol values bound by the inputs' shapes; InputError for a wrong rank, a value outside
    its compiled bounds, two inputs disagreeing, or a shape the bound symbols do not give."""
    env: dict[str, int] = {}
    for spec, shape in zip(specs, shapes):
        dims = spec.shape
        if len(shape) != len(dims):
            raise InputError(f"input {spec.name!r}: expected rank {len(dims)}, got shape {shape}")
        for axis, (d, actual) in enumerate(zip(dims, shape)):
            if not isinstance(d, int) and len(d) == 1 and d[0][0] == 1 and len(d[0][1]) == 1:
                s = d[0][1][0]
                lo, hi = bounds[s]
                if not lo <= actual <= hi:
                    raise InputError(f"input {spec.name!r} dim {axis} ({s}) = {actual} is outside its "
                                     f"bounds [{lo}, {hi}] (recompile with larger bounds)")
                if env.setdefault(s, actual) != actual:
                    raise InputError(f"input {spec.name!r} dim {axis}: {s}={actual} disagrees with "
                                     f"{s}={env[s]} from an earlier input")
    for spec, shape in zip(specs, shapes):
        expected = tuple(eval_dim(d, env) for d in spec.shape)
        if expected != shape:
            raise InputError(f"input {spec.name!r}: expected shape {expected}, got {shape}")
        if 0 in expected:
            raise InputError(f"input {spec.name!r}: zero-size dim in shape {expected}")
    return env


def _unreferenced(owners: list) -> int:
    """sys.getrefcount of owners[0] when nothing but `owners` holds it (measured, not assumed:
    the count a call sees differs between Python versions)."""
    return sys.getrefcount(owners[0])


_ALONE = _unreferenced([np.empty(1, np.uint8)])


class _Workspace:
    """Working memory of one call in flight: an arena, its views per shape, and the memory of
    recent outputs.

    Outputs are fresh arrays owned by the caller, but fresh memory costs page faults: GPT-2's
    4 x 128 logits (103 MB) took 8-12 ms more to write into new pages than into used ones on the
    2-core VM. So the memory of an output whose every array the caller has dropped (no view of
    it left anywhere: its owner's reference count says so) is handed out again. The price: up to
    SPARES dropped outputs per output buffer stay allocated while the executor lives."""

    SPARES = 2  # owners kept per output buffer (`out = f(x)` in a loop: the one before last is free)

    def __init__(self, arena_bytes: int):
        self.arena = aligned_empty((arena_bytes,), np.uint8) if arena_bytes else None
        self.temps: OrderedDict[tuple, dict[int, np.ndarray]] = OrderedDict()
        self.spares: dict[int, list[np.ndarray]] = {}

    def output(self, buffer: int, shape: Sequence[int], dtype: np.dtype) -> np.ndarray:
        owners = self.spares.setdefault(buffer, [])
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        for i in range(len(owners)):
            owners[0], owners[i] = owners[i], owners[0]
            if owners[0].size == nbytes + ALIGN and _unreferenced(owners) == _ALONE:
                raw = owners[0]
                pad = (-raw.ctypes.data) % ALIGN
                return raw[pad:pad + nbytes].view(dtype).reshape(shape)
        out = aligned_empty(shape, dtype)
        owners.insert(0, out.base)
        del owners[self.SPARES:]
        return out


class Executor:
    """A loaded program. Call it with arrays (positional in input order, or by name).

    Thread-safe: concurrent calls each get their own workspace (arena and temporaries); the
    weights are shared read-only. Outputs are arrays owned by the caller (in memory no array
    the caller still holds can see: _Workspace.output).
    """

    MAX_SHAPES = 4  # per workspace, the views of a few recent shapes stay cached

    def __init__(self, manifest: Manifest, module, weights: Mapping[str, np.ndarray], device: str = "cpu",
                 comm=None, sgemm: Sgemm | None = None):
        if not isinstance(manifest, Manifest):
            raise TypeError("Executor takes a validated runtime.manifest.Manifest (Manifest.from_json)")
        take_program(self, manifest)
        self.device = device
        p = manifest.program
        # (TVM function or None, buffer ids, symbols, kernel name, library call or None)
        self._calls = []
        check_comm(p.kernels, comm, "this artifact")
        # runtime library routes: (args, env) -> None
        tensor, pipeline = groups_of(comm)
        library = {"blas": lambda k: Gemm(k, sgemm), "attn": lambda k: AttentionCall(k, sgemm),
                   "kv": lambda k: PagedAttentionCall(k, sgemm), "coll": lambda k: HostCollective(k, tensor),
                   "p2p": lambda k: HostPointToPoint(k, pipeline)}
        calls = {name: library[k.route](k) for name, k in p.kernels.items() if k.route in library}
        weight_gemms = {}  # a blas kernel's calls whose W is a weight: llmc's GEMM may read it packed
        for c in p.calls:
            if c.kernel in calls:
                call = calls[c.kernel]
                if isinstance(call, Gemm) and call.sgemm is not None and self._is_weight(c.args[call.args[1]]):
                    if c.kernel not in weight_gemms:
                        weight_gemms[c.kernel] = Gemm(p.kernels[c.kernel], sgemm, weight=True)
                    call = weight_gemms[c.kernel]
                self._calls.append((None, c.args, (), c.kernel, call))
                continue
            try:
                fn = module[c.kernel]
            except (AttributeError, TypeError):  # TypeError: no TVM library at all
                raise ArtifactError(f"kernel {c.kernel!r} is missing from the library") from None
            self._calls.append((fn, c.args, p.kernels[c.kernel].symbols, c.kernel, None))
        self._weights: dict[int, np.ndarray] = {}
        for b in self._buffers:
            if b.role == "weight":
                w = weights.get(b.name)
                if w is None:
                    raise ArtifactError(f"weights file lacks {b.name!r}")
                shape = tuple(b.shape)
                if not isinstance(w, np.ndarray) or tuple(w.shape) != shape or w.dtype != numpy_dtype(b.dtype):
                    raise ArtifactError(f"weight {b.name!r}: file has {getattr(w, 'dtype', type(w).__name__)}"
                                        f"{tuple(getattr(w, 'shape', ()))}, manifest expects {b.dtype}{shape}")
                self._weights[b.id] = aligned(w)
        self._arena_bytes = p.arena_bytes
        self._pool: list[_Workspace] = [_Workspace(self._arena_bytes)]
        self._pool_lock = threading.Lock()
        self._bf16 = any(b.dtype == "bfloat16" for b in self._buffers)
        # per-call buffer work, listed once (a decode step calls this hundreds of times a second)
        self._fresh_outputs = [b for b in self._buffers if b.role == "temp" and b.id in self._out_set]
        self._aliases = [b for b in self._buffers if b.role == "alias"]  # after their sources, in buffer order

    def _is_weight(self, buffer_id: int) -> bool:
        return self._buffers[buffer_id].role == "weight"

    # ---- symbol binding and buffer resolution ----------------------------------------
    def _bind(self, arrays: Sequence[Any]) -> dict[str, int]:
        """The symbols' values from the inputs' shapes (numpy arrays or device tensors), checked
        against the manifest. Memoized per tuple of shapes: a decode loop calls with the same
        shapes hundreds of times a second, and the check depends on nothing else. The dict is
        shared between calls: read it, never change it."""
        shapes = tuple(tuple(a.shape) for a in arrays)
        env = self._envs.get(shapes)
        if env is None:
            env = bind_shapes(self._program.inputs, self._symbols, shapes)
            if len(self._envs) >= MAX_BOUND_SHAPES:
                self._envs.clear()
            self._envs[shapes] = env
        return env

    def _temps_for(self, ws: _Workspace, env: dict[str, int]) -> dict[int, np.ndarray]:
        key = tuple(sorted(env.items()))
        cached = ws.temps.get(key)
        if cached is not None:
            ws.temps.move_to_end(key)
            return cached
        temps: dict[int, np.ndarray] = {}
        for b in self._buffers:
            if b.role != "temp" or b.id in self._out_set:
                continue
            shape = tuple(eval_dim(d, env) for d in b.shape)
            dtype = numpy_dtype(b.dtype)
            if b.offset is not None and ws.arena is not None:
                nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
                if b.offset + nbytes > ws.arena.size:  # the manifest's plan is checked at the upper bounds too
                    raise ArtifactError(f"buffer {b.id}: {nbytes} bytes at offset {b.offset} overrun the arena "
                                        f"({ws.arena.size} bytes) for {dict(env)}")
                temps[b.id] = ws.arena[b.offset:b.offset + nbytes].view(dtype).reshape(shape)
            else:
                temps[b.id] = aligned_empty(shape, dtype)
        ws.temps[key] = temps
        if len(ws.temps) > self.MAX_SHAPES:
            ws.temps.popitem(last=False)
        return temps

    def _resolve(self, ws: _Workspace, arrays: Sequence[np.ndarray], env: dict[str, int]) -> dict[int, np.ndarray]:
        bufs: dict[int, np.ndarray] = dict(self._weights)
        bufs.update(self._temps_for(ws, env))
        for spec, a in zip(self._program.inputs, arrays):
            bufs[spec.buffer] = a
        for b in self._fresh_outputs:
            bufs[b.id] = ws.output(b.id, [eval_dim(d, env) for d in b.shape], numpy_dtype(b.dtype))
        for b in self._aliases:
            shape = [eval_dim(d, env) for d in b.shape]
            try:
                bufs[b.id] = bufs[b.alias_of].reshape(shape)
            except ValueError:
                raise ArtifactError(f"buffer {b.id}: alias of shape {shape} does not fit buffer {b.alias_of} "
                                    f"{bufs[b.alias_of].shape}") from None
        return bufs

    # ---- calling -----------------------------------------------------------------------
    def _collect(self, args: tuple, kwargs: dict) -> list[np.ndarray]:
        values = match_inputs(self.input_names, args, kwargs)
        arrays = []
        for spec in self._program.inputs:
            a = _to_numpy(values[spec.name], spec.name)
            want = numpy_dtype(spec.dtype)
            if a.dtype != want:
                raise InputError(f"input {spec.name!r}: expected dtype {want}, got {a.dtype}")
            arrays.append(aligned(a))
        return arrays

    def _borrow(self) -> _Workspace:
        with self._pool_lock:
            if self._pool:
                return self._pool.pop()
        return _Workspace(self._arena_bytes)

    def _give_back(self, ws: _Workspace) -> None:
        with self._pool_lock:
            self._pool.append(ws)

    def __call__(self, *args, **kwargs) -> list[np.ndarray]:
        arrays = self._collect(args, kwargs)
        env = self._bind(arrays)
        if self.manifest.input_checks:
            check_index_inputs(self.manifest, dict(zip(self.input_names, arrays)))
        ws = self._borrow()
        try:
            bufs = self._resolve(ws, arrays, env)
            fargs = {k: _DLPackAs(v) for k, v in bufs.items() if _is_bf16(v)} if self._bf16 else {}
            fargs = {**bufs, **fargs} if fargs else bufs
            for fn, buf_ids, syms, name, gemm in self._calls:
                try:
                    if gemm is not None:
                        gemm([bufs[i] for i in buf_ids], env)
                    else:
                        fn(*[fargs[i] for i in buf_ids], *[env[s] for s in syms])
                except (ValueError, TypeError, RuntimeError, IndexError) as e:
                    # inputs were checked above: a kernel refusing its arguments is the artifact's fault
                    raise ArtifactError(f"kernel {name!r} refused the buffers the manifest gives it "
                                        f"({' '.join(str(e).split())[:300]})") from None
            outs = []
            for bid in self._output_ids:
                a = bufs[bid]
                # outputs that are inputs, weights or arena views are copied so callers own them
                outs.append(a if self._buffers[bid].role == "temp" else np.array(a, copy=True))
        finally:
            self._give_back(ws)
        return outs

    def describe(self) -> dict:
        m = self.manifest
        return {"inputs": [{"name": i.name, "shape": list(i.shape), "dtype": i.dtype} for i in m.program.inputs],
                "outputs": m.output_names, "kernels": len(m.program.kernels),
                "calls": len(m.program.calls), "weight_bytes": m.weights.bytes}


def load(path, device: str = "cpu", **options):
    """Load an artifact folder written by `CompiledModel.export` / `llmc compile`.

    Everything is checked before native code is loaded: the manifest (schema, checksum),
    then the size and SHA-256 of every file it names (see docs/artifact.md).
    device "cpu" gives an Executor, or for a generation artifact (a causal LM with its step
    function) a runtime.engine.llm.LLM, which takes `kv_memory` (bytes of KV cache); both take
    `pack_weights` (default True: GEMMs of 256+ rows read a packed copy of each weight, made at
    its first such call, up to an eighth of the machine's memory; bytes: that budget; False: none;
    runtime/cpu_gemm.py). One rank
    of a tensor-parallel artifact (`llmc compile --tp N`) takes `comm`, its group's communicator
    (runtime/dist: HostComm on the CPU, NcclComm on CUDA); "cuda"
    (or "cuda:N") a runtime.gpu.GpuExecutor, which takes `graphs` (CUDA-graph replay,
    default on), `fill_weights` ("random" | "none", for perf artifacts compiled without
    weights) and, for a tensor-parallel rank, `allreduce` ("auto": the one-shot kernel for
    small all-reduces where every rank can map its peers' buffers, else NCCL; "nccl") as options.
    """
    from .artifact_files import check_library_files, load_weights, read_manifest
    from .cpu_features import check_cpu

    path = pathlib.Path(path)
    manifest = read_manifest(path)
    kind, _, index = device.partition(":")
    if kind not in ("cpu", "cuda"):
        from ..errors import TargetError

        raise TargetError(f"device {device!r} is not supported by this runtime (use 'cpu' or 'cuda')")
    if manifest.device != kind:
        raise ArtifactError(f"{path} was compiled for {manifest.device!r}, not {kind!r}")
    if kind == "cpu" and manifest.weights.omitted:
        raise ArtifactError(f"{path} lacks its large weights (a perf artifact compiled with --weights none); "
                            f"only the CUDA runtime fills them with random values")
    if kind == "cuda" and index and not index.isdigit():
        from ..errors import TargetError

        raise TargetError(f"device {device!r}: expected cuda or cuda:N")
    check_rank(manifest, options.get("comm"), path)
    libraries = check_library_files(path, manifest, manifest.libraries)
    weights = load_weights(path, manifest)
    if kind == "cuda":
        return _load_cuda(path, manifest, libraries, weights, int(index or 0), options)
    if manifest.cpu is not None:  # kernels using instructions this processor lacks would die with SIGILL
        check_cpu(manifest.cpu.triple, manifest.cpu.mcpu, manifest.cpu.features, str(path))
    tvm = import_tvm(with_gpu=False)
    comm = options.pop("comm", None)
    pack = options.pop("pack_weights", True)
    if not isinstance(pack, (bool, int)) or pack < 0:
        raise LLMCError(f"pack_weights={pack!r}: expected True, False or a number of bytes")
    sgemm = load_sgemm(libraries.get("gemm"), pack_weights=pack)
    forward = Executor(manifest, _load_library(tvm, libraries["tvm"]), weights, device, comm=comm, sgemm=sgemm)
    gen = manifest.generation
    if gen is None:
        if options:
            raise LLMCError(f"unknown options {sorted(options)} for a CPU forward artifact")
        return forward
    from .artifact_files import check_file, file_entry
    from .engine.llm import LLM

    unknown = set(options) - {"kv_memory"}
    if unknown:
        raise LLMCError(f"unknown options {sorted(unknown)} (a generation artifact takes kv_memory)")
    step_file = check_library_files(path, manifest, {"step": gen.library})["step"]
    step = Executor(manifest.step_manifest(), _load_library(tvm, step_file), weights, device, comm=comm, sgemm=sgemm)
    tok = None
    if gen.tokenizer is not None:
        tok = check_file(path, gen.tokenizer, file_entry(manifest, gen.tokenizer, path), "the tokenizer")
    return LLM(forward, step, gen, tok, kv_memory=options.get("kv_memory"))


def check_rank(manifest, comm, path) -> None:
    """A rank artifact with its group's communicator, as the same rank; a whole model with none."""
    par = manifest.parallel
    if par is None:
        if comm is not None and getattr(comm, "world_size", 1) != 1:
            raise ArtifactError(f"{path} is a whole model (compiled without --tp); it takes no communicator")
        return
    if comm is None:
        raise ArtifactError(f"{path} is rank {par.rank} of a tensor-parallel group of {par.tp}: start it with "
                            f"`llmc generate/serve --tp {par.tp}` (one process per rank) or pass comm=")
    world, rank = par.tp * par.pp, par.stage * par.tp + par.rank
    if comm.world_size != world or comm.rank != rank:
        raise ArtifactError(f"{path} is rank {rank} of {world}, but this process is rank {comm.rank} of "
                            f"{comm.world_size} (load {pathlib.Path(path).parent}/rank{comm.rank})")


def _load_cuda(path: pathlib.Path, manifest, libraries: dict, weights: dict, device_id: int, options: dict):
    """A GpuExecutor; for a generation artifact an LLM over two of them (forward and step),
    sharing the shim library (options: kv_memory for the LLM, the rest for the executors)."""
    from .gpu import GpuExecutor, import_tvm_cuda

    tvm = import_tvm_cuda()
    gen = manifest.generation
    if gen is not None:
        from .artifact_files import check_file, check_library_files, file_entry

        libraries = {**libraries, "step": check_library_files(path, manifest, {"step": gen.library})["step"]}
    modules = {}
    for lib, file in libraries.items():
        try:
            modules[lib] = tvm.runtime.load_module(str(file))
        except (RuntimeError, OSError, ValueError) as e:
            raise ArtifactError(f"{file}: cannot load the {lib} library "
                                f"({str(e).splitlines()[0][:200]})") from None
    kv_memory = options.pop("kv_memory", None)
    step_module = modules.pop("step", None)
    forward = GpuExecutor(manifest, modules, weights, device_id=device_id, **options)
    if gen is None:
        if kv_memory is not None:
            raise LLMCError("kv_memory is an option of generation artifacts; this one has no step function")
        return forward
    from .engine.llm import LLM

    # the step reads the same weights: hand it the forward's device tensors (no second upload)
    step = GpuExecutor(manifest.step_manifest(), {**modules, "tvm": step_module}, weights, device_id=device_id,
                       shared_weights=forward.device_tensors(), **options)
    tok = None
    if gen.tokenizer is not None:
        tok = check_file(path, gen.tokenizer, file_entry(manifest, gen.tokenizer, path), "the tokenizer")
    return LLM(forward, step, gen, tok, kv_memory=kv_memory)


def _load_library(tvm, file: pathlib.Path):
    try:
        return tvm.runtime.load_module(str(file))
    except (RuntimeError, OSError, ValueError) as e:
        raise ArtifactError(f"{file}: cannot load kernel library ({str(e).splitlines()[0][:200]})") from None


__all__ = ["Executor", "load", "LLMCError", "check_index_inputs"]
