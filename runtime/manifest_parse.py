"""Validating a manifest dict into the typed Manifest (runtime/manifest.py): one
ArtifactError per problem, naming the key path. See docs/artifact.md for the rules."""
from __future__ import annotations

import itertools
from typing import Any, Mapping

from . import manifest_checks as chk
from .manifest import (ALIGN, DEVICES, DTYPES, FORMAT, FORMAT_VERSION, INTEGER_DTYPES, LIBRARY, LIBRARY_ROLES,
                       REQUIRED_SECTIONS, ROLES, SECTION_VERSIONS, STORAGE_WORDS, TOP_LEVEL, BufferSpec, Call,
                       CpuSpec, Dim, FileEntry, InputCheck, InputSpec, KernelSpec, Manifest, OutputSpec, Program,
                       ShimTensor, Symbol, WeightsSpec, canonical_checksum, eval_dim)
from .cpu_attention import ATTENTION_FUNC, MASK_KINDS
from .manifest_checks import At
from .engine.kv_codec import CODEC_IDS

MAX_DIM_SYMBOLS = 6


def parse(m: Any, at: At, sealed: bool) -> Manifest:
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise at.error("not an llmc manifest (no \"format\": \"llmc-artifact\")")
    version = m.get("format_version")
    if version != FORMAT_VERSION:
        raise chk.ArtifactError(
            f"{at.where}: artifact format version {version!r} (written by llmc {str(m.get('llmc_version'))[:40]}) "
            f"is not supported by this runtime (format {FORMAT_VERSION}); recompile it with this llmc")
    llmc_version = chk.string(m.get("llmc_version"), at["llmc_version"])
    if sealed:
        digest = chk.string(m.get("checksum"), at["checksum"])
        if digest != canonical_checksum(m):
            raise at["checksum"].error("does not match the manifest's content (the file was changed or damaged)")
    sections = _sections(m, at)
    target = chk.obj(sections["target"], at["target"], ("version", "name", "device"))
    name = chk.string(target["name"], at["target"]["name"])
    device = chk.string(target["device"], at["target"]["device"], DEVICES)
    program = _program(sections["program"], at["program"])
    _check_routes(program, device, at["program"])
    generation = None
    if "generation" in sections:
        from .manifest_generation import parse_generation

        generation = parse_generation(sections["generation"], at["generation"], device)
        _check_routes(generation.program, device, at["generation"]["program"])
    weights = _weights(sections["weights"], at["weights"], program, generation)
    libraries = {"tvm": LIBRARY}
    if "libraries" in sections:
        lib = chk.obj(sections["libraries"], at["libraries"], ("version", "roles"))
        libraries = chk.mapping(lib["roles"], at["libraries"]["roles"], chk.plain_file_name, max_len=8)
        for role in libraries:
            chk.string(role, at["libraries"]["roles"][role], LIBRARY_ROLES)
        if "tvm" not in libraries:
            raise at["libraries"]["roles"].error("no 'tvm' library")
        allowed = {"cuda": {"tvm", "shim"}, "cpu": {"tvm", "gemm"}}.get(device, {"tvm"})
        if not set(libraries) <= allowed:
            raise at["libraries"]["roles"].error(f"a {device} artifact has libraries {sorted(allowed)}, "
                                                 f"not {sorted(set(libraries) - allowed)}")
    files: dict[str, FileEntry] = {}
    if "files" in sections:
        files = _files(sections["files"], at["files"])
    if sealed:
        if "files" not in sections:
            raise at.error("missing section 'files' (sizes and hashes of the artifact's files)")
        named = [(at["libraries"]["roles"][r], f) for r, f in libraries.items()] + [(at["weights"]["file"], weights.file)]
        if generation is not None:
            named.append((at["generation"]["library"], generation.library))
            if generation.tokenizer:
                named.append((at["generation"]["tokenizer"], generation.tokenizer))
        for a, f in named:
            if f not in files:
                raise a.error(f"file {f!r} has no size and hash in files.entries")
        if files[weights.file].bytes != weights.bytes:
            raise at["weights"]["bytes"].error(f"{weights.bytes}, but files.entries records "
                                               f"{files[weights.file].bytes} bytes for {weights.file}")
    checks: tuple[InputCheck, ...] = ()
    if "input_checks" in sections:
        checks = _input_checks(sections["input_checks"], at["input_checks"], program)
    cpu = None
    if "cpu" in sections:
        c = chk.obj(sections["cpu"], at["cpu"], ("version", "triple", "mcpu", "features"))
        cpu = CpuSpec(chk.string(c["triple"], at["cpu"]["triple"]), chk.string(c["mcpu"], at["cpu"]["mcpu"]),
                      chk.array(c["features"], at["cpu"]["features"], chk.string, max_len=1024))
    cuda: dict = {}
    if "cuda" in sections:
        c = chk.obj(sections["cuda"], at["cuda"], ("version", "arch"), ("fatbin",))
        cuda = {"arch": chk.string(c["arch"], at["cuda"]["arch"])}
        if "fatbin" in c:
            cuda["fatbin"] = chk.boolean(c["fatbin"], at["cuda"]["fatbin"])
    notes: dict = {}
    if "notes" in sections:
        n = chk.obj(sections["notes"], at["notes"], ("version", "values"))
        notes = chk.flat_scalars(n["values"], at["notes"]["values"])
    parallel = None
    if "parallel" in sections:
        from .manifest import ParallelSpec

        pa = chk.obj(sections["parallel"], at["parallel"], ("version", "tp", "rank", "fingerprint"), ("pp", "stage"))
        tp = chk.integer(pa["tp"], at["parallel"]["tp"], 1, 1 << 16)
        pp = chk.integer(pa.get("pp", 1), at["parallel"]["pp"], 1, 1 << 12)
        parallel = ParallelSpec(tp, chk.integer(pa["rank"], at["parallel"]["rank"], 0, tp - 1),
                                chk.string(pa["fingerprint"], at["parallel"]["fingerprint"]), pp,
                                chk.integer(pa.get("stage", 0), at["parallel"]["stage"], 0, pp - 1))
    unknown = tuple(k for k in m if k not in TOP_LEVEL and k not in SECTION_VERSIONS)
    return Manifest(llmc_version, name, device, program, weights, files, libraries, checks, cpu, cuda, notes,
                    unknown, generation=generation, parallel=parallel)


