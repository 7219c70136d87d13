"""Writing an artifact folder: kernels.so + manifest.json + weights.safetensors.

The folder is assembled in a temporary sibling and renamed into place, so an
interrupted export never leaves a half-written artifact at the destination. The manifest
(format 2, docs/artifact.md) records the size and SHA-256 of every file written and a
checksum of itself; the folder and files get the user's umask like any other output.
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import stat
import tempfile
from typing import Mapping, Sequence

import numpy as np

from .. import __version__
from ..compiler.program import Program, Role
from ..compiler.symbolic import to_json
from ..errors import ArtifactError
from ..runtime.manifest import FORMAT, FORMAT_VERSION, LIBRARY, MANIFEST, WEIGHTS, canonical_checksum
from .targets import TargetSpec

STORAGE_WORDS = {"bfloat16": "uint16", "float8_e4m3fn": "uint8"}  # safetensors' numpy API lacks these


def build_manifest(program: Program, target: TargetSpec, weight_bytes: int, describe=None,
                   input_checks: Sequence[Mapping] = (), cpu: Mapping | None = None) -> dict:
    """The manifest as a JSON dict (validated by runtime.manifest.Manifest.from_json on every
    load). `input_checks`: [{"input", "lo", "hi", "table"}] index inputs to range-check at run
    time; `cpu`: {"triple", "mcpu", "features"} the CPU the kernels were built for."""
    graph = program.graph
    names = graph.output_names or tuple(f"output_{i}" for i in range(len(program.outputs)))
    weights = [b for b in program.buffers if b.role is Role.WEIGHT]
    m = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "llmc_version": __version__,
        "target": {"version": 1, "name": str(target), "device": target.device},
        "program": {
            "version": 1,
            "symbols": [{"name": s.name, "lo": s.lo, "hi": s.hi} for s in graph.symbols.values()],
            "inputs": [{"name": n.attrs.name, "buffer": b, "shape": [to_json(d) for d in n.shape],
                        "dtype": n.dtype.value} for n, b in zip(graph.inputs, program.inputs)],
            "outputs": [{"name": name, "buffer": b} for name, b in zip(names, program.outputs)],
            "buffers": [{"id": b.id, "shape": [to_json(d) for d in b.shape], "dtype": b.dtype.value,
                         "role": b.role.value, "name": b.name, "alias_of": b.alias_of, "offset": b.offset}
                        for b in program.buffers],
            "arena_bytes": program.arena_bytes or 0,
            "kernels": {k.name: {"symbols": list(k.symbols),
                                 "ops": describe(k) if describe else k.anchor.op.name.lower()}
                        for k in program.kernels.values()},
            "calls": [{"kernel": c.kernel, "args": list(c.args)} for c in program.calls],
        },
        "weights": {"version": 1, "file": WEIGHTS, "bytes": weight_bytes, "count": len(weights),
                    "stored_as": {b.name: STORAGE_WORDS[b.dtype.value] for b in weights
                                  if b.dtype.value in STORAGE_WORDS}},
        "libraries": {"version": 1, "roles": {"tvm": LIBRARY}},
        "notes": {"version": 1, "values": {k: v for k, v in program.notes.items()
                                           if isinstance(v, (int, str)) and not isinstance(v, bool)
                                           or isinstance(v, float) and np.isfinite(v)}},
    }
    if input_checks:
        m["input_checks"] = {"version": 1, "checks": [
            {"input": str(c["input"]), "lo": int(c["lo"]), "hi": int(c["hi"]), "table": str(c["table"])}
            for c in input_checks]}
    if cpu is not None:
        m["cpu"] = {"version": 1, "triple": str(cpu["triple"]), "mcpu": str(cpu["mcpu"]),
                    "features": [str(f) for f in cpu["features"]]}
    return m


def with_library(manifest: dict, role: str, file: str) -> dict:
    """The manifest with library `role` ("tvm" | "shim") in `file`."""
    libs = manifest.get("libraries", {"version": 1, "roles": {}})
    return dict(manifest, libraries=dict(libs, roles={**libs["roles"], role: file}))


def _storable(a: np.ndarray) -> np.ndarray:
    """safetensors' numpy API has no bf16/fp8: store their raw words (the manifest's
    weights.stored_as says so). 0-d arrays stay 0-d (np.ascontiguousarray would make them 1-d)."""
    if a.dtype.kind == "V" or a.dtype.name in ("bfloat16", "float8_e4m3fn"):
        a = a.view({2: np.uint16, 1: np.uint8}[a.dtype.itemsize])
    return a if a.flags.c_contiguous else a.copy(order="C")


def weights_of(program: Program) -> dict[str, np.ndarray]:
    params = program.graph.params
    return {b.name: np.asarray(params[b.name]) for b in program.buffers if b.role is Role.WEIGHT}


def _sha256(file: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(file, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def _umask() -> int:
    mask = os.umask(0o022)  # read it (no getter in os): set and restore at once
    os.umask(mask)
    return mask


def _seal(folder: pathlib.Path, manifest: dict) -> dict:
    """Record size and SHA-256 of every file in the folder, then the manifest's checksum."""
    entries = {}
    for f in sorted(folder.iterdir()):
        st = os.lstat(f)
        if not stat.S_ISREG(st.st_mode):
            raise ArtifactError(f"{f}: the kernel library writer left a non-regular file in the artifact")
        entries[f.name] = {"bytes": st.st_size, "sha256": _sha256(f)}
    m = dict(manifest, files={"version": 1, "entries": entries})
    m.pop("checksum", None)
    m["checksum"] = canonical_checksum(m)
    return m


def write_artifact(path: str | os.PathLike, library_writer, manifest: dict, weights: Mapping[str, np.ndarray],
                   extra_files: Mapping[str, object] | None = None) -> pathlib.Path:
    """Write atomically. `library_writer(file)` exports the kernel library to `file`;
    `extra_files`: file name -> writer(file) of other files the manifest names (the step
    function's library, a tokenizer)."""
    from safetensors.numpy import save_file

    dest = pathlib.Path(path).resolve()
    if dest.exists() and not (dest.is_dir() and ((dest / MANIFEST).exists() or not any(dest.iterdir()))):
        raise ArtifactError(f"{dest} exists and is not an llmc artifact; refusing to overwrite it")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        library_writer(str(tmp / manifest.get("libraries", {}).get("roles", {}).get("tvm", LIBRARY)))
        for name, write in (extra_files or {}).items():
            write(str(tmp / name))
        save_file({k: _storable(v) for k, v in weights.items()}, str(tmp / WEIGHTS))
        manifest = dict(manifest, weights=dict(manifest["weights"], bytes=(tmp / WEIGHTS).stat().st_size))
        manifest = _seal(tmp, manifest)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, allow_nan=False))
        mask = _umask()  # mkdtemp made the folder 0700; files get 0666 or 0777 less the umask
        os.chmod(tmp, 0o777 & ~mask)
        for f in tmp.iterdir():
            os.chmod(f, (0o777 if os.stat(f).st_mode & 0o100 else 0o666) & ~mask)
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
