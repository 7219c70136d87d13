"""Writing an artifact folder: kernels.so + manifest.json + weights.safetensors.

The folder is assembled in a temporary sibling and renamed into place, so an
interrupted export never leaves a half-written artifact at the destination.
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import tempfile
from typing import Mapping

import numpy as np

from .. import __version__
from ..compiler.program import Program, Role
from ..compiler.symbolic import to_json
from ..errors import ArtifactError
from ..runtime.manifest import FORMAT, FORMAT_VERSION, LIBRARY, MANIFEST, WEIGHTS
from .targets import TargetSpec


def build_manifest(program: Program, target: TargetSpec, weight_bytes: int, describe=None) -> dict:
    graph = program.graph
    names = graph.output_names or tuple(f"output_{i}" for i in range(len(program.outputs)))
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "llmc_version": __version__,
        "target": str(target), "device": target.device,
        "symbols": [{"name": s.name, "lo": s.lo, "hi": s.hi} for s in graph.symbols.values()],
        "inputs": [{"name": n.attrs.name, "buffer": b, "shape": [to_json(d) for d in n.shape], "dtype": n.dtype.value}
                   for n, b in zip(graph.inputs, program.inputs)],
        "outputs": [{"name": name, "buffer": b} for name, b in zip(names, program.outputs)],
        "buffers": [{"id": b.id, "shape": [to_json(d) for d in b.shape], "dtype": b.dtype.value, "role": b.role.value,
                     "name": b.name, "alias_of": b.alias_of, "offset": b.offset} for b in program.buffers],
        "arena_bytes": program.arena_bytes,
        "kernels": {k.name: {"symbols": list(k.symbols), "ops": describe(k) if describe else k.anchor.op.name.lower()}
                    for k in program.kernels.values()},
        "calls": [{"kernel": c.kernel, "args": list(c.args)} for c in program.calls],
        "weights": {"file": WEIGHTS, "bytes": weight_bytes,
                    "count": sum(1 for b in program.buffers if b.role is Role.WEIGHT)},
        "notes": {k: v for k, v in program.notes.items() if isinstance(v, (int, float, str))},
    }


def _storable(a: np.ndarray) -> np.ndarray:
    """safetensors' numpy API has no bf16/fp8: store their raw words (the manifest keeps the dtype)."""
    if a.dtype.kind == "V" or a.dtype.name in ("bfloat16", "float8_e4m3fn"):
        return a.view({2: np.uint16, 1: np.uint8}[a.dtype.itemsize])
    return np.ascontiguousarray(a)


def weights_of(program: Program) -> dict[str, np.ndarray]:
    params = program.graph.params
    return {b.name: params[b.name] for b in program.buffers if b.role is Role.WEIGHT}


def write_artifact(path: str | os.PathLike, library_writer, manifest: dict, weights: Mapping[str, np.ndarray]) -> pathlib.Path:
    """Write atomically. `library_writer(file)` exports the kernel library to `file`."""
    from safetensors.numpy import save_file

    dest = pathlib.Path(path).resolve()
    if dest.exists() and not (dest.is_dir() and ((dest / MANIFEST).exists() or not any(dest.iterdir()))):
        raise ArtifactError(f"{dest} exists and is not an llmc artifact; refusing to overwrite it")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        library_writer(str(tmp / manifest.get("library", LIBRARY)))
        save_file({k: _storable(v) for k, v in weights.items()}, str(tmp / WEIGHTS))
        manifest = dict(manifest, weights=dict(manifest["weights"], bytes=(tmp / WEIGHTS).stat().st_size))
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        if dest.exists():  # swap: old artifact aside, new one in, old one removed
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest
