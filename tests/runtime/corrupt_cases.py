"""Corrupted artifacts, one function per case: each takes a fresh copy of a good artifact
folder and damages it. Used by test_corrupt_artifacts.py (each must load as ArtifactError).

`lie(...)` cases edit the manifest and re-seal its checksum, so that the validator itself
is exercised (an unsealed edit is caught by the checksum alone, which other cases test).
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import pathlib
import struct
from typing import Callable

from llmc.runtime.manifest import canonical_checksum

CASES: dict[str, Callable[[pathlib.Path], None]] = {}
K, W, M = "kernels.so", "weights.safetensors", "manifest.json"


def case(name: str):
    def register(fn):
        assert name not in CASES, name
        CASES[name] = fn
        return fn
    return register


def _m(d: pathlib.Path) -> dict:
    return json.loads((d / M).read_text())


def _write(d: pathlib.Path, m: dict, reseal: bool = True) -> None:
    if reseal:
        m = {k: v for k, v in m.items() if k != "checksum"}
        m["checksum"] = canonical_checksum(m)
    (d / M).write_text(json.dumps(m))


def _rehash(d: pathlib.Path, m: dict, name: str) -> None:
    data = (d / name).read_bytes()
    m["files"]["entries"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    if name == W:
        m["weights"]["bytes"] = len(data)


def lie(name: str, edit: Callable[[dict], object], reseal: bool = True) -> None:
    def run(d: pathlib.Path) -> None:
        m = _m(d)
        edit(m)
        _write(d, m, reseal)
    case(name)(run)


def _set(path: str, value):
    """An edit that sets m[a][b]...= value (path 'a/b/0/c')."""
    keys = [int(k) if k.lstrip("-").isdigit() else k for k in path.split("/")]

    def edit(m):
        o = m
        for k in keys[:-1]:
            o = o[k]
        o[keys[-1]] = value
    return edit


def _del(path: str):
    keys = [int(k) if k.lstrip("-").isdigit() else k for k in path.split("/")]

    def edit(m):
        o = m
        for k in keys[:-1]:
            o = o[k]
        del o[keys[-1]]
    return edit


# ---- truncated, bit-flipped, grown, replaced files (no manifest edit) -------------------------
def _truncate(file: str, keep: Callable[[int], int]):
    def run(d):
        data = (d / file).read_bytes()
        (d / file).write_bytes(data[:keep(len(data))])
    return run


for f in (M, K, W):
    for label, keep in [("empty", lambda n: 0), ("8 bytes", lambda n: 8), ("half", lambda n: n // 2),
                        ("minus 1", lambda n: n - 1)]:
        case(f"truncated {f} ({label})")(_truncate(f, keep))


def _flip(file: str, where: float, bit: int = 0):
    def run(d):
        data = bytearray((d / file).read_bytes())
        i = min(int(len(data) * where), len(data) - 1)
        data[i] ^= 1 << bit
        (d / file).write_bytes(bytes(data))
    return run


for f in (M, K, W):
    for where in (0.0, 0.01, 0.1, 0.3, 0.5, 0.7, 0.9, 0.999):
        case(f"bit flip in {f} at {where:.0%}")(_flip(f, where, bit=int(where * 7)))


def _append(file: str, extra: bytes):
    def run(d):
        with open(d / file, "ab") as fh:
            fh.write(extra)
    return run


case("kernels.so grown by one byte")(_append(K, b"\0"))
case("weights grown by 64 bytes")(_append(W, b"\0" * 64))
case("manifest with trailing garbage")(_append(M, b"}garbage"))


@case("kernels.so replaced by zeros of the same size")
def _(d):
    (d / K).write_bytes(bytes((d / K).stat().st_size))


@case("weights replaced by another valid safetensors file of the same size")
def _(d):
    data = bytearray((d / W).read_bytes())
    n = struct.unpack("<Q", data[:8])[0]
    data[8 + n:] = bytes(len(data) - 8 - n)  # all weights zero: a well-formed file, wrong content
    (d / W).write_bytes(bytes(data))


for f in (M, K, W):
    case(f"{f} missing")(lambda d, f=f: (d / f).unlink())


@case("manifest is not JSON")
def _(d):
    (d / M).write_bytes(b"\x7fELF not json")


@case("manifest is UTF-16")
def _(d):
    (d / M).write_bytes((d / M).read_text().encode("utf-16"))


@case("manifest is a JSON list")
def _(d):
    (d / M).write_text("[1, 2, 3]")


@case("manifest nested 100000 deep")
def _(d):
    (d / M).write_text("[" * 100000 + "]" * 100000)


@case("manifest: optional unknown section nested 100000 deep")
def _(d):
    text = (d / M).read_text().rstrip()[:-1]
    (d / M).write_text(text + ', "future": {"version": 1, "x": ' + "[" * 100000 + "]" * 100000 + "}}")


@case("manifest larger than any manifest (sparse 80 MB)")
def _(d):
    with open(d / M, "r+b") as fh:
        fh.truncate(80 << 20)


@case("manifest with NaN")
def _(d):
    (d / M).write_text((d / M).read_text().replace('"arena_bytes": 49152', '"arena_bytes": NaN'))


@case("manifest with a 5000-digit integer")
def _(d):
    (d / M).write_text((d / M).read_text().replace('"arena_bytes": 49152', '"arena_bytes": 1' + "0" * 5000))


# ---- special files and path traversal ---------------------------------------------------------
def _replace_with(file: str, make: Callable[[pathlib.Path], None]):
    def run(d):
        (d / file).unlink()
        make(d / file)
    return run


def _outside_copy(file: str):
    def make(p: pathlib.Path):
        outside = p.parent.parent / f"{p.parent.name}-outside-{file}"
        outside.write_bytes((p.parent.parent / "pristine" / file).read_bytes())
        p.symlink_to(outside)
    return make


for f in (M, K, W):
    case(f"{f} is a FIFO")(_replace_with(f, lambda p: os.mkfifo(p)))
    case(f"{f} is a directory")(_replace_with(f, lambda p: p.mkdir()))
    case(f"{f} is a symlink to /dev/zero")(_replace_with(f, lambda p: p.symlink_to("/dev/zero")))
    case(f"{f} is a symlink to an identical copy outside the folder")(_replace_with(f, _outside_copy(f)))
    case(f"{f} is a dangling symlink")(_replace_with(f, lambda p: p.symlink_to(p.parent / "nowhere")))


@case("artifact folder is a plain file")
def _(d):
    for f in d.iterdir():
        f.unlink()
    d.rmdir()
    d.write_text("not a folder")


@case("artifact folder is empty")
def _(d):
    for f in d.iterdir():
        f.unlink()


def _library_path(value_of: Callable[[pathlib.Path], str]):
    def run(d):
        m = _m(d)
        name = value_of(d)
        m["libraries"]["roles"]["tvm"] = name
        m["files"]["entries"][name] = m["files"]["entries"][K]
        _write(d, m)
    return run


def _abs_copy(d: pathlib.Path) -> str:
    target = d.parent / f"{d.name}-abs-kernels.so"
    target.write_bytes((d / K).read_bytes())
    return str(target)


def _dotdot_copy(d: pathlib.Path) -> str:
    (d.parent / f"{d.name}-up-kernels.so").write_bytes((d / K).read_bytes())
    return f"../{d.name}-up-kernels.so"


case("library path ../ (a real copy there)")(_library_path(_dotdot_copy))
case("library path absolute (a real copy there)")(_library_path(_abs_copy))
case("library path in a subfolder")(_library_path(lambda d: "sub/kernels.so"))
case("library path is ..")(_library_path(lambda d: ".."))
case("library path is a hidden file")(_library_path(lambda d: ".kernels.so"))
case("library path with a NUL byte")(_library_path(lambda d: "kernels.so\0x"))
case("library path with a backslash")(_library_path(lambda d: "..\\kernels.so"))
lie("weights file ../weights.safetensors", _set("weights/file", "../weights.safetensors"))
lie("weights file absolute /etc/passwd", _set("weights/file", "/etc/passwd"))
lie("files entry named ../x", lambda m: m["files"]["entries"].update({"../x": {"bytes": 1, "sha256": "0" * 64}}))
lie("unknown library role", _set("libraries/roles/evil", "kernels.so"))
lie("libraries without the tvm role", _set("libraries/roles", {"shim": "kernels.so"}))

# ---- lying manifests: structure and types -----------------------------------------------------
for key in ("format", "format_version", "llmc_version", "target", "program", "weights", "files"):
    lie(f"missing top-level {key}", _del(key))
lie("missing checksum", _del("checksum"), reseal=False)
lie("checksum of other content", _set("checksum", "0" * 64), reseal=False)
lie("unsealed edit: arena_bytes changed", _set("program/arena_bytes", 49216), reseal=False)
lie("unsealed edit: buffer offset moved onto another", _set("program/buffers/3/offset", 0), reseal=False)
lie("unsealed edit: call args swapped", _set("program/calls/1/args", [5, 4, 3]), reseal=False)
for key in ("symbols", "inputs", "outputs", "buffers", "arena_bytes", "kernels", "calls", "version"):
    lie(f"missing program.{key}", _del(f"program/{key}"))
lie("format is another format", _set("format", "onnx"))
lie("format_version 1", _set("format_version", 1))
lie("format_version 3", _set("format_version", 3))
lie("format_version as a string", _set("format_version", "2"))
lie("format_version true", _set("format_version", True))
lie("section version from the future", _set("program/version", 99))
lie("section version 0", _set("weights/version", 0))
lie("section version a bool", _set("target/version", True))
lie("section is a list", _set("target", ["llvm"]))
lie("unknown required section", _set("kv_cache", {"version": 1, "required": True}))
lie("section required flag not a bool", _set("kv_cache", {"version": 1, "required": "yes"}))
lie("program is a list", _set("program", []))
lie("symbols is an object", _set("program/symbols", {}))
lie("inputs is a string", _set("program/inputs", "x"))
lie("buffer entry is a number", _set("program/buffers/2", 5))
lie("arena_bytes a string", _set("program/arena_bytes", "49152"))
lie("arena_bytes a float", _set("program/arena_bytes", 49152.0))
lie("arena_bytes true", _set("program/arena_bytes", True))
lie("arena_bytes negative", _set("program/arena_bytes", -1))
lie("arena_bytes 2**70", _set("program/arena_bytes", 2 ** 70))
lie("arena too small for its buffers", _set("program/arena_bytes", 1024))
lie("symbol lo true", _set("program/symbols/0/lo", True))
lie("symbol lo 0", _set("program/symbols/0/lo", 0))
lie("symbol lo negative", _set("program/symbols/0/lo", -5))
lie("symbol hi float", _set("program/symbols/1/hi", 64.0))
lie("symbol hi 2**62", _set("program/symbols/1/hi", 2 ** 62))
lie("symbol lo > hi", _set("program/symbols/1/lo", 65))
lie("duplicate symbol", _set("program/symbols/1/name", "batch"))
lie("symbol hi raised past the arena plan", _set("program/symbols/1/hi", 100))
lie("buffer id is a bool", _set("program/buffers/1/id", True))
lie("buffer id not its position", _set("program/buffers/2/id", 7))
lie("buffer dim negative", _set("program/buffers/4/shape", [-16, 32]))
lie("buffer dim 2**45", _set("program/buffers/4/shape", [2 ** 45, 32]))
lie("buffer dim names an unknown symbol", _set("program/buffers/3/shape/0", [[1, ["vocab"]]]))
lie("buffer dim malformed polynomial", _set("program/buffers/3/shape/0", [[1, "batch"]]))
lie("buffer dim nested 50 deep", _set("program/buffers/3/shape/0", json.loads("[" * 50 + "]" * 50)))
lie("buffer dim over 40 symbols (2^40 corners)", lambda m: (
    m["program"]["symbols"].extend({"name": f"s{i}", "lo": 1, "hi": 2} for i in range(40)),
    m["program"]["buffers"][3]["shape"].__setitem__(0, [[1, [f"s{i}", f"s{i+1}", f"s{i+2}", f"s{i+3}"]]
                                                        for i in range(0, 40, 4)])))
lie("buffer dtype unknown", _set("program/buffers/3/dtype", "float128"))
lie("buffer role unknown", _set("program/buffers/3/role", "magic"))
lie("buffer with an unknown key", _set("program/buffers/3/extra", 1))
lie("temp offset negative", _set("program/buffers/3/offset", -64))
lie("temp offset unaligned", _set("program/buffers/3/offset", 32772))
lie("temp offset past the arena", _set("program/buffers/3/offset", 49152))
lie("temp offset overlapping a live buffer", _set("program/buffers/3/offset", 0))
lie("weight buffer with an arena offset", _set("program/buffers/1/offset", 0))
lie("alias of a later buffer", lambda m: m["program"]["buffers"][7].update(role="alias", alias_of=8))
lie("alias_of out of range", lambda m: m["program"]["buffers"][8].update(role="alias", alias_of=99))
lie("alias with another dtype", lambda m: m["program"]["buffers"][8].update(role="alias", alias_of=7,
                                                                             dtype="int32"))
lie("alias with another element count", lambda m: m["program"]["buffers"][5].update(role="alias", alias_of=3,
                                                                                    offset=None))
lie("alias without alias_of", _set("program/buffers/8/role", "alias"))
lie("input buffer out of range", _set("program/inputs/0/buffer", 9))
lie("input names a weight buffer", _set("program/inputs/0/buffer", 1))
lie("input dtype differs from its buffer", _set("program/inputs/0/dtype", "float16"))
lie("duplicate input", lambda m: m["program"]["inputs"].append(copy.deepcopy(m["program"]["inputs"][0])))
lie("output buffer 10**6", _set("program/outputs/0/buffer", 10 ** 6))
lie("output buffer -1", _set("program/outputs/1/buffer", -1))
lie("output buffer a string", _set("program/outputs/1/buffer", "7"))
lie("call of an unknown kernel", _set("program/calls/0/kernel", "softmax_9"))
lie("call arg out of range", _set("program/calls/0/args/1", 999))
lie("call arg negative", _set("program/calls/0/args/1", -1))
lie("call arg a bool", _set("program/calls/0/args/1", True))
lie("call args swapped (shapes differ)", _set("program/calls/1/args", [3, 5, 4]))
lie("call arg dropped", _set("program/calls/1/args", [3, 4]))
lie("call arg repeated", _set("program/calls/1/args", [3, 4, 5, 5]))
lie("kernel symbol unknown", _set("program/kernels/matmul_0/symbols", ["batch", "heads"]))
lie("kernel symbol dropped", _set("program/kernels/layer_norm_0/symbols", ["batch"]))
lie("kernel name missing from the library", lambda m: (
    m["program"]["kernels"].__setitem__("layer_norm_9", m["program"]["kernels"].pop("layer_norm_0")),
    m["program"]["calls"][0].__setitem__("kernel", "layer_norm_9")))
lie("tvm kernel with shim fields", _set("program/kernels/layer_norm_0/scalars", [1]))
lie("tvm kernel relabelled a blas gemm", lambda m: m["program"]["kernels"]["layer_norm_0"].update(
    route="blas", func="gemm", scalars=[0], tensors=[{"arg": i, "shape": [16, 16]} for i in range(3)]))
# the BLAS GEMMs (matmul_0 and matmul_1 are route "blas": a, w, out views and trans_b)
lie("blas function unknown", _set("program/kernels/matmul_0/func", "gemv"))
lie("blas gemm with two tensors", lambda m: m["program"]["kernels"]["matmul_0"]["tensors"].pop())
lie("blas gemm with a missing tensor", _set("program/kernels/matmul_0/tensors/1", None))
lie("blas gemm with a 3-D view", _set("program/kernels/matmul_0/tensors/1/shape", [16, 32, 1]))
lie("blas trans_b 2", _set("program/kernels/matmul_0/scalars", [2]))
lie("blas trans_b a bool", _set("program/kernels/matmul_0/scalars", [True]))
lie("blas trans_b missing", _set("program/kernels/matmul_0/scalars", []))
lie("blas trans_b flipped (shapes disagree)", _set("program/kernels/matmul_0/scalars", [0]))
lie("blas weight view transposed (same size)", _set("program/kernels/matmul_0/tensors/1/shape", [16, 32]))
lie("blas output view larger than its buffer", _set("program/kernels/matmul_1/tensors/2/shape/1", 32))
lie("blas tensor reads past the call's args", _set("program/kernels/matmul_0/tensors/2/arg", 3))
lie("blas a and out swapped", lambda m: (_set("program/kernels/matmul_0/tensors/0/arg", 2)(m),
                                         _set("program/kernels/matmul_0/tensors/2/arg", 0)(m)))
lie("blas call with a fourth argument", _set("program/calls/1/args", [3, 4, 5, 8]))
lie("blas kernel in a cuda artifact's clothing", lambda m: m["program"]["kernels"]["matmul_0"].update(route="shim"))
lie("shim kernel on a CPU artifact", lambda m: m["program"]["kernels"]["matmul_0"].update(
    route="shim", func="llmc_gemm_ex", tensors=[], scalars=[]))
lie("shim tensor reads past the call's args", lambda m: m["program"]["kernels"]["matmul_0"].update(
    route="shim", func="llmc_gemm_ex", tensors=[{"arg": 7, "shape": [16]}], scalars=[]))
lie("temp buffer shape changed (kernel disagrees)", _set("program/buffers/5/shape/2", 31))
lie("target device unknown", _set("target/device", "tpu"))
lie("target device cuda on a CPU load", _set("target/device", "cuda"))

# ---- lying manifests: weights and files ---------------------------------------------------------
lie("weight dtype float16 in the manifest, float32 in the file", _set("program/buffers/4/dtype", "float16"))
lie("weight dtype int32 in the manifest (same width as the file's float32)", _set("program/buffers/4/dtype", "int32"))
lie("weight shape transposed", _set("program/buffers/4/shape", [16, 32]))
lie("weight shape one longer", _set("program/buffers/1/shape", [17]))
lie("weight shape 0-d vs the file's 1-d", _set("program/buffers/1/shape", []))
lie("weight renamed (file lacks it)", _set("program/buffers/1/name", "ln.weight"))
lie("weight without a name", _set("program/buffers/1/name", None))
lie("duplicate weight name", _set("program/buffers/2/name", "ln.w"))
lie("weights count wrong", _set("weights/count", 3))
lie("weights bytes wrong", _set("weights/bytes", 4489))
lie("weights stored_as a float32 weight as uint16", _set("weights/stored_as", {"up.T": "uint16"}))
lie("weights stored_as names an unknown weight", _set("weights/stored_as", {"nope": "uint8"}))
lie("weights omitted on a CPU load", _set("weights/omitted", ["up.T"]))
lie("weights omitted names an unknown weight", _set("weights/omitted", ["nope"]))
lie("file size wrong (kernels.so)", _set("files/entries/kernels.so/bytes", 12))
lie("file hash wrong (kernels.so)", _set("files/entries/kernels.so/sha256", "ab" * 32))
lie("file hash wrong (weights)", _set("files/entries/weights.safetensors/sha256", "cd" * 32))
lie("file hash not hex", _set("files/entries/kernels.so/sha256", "z" * 64))
lie("file hash uppercase", lambda m: m["files"]["entries"][K].update(sha256=m["files"]["entries"][K]["sha256"].upper()))
lie("file size a bool", _set("files/entries/kernels.so/bytes", True))
lie("no files entry for kernels.so", _del("files/entries/kernels.so"))
lie("files entries a list", _set("files/entries", []))
lie("input_checks on a float input", _set("input_checks", {"version": 1, "checks": [
    {"input": "x", "lo": 0, "hi": 5, "table": "t"}]}))
lie("cpu section with a numeric triple", _set("cpu", {"version": 1, "triple": 5, "mcpu": "x86-64",
                                                      "features": []}))
lie("notes with nested values", _set("notes/values", {"a": {"b": [1]}}))


def _rewrite_weights(edit_header: Callable[[dict], None], data_edit: Callable[[bytes], bytes] = lambda b: b):
    """Rewrite the weights file's header (and data), then record its new size and hash: a
    consistent-looking artifact whose weights file disagrees with the program."""
    def run(d):
        raw = (d / W).read_bytes()
        n = struct.unpack("<Q", raw[:8])[0]
        header = json.loads(raw[8:8 + n])
        edit_header(header)
        h = json.dumps(header).encode()
        h += b" " * (-len(h) % 8)
        (d / W).write_bytes(struct.pack("<Q", len(h)) + h + data_edit(raw[8 + n:]))
        m = _m(d)
        _rehash(d, m, W)
        _write(d, m)
    return run


def _retag(name: str, **kw):
    return lambda h: h[name].update(**kw)


# (the CPU stores GEMM weights [N, K]: "up" [16, 32] is "up.T" [32, 16], passes/gemm_weight_layout.py)
case("weights file says float16 for a float32 weight (rehashed)")(_rewrite_weights(_retag("up.T", dtype="F16")))
case("weights file says int32 for a float32 weight (rehashed)")(_rewrite_weights(_retag("up.T", dtype="I32")))
case("weights file shape [16, 32] for [32, 16] (rehashed)")(_rewrite_weights(_retag("up.T", shape=[16, 32])))
case("weights file offsets overlap (rehashed)")(_rewrite_weights(
    lambda h: h["ln.b"].update(data_offsets=[0, 64])))
case("weights file offsets past the end (rehashed)")(_rewrite_weights(
    lambda h: [t.update(data_offsets=[o + 10 ** 6 for o in t["data_offsets"]]) for k, t in h.items()
               if k != "__metadata__"]))
case("weights file lacks a tensor (rehashed)")(_rewrite_weights(lambda h: h.pop("down.T")))
case("weights file has an extra tensor (rehashed)")(_rewrite_weights(
    lambda h: h.update(extra={"dtype": "F32", "shape": [0], "data_offsets": [0, 0]})))
case("weights header is a list (rehashed)")(_rewrite_weights(lambda h: (h.clear(), h.update({"a": [1]}))))
case("weights header length past the file (rehashed)")(lambda d: (
    (d / W).write_bytes(struct.pack("<Q", 2 ** 40) + (d / W).read_bytes()[8:]),
    (lambda m: (_rehash(d, m, W), _write(d, m)))(_m(d))))
case("weights data trailing bytes (rehashed)")(_rewrite_weights(lambda h: None, lambda b: b + b"\0" * 8))
