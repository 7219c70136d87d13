"""The artifact writer: sizes and SHA-256 of every file, a sealed manifest, the user's
umask, atomic replacement, and weights that round-trip exactly (0-d scalars, bf16 words)."""
import hashlib
import json
import os
import shutil
import stat

import numpy as np
import pytest

from llmc.compiler.dtypes import DType
from llmc.compiler.ir import Graph, TensorType, input_node, node, sym, weight_node
from llmc.compiler.ops import Op
from llmc.compiler.symbolic import SymDim


def scaled_graph() -> Graph:
    """y = (x @ w) * scale with a 0-d weight `scale` (like Gemma's embed_scale)."""
    rng = np.random.default_rng(0)
    s = sym("seq")
    x = input_node("x", TensorType((s, 8), DType.F32))
    params = {"w": rng.standard_normal((8, 4)).astype(np.float32), "scale": np.array(3.5, np.float32)}
    w = {k: weight_node(k, TensorType(v.shape, DType.F32)) for k, v in params.items()}
    y = node(Op.MUL, [node(Op.MATMUL, [x, w["w"]]), w["scale"]])
    return Graph((x,), (y,), params, {"seq": SymDim("seq", 1, 16)}, ("y",))


@pytest.fixture(scope="module")
def compiled():
    from llmc.api import CompileOptions, compile_graph

    # TVM kernels only: the bf16 test below relabels a weight, which a BLAS GEMM would refuse
    return compile_graph(scaled_graph(), CompileOptions(use_blas=False))


def test_every_file_has_size_and_hash_and_the_manifest_is_sealed(compiled, tmp_path):
    from llmc.runtime.manifest import canonical_checksum, read_manifest

    out = compiled.export(tmp_path / "a.llmc")
    m = json.loads((out / "manifest.json").read_text())
    files = sorted(p.name for p in out.iterdir() if p.name != "manifest.json")
    assert sorted(m["files"]["entries"]) == files == ["kernels.so", "weights.safetensors"]
    for name, e in m["files"]["entries"].items():
        data = (out / name).read_bytes()
        assert e == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert m["checksum"] == canonical_checksum(m)
    typed = read_manifest(out)
    assert typed.files["kernels.so"].bytes == (out / "kernels.so").stat().st_size
    assert m["weights"]["bytes"] == (out / "weights.safetensors").stat().st_size


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_files_follow_the_umask(compiled, tmp_path, umask):
    old = os.umask(umask)
    try:
        out = compiled.export(tmp_path / "a.llmc")
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask
    assert stat.S_IMODE((out / "manifest.json").stat().st_mode) == 0o666 & ~umask
    assert stat.S_IMODE((out / "weights.safetensors").stat().st_mode) == 0o666 & ~umask
    assert stat.S_IMODE((out / "kernels.so").stat().st_mode) == 0o777 & ~umask


def test_scalar_weight_round_trips(compiled, tmp_path):
    import llmc
    from llmc.compiler.interpreter import interpret

    out = compiled.export(tmp_path / "a.llmc")
    m = json.loads((out / "manifest.json").read_text())
    (scale,) = [b for b in m["program"]["buffers"] if b["name"] == "scale"]
    assert scale["shape"] == []
    x = np.random.default_rng(1).standard_normal((5, 8)).astype(np.float32)
    r = llmc.load(out)
    np.testing.assert_allclose(r(x)[0], interpret(scaled_graph(), [x])[0], rtol=1e-5, atol=1e-5)


def test_overwrite_is_atomic_and_leaves_no_temporaries(compiled, tmp_path):
    import llmc

    first = compiled.export(tmp_path / "a.llmc")
    again = compiled.export(tmp_path / "a.llmc")
    assert first == again and sorted(p.name for p in tmp_path.iterdir()) == ["a.llmc"]
    llmc.load(again)


def test_bf16_weights_are_declared_as_uint16_words(compiled, tmp_path):
    """bf16 is stored as its uint16 words (safetensors' numpy API lacks bf16); the manifest
    says so, and the loader gives back the very same bf16 values."""
    import ml_dtypes

    from llmc.backends.artifact import write_artifact
    from llmc.runtime.artifact_files import load_weights, read_manifest

    src = compiled.export(tmp_path / "src.llmc")
    m = json.loads(json.dumps(compiled.manifest))
    for b in m["program"]["buffers"]:
        if b["name"] == "w":
            b["dtype"] = "bfloat16"
    m["weights"]["stored_as"] = {"w": "uint16"}
    w = np.random.default_rng(2).standard_normal((8, 4)).astype(ml_dtypes.bfloat16)
    out = write_artifact(tmp_path / "bf.llmc", lambda f: shutil.copy(src / "kernels.so", f), m,
                         {"w": w, "scale": np.array(2.0, np.float32)})
    from safetensors import safe_open

    with safe_open(str(out / "weights.safetensors"), "np") as f:
        assert f.get_tensor("w").dtype == np.uint16
    got = load_weights(out, read_manifest(out))
    assert got["w"].dtype == w.dtype and np.array_equal(got["w"].view(np.uint16), w.view(np.uint16))
    assert got["scale"].shape == () and got["scale"] == 2.0