def _check_routes(program: Program, device: str, at: At) -> None:
    for name, k in program.kernels.items():
        if k.route != "tvm" and device not in ROUTE_DEVICE[k.route]:
            raise at["kernels"][name]["route"].error(
                f"route {k.route!r} exists on {' and '.join(ROUTE_DEVICE[k.route])} only, not in a {device} artifact")
        if k.route == "blas":
            _check_blas(k, program, at["kernels"][name])
        if k.route == "attn":
            _check_attn(k, program, at["kernels"][name])
        if k.route == "kv":
            _check_kv(k, program, at["kernels"][name])
        if k.route == "coll":
            _check_coll(k, program, at["kernels"][name])
        if k.route == "p2p":
            _check_p2p(k, at["kernels"][name])


def _sections(m: dict, at: At) -> dict[str, dict]:
    out = {}
    for key, body in m.items():
        if key in TOP_LEVEL:
            continue
        a = at[key]
        chk.string(key, a)
        if not isinstance(body, dict):
            raise a.error(f"a section must be an object, got {chk._kind(body)}")
        version = chk.integer(body.get("version"), a["version"], 1, 1 << 20)
        required = body.get("required", False)
        chk.boolean(required, a["required"])
        supported = SECTION_VERSIONS.get(key)
        if supported is None:
            if required:
                raise a.error(f"this artifact needs section {key!r} (version {version}), which this runtime "
                              f"does not know; upgrade llmc to load it")
            continue  # an optional section of a newer llmc: ignored on purpose
        if version > supported:
            raise a.error(f"section version {version} is newer than this runtime reads ({supported}); upgrade llmc")
        out[key] = {k: v for k, v in body.items() if k != "required"}
    for key in REQUIRED_SECTIONS:
        if key not in out:
            raise at.error(f"missing section {key!r}")
    return out


