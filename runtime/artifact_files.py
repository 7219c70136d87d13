"""Opening an artifact's files safely: every name is a plain file inside the folder, a
regular file (never a symlink, FIFO, device or directory: a FIFO would hang the read), of
the size the manifest records and with its SHA-256, all checked before anything is mapped
or loaded (a truncated kernels.so would otherwise SIGBUS inside the dynamic loader).

The weights file is read once into aligned arrays while it is hashed, so what is checked
is exactly what is used; its safetensors header is parsed here and each tensor's stored
dtype and shape must equal the manifest's (nothing is reinterpreted behind its back).
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
import stat
from typing import Mapping

import numpy as np

from ..errors import ArtifactError
from .manifest import MANIFEST, MAX_MANIFEST_BYTES, FileEntry, Manifest

CHUNK = 1 << 22
_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
             "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "U16": "uint16", "BOOL": "bool",
             "F8_E4M3": "float8_e4m3fn"}
MAX_HEADER = 100 << 20


def _open_regular(file: pathlib.Path, what: str) -> tuple[int, int]:
    """(fd, size) of a regular file, opened without following links or blocking on FIFOs."""
    try:
        st = os.lstat(file)
    except FileNotFoundError:
        raise ArtifactError(f"{file.parent}: missing {file.name}") from None
    except OSError as e:
        raise ArtifactError(f"{file}: cannot stat {what} ({e.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        kind = ("a symlink" if stat.S_ISLNK(st.st_mode) else "a directory" if stat.S_ISDIR(st.st_mode)
                else "a FIFO" if stat.S_ISFIFO(st.st_mode) else "a device or special file")
        raise ArtifactError(f"{file}: {what} is {kind}, not a regular file")
    try:
        fd = os.open(file, _FLAGS)
    except OSError as e:
        raise ArtifactError(f"{file}: cannot open {what} ({e.strerror})") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):  # swapped between lstat and open
        os.close(fd)
        raise ArtifactError(f"{file}: {what} is not a regular file")
    os.set_blocking(fd, True)
    return fd, st.st_size


def read_manifest_json(folder: pathlib.Path) -> dict:
    if not folder.is_dir():
        raise ArtifactError(f"{folder}: not an llmc artifact folder (expected {MANIFEST}, kernels.so, weights.safetensors)")
    file = folder / MANIFEST
    if not os.path.lexists(file):
        raise ArtifactError(f"{folder}: missing {MANIFEST}; not an llmc artifact or an interrupted export")
    fd, size = _open_regular(file, "the manifest")
    with os.fdopen(fd, "rb") as f:
        if size > MAX_MANIFEST_BYTES:
            raise ArtifactError(f"{file}: {size} bytes, larger than any manifest ({MAX_MANIFEST_BYTES})")
        data = f.read(MAX_MANIFEST_BYTES + 1)
    if len(data) > MAX_MANIFEST_BYTES:
        raise ArtifactError(f"{file}: larger than any manifest ({MAX_MANIFEST_BYTES} bytes)")
    try:
        return json.loads(data.decode("utf-8"), parse_constant=_no_constant)
    except RecursionError:
        raise ArtifactError(f"{file}: corrupt manifest (nested too deeply)") from None
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError, int digit limit, NaN/Infinity
        raise ArtifactError(f"{file}: corrupt manifest ({str(e)[:200]})") from None


def _no_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def read_manifest(folder: pathlib.Path) -> Manifest:
    """The folder's manifest, validated (schema, checksum, file names)."""
    folder = pathlib.Path(folder)
    return Manifest.from_json(read_manifest_json(folder), str(folder / MANIFEST), sealed=True)


def check_file(folder: pathlib.Path, name: str, entry: FileEntry, what: str) -> pathlib.Path:
    """Size and SHA-256 of a named file; returns its path once it matches."""
    file = folder / name
    fd, size = _open_regular(file, what)
    with os.fdopen(fd, "rb") as f:
        if size != entry.bytes:
            raise ArtifactError(f"{file}: {what} is {size} bytes, the manifest records {entry.bytes} "
                                f"(truncated or replaced)")
        h = hashlib.sha256()
        while block := f.read(CHUNK):
            h.update(block)
    if h.hexdigest() != entry.sha256:
        raise ArtifactError(f"{file}: {what} does not match its SHA-256 in the manifest (damaged or replaced)")
    return file


def file_entry(manifest: Manifest, name: str, folder: pathlib.Path) -> FileEntry:
    entry = manifest.files.get(name)
    if entry is None:
        raise ArtifactError(f"{folder / MANIFEST}: files.entries has no size and hash for {name!r}")
    return entry


