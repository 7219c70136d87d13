"""The artifact manifest, typed: parsed and validated once, then read as frozen dataclasses.

Layout (format_version 2): a few top-level fields plus named *sections*, each an object
with its own `version`:

    {"format": "llmc-artifact", "format_version": 2, "llmc_version": "...",
     "checksum": "<sha256 of the canonical JSON of everything else>",
     "target":  {"version": 1, "name": "llvm", "device": "cpu"},
     "program": {"version": 1, "symbols", "inputs", "outputs", "buffers", "arena_bytes", "kernels", "calls"},
     "weights": {"version": 1, "file", "bytes", "count", "omitted", "stored_as"},
     "files":   {"version": 1, "entries": {"kernels.so": {"bytes": n, "sha256": "..."}, ...}},
     optional:  "libraries", "input_checks", "cpu", "cuda", "notes"}

Rule for sections this runtime does not know (added by a newer llmc): a section marked
`"required": true` (its meaning changes how the program runs: KV cache, entry points,
quantized weights, shards) makes the load fail with an ArtifactError asking for a newer
llmc; any other unknown section is ignored (listed in `Manifest.unknown_sections`). A
known section with a newer `version` than this runtime reads also fails. So new features
add sections, and old artifacts keep loading unchanged.

Symbolic dims are JSON polynomials `[[coeff, [sym, ...]], ...]` (or plain ints); they are
checked to name declared symbols only, and evaluated here (no compiler imports).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Mapping, Union

from .manifest_checks import At

FORMAT = "llmc-artifact"
FORMAT_VERSION = 2
LIBRARY = "kernels.so"
MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"
MAX_MANIFEST_BYTES = 64 << 20  # checked before reading: the largest real manifests are ~1 MB
SECTION_VERSIONS = {"target": 1, "program": 1, "weights": 1, "files": 1, "libraries": 1,
                    "input_checks": 1, "cpu": 1, "cuda": 1, "notes": 1, "generation": 1, "parallel": 1}
REQUIRED_SECTIONS = ("target", "program", "weights")
TOP_LEVEL = ("format", "format_version", "llmc_version", "checksum")
DTYPES = ("float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "int64", "int32", "int8", "uint8",
          "bool", "int4x2")
INTEGER_DTYPES = ("int64", "int32", "int8", "uint8")
DEVICES = ("cpu", "cuda", "rocm", "metal")
LIBRARY_ROLES = ("tvm", "shim", "gemm")  # shim: CUDA's; gemm: llmc's CPU GEMM (runtime/cpu_gemm.py)
ROLES = ("input", "weight", "temp", "alias")
ALIGN = 64  # arena offsets: TVM kernels assume aligned data
# (buffer dtype, word dtype stored in safetensors): safetensors' numpy API has no bf16/fp8
STORAGE_WORDS = {("bfloat16", "uint16"), ("float8_e4m3fn", "uint8")}

Dim = Union[int, tuple]  # an int, or ((coeff, (sym, ...)), ...)


def eval_dim(d, env: Mapping[str, int]) -> int:
    if isinstance(d, int):
        return d
    total = 0
    for coeff, names in d:
        v = coeff
        for s in names:
            v *= env[s]
        total += v
    return total


# ---- the typed manifest ---------------------------------------------------------------------
@dataclass(frozen=True)
class Symbol:
    name: str
    lo: int
    hi: int


@dataclass(frozen=True)
class InputSpec:
    name: str
    buffer: int
    shape: tuple
    dtype: str


@dataclass(frozen=True)
class OutputSpec:
    name: str
    buffer: int


@dataclass(frozen=True)
class BufferSpec:
    id: int
    shape: tuple
    dtype: str
    role: str  # input | weight | temp | alias
    name: str | None = None
    alias_of: int | None = None
    offset: int | None = None  # byte offset in the arena (planned temps only)


@dataclass(frozen=True)
class ShimTensor:
    arg: int  # index into the call's args
    shape: tuple


@dataclass(frozen=True)
class KernelSpec:
    name: str
    symbols: tuple[str, ...]
    ops: str = ""
    route: str = "tvm"  # tvm | shim (CUDA) | blas (CPU)
    func: str = ""  # shim or blas function (route "shim" / "blas")
    tensors: tuple = ()  # ShimTensor | None per shim tensor argument
    scalars: tuple = ()
    label: str = ""
    schedule: str = ""


@dataclass(frozen=True)
class Call:
    kernel: str
    args: tuple[int, ...]


@dataclass(frozen=True)
class Program:
    symbols: tuple[Symbol, ...]
    inputs: tuple[InputSpec, ...]
    outputs: tuple[OutputSpec, ...]
    buffers: tuple[BufferSpec, ...]
    arena_bytes: int
    kernels: Mapping[str, KernelSpec]
    calls: tuple[Call, ...]

    @property
    def symbol_bounds(self) -> dict[str, tuple[int, int]]:
        return {s.name: (s.lo, s.hi) for s in self.symbols}

    @property
    def output_buffers(self) -> list[int]:
        return [o.buffer for o in self.outputs]


@dataclass(frozen=True)
class WeightsSpec:
    file: str
    bytes: int
    count: int
    omitted: tuple[str, ...] = ()
    stored_as: Mapping[str, str] = field(default_factory=dict)  # name -> word dtype in the file


@dataclass(frozen=True)
class FileEntry:
    bytes: int
    sha256: str


@dataclass(frozen=True)
class InputCheck:
    """Every value v of integer input `input` must satisfy lo <= v < hi (rows of `table`)."""
    input: str
    lo: int
    hi: int
    table: str


@dataclass(frozen=True)
class CpuSpec:
    triple: str
    mcpu: str
    features: tuple[str, ...]


@dataclass(frozen=True)
class KvLayerSpec:
    kv_heads: int
    head_dim: int
    window: int  # sliding window of the layer's attention (0: none)


# the step function's inputs, in call order, before one kv_cache.<i> per attention layer
STEP_INPUTS = ("tokens", "positions", "logit_rows", "page_table", "kv_lens", "q_starts")


@dataclass(frozen=True)
class GenerationSpec:
    """Section "generation" (required): the step function of a causal LM and its KV cache.

    Its program takes STEP_INPUTS then kv_cache.0 .. kv_cache.{L-1} ([pages, 2, page_size,
    kv_heads, head_dim] each) and returns logits [rows, vocab]; its kernels are in
    `library`; its weights are in the artifact's one weights file, shared with the forward."""
    program: Program
    library: str
    input_checks: tuple[InputCheck, ...]
    page_size: int
    kv_dtype: str
    layers: tuple[KvLayerSpec, ...]
    max_tokens: int
    max_seqs: int
    max_context: int
    vocab: int
    stop_token_ids: tuple[int, ...] = ()
    tokenizer: str | None = None  # a tokenizer.json in the folder