def _dim(v: Any, at: At, symbols: Mapping[str, Symbol]) -> Dim:
    if type(v) is int:
        return chk.integer(v, at)
    terms = chk.array(v, at, lambda t, a: t, max_len=16)
    if not terms:
        raise at.error("an empty polynomial")
    out = []
    for i, t in enumerate(terms):
        a = at[i]
        if not isinstance(t, list) or len(t) != 2:
            raise a.error("expected [coefficient, [symbol, ...]]")
        coeff = chk.integer(t[0], a[0], -chk.MAX_COUNT, chk.MAX_COUNT)
        names = chk.array(t[1], a[1], lambda s, b: chk.lookup(symbols, chk.string(s, b), b, "symbol").name, max_len=4)
        out.append((coeff, names))
    if len({s for _, ns in out for s in ns}) > MAX_DIM_SYMBOLS:  # dim_range walks 2^k corners
        raise at.error(f"a dim over more than {MAX_DIM_SYMBOLS} distinct symbols")
    return tuple(out)


def dim_range(d: Dim, symbols: Mapping[str, Symbol]) -> tuple[int, int]:
    """Smallest and largest value of a dim over the corners of its symbols' bounds."""
    if isinstance(d, int):
        return d, d
    names = sorted({s for _, ns in d for s in ns})
    values = [eval_dim(d, dict(zip(names, corner)))
              for corner in itertools.product(*[(symbols[s].lo, symbols[s].hi) for s in names])]
    return min(values), max(values)


def _shape(v: Any, at: At, symbols: Mapping[str, Symbol]) -> tuple:
    shape = chk.array(v, at, lambda d, a: _dim(d, a, symbols), max_len=16)
    count = 1
    for i, d in enumerate(shape):
        lo, hi = dim_range(d, symbols)
        if lo < 0:
            raise at[i].error(f"dim can be negative ({lo}) within the symbols' bounds")
        count *= hi
        if count > chk.MAX_COUNT:
            raise at.error(f"more than {chk.MAX_COUNT} elements at the symbols' upper bounds")
    return shape


def _itemsize(dtype: str) -> int:
    return {"float64": 8, "int64": 8, "float32": 4, "int32": 4, "float16": 2, "bfloat16": 2}.get(dtype, 1)


def max_bytes(shape: tuple, dtype: str, symbols: Mapping[str, Symbol]) -> int:
    n = 1
    for d in shape:
        n *= dim_range(d, symbols)[1]
    return n * _itemsize(dtype)


