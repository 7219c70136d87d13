"""Validating the manifest's "generation" section (runtime/manifest.py: GenerationSpec).

    "generation": {"version": 1, "required": true,
                   "program": {... the step function, the same schema as "program" ...},
                   "library": "step_kernels.so", "input_checks": {"version": 1, "checks": [...]},
                   "kv": {"page_size": 16, "dtype": "float32", "layers": [[kv_heads, head_dim, window], ...]},
                   (kv dtype "int8" / "float8_e4m3fn": a quantized cache, uint8 rows of head_dim codes
                    + a float32 scale: runtime/engine/kv_codec.py)
                   "limits": {"max_tokens", "max_seqs", "max_context", "vocab"},
                   "stop_token_ids": [...], "tokenizer": "tokenizer.json"}

Beyond the types, the step program must have exactly the step inputs (STEP_INPUTS, then
one KV cache per layer, shaped as "kv" says) and one output, logits [rows, vocab].
"""
from __future__ import annotations

from typing import Any

from . import manifest_checks as chk
from .manifest import STEP_INPUTS, GenerationSpec, KvLayerSpec, Program
from .manifest_checks import At
from .engine.kv_codec import QMAX, storage as kv_storage


def parse_generation(g: Any, at: At, device: str) -> GenerationSpec:
    from .manifest_parse import _input_checks, _program

    chk.obj(g, at, ("version", "program", "library", "kv", "limits"),
            ("input_checks", "stop_token_ids", "tokenizer", "stage"))
    program = _program(g["program"], at["program"])
    checks = _input_checks(g["input_checks"], at["input_checks"], program) if "input_checks" in g else ()
    kv = chk.obj(g["kv"], at["kv"], ("page_size", "dtype", "layers"))
    page = chk.integer(kv["page_size"], at["kv"]["page_size"], 1, 1 << 16)
    dtype = chk.string(kv["dtype"], at["kv"]["dtype"], ("float32", "float64", "float16", "bfloat16", *QMAX))

    def layer(v: Any, a: At) -> KvLayerSpec:
        if not isinstance(v, list) or len(v) != 3:
            raise a.error("expected [kv_heads, head_dim, window]")
        return KvLayerSpec(chk.integer(v[0], a[0], 1, 1 << 12), chk.integer(v[1], a[1], 1, 1 << 12),
                           chk.integer(v[2], a[2], 0, 1 << 30))

    layers = chk.array(kv["layers"], at["kv"]["layers"], layer, max_len=1024)
    lim = chk.obj(g["limits"], at["limits"], ("max_tokens", "max_seqs", "max_context", "vocab"))
    limits = {k: chk.integer(lim[k], at["limits"][k], 1, 1 << 30) for k in lim}
    stops = chk.array(g.get("stop_token_ids", []), at["stop_token_ids"],
                      lambda v, a: chk.integer(v, a, 0, limits["vocab"] - 1), max_len=64)
    tokenizer = chk.plain_file_name(g["tokenizer"], at["tokenizer"]) if g.get("tokenizer") is not None else None
    spec = GenerationSpec(program, chk.plain_file_name(g["library"], at["library"]), checks, page, dtype, layers,
                          limits["max_tokens"], limits["max_seqs"], limits["max_context"], limits["vocab"],
                          stops, tokenizer)
    last = True
    if "stage" in g:  # one pipeline stage: all but the last hand their activations on (SEND)
        st = chk.obj(g["stage"], at["stage"], ("index", "count"))
        count = chk.integer(st["count"], at["stage"]["count"], 1, 1 << 12)
        last = chk.integer(st["index"], at["stage"]["index"], 0, count - 1) == count - 1
    _check_signature(spec, program, at["program"], last)
    return spec


def _check_signature(spec: GenerationSpec, program: Program, at: At, last: bool = True) -> None:
    want = list(STEP_INPUTS) + [f"kv_cache.{i}" for i in range(len(spec.layers))]
    names = [i.name for i in program.inputs]
    if names != want:
        raise at["inputs"].error(f"a step function takes inputs {want}, this one {names}")
    for i, (inp, lay) in enumerate(zip(program.inputs[len(STEP_INPUTS):], spec.layers)):
        dtype, row = kv_storage(spec.kv_dtype, lay.head_dim)
        if inp.dtype != dtype or len(inp.shape) != 5 or list(inp.shape[1:]) != [2, spec.page_size, lay.kv_heads, row]:
            raise at["inputs"][len(STEP_INPUTS) + i].error(
                f"KV cache {inp.name} is {inp.dtype}{list(inp.shape)}, the kv section says {spec.kv_dtype} "
                f"(stored as {dtype}[pages, 2, {spec.page_size}, {lay.kv_heads}, {row}])")
    for inp in program.inputs[:len(STEP_INPUTS)]:
        if inp.dtype not in ("int64", "int32"):
            raise at["inputs"].error(f"step input {inp.name} must be an integer array, it is {inp.dtype}")
    if not last:
        return  # an earlier pipeline stage returns what it sent on
    if len(program.outputs) != 1:
        raise at["outputs"].error("a step function returns one output, the logits")
    out = program.buffers[program.outputs[0].buffer]
    if len(out.shape) != 2 or out.shape[1] != spec.vocab:
        raise at["outputs"].error(f"logits {list(out.shape)} are not [rows, {spec.vocab}]")
