"""CPU latency: llmc vs torch eager vs onnxruntime, GEMM rates vs numpy's BLAS, compile time.

    python benchmarks/bench_cpu.py [--threads N] [--reps 10] [--models minilm,llama,gpt2]
                                   [--target llvm] [--no-ort] [--no-tvm-gemm] [--no-gemm-table]

Models: MiniLM (real all-MiniLM-L6-v2 weights) at 8 x 128; a small Llama (4 layers, hidden
512, GQA 8/4, random weights) at 1 x 128; GPT-2 124M (GPT2LMHeadModel, random weights) at
1 x 128, 4 x 128 and 1 x 1 (a one-token forward: every weight is read once, so it is
bandwidth-bound like a decode step). Rows: torch eager; llmc as compiled by default (GEMMs
in llmc's CPU GEMM where the processor has AVX-512); the same kernels with every GEMM in numpy's BLAS;
llmc with every GEMM built by TVM (`use_blas=False`, unless --no-tvm-gemm);
onnxruntime (ORT_ENABLE_ALL) on the legacy ONNX export where that export works.

GEMM table: each GEMM shape these models run, timed in numpy (its BLAS: the baseline),
torch (MKL) and llmc (a compiled one-MATMUL graph, called through the runtime, its GEMM in llmc's
CPU GEMM, backends/cpu_gemm, where the processor has AVX-512, and again in numpy's BLAS; so its
per-call overhead counts, and like a torch call it returns a freshly allocated output,
whose pages the kernel faults in; the LM head reads the tied [vocab, hidden] table
transposed, as in GPT-2; from 256 rows the weight is read from the copy the runtime packed at
the first call, as in the models), as ms and GFLOP/s, with llmc's rate as a fraction of numpy's.
Each timed call follows an idle pause (see `race`): a one-row GEMM then pays the wake-up of
llmc's second thread, which OpenBLAS, running a GEMV that small on one thread, does not.

Ceiling: the bandwidth of a plain numpy copy of 512 MiB (bytes read + written, STREAM's
convention), raced with the one-token GPT-2 rows, which report weight bytes / time against it.

Every figure comes from this run on this machine; ratios are against the baseline measured
in the same process (torch eager for models, numpy's BLAS for GEMMs). Times are medians of
`--reps` calls after 2 warm-ups, the contenders of a row timed in interleaved rounds.
"""
from __future__ import annotations

import argparse
import copy
import gc
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
import transformers

import llmc
from llmc.compiler.frontend.hf_models import minilm_path


SETTLE_S = 0.2  # idle time before each timed call: the previous contender's threads stop spinning


def race(fns: dict, reps: int, warmup: int = 2) -> dict:
    """Median ms per call of each fn, timed in interleaved rounds (each round calls every fn
    once, in rotating order), so a machine whose speed drifts during the run (this shared
    VM's does, by up to 2x over minutes) slows every contender alike and ratios stay fair.
    Each timed call starts after SETTLE_S of idling: torch's OpenMP and OpenBLAS's threads
    keep spinning for a while after their work (OpenBLAS ~0.1 s), and whoever ran next was
    measured up to 10x slower without the pause."""
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    ts: dict = {n: [] for n in names}
    for r in range(reps):
        for name in names[r % len(names):] + names[:r % len(names)]:
            time.sleep(SETTLE_S)
            t = time.perf_counter()
            fns[name]()
            ts[name].append(time.perf_counter() - t)
    return {n: statistics.median(v) * 1e3 for n, v in ts.items()}


def say(msg: str) -> None:
    print(msg, flush=True)


# ---- onnxruntime ---------------------------------------------------------------------------
def export_legacy(model, kwargs, path) -> None:
    names = list(kwargs)

    class Positional(torch.nn.Module):  # the legacy exporter wants positional tensors
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, *xs):
            return self.m(**dict(zip(names, xs)), **({"use_cache": False} if "use_cache" in
                                                       self.m.forward.__code__.co_varnames else {}))[0]

    torch.onnx.export(Positional(model), tuple(kwargs.values()), path, input_names=names, output_names=["out"],
                      dynamic_axes={n: {0: "batch", 1: "seq"} for n in names}, opset_version=17, dynamo=False)


def ort_session(path: str, threads: int):
    import onnx
    import onnxruntime as ort

    m = onnx.load(path)
    m.ir_version = min(m.ir_version, 10)  # onnxruntime 1.31 cannot read the IR version onnx 1.23 writes
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])


