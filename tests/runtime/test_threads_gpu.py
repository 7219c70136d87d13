"""One loaded CUDA artifact called from 8 threads x 100 calls with mixed shapes: every
output equals the single-threaded one. Two halves (the GPU machine has no TVM compiler):

    python tests/runtime/test_threads_gpu.py --prepare gpu_art/threads      # CPU host, nvcc
    LLMC_GPU_THREADS=gpu_art/threads pytest -m gpu tests/runtime/test_threads_gpu.py   # GPU machine

`--prepare` compiles a tiny Llama (float16, padding mask, GEMMs and attention in the shim)
for sm_90; shim.so travels once, as a symlink that the GPU side replaces with a copy.
"""
from __future__ import annotations

import os
import pathlib
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

SHAPES = [(1, 5), (2, 16), (4, 64), (3, 1), (1, 40)]
BOUNDS = {"batch": (1, 4), "seq": (1, 64)}
ROOT = pathlib.Path(os.environ.get("LLMC_GPU_THREADS", "gpu_art/threads"))


def prepare(out: pathlib.Path, arch: str = "sm_90") -> None:
    import torch

    from llmc.api import CompileOptions, capture, compile_graph
    from llmc.compiler.frontend.hf_models import tiny_model

    model, kw = tiny_model("llama")
    model = model.to(torch.float16)
    opts = CompileOptions(target=f"cuda:{arch}", dim_bounds=BOUNDS, progress=print)
    cm = compile_graph(capture(model, (), kw, opts), opts)
    if out.exists():
        shutil.rmtree(out)
    art = cm.export(out / "artifact.llmc")
    if (art / "shim.so").exists():
        shutil.move(art / "shim.so", out / "shim.so")
        (art / "shim.so").symlink_to(os.path.relpath(out / "shim.so", art))
    (out / "vocab.txt").write_text(str(model.config.vocab_size))
    print(f"prepared {out}: {sorted(p.name for p in art.iterdir())}")


def _feeds(vocab: int, n: int) -> list[dict]:
    out = []
    for i in range(n):
        b, s = SHAPES[i % len(SHAPES)]
        rng = np.random.default_rng(1000 + i)
        mask = np.ones((b, s), np.int64)
        if b > 1 and s > 3:
            mask[1, s - 3:] = 0
        out.append({"input_ids": rng.integers(3, min(vocab, 1000), (b, s)).astype(np.int64), "attention_mask": mask})
    return out


pytestmark = pytest.mark.gpu


def _materialize(art: pathlib.Path) -> None:
    for f in art.iterdir():
        if f.is_symlink():
            target = f.resolve()
            f.unlink()
            shutil.copy2(target, f)


@pytest.fixture(scope="module")
def loaded():
    if not (ROOT / "artifact.llmc").exists():
        pytest.skip(f"no prepared artifact under {ROOT} (run this file with --prepare on the build host)")
    from llmc.runtime.executor import load

    _materialize(ROOT / "artifact.llmc")
    vocab = int((ROOT / "vocab.txt").read_text())
    return {graphs: load(ROOT / "artifact.llmc", device="cuda", graphs=graphs) for graphs in (True, False)}, vocab


@pytest.mark.parametrize("graphs", [True, False], ids=["cuda-graphs", "eager"])
def test_eight_threads_mixed_shapes_match_single_thread(loaded, graphs):
    executors, vocab = loaded
    ex = executors[graphs]
    n_threads, per_thread = 8, 100
    feeds = _feeds(vocab, n_threads * per_thread)
    refs = [ex(**f) for f in feeds]  # single-threaded reference, same executor
    assert all(np.isfinite(r[0].astype(np.float32)).all() for r in refs)

    def worker(t: int) -> list[int]:
        bad = []
        for i in range(t, len(feeds), n_threads):
            got = ex(**feeds[i])
            if not all(np.array_equal(g, w) for g, w in zip(got, refs[i])):
                bad.append(i)
        return bad

    with ThreadPoolExecutor(n_threads) as pool:
        bad = [i for b in pool.map(worker, range(n_threads)) for i in b]
    assert bad == [], f"{len(bad)} of {len(feeds)} concurrent calls differ from the single-threaded result"


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "--prepare":
        prepare(pathlib.Path(sys.argv[2]), *(sys.argv[3:4]))
    else:
        print(__doc__)
