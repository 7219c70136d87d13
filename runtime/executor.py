"""Executor: runs an artifact's kernel call list over planned buffers.

Per distinct input shape the executor binds the symbolic dims, then resolves every
buffer to an array: inputs and weights as given, temporaries as views into one arena
(offsets from the compile-time memory plan) or, for unplanned programs, their own
allocations; reshape aliases as views of their source. Program outputs get fresh
arrays each call so results stay valid after the next call.
"""
from __future__ import annotations

import pathlib
from collections import OrderedDict
from typing import Any, Mapping, Sequence

import numpy as np

from ..errors import ArtifactError, InputError, LLMCError
from .manifest import LIBRARY, WEIGHTS, eval_dim, read_manifest
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
    if isinstance(x, np.ndarray):
        return x
    if hasattr(x, "detach") and hasattr(x, "numpy"):  # a torch tensor, without importing torch
        return x.detach().cpu().numpy()
    if isinstance(x, (list, tuple, int, float)):
        return np.asarray(x)
    raise InputError(f"input {name!r}: expected a numpy array or torch tensor, got {type(x).__name__}")


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


class Executor:
    """A loaded program. Call it with arrays (positional in input order, or by name)."""

    def __init__(self, manifest: dict, module, weights: Mapping[str, np.ndarray], device: str = "cpu"):
        self.manifest = manifest
        self.device = device
        self.input_names = [i["name"] for i in manifest["inputs"]]
        self.output_names = [o["name"] for o in manifest["outputs"]]
        self._buffers = manifest["buffers"]
        self._symbols = {s["name"]: (s["lo"], s["hi"]) for s in manifest["symbols"]}
        self._output_ids = [o["buffer"] for o in manifest["outputs"]]
        self._calls = []
        for c in manifest["calls"]:
            try:
                fn = module[c["kernel"]]
            except Exception:
                raise ArtifactError(f"kernel {c['kernel']!r} is missing from the library") from None
            self._calls.append((fn, tuple(c["args"]), tuple(manifest["kernels"][c["kernel"]]["symbols"])))
        self._weights: dict[int, np.ndarray] = {}
        for b in self._buffers:
            if b["role"] == "weight":
                w = weights.get(b["name"])
                if w is None:
                    raise ArtifactError(f"weights file lacks {b['name']!r}")
                shape = tuple(b["shape"])
                if tuple(w.shape) != shape or w.dtype != numpy_dtype(b["dtype"]):
                    raise ArtifactError(f"weight {b['name']!r}: file has {w.dtype}{tuple(w.shape)}, "
                                        f"manifest expects {b['dtype']}{shape}")
                self._weights[b["id"]] = aligned(w)
        arena = manifest.get("arena_bytes", 0)
        self._arena = aligned_empty((int(arena),), np.uint8) if isinstance(arena, int) and arena else None
        self._temps: OrderedDict[tuple, dict[int, np.ndarray]] = OrderedDict()
        self._out_set = set(self._output_ids)
        self._bf16 = any(b["dtype"] == "bfloat16" for b in self._buffers)

    # ---- symbol binding and buffer resolution ----------------------------------------
    def _bind(self, arrays: Sequence[np.ndarray]) -> dict[str, int]:
        env: dict[str, int] = {}
        for spec, a in zip(self.manifest["inputs"], arrays):
            shape = spec["shape"]
            if a.ndim != len(shape):
                raise InputError(f"input {spec['name']!r}: expected rank {len(shape)}, got shape {a.shape}")
            for axis, (d, actual) in enumerate(zip(shape, a.shape)):
                if isinstance(d, list) and len(d) == 1 and d[0][0] == 1 and len(d[0][1]) == 1:
                    s = d[0][1][0]
                    lo, hi = self._symbols[s]
                    if not lo <= actual <= hi:
                        raise InputError(f"input {spec['name']!r} dim {axis} ({s}) = {actual} is outside its "
                                         f"bounds [{lo}, {hi}] (recompile with larger bounds)")
                    if env.setdefault(s, actual) != actual:
                        raise InputError(f"input {spec['name']!r} dim {axis}: {s}={actual} disagrees with "
                                         f"{s}={env[s]} from an earlier input")
        for spec, a in zip(self.manifest["inputs"], arrays):
            expected = tuple(eval_dim(d, env) for d in spec["shape"])
            if expected != a.shape:
                raise InputError(f"input {spec['name']!r}: expected shape {expected}, got {a.shape}")
        return env

    def _temps_for(self, env: dict[str, int]) -> dict[int, np.ndarray]:
        key = tuple(sorted(env.items()))
        cached = self._temps.get(key)
        if cached is not None:
            self._temps.move_to_end(key)
            return cached
        temps: dict[int, np.ndarray] = {}
        for b in self._buffers:
            if b["role"] != "temp" or b["id"] in self._out_set:
                continue
            shape = tuple(eval_dim(d, env) for d in b["shape"])
            dtype = numpy_dtype(b["dtype"])
            if b.get("offset") is not None and self._arena is not None:
                nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
                temps[b["id"]] = self._arena[b["offset"]:b["offset"] + nbytes].view(dtype).reshape(shape)
            else:
                temps[b["id"]] = aligned_empty(shape, dtype)
        self._temps[key] = temps
        if len(self._temps) > 4:  # a few recent shapes; the arena itself is shared
            self._temps.popitem(last=False)
        return temps

    def _resolve(self, arrays: Sequence[np.ndarray], env: dict[str, int]) -> dict[int, np.ndarray]:
        bufs: dict[int, np.ndarray] = dict(self._weights)
        bufs.update(self._temps_for(env))
        for spec, a in zip(self.manifest["inputs"], arrays):
            bufs[spec["buffer"]] = a
        for b in self._buffers:
            bid = b["id"]
            if b["role"] == "temp" and bid in self._out_set:
                bufs[bid] = aligned_empty([eval_dim(d, env) for d in b["shape"]], numpy_dtype(b["dtype"]))
        for b in self._buffers:  # aliases come after their sources in buffer order
            if b["role"] == "alias":
                bufs[b["id"]] = bufs[b["alias_of"]].reshape([eval_dim(d, env) for d in b["shape"]])
        return bufs

    # ---- calling -----------------------------------------------------------------------
    def _collect(self, args: tuple, kwargs: dict) -> list[np.ndarray]:
        values = match_inputs(self.input_names, args, kwargs)
        arrays = []
        for spec in self.manifest["inputs"]:
            a = _to_numpy(values[spec["name"]], spec["name"])
            want = numpy_dtype(spec["dtype"])
            if a.dtype != want:
                raise InputError(f"input {spec['name']!r}: expected dtype {want}, got {a.dtype}")
            arrays.append(aligned(a))
        return arrays

    def __call__(self, *args, **kwargs) -> list[np.ndarray]:
        arrays = self._collect(args, kwargs)
        env = self._bind(arrays)
        bufs = self._resolve(arrays, env)
        args = {k: _DLPackAs(v) for k, v in bufs.items() if _is_bf16(v)} if self._bf16 else {}
        args = {**bufs, **args} if args else bufs
        for fn, buf_ids, syms in self._calls:
            fn(*[args[i] for i in buf_ids], *[env[s] for s in syms])
        outs = []
        for bid in self._output_ids:
            a = bufs[bid]
            # outputs that are inputs, weights or arena views are copied so callers own them
            outs.append(a if self._buffers[bid]["role"] == "temp" else np.array(a, copy=True))
        return outs

    def describe(self) -> dict:
        m = self.manifest
        return {"inputs": m["inputs"], "outputs": m["outputs"], "kernels": len(m["kernels"]),
                "calls": len(m["calls"]), "weight_bytes": m["weights"]["bytes"]}