def _program(p: dict, at: At) -> Program:
    chk.obj(p, at, ("version", "symbols", "inputs", "outputs", "buffers", "arena_bytes", "kernels", "calls"))
    symbols: dict[str, Symbol] = {}
    for i, s in enumerate(chk.array(p["symbols"], at["symbols"], lambda x, a: x, max_len=64)):
        a = at["symbols"][i]
        chk.obj(s, a, ("name", "lo", "hi"))
        name = chk.string(s["name"], a["name"])
        lo = chk.integer(s["lo"], a["lo"], 1)
        hi = chk.integer(s["hi"], a["hi"], 1, 1 << 31)
        if lo > hi:
            raise a.error(f"lo {lo} > hi {hi}")
        if name in symbols:
            raise a["name"].error(f"duplicate symbol {name!r}")
        symbols[name] = Symbol(name, lo, hi)
    arena = chk.integer(p["arena_bytes"], at["arena_bytes"])
    buffers = []
    for i, b in enumerate(chk.array(p["buffers"], at["buffers"], lambda x, a: x)):
        a = at["buffers"][i]
        chk.obj(b, a, ("id", "shape", "dtype", "role"), ("name", "alias_of", "offset"))
        bid = chk.integer(b["id"], a["id"])
        if bid != i:
            raise a["id"].error(f"buffer ids must be their positions ({i}), got {bid}")
        shape = _shape(b["shape"], a["shape"], symbols)
        dtype = chk.string(b["dtype"], a["dtype"], DTYPES)
        role = chk.string(b["role"], a["role"], ROLES)
        name = None if b.get("name") is None else chk.string(b["name"], a["name"], empty=True)
        alias_of = offset = None
        if role == "weight" and not name:
            raise a["name"].error("a weight buffer needs a name")
        if b.get("alias_of") is not None:
            alias_of = chk.integer(b["alias_of"], a["alias_of"], 0, max(i - 1, 0))
            if role != "alias" or alias_of >= i:
                raise a["alias_of"].error("only an alias names a source, and an earlier buffer")
            src = buffers[alias_of]
            if src.dtype != dtype:
                raise a["dtype"].error(f"alias of a {src.dtype} buffer has dtype {dtype}")
            for env in ({s.name: s.lo for s in symbols.values()}, {s.name: s.hi for s in symbols.values()}):
                n_self = _count(shape, env)
                n_src = _count(src.shape, env)
                if n_self != n_src:
                    raise a["shape"].error(f"{n_self} elements, its source buffer {alias_of} has {n_src} (at {env})")
        elif role == "alias":
            raise a.error("an alias buffer needs alias_of")
        if b.get("offset") is not None:
            offset = chk.integer(b["offset"], a["offset"])
            if role not in ("temp", "alias"):
                raise a["offset"].error(f"only temporaries live in the arena, not a {role} buffer")
            if role == "alias" and buffers[alias_of].offset != offset:  # a view: its source's bytes
                raise a["offset"].error(f"{offset}, but its source buffer {alias_of} is at "
                                        f"{buffers[alias_of].offset}")
            if offset % ALIGN:
                raise a["offset"].error(f"{offset} is not a multiple of {ALIGN}")
            end = offset + max_bytes(shape, dtype, symbols)
            if end > arena:
                raise a["offset"].error(f"buffer ends at byte {end} at the symbols' upper bounds, past the "
                                        f"arena ({arena} bytes)")
        buffers.append(BufferSpec(bid, shape, dtype, role, name, alias_of, offset))
    n = len(buffers)
    chk.unique([b.name for b in buffers if b.role == "weight"], at["buffers"], "weight name")

    def buffer_id(v: Any, a: At) -> int:
        return chk.integer(v, a, 0, n - 1) if n else chk.integer(v, a, 0, -1)

    inputs = []
    for i, x in enumerate(chk.array(p["inputs"], at["inputs"], lambda x, a: x, max_len=256)):
        a = at["inputs"][i]
        chk.obj(x, a, ("name", "buffer", "shape", "dtype"))
        spec = InputSpec(chk.string(x["name"], a["name"]), buffer_id(x["buffer"], a["buffer"]),
                         _shape(x["shape"], a["shape"], symbols), chk.string(x["dtype"], a["dtype"], DTYPES))
        b = buffers[spec.buffer]
        if b.role != "input" or b.dtype != spec.dtype or b.shape != spec.shape:
            raise a["buffer"].error(f"buffer {spec.buffer} ({b.role}, {b.dtype}) does not match this input "
                                    f"({spec.dtype}); an input's buffer has role 'input' and the same dtype and shape")
        inputs.append(spec)
    chk.unique([i.name for i in inputs], at["inputs"], "input name")
    chk.unique([str(i.buffer) for i in inputs], at["inputs"], "input buffer")
    outputs = []
    for i, x in enumerate(chk.array(p["outputs"], at["outputs"], lambda x, a: x, max_len=4096)):
        a = at["outputs"][i]
        chk.obj(x, a, ("name", "buffer"))
        outputs.append(OutputSpec(chk.string(x["name"], a["name"]), buffer_id(x["buffer"], a["buffer"])))
    kernels = {}
    for name, k in chk.mapping(p["kernels"], at["kernels"], lambda x, a: x).items():
        kernels[name] = _kernel(name, k, at["kernels"][name], symbols)
    calls = []
    for i, c in enumerate(chk.array(p["calls"], at["calls"], lambda x, a: x)):
        a = at["calls"][i]
        chk.obj(c, a, ("kernel", "args"))
        kname = chk.string(c["kernel"], a["kernel"])
        k = chk.lookup(kernels, kname, a["kernel"], "kernel")
        args = chk.array(c["args"], a["args"], buffer_id, max_len=1024)
        for j, t in enumerate(k.tensors):
            if t is not None and t.arg >= len(args):
                raise a["args"].error(f"kernel {kname!r} reads tensor {j} from arg {t.arg}, the call has {len(args)}")
        calls.append(Call(kname, args))
    _check_arena_overlap(buffers, calls, outputs, symbols, at)
    bound = {d[0][1][0] for i in inputs for d in i.shape
             if not isinstance(d, int) and len(d) == 1 and d[0][0] == 1 and len(d[0][1]) == 1}
    used = {s for b in buffers for d in b.shape if not isinstance(d, int) for _, ns in d for s in ns}
    used |= {s for k in kernels.values() for s in k.symbols}
    unbound = sorted(used - bound)
    if unbound:  # the runtime learns symbol values from input dims only
        raise at["inputs"].error(f"symbols {unbound} are used but no input dim binds them")
    return Program(tuple(symbols.values()), tuple(inputs), tuple(outputs), tuple(buffers), arena, kernels,
                   tuple(calls))