def _aligned_empty(shape, dtype: np.dtype) -> np.ndarray:
    from .executor import aligned_empty

    return aligned_empty(shape, dtype)


def load_weights(folder: pathlib.Path, manifest: Manifest) -> dict[str, np.ndarray]:
    """Weight name -> array (in the manifest's dtype), hashed while read, checked against the
    safetensors header and the manifest."""
    from .executor import numpy_dtype

    w = manifest.weights
    file = folder / w.file
    entry = file_entry(manifest, w.file, folder)
    fd, size = _open_regular(file, "the weights file")
    h = hashlib.sha256()
    with os.fdopen(fd, "rb") as f:
        if size != entry.bytes:
            raise ArtifactError(f"{file}: weights file is {size} bytes, the manifest expects {entry.bytes} "
                                f"(truncated or replaced)")
        head = f.read(8)
        h.update(head)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 <= n <= min(MAX_HEADER, size - 8):
            raise ArtifactError(f"{file}: not a safetensors file (header length {n})")
        raw_header = f.read(n)
        h.update(raw_header)
        try:
            header = json.loads(raw_header.decode("utf-8"))
        except RecursionError:
            raise ArtifactError(f"{file}: corrupt safetensors header (nested too deeply)") from None
        except (ValueError, UnicodeDecodeError) as e:
            raise ArtifactError(f"{file}: corrupt safetensors header ({str(e)[:200]})") from None
        if not isinstance(header, dict):
            raise ArtifactError(f"{file}: corrupt safetensors header")
        header.pop("__metadata__", None)
        by_name = manifest.weight_buffers()
        expected = set(by_name) - set(w.omitted)
        if set(header) != expected:
            extra, lacking = sorted(set(header) - expected), sorted(expected - set(header))
            raise ArtifactError(f"{file}: " + (f"weights file lacks {lacking[:5]}" if lacking
                                               else f"unexpected tensors {extra[:5]}"))
        entries = []
        for name, t in header.items():
            b = by_name[name]
            if not isinstance(t, dict) or not isinstance(t.get("data_offsets"), list) \
                    or not isinstance(t.get("shape"), list):
                raise ArtifactError(f"{file}: tensor {name!r}: corrupt header entry")
            stored = ST_DTYPES.get(t.get("dtype"), str(t.get("dtype")))
            want = w.stored_as.get(name, b.dtype if b.dtype != "int4x2" else "uint8")
            shape = tuple(t["shape"])
            want_shape = tuple(b.shape)
            if stored != want or shape != want_shape or not all(type(d) is int for d in shape):
                raise ArtifactError(f"{file}: weight {name!r}: file has {stored}{list(shape)}, manifest expects "
                                    f"{want}{list(want_shape)}")
            begin, end = t["data_offsets"] if len(t["data_offsets"]) == 2 else (None, None)
            nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(numpy_dtype(stored)).itemsize
            if type(begin) is not int or type(end) is not int or end - begin != nbytes:
                raise ArtifactError(f"{file}: tensor {name!r}: data offsets {t['data_offsets']} do not fit "
                                    f"{stored}{list(shape)}")
            entries.append((begin, end, name, stored))
        entries.sort()
        cursor, data_bytes = 0, size - 8 - n
        out = {}
        for begin, end, name, stored in entries:
            if begin != cursor:
                raise ArtifactError(f"{file}: tensor {name!r} starts at {begin}, expected {cursor} (gap or overlap)")
            b = by_name[name]
            a = _aligned_empty(b.shape, numpy_dtype(stored))
            view = memoryview(a.reshape(-1).view(np.uint8)) if a.size else memoryview(b"")
            got = f.readinto(view) if a.size else 0
            if got != end - begin:
                raise ArtifactError(f"{file}: truncated in tensor {name!r}")
            h.update(view)
            out[name] = a if stored == b.dtype or b.dtype == "int4x2" else a.view(numpy_dtype(b.dtype))
            cursor = end
        if cursor != data_bytes:
            raise ArtifactError(f"{file}: {data_bytes - cursor} bytes after the last tensor")
    if h.hexdigest() != entry.sha256:
        raise ArtifactError(f"{file}: weights file does not match its SHA-256 in the manifest (damaged or replaced)")
    return out


def check_library_files(folder: pathlib.Path, manifest: Manifest, roles: Mapping[str, str]) -> dict[str, pathlib.Path]:
    """role -> path of each library, after its size and hash check."""
    return {role: check_file(folder, name, file_entry(manifest, name, folder), f"the {role} library")
            for role, name in roles.items()}