# ---- models --------------------------------------------------------------------------------
class Table:
    def __init__(self):
        self.rows: list[tuple[str, str, float, str]] = []

    def add(self, model: str, what: str, ms: float, note: str = "") -> None:
        self.rows.append((model, what, ms, note))
        say(f"   {model} | {what} | {ms:.2f} ms | {note}")

    def print(self, title: str) -> None:
        say(f"\n{title}")
        say("| model | what | ms | vs torch eager | notes |\n| --- | --- | ---: | ---: | --- |")
        base: dict[str, float] = {}
        for model, what, ms, note in self.rows:
            if what == "torch eager":
                base[model] = ms
            ratio = f"{ms / base[model]:.2f}" if model in base else ""
            say(f"| {model} | {what} | {ms:.2f} | {ratio} | {note} |")


TARGET = ["llvm"]  # --target


def numpy_blas_runner(cm):
    """The same compiled model with every BLAS-routed GEMM in numpy's BLAS instead of llmc's
    CPU GEMM (an Executor given no sgemm): the A/B of the GEMM library on the same kernels."""
    from llmc.backends.artifact import weights_of
    from llmc.runtime.executor import Executor
    from llmc.runtime.manifest import Manifest

    return Executor(Manifest.from_json(cm.manifest), cm.executable.mod, weights_of(cm.program), "cpu")


def compile_timed(model, example: dict, bounds: dict, use_blas: bool):
    t0 = time.perf_counter()
    cm = llmc.compile(model, (), example, dim_bounds=bounds, use_blas=use_blas, target=TARGET[0])
    return cm, time.perf_counter() - t0


