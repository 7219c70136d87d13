"""The `llmc` command: compile, run, inspect (and bench on a GPU machine)."""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

from .errors import LLMCError

USAGE = """examples:
  llmc compile minilm -o minilm.llmc --report      # a bundled example
  llmc compile ./my-hf-model -o out.llmc --seq-len 512 --batch 4
  llmc compile model.onnx -o out.llmc
  llmc compile mypkg.models:make -o out.llmc       # make() returns (model, example_args)
  llmc run out.llmc --input input_ids=ids.npy -o result.npz
  llmc inspect out.llmc
  llmc compile llmc.bench_models:llama_1b -o l1b.llmc --target cuda --weights none --batch 8
  llmc bench l1b.llmc --model llmc.bench_models:llama_1b --batch 8 --seq 512   # on a GPU machine
"""


def _progress(msg: str) -> None:
    print(f"[llmc] {msg}", file=sys.stderr, flush=True)


def cmd_compile(a: argparse.Namespace) -> int:
    from .api import CompileOptions, capture, compile_graph
    from .backends.targets import parse_target
    from .sources import resolve

    parse_target(a.target)
    t0 = time.perf_counter()
    bounds = {"batch": (1, a.batch), "seq": (1, a.seq_len)}
    src = resolve(a.src, batch=min(2, a.batch), seq=min(16, a.seq_len))
    _progress(f"capturing {src.description}")
    opts = CompileOptions(a.target, None, bounds, not a.no_fuse, a.verify_each, a.dump_ir, _progress,
                          use_shim=not a.no_shim)
    graph = capture(src.model, src.args, src.kwargs, opts)
    _progress(f"captured {len(graph.nodes())} nodes, {len(graph.params)} weights in {time.perf_counter() - t0:.1f}s")
    compiled = compile_graph(graph, opts)
    out = compiled.export(a.output, weights=a.weights == "all")
    if a.weights == "none":
        from .runtime.artifact_files import read_manifest

        omitted = read_manifest(out).weights.omitted
        _progress(f"perf artifact: {len(omitted)} large weights left out (shapes only); the CUDA runtime fills "
                  f"them with random values")
    _progress(f"wrote {out} in {time.perf_counter() - t0:.1f}s total")
    if a.report:
        print(compiled.report)
    return 0


