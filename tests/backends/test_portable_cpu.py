"""CPU artifacts built for the default target run on an older processor, and ones built for
this host's processor refuse to load there with ArtifactError instead of dying with SIGILL.

The older processor is qemu-user's emulated Haswell (AVX2 + FMA, no AVX-512): the test
compiles a tiny model, then runs a small script under `qemu-x86_64 -cpu Haswell python` that
loads the artifact with `llmc.load` (which checks the manifest's `cpu` section against the
processor before any kernel is loaded) and compares with the output computed here.
"""
import os
import platform
import shutil
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from llmc.compiler.dtypes import DType
from llmc.compiler.ir import Graph, TensorType, input_node, node, sym, weight_node
from llmc.compiler.ops import AxisAttrs, GeluAttrs, NormAttrs, Op

QEMU = shutil.which("qemu-x86_64")
pytestmark = [
    pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="x86_64 host needed"),
    pytest.mark.skipif(QEMU is None, reason="qemu-x86_64 (qemu-user) is not installed; apt-get install qemu-user"),
]

SCRIPT = textwrap.dedent('''
    import sys, time
    t0 = time.perf_counter()
    import numpy as np
    import llmc

    art, data = sys.argv[1:3]
    try:
        model = llmc.load(art)  # the loader checks the manifest's cpu section first
    except llmc.ArtifactError as e:
        print("ArtifactError:", e)
        sys.exit(3)
    d = np.load(data)
    got = model(d["ids"], d["x"])[0]
    print(f"max_abs_err {float(np.abs(got - d['y']).max()):.3e} in {time.perf_counter() - t0:.1f}s")
''')


def tiny_graph(seed: int = 0) -> Graph:
    """An embedding lookup, a LayerNorm -> GEMM -> GELU -> GEMM block and a residual add."""
    rng = np.random.default_rng(seed)
    b, s = sym("batch"), sym("seq")
    ids = input_node("ids", TensorType((b, s), DType.I64))
    x = input_node("x", TensorType((b, s, 16), DType.F32))
    params = {"emb": rng.standard_normal((50, 16)), "ln.w": rng.standard_normal(16), "ln.b": rng.standard_normal(16),
              "up": rng.standard_normal((16, 64)) * 0.3, "down": rng.standard_normal((64, 16)) * 0.3}
    params = {k: v.astype(np.float32) for k, v in params.items()}
    w = {k: weight_node(k, TensorType(v.shape, DType.F32)) for k, v in params.items()}
    h = node(Op.ADD, [x, node(Op.TAKE, [w["emb"], ids], AxisAttrs(0))])
    y = node(Op.LAYER_NORM, [h, w["ln.w"], w["ln.b"]], NormAttrs(1e-5))
    y = node(Op.GELU, [node(Op.MATMUL, [y, w["up"]])], GeluAttrs(False))
    y = node(Op.ADD, [h, node(Op.MATMUL, [y, w["down"]])])
    from llmc.compiler.symbolic import SymDim

    return Graph((ids, x), (y,), params, {"batch": SymDim("batch", 1, 4), "seq": SymDim("seq", 1, 32)}, ("y",))


def _build(tmp_path, target: str):
    from llmc.api import CompileOptions, compile_graph
    cm = compile_graph(tiny_graph(), CompileOptions(target=target))
    art = cm.export(tmp_path / "model.llmc")
    rng = np.random.default_rng(1)
    ids, x = rng.integers(0, 50, (2, 7)), rng.standard_normal((2, 7, 16)).astype(np.float32)
    np.savez(tmp_path / "data.npz", ids=ids, x=x, y=cm(ids, x)[0])  # the in-process reference
    (tmp_path / "run.py").write_text(SCRIPT)
    return cm, art


def _run_under_haswell(tmp_path, art) -> tuple[subprocess.CompletedProcess, float]:
    env = dict(os.environ, TVM_USE_RUNTIME_LIB="1")  # the lean runtime-only TVM, as a serving host has
    t = time.perf_counter()
    proc = subprocess.run([QEMU, "-cpu", "Haswell", sys.executable, str(tmp_path / "run.py"), str(art),
                           str(tmp_path / "data.npz")],
                          capture_output=True, text=True, timeout=600, env=env)
    return proc, time.perf_counter() - t


def _haswell_features() -> set[str]:
    """numpy's CPU features as the emulated Haswell reports them (checks the emulation itself)."""
    code = ("from numpy._core._multiarray_umath import __cpu_features__ as f;"
            "print(' '.join(k for k, v in f.items() if v))")
    out = subprocess.run([QEMU, "-cpu", "Haswell", sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    return set(out.stdout.split())


def test_emulated_haswell_lacks_avx512():
    feats = _haswell_features()
    assert {"AVX2", "FMA3"} <= feats and not any(f.startswith("AVX512") for f in feats), feats


def test_default_target_runs_on_haswell(tmp_path):
    cm, art = _build(tmp_path, "llvm")
    assert cm.manifest["target"]["name"] == "llvm"
    proc, wall = _run_under_haswell(tmp_path, art)
    print(f"\nportable artifact under qemu-x86_64 -cpu Haswell: {wall:.1f}s wall; {proc.stdout.strip()}")
    assert proc.returncode == 0, (proc.returncode, proc.stdout, proc.stderr[-2000:])
    err = float(proc.stdout.split("max_abs_err")[1].split()[0])
    assert err <= 1e-5


def test_native_target_is_refused_on_haswell_not_sigill(tmp_path):
    from llmc.runtime.cpu_features import host_cpu_features

    if not any(f.startswith("AVX512") for f in host_cpu_features()):
        pytest.skip("this host has no AVX-512, so llvm:native builds nothing Haswell lacks")
    cm, art = _build(tmp_path, "llvm:native")
    assert cm.manifest["target"]["name"].startswith("llvm:") and cm.manifest["target"]["name"] != "llvm:x86-64-v3"
    proc, wall = _run_under_haswell(tmp_path, art)
    print(f"\nnative artifact under qemu-x86_64 -cpu Haswell: {wall:.1f}s wall; {proc.stdout.strip()}")
    assert proc.returncode == 3, (proc.returncode, proc.stdout, proc.stderr[-2000:])  # not -4 / 132 (SIGILL)
    assert "ArtifactError" in proc.stdout and "AVX512F" in proc.stdout and "--target llvm" in proc.stdout