def _check_arena_overlap(buffers: list, calls: list, outputs: list, symbols: Mapping[str, Symbol], at: At) -> None:
    """Arena temporaries whose lifetimes (first to last call that touches them or an alias of
    them; program outputs live to the end) intersect must not share bytes, except an
    in-place pair: same bytes, one's life ending where the other's starts."""
    import numpy as np

    root = [b.id if b.alias_of is None else -1 for b in buffers]
    for b in buffers:
        if b.alias_of is not None:
            root[b.id] = root[b.alias_of]
    first: dict[int, int] = {}
    last: dict[int, int] = {}
    for i, c in enumerate(calls):
        for a in c.args:
            r = root[a]
            first.setdefault(r, i)
            last[r] = i
    for o in outputs:
        last[root[o.buffer]] = len(calls)
    placed = [b for b in buffers if b.offset is not None and b.id in first]
    if len(placed) < 2:
        return
    off = np.array([b.offset for b in placed], np.int64)
    end = off + np.array([max_bytes(b.shape, b.dtype, symbols) for b in placed], np.int64)
    s = np.array([first[b.id] for b in placed])
    e = np.array([last[b.id] for b in placed])
    for i0 in range(0, len(placed), 512):  # row blocks keep the pairwise matrix small
        sl = slice(i0, i0 + 512)
        clash = (off[sl, None] < end[None, :]) & (off[None, :] < end[sl, None]) \
            & (s[sl, None] <= e[None, :]) & (s[None, :] <= e[sl, None])
        in_place = (off[sl, None] == off[None, :]) & (end[sl, None] == end[None, :]) \
            & ((e[sl, None] == s[None, :]) | (s[sl, None] == e[None, :]))
        clash &= ~in_place
        clash[np.arange(clash.shape[0]), np.arange(i0, i0 + clash.shape[0])] = False
        hit = np.argwhere(clash)
        if len(hit):
            x, y = placed[i0 + hit[0][0]], placed[hit[0][1]]
            raise at["buffers"][x.id]["offset"].error(
                f"buffer {x.id} (bytes {x.offset}..{int(end[i0 + hit[0][0]])}) overlaps buffer {y.id} while both "
                f"are live")


def _count(shape: tuple, env: Mapping[str, int]) -> int:
    n = 1
    for d in shape:
        n *= eval_dim(d, env)
    return n


def _kernel(name: str, k: Any, at: At, symbols: Mapping[str, Symbol]) -> KernelSpec:
    chk.obj(k, at, ("symbols",), ("ops", "route", "func", "tensors", "scalars", "label", "schedule"))
    syms = chk.array(k["symbols"], at["symbols"],
                     lambda s, a: chk.lookup(symbols, chk.string(s, a), a, "symbol").name, max_len=64)
    ops = chk.string(k.get("ops", name), at["ops"])
    route = chk.string(k.get("route", "tvm"), at["route"], ("tvm", *ROUTE_DEVICE))
    text = {key: chk.string(k[key], at[key]) if k.get(key) else "" for key in ("label", "schedule")}
    if route == "tvm":
        for key in ("func", "tensors", "scalars"):
            if key in k:
                raise at[key].error("only a shim or blas kernel has this key")
        return KernelSpec(name, syms, ops, route, label=text["label"], schedule=text["schedule"])
    chk.obj(k, at, ("symbols", "func", "tensors", "scalars"), ("ops", "route", "label", "schedule"))

    def tensor(t: Any, a: At) -> ShimTensor | None:
        if t is None:
            return None
        chk.obj(t, a, ("arg", "shape"))
        return ShimTensor(chk.integer(t["arg"], a["arg"], 0, 1023), _shape(t["shape"], a["shape"], symbols))

    return KernelSpec(name, syms, ops, route, chk.string(k["func"], at["func"]),
                      chk.array(k["tensors"], at["tensors"], tensor, max_len=32),
                      chk.array(k["scalars"], at["scalars"], chk.number, max_len=64),
                      text["label"], text["schedule"])