def load(path, device: str = "cpu", **options):
    """Load an artifact folder written by `CompiledModel.export` / `llmc compile`.

    device "cpu" gives an Executor; "cuda" (or "cuda:N") a runtime.gpu.GpuExecutor, which
    takes `graphs` (CUDA-graph replay, default on) and `fill_weights` ("random" | "none",
    for perf artifacts compiled without weights) as options.
    """
    path = pathlib.Path(path)
    manifest = read_manifest(path)
    kind, _, index = device.partition(":")
    if kind not in ("cpu", "cuda"):
        from ..errors import TargetError

        raise TargetError(f"device {device!r} is not supported by this runtime (use 'cpu' or 'cuda')")
    if manifest["device"] != kind:
        raise ArtifactError(f"{path} was compiled for {manifest['device']!r}, not {kind!r}")
    omitted = bool(manifest["weights"].get("omitted"))
    weights = load_weights(path / WEIGHTS, manifest)
    if kind == "cuda":
        from .gpu import GpuExecutor, import_tvm_cuda

        tvm = import_tvm_cuda()
        modules = {}
        for lib, file in manifest.get("libraries", {"tvm": LIBRARY}).items():
            try:
                modules[lib] = tvm.runtime.load_module(str(path / file))
            except Exception as e:
                raise ArtifactError(f"{path / file}: cannot load the {lib} library "
                                    f"({str(e).splitlines()[0][:200]})") from None
        return GpuExecutor(manifest, modules, weights, device_id=int(index or 0), **options)
    if omitted:
        raise ArtifactError(f"{path} lacks its large weights (a perf artifact compiled with --weights none); "
                            f"only the CUDA runtime fills them with random values")
    tvm = import_tvm(with_gpu=False)
    try:
        module = tvm.runtime.load_module(str(path / LIBRARY))
    except Exception as e:
        raise ArtifactError(f"{path / LIBRARY}: cannot load kernel library ({str(e).splitlines()[0][:200]})") from None
    return Executor(manifest, module, weights, device)


def load_weights(file: pathlib.Path, manifest: dict) -> dict[str, np.ndarray]:
    expected = manifest["weights"]["bytes"]
    size = file.stat().st_size
    if size != expected:
        raise ArtifactError(f"{file}: weights file is {size} bytes, the manifest expects {expected} "
                            f"(truncated or replaced)")
    try:
        from safetensors.numpy import load_file

        raw = load_file(str(file))
    except Exception as e:
        raise ArtifactError(f"{file}: unreadable weights file ({str(e)[:200]})") from None
    dtypes = {b["name"]: b["dtype"] for b in manifest["buffers"] if b["role"] == "weight"}
    # bf16/fp8 are stored as raw integer words of the same width (safetensors' numpy API
    # has no such dtypes) and reinterpreted here.
    return {k: (v.view(numpy_dtype(dtypes[k])) if k in dtypes and numpy_dtype(dtypes[k]) != v.dtype else v)
            for k, v in raw.items()}


__all__ = ["Executor", "load", "LLMCError"]
