"""CPU latency: llmc (unfused and fused) vs torch eager vs onnxruntime, plus compile time.

    python benchmarks/bench_cpu.py [--quick]

MiniLM (real all-MiniLM-L6-v2 weights) at batch 8 x seq 128, and a small Llama
(random weights) at batch 1 x seq 128. Every figure comes from this run on this
machine; ratios are against torch eager measured in the same process.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import numpy as np
import torch
import transformers

import llmc
from llmc.compiler.frontend.hf_models import minilm_path


def timeit(fn, warmup=2, reps=10) -> float:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3


def export_legacy(model, kwargs, path) -> None:
    names = list(kwargs)

    class Positional(torch.nn.Module):  # the legacy exporter wants positional tensors
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, *xs):
            out = self.m(**dict(zip(names, xs)))
            return out[0]

    torch.onnx.export(Positional(model), tuple(kwargs.values()), path, input_names=names, output_names=["out"],
                      dynamic_axes={n: {0: "batch", 1: "seq"} for n in names}, opset_version=17, dynamo=False)


def ort_session(kwargs, path, optimized: bool):
    import onnx
    import onnxruntime as ort

    m = onnx.load(path)
    m.ir_version = min(m.ir_version, 10)  # onnxruntime 1.31 cannot read the IR version onnx 1.23 writes
    so = ort.SessionOptions()
    so.intra_op_num_threads = torch.get_num_threads()
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimized
                                   else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    feeds = {k: v.numpy() for k, v in kwargs.items()}
    return lambda: sess.run(None, feeds)


class Rows(list):
    """Result rows, echoed as they come so a long run shows progress."""

    def append(self, row) -> None:
        super().append(row)
        print("  ", row[0], "|", row[1], f"| {row[2]:.2f} ms", "|", row[3] or "", flush=True)


def bench(name, model, kwargs, bounds, with_ort: bool, rows: list, example: dict | None = None) -> None:
    """Time `kwargs`; compile from `example` (torch.export needs example dims >= 2)."""
    feeds = {k: v.numpy() for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
    with torch.no_grad():
        t_torch = timeit(lambda: model(**kwargs))
    rows.append((name, "torch eager", t_torch, None))
    for fuse in (False, True):
        t0 = time.perf_counter()
        cm = llmc.compile(model, (), example or kwargs, dim_bounds=bounds, fuse=fuse)
        compile_s = time.perf_counter() - t0
        out = cm(**feeds)[0]
        with torch.no_grad():
            ref = model(**kwargs)[0].numpy()
        err = float(np.abs(out - ref).max())
        t = timeit(lambda: cm(**feeds))
        rows.append((name, f"llmc {'fused' if fuse else 'unfused'}", t,
                     f"compile {compile_s:.1f}s, {len(cm.program.calls)} kernel calls, max err {err:.1e}"))
    if with_ort:
        tensors = {k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "model.onnx")
            export_legacy(model, tensors, path)
            for opt in (False, True):
                rows.append((name, f"onnxruntime ({'optimized' if opt else 'unoptimized'}, legacy export)",
                             timeit(ort_session(tensors, path, opt)), None))
            t0 = time.perf_counter()
            cm = llmc.compile(path, dim_bounds=bounds)
            compile_s = time.perf_counter() - t0
            rows.append((name, "llmc fused, from the ONNX file", timeit(lambda: cm(**feeds)),
                         f"compile {compile_s:.1f}s, {len(cm.program.calls)} kernel calls"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TVM_NUM_THREADS", str(args.threads))
    rows = Rows()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    minilm = transformers.AutoModel.from_pretrained(str(minilm_path()), local_files_only=True,
                                                    attn_implementation="sdpa").eval()
    g = torch.Generator().manual_seed(0)
    kw = {"input_ids": torch.randint(1000, 20000, (8, 128), generator=g),
          "attention_mask": torch.ones(8, 128, dtype=torch.long)}
    bench("MiniLM b8 s128", minilm, kw, {"batch": (1, 8), "seq": (1, 128)}, True, rows)
    cfg = transformers.LlamaConfig(hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                                   num_attention_heads=8, num_key_value_heads=4, vocab_size=8192,
                                   max_position_embeddings=512, attn_implementation="sdpa")
    torch.manual_seed(0)
    llama = transformers.LlamaForCausalLM(cfg).eval()
    kw = {"input_ids": torch.randint(0, 8192, (1, 128), generator=g), "use_cache": False}
    example = {"input_ids": torch.randint(0, 8192, (2, 16), generator=g), "use_cache": False}
    bench("Llama 4x512 b1 s128", llama, kw, {"batch": (1, 4), "seq": (1, 256)}, False, rows, example)
    print(f"\nCPU latency, {args.threads} threads (median ms); ratio = llmc or ort / torch eager")
    base = {}
    for model_name, what, ms, note in rows:
        if what == "torch eager":
            base[model_name] = ms
        print(f"{model_name:22s} {what:42s} {ms:9.2f} ms  x{ms / base[model_name]:.2f}" + (f"  ({note})" if note else ""))


if __name__ == "__main__":
    main()