# library routes besides TVM, and the devices they exist on
ROUTE_DEVICE = {"shim": ("cuda",), "blas": ("cpu",), "attn": ("cpu",), "kv": ("cpu",), "coll": ("cpu", "cuda"), "p2p": ("cpu", "cuda")}
COLL_FUNCS = ("all_reduce", "all_gather")
MAX_WORLD = 1 << 16


def _check_p2p(k: KernelSpec, at: At) -> None:
    """A p2p kernel sends its x to a pipeline stage (x, out: out is x) or receives out from one;
    scalars: the peer stage."""
    n = {"send": 2, "recv": 1}.get(k.func)
    if n is None:
        raise at["func"].error(f"unknown point-to-point function {k.func!r} (this runtime has send, recv)")
    if len(k.scalars) != 1 or isinstance(k.scalars[0], bool) or not isinstance(k.scalars[0], int) \
            or not 0 <= k.scalars[0] < MAX_WORLD:
        raise at["scalars"].error("a send/recv takes one scalar, the peer stage (a non-negative int)")
    if len(k.tensors) != n or any(t is None for t in k.tensors) or [t.arg for t in k.tensors] != list(range(n)):
        raise at["tensors"].error(f"a {k.func} reads its call's {n} arguments in order")


def _check_coll(k: KernelSpec, program: Program, at: At) -> None:
    """A coll kernel is one collective over its call's 2 buffers (x, out) of one dtype: all_reduce
    (out shaped as x) or all_gather (out [world, *x.shape]); scalars: the group size, which the
    runtime checks against its communicator when it loads."""
    if k.func not in COLL_FUNCS:
        raise at["func"].error(f"unknown collective {k.func!r} (this runtime has {', '.join(COLL_FUNCS)})")
    if len(k.scalars) != 1 or isinstance(k.scalars[0], bool) or not isinstance(k.scalars[0], int) \
            or not 1 <= k.scalars[0] <= MAX_WORLD:
        raise at["scalars"].error("a collective takes one scalar, the group size (a positive int)")
    if len(k.tensors) != 2 or any(t is None for t in k.tensors) or [t.arg for t in k.tensors] != [0, 1]:
        raise at["tensors"].error("a collective reads its call's two arguments (x, out) in order")
    x, out = (tuple(t.shape) for t in k.tensors)
    want = x if k.func == "all_reduce" else ((k.scalars[0],) + x)
    if out != want:
        raise at["tensors"].error(f"{k.func}: out is shaped {list(out)}, x implies {list(want)}")
    for c in (c for c in program.calls if c.kernel == k.name):
        if len(c.args) != 2 or len({program.buffers[b].dtype for b in c.args}) != 1:
            raise at.error(f"a collective is called with two buffers of one dtype")
BLAS_DTYPES = ("float32", "float64")


def _check_blas(k: KernelSpec, program: Program, at: At) -> None:
    """A blas kernel is one GEMM out[M, N] = a[M, K] @ w (w^T with trans_b) over 2-D views of
    float32/float64 buffers; the shapes are checked per call (numpy refuses a mismatch)."""
    if k.func != "gemm":
        raise at["func"].error(f"unknown blas function {k.func!r} (this runtime has 'gemm')")
    if len(k.tensors) != 3 or any(t is None or len(t.shape) != 2 for t in k.tensors):
        raise at["tensors"].error("a blas gemm takes three 2-D tensors (a, w, out)")
    if len(k.scalars) != 1 or k.scalars[0] not in (0, 1) or isinstance(k.scalars[0], bool):
        raise at["scalars"].error("a blas gemm takes one scalar, trans_b (0 or 1)")
    if sorted(t.arg for t in k.tensors) != [0, 1, 2]:
        raise at["tensors"].error("a blas gemm reads its call's three arguments (a, w, out), each once")
    for c in (c for c in program.calls if c.kernel == k.name):
        if len(c.args) != 3:
            raise at.error(f"a blas gemm is called with three buffers, one call passes {len(c.args)}")
        dtypes = set()
        for t in k.tensors:
            dtypes.add(program.buffers[c.args[t.arg]].dtype)
        if len(dtypes) != 1 or not dtypes <= set(BLAS_DTYPES):
            raise at.error(f"a blas gemm runs on one of {BLAS_DTYPES}, its buffers have {sorted(dtypes)}")


