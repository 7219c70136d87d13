"""MiniLM 8 x 128 forward, llmc against torch eager in one process, to see what OpenBLAS's idle
threads cost TVM's kernels (issue 10). Run it twice, with and without the variable, which
OpenBLAS reads once, when numpy is imported:

    python benchmarks/blas_idle_cpu.py
    OPENBLAS_THREAD_TIMEOUT=4 python benchmarks/blas_idle_cpu.py

2 threads for both; contenders interleaved with a 0.2 s settle before each call; median of 12.
"""
from __future__ import annotations

import os
import time

import numpy as np
import torch
import transformers

import llmc
from llmc.compiler.frontend.hf_models import minilm_path


def main() -> None:
    torch.set_num_threads(2)
    model = transformers.AutoModel.from_pretrained(str(minilm_path()), local_files_only=True,
                                                   attn_implementation="sdpa").eval()
    g = torch.Generator().manual_seed(0)
    kw = {"input_ids": torch.randint(1000, 20000, (8, 128), generator=g),
          "attention_mask": torch.ones(8, 128, dtype=torch.long)}
    run = llmc.compile(model, (), kw, dim_bounds={"batch": (1, 8), "seq": (1, 128)})
    np_kw = {k: v.numpy() for k, v in kw.items()}

    def ours():
        run(**np_kw)

    def theirs():
        with torch.no_grad():
            model(**kw)

    for f in (ours, theirs, ours, theirs):  # warm-up
        f()
    times: dict[str, list[float]] = {"llmc": [], "torch": []}
    for _ in range(12):
        for name, f in (("llmc", ours), ("torch", theirs)):
            time.sleep(0.2)
            t = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t)
    ms = {k: float(np.median(v)) * 1e3 for k, v in times.items()}
    print(f"OPENBLAS_THREAD_TIMEOUT={os.environ.get('OPENBLAS_THREAD_TIMEOUT', 'unset')}: llmc {ms['llmc']:.1f} ms, "
          f"torch {ms['torch']:.1f} ms, llmc / torch {ms['llmc'] / ms['torch']:.2f}")


if __name__ == "__main__":
    main()