def _parse_inputs(specs: list[str], names: list[str]) -> dict:
    import numpy as np

    values = {}
    for i, spec in enumerate(specs):
        name, eq, file = spec.partition("=")
        if not eq:
            if i >= len(names):
                raise LLMCError(f"more --input files than model inputs {names}")
            name, file = names[i], spec
        try:
            values[name] = np.load(file, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise LLMCError(f"cannot read input {file!r}: {e}") from None
    return values


def cmd_run(a: argparse.Namespace) -> int:
    import numpy as np

    from .runtime.executor import load

    ex = load(a.artifact, device=a.device)
    outs = ex(**_parse_inputs(a.input, ex.input_names))
    result = dict(zip(ex.output_names, outs))
    if a.output:
        np.savez(a.output, **result)
        _progress(f"wrote {a.output}")
    for name, v in result.items():
        print(f"{name}: {v.dtype}{list(v.shape)}  mean={float(v.astype('float64').mean()):.6g} "
              f"first={np.ravel(v)[:4].tolist()}")
    return 0


def cmd_inspect(a: argparse.Namespace) -> int:
    from .runtime.artifact_files import read_manifest, read_manifest_json

    path = pathlib.Path(a.artifact)
    m = read_manifest(path)  # validated (raises ArtifactError) before anything is printed
    if a.json:
        print(json.dumps(read_manifest_json(path), indent=1))
        return 0

    def shape(s):
        return "[" + ", ".join(str(d) if isinstance(d, int) else
                               " + ".join("*".join([str(c)] * (c != 1) + list(n)) for c, n in d) for d in s) + "]"

    p = m.program
    print(f"llmc artifact {a.artifact}  (llmc {m.llmc_version}, target {m.target}, device {m.device})")
    print("symbols: " + ", ".join(f"{s.name} in [{s.lo}, {s.hi}]" for s in p.symbols))
    for i in p.inputs:
        print(f"input  {i.name}: {i.dtype}{shape(i.shape)}")
    for o in p.outputs:
        b = p.buffers[o.buffer]
        print(f"output {o.name}: {b.dtype}{shape(b.shape)}")
    for c in m.input_checks:
        print(f"check  {c.input} in [{c.lo}, {c.hi}) (rows of {c.table})")
    counts: dict[str, int] = {}
    for c in p.calls:
        counts[c.kernel] = counts.get(c.kernel, 0) + 1
    print(f"kernels: {len(p.kernels)} built, {len(p.calls)} calls")
    routed = m.device == "cuda"
    for name, k in p.kernels.items():
        route = ""
        if routed:
            route = f"shim:{k.func} ({k.label})" if k.route == "shim" else f"tvm ({k.schedule})"
            route = f"{route:44s} "
        print(f"  {name:20s} x{counts.get(name, 0):<4d} {route}{k.ops}")
    print("libraries: " + ", ".join(f"{k}={v}" for k, v in m.libraries.items()))
    w = m.weights
    print(f"weights: {w.count} tensors, {w.bytes / 2**20:.2f} MiB"
          + (f" ({len(w.omitted)} large ones left out: a perf artifact, random values at run time)"
             if w.omitted else ""))
    print(f"arena: {p.arena_bytes / 2**20:.2f} MiB planned")
    return 0

    def shape(s):
        return "[" + ", ".join(str(d) if isinstance(d, int) else
                               " + ".join("*".join([str(c)] * (c != 1) + n) for c, n in d) for d in s) + "]"

    print(f"llmc artifact {a.artifact}  (llmc {m['llmc_version']}, target {m['target']}, device {m['device']})")
    print("symbols: " + ", ".join(f"{s['name']} in [{s['lo']}, {s['hi']}]" for s in m["symbols"]))
    for i in m["inputs"]:
        print(f"input  {i['name']}: {i['dtype']}{shape(i['shape'])}")
    bufs = m["buffers"]
    for o in m["outputs"]:
        b = bufs[o["buffer"]]
        print(f"output {o['name']}: {b['dtype']}{shape(b['shape'])}")
    counts: dict[str, int] = {}
    for c in m["calls"]:
        counts[c["kernel"]] = counts.get(c["kernel"], 0) + 1
    print(f"kernels: {len(m['kernels'])} built, {len(m['calls'])} calls")
    routed = any("route" in k for k in m["kernels"].values())
    for name, k in m["kernels"].items():
        route = ""
        if routed:
            route = (f"shim:{k['func']} ({k.get('label', '')})" if k.get("route") == "shim"
                     else f"tvm ({k.get('schedule', '')})")
            route = f"{route:44s} "
        print(f"  {name:20s} x{counts.get(name, 0):<4d} {route}{k['ops']}")
    if "libraries" in m:
        print("libraries: " + ", ".join(f"{k}={v}" for k, v in m["libraries"].items()))
    w = m["weights"]
    print(f"weights: {w['count']} tensors, {w['bytes'] / 2**20:.2f} MiB"
          + (f" ({len(w['omitted'])} large ones left out: a perf artifact, random values at run time)"
             if w.get("omitted") else ""))
    print(f"arena: {m['arena_bytes'] / 2**20:.2f} MiB planned" if isinstance(m["arena_bytes"], int) else "")
    return 0


def cmd_bench(a: argparse.Namespace) -> int:
    from .bench import main_bench

    return main_bench(a)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="llmc", description="Compile transformer graphs to TVM kernels and run them.",
                                epilog=USAGE, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("compile", help="compile a model to an artifact folder")
    c.add_argument("src", help="model.onnx | HF model folder | pkg.module:function | bundled example name")
    c.add_argument("-o", "--output", required=True, help="artifact folder to write")
    c.add_argument("--target", default="llvm", help="llvm (default) | cuda[:sm_XX] | rocm[:gfxXXX] | metal")
    c.add_argument("--seq-len", type=int, default=512, help="largest sequence length the artifact accepts")
    c.add_argument("--batch", type=int, default=8, help="largest batch size the artifact accepts")
    c.add_argument("--report", action="store_true", help="print what each pass fused and the memory plan")
    c.add_argument("--no-fuse", action="store_true", help="one kernel per op (for debugging)")
    c.add_argument("--verify-each", action="store_true", help="run the IR verifier after every pass")
    c.add_argument("--dump-ir", metavar="DIR", help="write the printed IR after each pass into DIR")
    c.add_argument("--weights", choices=["all", "none"], default="all",
                   help="none: a perf artifact without its large weights (the CUDA runtime fills random values)")
    c.add_argument("--no-shim", action="store_true", help="cuda: build every kernel with TVM (no cuBLASLt / "
                                                           "flash-attention offload)")
    c.set_defaults(fn=cmd_compile)
    r = sub.add_parser("run", help="run an artifact on .npy inputs")
    r.add_argument("artifact")
    r.add_argument("--input", action="append", default=[], help="[name=]file.npy (repeat; positional order if unnamed)")
    r.add_argument("-o", "--output", help="write the outputs to this .npz")
    r.add_argument("--device", default="cpu", help="cpu | cuda[:N]")
    r.set_defaults(fn=cmd_run)
    b = sub.add_parser("bench", help="time an artifact on the GPU against torch eager / torch.compile")
    b.add_argument("artifact")
    b.add_argument("--model", required=True, help="pkg.module:function building the same model in torch "
                                                  "(e.g. llmc.bench_models:llama_1b)")
    b.add_argument("--batch", type=int, default=1)
    b.add_argument("--seq", type=int, default=512)
    b.add_argument("--modes", default="eager,max-autotune-no-cudagraphs,reduce-overhead",
                   help="comma-separated torch runs: eager, default, max-autotune-no-cudagraphs, reduce-overhead, ...")
    b.add_argument("--iters", type=int, default=50)
    b.add_argument("--no-profile", action="store_true", help="skip the per-kernel profile")
    b.add_argument("--json", help="also write the results here")
    b.set_defaults(fn=cmd_bench)
    i = sub.add_parser("inspect", help="show an artifact's inputs, outputs, kernels and weight bytes")
    i.add_argument("artifact")
    i.add_argument("--json", action="store_true", help="print the raw manifest")
    i.set_defaults(fn=cmd_inspect)
    a = p.parse_args(argv)
    if getattr(a, "batch", 2) < 1 or getattr(a, "seq_len", 2) < 1:
        p.error("--batch and --seq-len must be positive")
    try:
        return a.fn(a)
    except LLMCError as e:
        print(f"llmc: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("llmc: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