def _check_attn(k: KernelSpec, program: Program, at: At) -> None:
    """An attn kernel is one attention over its call's q, k, v, [mask,] out: float32 rank-4 q, k,
    v and out, a bool or float32 mask of rank <= 4; scalars: scale, causal (0/1), mask kind."""
    if k.func != ATTENTION_FUNC:
        raise at["func"].error(f"unknown attn function {k.func!r} (this runtime has {ATTENTION_FUNC!r})")
    sc = k.scalars
    if len(sc) != 3 or isinstance(sc[0], bool) or not isinstance(sc[0], (int, float)) or not 0 < sc[0] < 1e3 \
            or sc[1] not in (0, 1) or sc[2] not in MASK_KINDS.values() or any(isinstance(x, bool) for x in sc[1:]):
        kinds = ", ".join(f"{v}: {n or 'none'}" for n, v in MASK_KINDS.items())
        raise at["scalars"].error(f"attention takes scalars [scale (a positive number), causal (0 or 1), "
                                  f"mask kind ({kinds})]")
    n = 5 if sc[2] else 4
    if len(k.tensors) != n or [t.arg if t else None for t in k.tensors] != list(range(n)):
        raise at["tensors"].error(f"attention reads its call's {n} arguments (q, k, v, {'mask, ' if sc[2] else ''}out) "
                                  f"in order")
    mask_dtype = {v: name for name, v in MASK_KINDS.items()}[sc[2]]
    for c in (c for c in program.calls if c.kernel == k.name):
        if len(c.args) != n:
            raise at.error(f"attention is called with {n} buffers, one call passes {len(c.args)}")
        bufs = [program.buffers[a] for a in c.args]
        want = ["float32"] * 3 + ([mask_dtype] if sc[2] else []) + ["float32"]
        ranks_ok = all(len(b.shape) == 4 for i, b in enumerate(bufs) if not (sc[2] and i == 3)) \
            and (not sc[2] or len(bufs[3].shape) <= 4)
        if [b.dtype for b in bufs] != want or not ranks_ok:
            raise at.error(f"attention runs on rank-4 float32 q, k, v, out (and a {mask_dtype or 'no'} mask), one call "
                           f"passes {[(b.dtype, len(b.shape)) for b in bufs]}")


KV_ARGS = ("q", "k", "v", "kv_cache", "page_table", "kv_lens", "q_starts", "out")
KV_RANKS = (4, 4, 4, 5, 2, 1, 1, 4)


def _check_kv(k: KernelSpec, program: Program, at: At) -> None:
    """A kv kernel is one paged attention over its call's 8 buffers in KV_ARGS order: float
    q, k, v, cache and out of one dtype, int32 metadata; the runtime checks the metadata's
    values (pages inside the pool, offsets splitting the step) on every call."""
    if k.func != "paged_attention":
        raise at["func"].error(f"unknown kv function {k.func!r} (this runtime has 'paged_attention')")
    if len(k.tensors) != 8 or [t.arg if t else None for t in k.tensors] != list(range(8)) \
            or [len(t.shape) for t in k.tensors] != list(KV_RANKS):
        raise at["tensors"].error(f"paged attention takes 8 tensors {KV_ARGS} of ranks {KV_RANKS}, in call order")
    codecs = len(CODEC_IDS)
    if len(k.scalars) not in (2, 3) or not isinstance(k.scalars[0], float) or not 0 < k.scalars[0] < 1e3 \
            or any(isinstance(s, bool) or not isinstance(s, int) for s in k.scalars[1:]) or k.scalars[1] < 0 \
            or (len(k.scalars) == 3 and not 0 < k.scalars[2] < codecs):
        raise at["scalars"].error(f"paged attention takes scalars [scale (a positive float), window (an int >= 0)] "
                                  f"and, for a quantized cache, its codec (1..{codecs - 1})")
    for c in (c for c in program.calls if c.kernel == k.name):
        if len(c.args) != 8:
            raise at.error(f"paged attention is called with 8 buffers, one call passes {len(c.args)}")
        dtypes = [program.buffers[a].dtype for a in c.args]
        quantized = len(k.scalars) == 3  # the cache holds uint8 rows: codes + scale (engine/kv_codec.py)
        floats, ints = {dtypes[i] for i in (0, 1, 2, 7) + (() if quantized else (3,))}, set(dtypes[4:7])
        if len(floats) != 1 or not floats <= set(BLAS_DTYPES) or ints != {"int32"} \
                or (quantized and dtypes[3] != "uint8"):
            raise at.error(f"paged attention wants float32/float64 q, k, v, out of one dtype, a cache of that "
                           f"dtype (uint8 when quantized) and int32 metadata; its buffers have {dtypes}")
        if program.buffers[c.args[3]].role != "input":
            raise at.error("paged attention's KV cache must be a program input (the runtime owns the pages)")