def bench_model(name: str, model, shapes: dict, example: dict, bounds: dict, args, table: Table,
                copy_buffers: tuple | None = None) -> None:
    """`shapes`: label -> torch kwargs; the model is compiled once (dynamic dims) per variant."""
    say(f"== {name}: compiling")
    variants = [(LLMC, True)] + ([("llmc (GEMMs built by TVM)", False)] if args.tvm_gemm else [])
    compiled = {}
    for label, use_blas in variants:
        cm, secs = compile_timed(model, example, bounds, use_blas)
        kernels = cm.manifest["program"]["kernels"]
        n_blas = sum(1 for c in cm.program.calls if kernels[c.kernel].get("route") == "blas")
        compiled[label] = (cm, f"compile {secs:.1f} s, {len(cm.program.calls)} calls ({n_blas} GEMM library)")
        if use_blas:
            compiled[NUMPY_BLAS] = (numpy_blas_runner(cm), f"the same kernels, {n_blas} GEMMs in numpy's BLAS")
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    sess = ort_session_for(name, model, shapes, args, table) if args.ort else None
    for label, kwargs in shapes.items():
        row = f"{name} {label}"
        feeds = {k: v.numpy() for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
        with torch.no_grad():
            ref = model(**kwargs)[0].numpy()
        notes = {}
        for what, (cm, note) in compiled.items():
            err = float(np.abs(cm(**feeds)[0] - ref).max())
            notes[what] = f"{note}, max abs err {err:.1e}"
        fns = {"torch eager": lambda: model(**kwargs)}
        fns.update({what: (lambda cm=cm: cm(**feeds)) for what, (cm, _) in compiled.items()})
        if sess is not None:
            fns[ORT] = lambda: sess.run(None, feeds)
        decode = copy_buffers is not None and label.endswith("x 1")
        if decode:  # the bandwidth ceiling, raced with the contenders
            fns[COPY] = lambda: np.copyto(copy_buffers[1], copy_buffers[0])
        with torch.no_grad():
            times = race(fns, args.reps)
        copy_gbs = 2 * copy_buffers[0].nbytes / times[COPY] / 1e6 if decode else None
        for what, t in times.items():
            note = notes.get(what, "")
            if what == COPY:
                note = f"{copy_gbs:.1f} GB/s (read + written)"
            elif decode and what != "torch eager":
                gbs = weight_bytes / t / 1e6
                note += f"{', ' if note else ''}weights {weight_bytes / 1e6:.0f} MB read at {gbs:.1f} GB/s = " \
                        f"{gbs / copy_gbs:.0%} of copy"
            table.add(row, what, t, note)
    del sess
    gc.collect()  # onnxruntime's spinning pool must be gone before the next model


ORT = "onnxruntime ORT_ENABLE_ALL (legacy export)"
LLMC = "llmc (GEMMs in llmc's CPU GEMM)"
NUMPY_BLAS = "llmc (GEMMs in numpy's BLAS)"
COPY = "numpy copy of 512 MiB (bandwidth ceiling)"


def ort_session_for(name: str, model, shapes: dict, args, table: Table):
    """onnxruntime on the legacy export of a copy of the model (the exporter leaves the module
    it traces changed: its outputs differed by ~2 afterwards, measured), or None with a row
    saying why the export failed."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "model.onnx")
        first = next(iter(shapes.values()))
        try:
            export_legacy(copy.deepcopy(model), {k: v for k, v in first.items() if isinstance(v, torch.Tensor)}, path)
            return ort_session(path, args.threads)
        except Exception as e:  # noqa: BLE001 - reported in the table: the row says why it is missing
            why = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
            table.add(f"{name} {next(iter(shapes))}", "onnxruntime: legacy export failed", float("nan"), why)
            return None


def minilm(args, table: Table) -> None:
    model = transformers.AutoModel.from_pretrained(str(minilm_path()), local_files_only=True,
                                                   attn_implementation="sdpa").eval()
    g = torch.Generator().manual_seed(0)
    kw = {"input_ids": torch.randint(1000, 20000, (8, 128), generator=g),
          "attention_mask": torch.ones(8, 128, dtype=torch.long)}
    bench_model("MiniLM", model, {"8 x 128": kw}, kw, {"batch": (1, 8), "seq": (1, 128)}, args, table)


def llama(args, table: Table) -> None:
    cfg = transformers.LlamaConfig(hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                                   num_attention_heads=8, num_key_value_heads=4, vocab_size=8192,
                                   max_position_embeddings=512, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(1)
    kw = {"input_ids": torch.randint(0, 8192, (1, 128), generator=g), "use_cache": False}
    example = {"input_ids": torch.randint(0, 8192, (2, 16), generator=g), "use_cache": False}
    bench_model("Llama 4x512", model, {"1 x 128": kw}, example, {"batch": (1, 4), "seq": (1, 256)}, args, table)


def gpt2(args, table: Table) -> None:
    cfg = transformers.GPT2Config(attn_implementation="sdpa")  # 124M: 12 layers, 768 wide, vocab 50257
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    g = torch.Generator().manual_seed(2)
    shapes = {f"{b} x {s}": {"input_ids": torch.randint(0, 50257, (b, s), generator=g), "use_cache": False}
              for b, s in ((1, 128), (4, 128), (1, 1))}
    example = {"input_ids": torch.randint(0, 50257, (2, 16), generator=g), "use_cache": False}
    bench_model("GPT-2 124M", model, shapes, example, {"batch": (1, 4), "seq": (1, 256)}, args, table,
                copy_buffers=(np.ones(1 << 27, np.float32), np.empty(1 << 27, np.float32)))


# ---- GEMMs ---------------------------------------------------------------------------------
GEMMS = [  # (what, M, K, N, W stored transposed [N, K] as a tied embedding)
    ("GPT-2 qkv, 1x128", 128, 768, 2304, False), ("GPT-2 attn out", 128, 768, 768, False),
    ("GPT-2 mlp up", 128, 768, 3072, False), ("GPT-2 mlp down", 128, 3072, 768, False),
    ("GPT-2 LM head (tied, W^T)", 128, 768, 50257, True), ("GPT-2 mlp up, 4x128", 512, 768, 3072, False),
    ("GPT-2 LM head, 4x128", 512, 768, 50257, True),
    ("GPT-2 qkv, 1 token", 1, 768, 2304, False), ("GPT-2 mlp down, 1 token", 1, 3072, 768, False),
    ("GPT-2 LM head, 1 token", 1, 768, 50257, True),
    ("Llama gate+up, 1x128", 128, 512, 2816, False), ("Llama down", 128, 1408, 512, False),
    ("MiniLM mlp up, 8x128", 1024, 384, 1536, False),
]


def gemm_graph(m: int, k: int, n: int, transposed: bool, rng):
    from llmc.compiler.dtypes import DType
    from llmc.compiler.ir import Graph, TensorType, input_node, node, weight_node
    from llmc.compiler.ops import Op, PermuteAttrs

    x = input_node("x", TensorType((m, k), DType.F32))
    w_np = (rng.standard_normal((n, k) if transposed else (k, n)) * 0.05).astype(np.float32)
    w = weight_node("w", TensorType(w_np.shape, DType.F32))
    rhs = node(Op.PERMUTE, [w], PermuteAttrs((1, 0))) if transposed else w
    return Graph((x,), (node(Op.MATMUL, [x, rhs]),), {"w": w_np}, {}, ("y",)), w_np


def gemm_table(args) -> None:
    from llmc.api import CompileOptions, compile_graph

    rng = np.random.default_rng(0)
    say("\nGEMMs (fp32): ms and GFLOP/s; llmc / numpy = llmc's rate as a fraction of numpy's BLAS")
    cols = ["numpy (BLAS)", "torch (MKL)", "llmc", "llmc, numpy's BLAS"] + (["llmc TVM GEMM"] if args.tvm_gemm else [])
    say("| GEMM | M x K x N | " + " | ".join(cols) + " | llmc / numpy |")
    say("| --- | --- |" + " ---: |" * (len(cols) + 1))
    for what, m, k, n, transposed in GEMMS:
        g, w = gemm_graph(m, k, n, transposed, rng)
        x = rng.standard_normal((m, k)).astype(np.float32)
        out = np.empty((m, n), np.float32)
        rhs = w.T if transposed else w
        reps = max(5, min(args.reps, int(2e10 / (2 * m * k * n))))
        tx, tw, to = torch.from_numpy(x), torch.from_numpy(np.ascontiguousarray(rhs)), torch.from_numpy(out)
        fns = {"numpy (BLAS)": lambda: np.matmul(x, rhs, out=out), "torch (MKL)": lambda: torch.mm(tx, tw, out=to)}
        ref = x.astype(np.float64) @ rhs.astype(np.float64)
        for col, use_blas in (("llmc", True), ("llmc TVM GEMM", False)):
            if col not in cols:
                continue
            cm = compile_graph(g, CompileOptions(TARGET[0], use_blas=use_blas))
            err = float(np.abs(cm(x)[0] - ref).max())
            if err > 1e-3:
                raise SystemExit(f"{what}: {col} is wrong (max abs err {err})")
            fns[col] = lambda cm=cm: cm(x)
            if use_blas:
                fns["llmc, numpy's BLAS"] = lambda ex=numpy_blas_runner(cm): ex(x)
        times = race(fns, reps)
        gf = {c: 2 * m * k * n / t / 1e6 for c, t in times.items()}
        cells = " | ".join(f"{times[c]:.3f} ms, {gf[c]:.0f} GF/s" for c in cols)
        say(f"| {what} | {m} x {k} x {n} | {cells} | {gf['llmc'] / gf['numpy (BLAS)']:.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--models", default="minilm,llama,gpt2")
    ap.add_argument("--target", default="llvm", help="llmc's CPU target: llvm (portable x86-64-v3), llvm:native, ...")
    ap.add_argument("--no-ort", dest="ort", action="store_false")
    ap.add_argument("--no-tvm-gemm", dest="tvm_gemm", action="store_false",
                    help="skip the rows with every GEMM built by TVM (use_blas=False)")
    ap.add_argument("--no-gemm-table", dest="gemm_table", action="store_false")
    args = ap.parse_args()
    TARGET[0] = args.target
    torch.set_num_threads(args.threads)
    os.environ.setdefault("LLMC_NUM_THREADS", str(args.threads))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    say(f"llmc target {args.target}; CPU: {args.threads} threads; numpy {np.__version__} BLAS: {blas_name()}; torch {torch.__version__}")
    if args.gemm_table:
        gemm_table(args)
    table = Table()
    runners = {"minilm": lambda: minilm(args, table), "llama": lambda: llama(args, table),
               "gpt2": lambda: gpt2(args, table)}
    for name in args.models.split(","):
        if name not in runners:
            raise SystemExit(f"unknown model {name!r}; choose from {', '.join(runners)}")
        runners[name]()
    table.print(f"CPU latency, {args.threads} threads, median ms; ratio = time / torch eager (same run)")


def blas_name() -> str:
    cfg = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
    return f"{cfg.get('name', '?')} {cfg.get('version', '')}".strip()


if __name__ == "__main__":
    sys.exit(main())
