"""The CUDA executor: an artifact's call list on one GPU, replayed as a CUDA graph.

Device memory: weights are uploaded once (or, for a perf artifact that omits them, filled
with random values on the device); temporaries are views into one arena allocation at the
planned offsets (TVM kernels of a CUDA build accept the views' byte_offset); program outputs
get their own device buffers, and the inputs one block laid out like the pinned staging buffer
they are copied from (one copy a call), one set per input shape; inputs bound as state (a step
function's KV pages) stay where their owner put them.

Per distinct input shape (the bound symbols) a plan resolves every call to a launch
`(function, args)`: a TVM kernel (buffers, then symbol values) or a shim call (cuBLASLt
GEMM / flash attention: views shaped as the manifest says, None for absent tensors, then the
call's scalars). The first call with a shape runs the launches eagerly once, then captures
them into a CUDA graph; later calls copy the inputs in and replay the graph (the symbols a
call's shapes bind are memoized per shape tuple: a decode step's host work is ~60-90 us on an
H100 host). If capture fails, or graphs are off (`graphs=False`, LLMC_CUDA_GRAPHS=0), the launches run one by one.
Up to MAX_PLANS shapes keep their plan and graph.

Concurrency: a plan's device buffers and its captured graph are shared by every call with
that shape, so calls are serialized by one lock per executor (the GPU runs one call's
launches at a time anyway; host-side copies are the only overlap given up). `run(...,
outputs="device")` returns the plan's own output tensors, which the next call with the
same shape overwrites: callers that share an executor across threads should take numpy
outputs (the default), which are copied out under the lock.

Imports neither torch nor the llmc compiler: TVM's runtime, numpy and ctypes (libcudart).
"""
from __future__ import annotations

import ctypes
import glob
import itertools
import os
import sys
import threading
from collections import OrderedDict
from typing import Any, Mapping

import numpy as np

from ..errors import ArtifactError, InputError, LLMCError
from .manifest import Manifest, eval_dim
from .collective_call import check_comm
from .cuda_graph import CudaGraph, HostToDevice, Stream, check, copy_runs, cudart
from .dist.comm import groups_of

SHIM = "shim"
MAX_PLANS = 16  # a step function meets a decode shape per batch size and prefill chunks besides


CUBLASLT = ("libcublasLt.so.13", "libcublasLt.so.12")
CUSPARSELT = ("libcusparseLt.so.0",)


def _preload(sonames: tuple[str, ...]) -> str | None:
    """Load a CUDA library globally, by soname or else from pip's nvidia-* packages on sys.path
    (torch's CUDA libraries), so that the shim's dlopen by soname finds it; returns what was
    loaded, or None. Not needed when it is on the loader path or already loaded."""
    found = (h for name in sonames for p in sys.path
             for h in sorted(glob.glob(os.path.join(p or ".", "nvidia", "*", "lib", name + "*"))))
    for candidate in itertools.chain(sonames, found):
        try:
            ctypes.CDLL(candidate, mode=ctypes.RTLD_GLOBAL)
            return candidate
        except OSError:
            pass
    return None


def preload_cublaslt() -> str | None:
    """libcublasLt (the shim's GEMMs) and, where present, libcusparseLt (its 2:4 sparse GEMMs,
    optional: only a 2:4-routed artifact needs it); returns the cuBLASLt loaded, or None."""
    _preload(CUSPARSELT)
    return _preload(CUBLASLT)


def import_tvm_cuda():
    """TVM's runtime with its CUDA plugin loaded (preloading libcudart/libcublasLt if needed)."""
    from .tvm_runtime import import_tvm, skipped_plugins

    try:
        cudart()  # libcudart.so.13 before the plugin, which links it
    except Exception:  # noqa: BLE001 - the plugin load below reports the real problem
        pass
    preload_cublaslt()
    tvm = import_tvm(with_gpu=True)
    import tvm_ffi

    if tvm_ffi.get_global_func("ffi.Module.load_from_bytes.cuda", allow_missing=True) is None:
        import pathlib

        lib = pathlib.Path(tvm.__file__).resolve().parent / "lib" / "libtvm_runtime_cuda.so"
        try:
            ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
        except OSError as e:
            from ..errors import TargetError

            raise TargetError(f"TVM's CUDA runtime plugin does not load here ({e}; {skipped_plugins}); "
                              f"running a CUDA artifact needs the NVIDIA driver and libcudart.so.13") from None
    return tvm