def _weights(w: Any, at: At, program: Program, generation=None) -> WeightsSpec:
    chk.obj(w, at, ("version", "file", "bytes", "count"), ("omitted", "stored_as"))
    names = {b.name: b for b in program.buffers if b.role == "weight"}
    if generation is not None:  # one file for both programs: a shared name means the same tensor
        for b in generation.program.buffers:
            if b.role != "weight":
                continue
            other = names.setdefault(b.name, b)
            if (other.dtype, tuple(other.shape)) != (b.dtype, tuple(b.shape)):
                raise at.error(f"weight {b.name!r} is {other.dtype}{list(other.shape)} in the program but "
                               f"{b.dtype}{list(b.shape)} in the generation program")
    count = chk.integer(w["count"], at["count"])
    if count != len(names):
        raise at["count"].error(f"{count}, but the program has {len(names)} weight buffers")
    omitted = chk.array(w.get("omitted", []), at["omitted"],
                        lambda s, a: chk.lookup(names, chk.string(s, a), a, "weight").name)
    stored_as = chk.mapping(w.get("stored_as", {}), at["stored_as"], lambda s, a: chk.string(s, a, ("uint16", "uint8")))
    for name, word in stored_as.items():
        b = chk.lookup(names, name, at["stored_as"][name], "weight")
        if (b.dtype, word) not in STORAGE_WORDS:
            raise at["stored_as"][name].error(f"a {b.dtype} weight cannot be stored as {word}")
    return WeightsSpec(chk.plain_file_name(w["file"], at["file"]), chk.integer(w["bytes"], at["bytes"]), count,
                       omitted, stored_as)


def _files(f: Any, at: At) -> dict[str, FileEntry]:
    chk.obj(f, at, ("version", "entries"))

    def entry(e: Any, a: At) -> FileEntry:
        chk.obj(e, a, ("bytes", "sha256"))
        digest = chk.string(e["sha256"], a["sha256"])
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise a["sha256"].error("expected 64 lowercase hex digits")
        return FileEntry(chk.integer(e["bytes"], a["bytes"]), digest)

    entries = chk.mapping(f["entries"], at["entries"], entry, max_len=64)
    for name in entries:
        chk.plain_file_name(name, at["entries"][name])
    return entries


def _input_checks(s: Any, at: At, program: Program) -> tuple[InputCheck, ...]:
    chk.obj(s, at, ("version", "checks"))
    inputs = {i.name: i for i in program.inputs}

    def one(c: Any, a: At) -> InputCheck:
        chk.obj(c, a, ("input", "lo", "hi", "table"))
        spec = chk.lookup(inputs, chk.string(c["input"], a["input"]), a["input"], "input")
        if spec.dtype not in INTEGER_DTYPES:
            raise a["input"].error(f"input {spec.name!r} is {spec.dtype}, not an integer input")
        lo = chk.integer(c["lo"], a["lo"], -(1 << 62), 1 << 62)
        hi = chk.integer(c["hi"], a["hi"], -(1 << 62), 1 << 62)
        if lo >= hi:
            raise a.error(f"empty range [{lo}, {hi})")
        return InputCheck(spec.name, lo, hi, chk.string(c["table"], a["table"]))

    return chk.array(s["checks"], at["checks"], one, max_len=256)