@dataclass(frozen=True)
class ParallelSpec:
    """Which part of a parallel model this artifact is: rank `rank` of a tensor-parallel group of
    `tp` (its weights are that rank's shards; its collectives need the group's communicator)."""
    tp: int
    rank: int
    fingerprint: str  # the same for every rank of one compile (ranks from different compiles refuse to pair)
    pp: int = 1  # pipeline stages, and which one this artifact runs
    stage: int = 0


@dataclass(frozen=True)
class Manifest:
    llmc_version: str
    target: str
    device: str
    program: Program
    weights: WeightsSpec
    files: Mapping[str, FileEntry]  # empty for an in-memory (not yet written) manifest
    libraries: Mapping[str, str]  # role -> file name
    input_checks: tuple[InputCheck, ...] = ()
    cpu: CpuSpec | None = None
    cuda: Mapping[str, Any] = field(default_factory=dict)
    notes: Mapping[str, Any] = field(default_factory=dict)
    unknown_sections: tuple[str, ...] = ()
    format_version: int = FORMAT_VERSION
    generation: GenerationSpec | None = None
    parallel: ParallelSpec | None = None

    def weight_buffers(self) -> dict[str, "BufferSpec"]:
        """name -> buffer of every weight the artifact's programs read (stored once)."""
        out = {b.name: b for b in self.program.buffers if b.role == "weight"}
        if self.generation is not None:
            out.update({b.name: b for b in self.generation.program.buffers if b.role == "weight"})
        return out

    def step_manifest(self) -> "Manifest":
        """This manifest with the step function as its program (what an Executor runs)."""
        import dataclasses

        g = self.generation
        if g is None:
            raise ValueError("this artifact has no generation section")
        libraries = {**self.libraries, "tvm": g.library}  # a CUDA step shares the forward's shim library
        return dataclasses.replace(self, program=g.program, input_checks=g.input_checks, libraries=libraries)

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self.program.inputs]

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self.program.outputs]

    @classmethod
    def from_json(cls, m: Any, where: str = MANIFEST, sealed: bool = False) -> "Manifest":
        """Validate a manifest dict. `sealed`: as read from disk, with its checksum and the
        sizes and hashes of its files (a manifest built in memory has neither yet)."""
        from .manifest_parse import parse

        return parse(m, At(where), sealed)


def canonical_checksum(m: Mapping) -> str:
    """SHA-256 of the manifest without its checksum field, as canonical JSON."""
    body = {k: v for k, v in m.items() if k != "checksum"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def read_manifest(folder) -> Manifest:
    """The validated manifest of an artifact folder (see runtime.artifact_files)."""
    from .artifact_files import read_manifest as read

    return read(folder)