class _Plan:
    """Launches for one set of symbol values, over buffers that stay put (graph-capturable)."""

    def __init__(self):
        self.inputs: list = []  # device tensors, manifest input order
        self.bufs: dict[int, Any] = {}
        self.launches: list[tuple] = []  # (fn, args, kernel name)
        self.graph = None
        self.graph_state = "new"  # new | captured | failed | off
        self.graph_error = ""
        self.staging = None  # cuda_graph.HostToDevice for the host inputs of this shape
        self.staged: dict[int, Any] = {}  # input index -> its numpy view in the staging buffer
        self.runs: list[tuple[int, int]] = []  # byte ranges one call with every input from the host copies
        self.fed: list[tuple] = []  # (input index, shape, dtype, byte offset) of the inputs copied in
        self.input_block = None  # device bytes holding every input not bound as state
        self.input_offsets: dict[int, int] = {}  # input index -> byte offset in input_block


def _shim_function(module, name: str):
    if module is None:
        return None
    try:
        return module[name]
    except AttributeError:
        return None


def random_blocks(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The random block a perf artifact's weights are tiled from: N(0, 0.02) floats with two of
    every four consecutive values 0, and integer codes made from the same values."""
    block = np.random.default_rng(seed).standard_normal(1 << 20, dtype=np.float32) * 0.02
    block.reshape(-1, 4)[:, 2:] = 0
    return block, (block * 5000).astype(np.int64)


def random_weight_values(shape: tuple[int, ...], dtype: np.dtype, blocks: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """A weight's values for a perf artifact compiled without its weights (cheap, no NaNs): the
    block tiled, floats as N(0, 0.02), integer weights (packed int8 / int4 codes) as codes of the
    same block. Two of every four consecutive values along either axis of a matrix are 0, so a
    weight the compiler routed to the 2:4 sparse GEMM, stored [N, K] or [K, N], passes
    cuSPARSELt's pattern check; a dense kernel's time does not depend on the values. (Integer
    weights once tiled a one-element array: np.resize builds one tuple entry per copy, minutes
    for a 1B model's int8 weights, the load that kept int8 decode lines from finishing.)"""
    block, codes = blocks
    dtype = np.dtype(dtype)
    src = block.astype(dtype) if dtype.kind in "fV" else codes.astype(dtype)
    values = np.resize(src, int(np.prod(shape, dtype=np.int64))).reshape(shape)
    if values.ndim == 2 and shape[1] % 4 == 0:
        values[np.arange(shape[0]) % 4 >= 2] = 0  # rows 2, 3 of every 4: 2:4 down the columns
    return values

class GpuExecutor:
    """A loaded CUDA artifact. Call it like Executor; `run(..., outputs="device")` keeps the
    outputs on the GPU (valid until the next call with the same shape).

    Thread-safe: calls (run, replay, profile, graph_state) hold one lock per executor, since
    per-shape device buffers and captured graphs are shared; numpy outputs are copied out
    before the lock is released."""

    def __init__(self, manifest: Manifest, modules: Mapping[str, Any], weights: Mapping[str, Any] | None,
                 device_id: int = 0, graphs: bool | None = None, fill_weights: str = "random",
                 shared_weights: Mapping[str, Any] | None = None, comm=None, allreduce: str = "auto"):
        from .executor import numpy_dtype, take_program

        if not isinstance(manifest, Manifest):
            raise TypeError("GpuExecutor takes a validated runtime.manifest.Manifest (Manifest.from_json)")
        unknown = sorted(set(modules) - {"tvm", SHIM})
        if unknown:
            raise ArtifactError(f"unknown library roles {unknown}")
        self._lock = threading.RLock()
        self.tvm = import_tvm_cuda()
        take_program(self, manifest)
        self.device = "cuda"
        self.dev = self.tvm.cuda(device_id)
        if not self.dev.exist:
            raise LLMCError("no CUDA device is visible to TVM's runtime")
        self.device_id = device_id
        # graphs: True/False, or a predicate on a shape's bound symbols (capture only those shapes)
        self.graphs = (os.environ.get("LLMC_CUDA_GRAPHS", "1") != "0") if graphs is None else graphs
        self._state: dict[str, Any] = {}  # input name -> device tensor bound for good (bind_state)
        self._range_checked = {c.input for c in manifest.input_checks}
        # per-call facts listed once (a decode loop calls hundreds of times a second)
        self._wants = [numpy_dtype(spec.dtype) for spec in manifest.program.inputs]
        self._name_set = frozenset(self.input_names)
        p = manifest.program
        self._numpy_dtype = numpy_dtype
        self._kernels = {}
        check_comm(p.kernels, comm, "this artifact")
        self.comm, self._p2p_comm = groups_of(comm)  # collectives, SEND / RECV
        for name, k in p.kernels.items():
            if k.route in ("coll", "p2p"):  # NCCL on the executor's stream (captured into its CUDA graphs)
                self._kernels[name] = (None, k)
                continue
            lib = SHIM if k.route == SHIM else "tvm"
            mod = modules.get(lib)
            if mod is None:
                raise ArtifactError(f"kernel {name!r} runs in the {lib!r} library, which the artifact lacks")
            fn_name = k.func if lib == SHIM else name
            try:
                fn = mod[fn_name]
            except AttributeError:
                raise ArtifactError(f"kernel {name!r}: function {fn_name!r} is missing from the {lib} library") from None
            self._kernels[name] = (fn, k)
        self._argmax = _shim_function(modules.get(SHIM), "llmc_argmax_rows")  # None: an older shim
        self.oneshot, self.oneshot_why = self._setup_oneshot(p.kernels, modules.get(SHIM), allreduce)
        self._argmax_out: dict[int, Any] = {}
        if SHIM in modules and modules[SHIM] is not None:
            try:
                modules[SHIM]["llmc_shim_init"](device_id)
            except Exception:  # noqa: BLE001 - GEMM calls will raise with the reason (e.g. no cuBLASLt)
                pass
        self.weights_random = False
        self._weights: dict[int, Any] = {}
        self.omitted = set(manifest.weights.omitted)
        self._shared: set[int] = set()  # weights owned (and filled) by another executor
        shared = shared_weights or {}  # name -> device tensor of another executor (forward and step share)
        for b in self._buffers:
            if b.role != "weight":
                continue
            shape, dtype = tuple(b.shape), numpy_dtype(b.dtype)
            t = shared.get(b.name)
            if t is not None:
                if tuple(t.shape) != shape or str(t.dtype) != b.dtype:
                    raise ArtifactError(f"shared weight {b.name!r} is {t.dtype}{tuple(t.shape)}, "
                                        f"this program expects {b.dtype}{shape}")
                self._weights[b.id] = t
                self._shared.add(b.id)
                continue
            t = self.tvm.runtime.empty(shape, b.dtype, self.dev)
            w = None if weights is None else weights.get(b.name)
            if w is None:
                if b.name not in self.omitted:
                    raise ArtifactError(f"weights file lacks {b.name!r}")
                self.weights_random = True
            else:
                if tuple(w.shape) != shape or w.dtype != dtype:
                    raise ArtifactError(f"weight {b.name!r}: file has {w.dtype}{tuple(w.shape)}, "
                                        f"manifest expects {b.dtype}{shape}")
                t.copyfrom(w if w.flags.c_contiguous else w.copy(order="C"))  # 0-d weights stay 0-d
            self._weights[b.id] = t
        if self.weights_random and fill_weights == "random":
            self.fill_random_weights()
        self._forget_sparse_weights(modules.get(SHIM))
        arena = p.arena_bytes
        self._arena = self.tvm.runtime.empty((arena,), "uint8", self.dev) if arena else None
        self._plans: OrderedDict[tuple, _Plan] = OrderedDict()
        self._stream = None

    # ---- shapes and plans ----------------------------------------------------------------
    def _shape(self, dims, env) -> tuple[int, ...]:
        return tuple(eval_dim(d, env) for d in dims)

    def _plan_for(self, env: dict[str, int]) -> _Plan:
        key = tuple(sorted(env.items()))
        plan = self._plans.get(key)
        if plan is not None:
            self._plans.move_to_end(key)
            return plan
        rt, dev = self.tvm.runtime, self.dev
        plan = _Plan()
        bufs = dict(self._weights)
        fed = []  # (input index, shape, dtype, byte offset) of the inputs copied in at each call
        end = 0
        for i, spec in enumerate(self._program.inputs):
            if spec.name not in self._state:
                shape = self._shape(spec.shape, env)
                fed.append((i, shape, spec.dtype, end))
                end += -(-int(np.prod(shape, dtype=np.int64)) * self._numpy_dtype(spec.dtype).itemsize // 256) * 256
        # one device block for them, laid out as the pinned staging buffer: one copy a call
        block = rt.empty((max(end, 256),), "uint8", dev)
        plan.input_block, plan.input_offsets, plan.fed = block, {i: off for i, _, _, off in fed}, fed
        views = {i: block._create_view(shape, dtype, off) for i, shape, dtype, off in fed}
        for i, spec in enumerate(self._program.inputs):
            t = self._state.get(spec.name)
            if t is None:
                t = views[i]
            bufs[spec.buffer] = t
            plan.inputs.append(t)
        arena_size = self._program.arena_bytes
        for b in self._buffers:
            if b.role != "temp":
                continue
            shape = self._shape(b.shape, env)
            if b.id not in self._out_set and b.offset is not None and self._arena is not None:
                nbytes = int(np.prod(shape, dtype=np.int64)) * self._numpy_dtype(b.dtype).itemsize
                if b.offset + nbytes > arena_size:  # backstop to the manifest's upper-bound check
                    raise ArtifactError(f"buffer {b.id}: {nbytes} bytes at offset {b.offset} overrun the arena "
                                        f"({arena_size} bytes) for {env}")
                bufs[b.id] = self._arena._create_view(shape, b.dtype, b.offset)
            else:
                bufs[b.id] = rt.empty(shape, b.dtype, dev)
        for b in self._buffers:  # aliases come after their sources in buffer order
            if b.role == "alias":
                bufs[b.id] = bufs[b.alias_of]._create_view(self._shape(b.shape, env), b.dtype, 0)
        for c in self._program.calls:
            fn, k = self._kernels[c.kernel]
            args = [bufs[i] for i in c.args]
            if k.route == "coll":
                fn, launch = self._collective(k, args)
            elif k.route == "p2p":
                fn, launch = self._point_to_point(k, args)
            elif k.route == SHIM:
                tensors = [None if t is None else args[t.arg]._create_view(self._shape(t.shape, env), None, 0)
                           for t in k.tensors]
                launch = (*tensors, *k.scalars)
            else:
                launch = (*args, *[env[s] for s in k.symbols])
            plan.launches.append((fn, launch, c.kernel))
        plan.bufs = bufs
        plan.graph_state = "new" if (self.graphs(env) if callable(self.graphs) else self.graphs) else "off"
        self._plans[key] = plan
        if len(self._plans) > MAX_PLANS:
            self._plans.popitem(last=False)
        return plan

    def _setup_oneshot(self, kernels, shim, allreduce: str):
        """The one-shot all-reduce (runtime/dist/oneshot.py) for the small all-reduces of this
        program, or None and why not. allreduce: "auto" (one-shot where every rank can, else
        NCCL) or "nccl". Every rank decides the same, meeting the others on the store."""
        if allreduce not in ("auto", "nccl"):
            raise LLMCError(f"allreduce={allreduce!r}: expected 'auto' or 'nccl'")
        if self.comm is None or not any(k.route == "coll" and k.func == "all_reduce" for k in kernels.values()):
            return None, "no all-reduce"
        if allreduce == "nccl":
            return None, "allreduce='nccl'"
        if not hasattr(self.comm, "exchange_keys") or not hasattr(self.comm, "device"):
            return None, "the communicator is not NCCL's"
        from .dist.oneshot import OneShotAllReduce

        return OneShotAllReduce.create(self.comm, _shim_function(shim, "llmc_allreduce_oneshot"))

    def _collective(self, k, args) -> tuple:
        """(fn, args) of a coll kernel on the stream the plan runs on (self.stream while launching
        or capturing): a small all-reduce through the one-shot kernel when set up, the rest
        through NCCL, reading and writing the buffers in place."""
        comm, stream = self.comm, self.stream
        x, out = args
        count = int(np.prod(x.shape, dtype=np.int64))
        nbytes = count * np.dtype(self._numpy_dtype(str(x.dtype))).itemsize
        if k.func == "all_reduce" and self.oneshot is not None and self.oneshot.fits(nbytes, str(x.dtype)):
            return self.oneshot, (x, out)
        if k.func == "all_reduce":
            return (lambda a, b: comm.all_reduce_device(a.data_ptr(), count, str(a.dtype), stream.ptr, out_ptr=b.data_ptr())), (x, out)
        return (lambda a, b: comm.all_gather_device(a.data_ptr(), b.data_ptr(), count, str(a.dtype), stream.ptr)), (x, out)

    def _point_to_point(self, k, args) -> tuple:
        """(fn, args) of a p2p kernel: NCCL send of x to the peer stage (and out = x, the value the
        stage's program goes on with), or receive into out, on the plan's stream."""
        comm, stream, peer = self._p2p_comm, self.stream, int(k.scalars[0])
        if k.func == "send":
            x, out = args
            count = int(np.prod(x.shape, dtype=np.int64))
            nbytes = count * np.dtype(self._numpy_dtype(str(x.dtype))).itemsize

            def send(a, b):
                comm.send_device(a.data_ptr(), count, str(a.dtype), peer, stream.ptr)
                if b.data_ptr() != a.data_ptr():
                    check(cudart().cudaMemcpyAsync(b.data_ptr(), a.data_ptr(), nbytes, 3, stream.handle),
                          "cudaMemcpyAsync (send's output)")  # 3: device to device
            return send, (x, out)
        (out,) = args
        count = int(np.prod(out.shape, dtype=np.int64))
        return (lambda b: comm.recv_device(b.data_ptr(), count, str(b.dtype), peer, stream.ptr)), (out,)

    def bind_state(self, tensors: Mapping[str, Any]) -> None:
        """Bind inputs to device tensors for good: state the caller owns and the kernels update
        in place (a step function's KV pages). Every plan reads them where they are, so a call
        passes these same tensors (or omits nothing: the shapes still bind symbols) and nothing
        is copied. Plans made before are dropped."""
        names = set(self.input_names)
        unknown = sorted(set(tensors) - names)
        if unknown:
            raise LLMCError(f"bind_state: no inputs named {unknown}")
        specs = {spec.name: spec for spec in self._program.inputs}
        for name, t in tensors.items():
            if str(t.dtype) != specs[name].dtype:
                raise InputError(f"bind_state: input {name!r} expects dtype {specs[name].dtype}, got {t.dtype}")
        with self._lock:
            self._state = dict(tensors)
            self._plans.clear()

    @property
    def stream(self):
        if self._stream is None:
            self._stream = Stream(self.device_id)
        return self._stream

    def _launch_all(self, plan: _Plan) -> None:
        for fn, args, _ in plan.launches:
            fn(*args)

    def _execute(self, plan: _Plan) -> None:
        if plan.graph_state == "new":
            try:
                g = CudaGraph(self.device_id, self.stream)
                g.capture(lambda: self._launch_all(plan), warmup=1)
                plan.graph, plan.graph_state = g, "captured"
            except Exception as e:  # noqa: BLE001 - e.g. a call that cannot be captured: run eagerly
                plan.graph, plan.graph_state, plan.graph_error = None, "failed", str(e)[:300]
                self.stream.synchronize()
        if plan.graph_state == "captured":
            plan.graph.replay()
        else:
            with self.stream.use():
                self._launch_all(plan)

    # ---- calling ---------------------------------------------------------------------------
    def _arrays(self, args: tuple, kwargs: dict) -> list:
        from .executor import _to_numpy, match_inputs

        if not args and len(kwargs) == len(self._name_set) and kwargs.keys() == self._name_set:
            values = kwargs  # every input by name (a decode loop's call): nothing to match
        else:
            values = match_inputs(self.input_names, args, kwargs)
        out = []
        state, tensor = self._state, self.tvm.runtime.Tensor
        for spec, want in zip(self._program.inputs, self._wants):
            v = values[spec.name]
            if state and v is state.get(spec.name) and spec.name not in self._range_checked:  # dtype checked when bound
                out.append(v)
                continue
            if isinstance(v, tensor):
                if str(v.dtype) != spec.dtype:
                    raise InputError(f"input {spec.name!r}: expected dtype {spec.dtype}, got {v.dtype}")
                if spec.name in self._range_checked:
                    v = v.numpy()  # index inputs are range-checked on the host before any kernel runs
                else:
                    out.append(v)
                    continue
            a = _to_numpy(v, spec.name)
            if a.dtype != want:
                raise InputError(f"input {spec.name!r}: expected dtype {want}, got {a.dtype}")
            out.append(a if a.flags.c_contiguous else a.copy(order="C"))
        return out

    def _checked(self, args: tuple, kwargs: dict) -> tuple[list, dict[str, int]]:
        """Inputs as arrays (or device tensors), their bound symbols, index inputs range-checked."""
        from .executor import check_index_inputs

        arrays = self._arrays(args, kwargs)
        env = self._bind(arrays)
        if self.manifest.input_checks:
            check_index_inputs(self.manifest, dict(zip(self.input_names, arrays)))
        return arrays, env

    def _bind(self, arrays) -> dict[str, int]:
        from .executor import Executor

        return Executor._bind(self, arrays)  # type: ignore[arg-type]

    def run(self, *args, outputs: str = "numpy", **kwargs) -> list:
        """Run once. outputs="numpy" (default) copies them to the host; "device" returns the
        device tensors themselves (no copy, no synchronisation: they are overwritten by the
        next call with the same shape)."""
        arrays, env = self._checked(args, kwargs)
        with self._lock:
            plan = self._plan_for(env)
            self._copy_inputs(plan, arrays)
            self._execute(plan)
            outs = [plan.bufs[b] for b in self._output_ids]
            if outputs == "device":
                return outs
            self.stream.synchronize()
            return [np.array(t.numpy(), copy=True) for t in outs]

    def argmax_rows(self, logits) -> np.ndarray:
        """Each row's argmax (first of equal maxima) of a [rows, vocab] device tensor that `run(...,
        outputs="device")` returned: on the device when the artifact's shim has the kernel, so
        only rows * 4 bytes come back; else through a host copy."""
        with self._lock:
            if self._argmax is None:
                self.stream.synchronize()
                return np.argmax(np.asarray(logits.numpy()), axis=1).astype(np.int32)
            rows = int(logits.shape[0])
            out = self._argmax_out.get(rows)
            if out is None:
                out = self._argmax_out[rows] = self.tvm.runtime.empty((rows,), "int32", self.dev)
            with self.stream.use():
                self._argmax(logits, out)
            self.stream.synchronize()
            return out.numpy()

    def _copy_inputs(self, plan: _Plan, arrays: list) -> None:
        """Host arrays go through the plan's pinned staging buffer, asynchronously on the
        executor's stream (ordered before the launches), in as few copies as the layout allows
        (one when every input comes from the host); device tensors are copied; state tensors
        bound in place are skipped."""
        host = []
        for i, (dst, src) in enumerate(zip(plan.inputs, arrays)):
            if i not in plan.input_offsets:  # bound as state: the call must pass the bound tensor itself
                if src is not dst:
                    raise InputError(f"input {self.input_names[i]!r} is bound as state (bind_state): pass the "
                                     f"bound device tensor, not another array")
            elif isinstance(src, np.ndarray):
                host.append(i)
            else:
                dst.copyfrom(src)
        if not host:
            return

        def runs_of(indices):  # the byte ranges that copy these inputs
            return copy_runs([(plan.input_offsets[i], plan.staged[i].nbytes) for i in indices], HostToDevice.ALIGN)

        if plan.staging is None:  # the staging views and the copies of a call with every input from the host
            plan.staging = HostToDevice(int(plan.input_block.shape[0]))
            plan.staged = {i: plan.staging.view(off, shape, self._numpy_dtype(dtype)) for i, shape, dtype, off in plan.fed}
            plan.runs = runs_of(plan.staged)
        # some inputs came as device tensors: copy only the others
        runs = plan.runs if len(host) == len(plan.staged) else runs_of(host)
        plan.staging.acquire()
        for i in host:
            plan.staged[i][...] = arrays[i]  # same shape (the symbols were bound from it) and dtype (checked)
        plan.staging.send(plan.input_block.data_ptr(), runs, self.stream)

    def __call__(self, *args, **kwargs) -> list[np.ndarray]:
        return self.run(*args, **kwargs)

    def replay(self, *args, **kwargs) -> None:
        """Run again on the inputs already on the device for this shape (benchmarking)."""
        _, env = self._checked(args, kwargs)
        with self._lock:
            self._execute(self._plan_for(env))

    def synchronize(self) -> None:
        self.stream.synchronize()

    def graph_state(self, *args, **kwargs) -> str:
        _, env = self._checked(args, kwargs)
        with self._lock:
            plan = self._plan_for(env)
        return plan.graph_state + (f" ({plan.graph_error})" if plan.graph_error else "")

    def profile(self, *args, repeat: int = 5, **kwargs) -> list[tuple[str, float]]:
        """Per launch: (kernel name, median ms over `repeat` eager runs), timed with CUDA events."""
        arrays, env = self._checked(args, kwargs)
        with self._lock:
            return self._profile(self._plan_for(env), arrays, repeat)

    def _profile(self, plan: _Plan, arrays: list, repeat: int) -> list[tuple[str, float]]:
        for dst, src in zip(plan.inputs, arrays):
            if dst is not src:
                dst.copyfrom(src)
        rt = cudart()
        n = len(plan.launches)
        events = [ctypes.c_void_p() for _ in range(n + 1)]
        for e in events:
            check(rt.cudaEventCreate(ctypes.byref(e)), "cudaEventCreate")
        times = np.zeros((repeat, n))
        s = self.stream
        with s.use():
            self._launch_all(plan)  # warm-up
            for r in range(repeat):
                check(rt.cudaEventRecord(events[0], s.handle), "cudaEventRecord")
                for i, (fn, a, _) in enumerate(plan.launches):
                    fn(*a)
                    check(rt.cudaEventRecord(events[i + 1], s.handle), "cudaEventRecord")
                check(rt.cudaEventSynchronize(events[n]), "cudaEventSynchronize")
                ms = ctypes.c_float()
                for i in range(n):
                    check(rt.cudaEventElapsedTime(ctypes.byref(ms), events[i], events[i + 1]), "cudaEventElapsedTime")
                    times[r, i] = ms.value
        for e in events:
            rt.cudaEventDestroy(e)
        med = np.median(times, axis=0)
        return [(name, float(t)) for (_, _, name), t in zip(plan.launches, med)]

    def _forget_sparse_weights(self, shim) -> None:
        """The shim compresses a 2:4 weight at its first call and remembers it by address: make it
        forget what it holds for this executor's 2:4 weights (a freed model's weight may have had
        the same address), so their first calls compress these values."""
        sparse = {k.name: k for k in self._program.kernels.values() if k.func == "llmc_gemm_sparse24"}
        if not sparse or shim is None:
            return
        forget = _shim_function(shim, "llmc_sparse24_forget")
        for c in self._program.calls:
            k = sparse.get(c.kernel)
            if k is not None and forget is not None and c.args[k.tensors[1].arg] in self._weights:
                forget(self._weights[c.args[k.tensors[1].arg]])

    def fill_random_weights(self, seed: int = 0) -> None:
        """Fill every omitted weight with tiled random values (random_weight_values)."""
        blocks = random_blocks(seed)
        for b in self._buffers:
            if b.role == "weight" and b.name in self.omitted and b.id not in self._shared:
                self._weights[b.id].copyfrom(random_weight_values(tuple(b.shape), self._numpy_dtype(b.dtype), blocks))

    def device_tensors(self, omitted_only: bool = False) -> dict[str, Any]:
        """Weight name -> device tensor (e.g. to fill a perf artifact's weights another way)."""
        by_id = {b.id: b.name for b in self._buffers if b.role == "weight"}
        return {by_id[i]: t for i, t in self._weights.items() if not omitted_only or by_id[i] in self.omitted}

    def describe(self) -> dict:
        from .executor import Executor

        return {**Executor.describe(self), "device": "cuda", "weights_random": self.weights_random}  # type: ignore[arg-type]


__all__ = ["GpuExecutor", "import_tvm_cuda"]
