"""The artifact runs in a fresh process through the runtime alone, and matches the
reference interpreter; bad inputs and damaged artifacts give clear errors."""
import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import llmc
from llmc.compiler.interpreter import interpret
from llmc.errors import ArtifactError, InputError


def _inputs(b, s, seed=1):
    return np.random.default_rng(seed).standard_normal((b, s, 16)).astype(np.float32)


def test_in_process_matches_interpreter(mlp_artifact):
    g, compiled, _ = mlp_artifact
    for b, s in [(1, 5), (3, 17)]:
        x = _inputs(b, s)
        for got, want in zip(compiled(x), interpret(g, [x])):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_fresh_process_runtime_only(mlp_artifact, tmp_path):
    g, _, path = mlp_artifact
    x = _inputs(2, 9)
    np.save(tmp_path / "x.npy", x)
    code = textwrap.dedent(f"""
        import sys, numpy as np, llmc
        r = llmc.load({str(path)!r})
        outs = r(np.load({str(tmp_path / 'x.npy')!r}))
        np.savez({str(tmp_path / 'out.npz')!r}, *outs)
        maps = open('/proc/self/maps').read()
        print('TORCH' if 'torch' in sys.modules else 'no-torch')
        print('COMPILER' if 'libtvm_compiler' in maps else 'no-compiler')
    """)
    env = {k: v for k, v in os.environ.items() if k != "TVM_USE_RUNTIME_LIB"}  # as a user's process
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0, res.stderr
    assert "no-torch" in res.stdout and "no-compiler" in res.stdout, res.stdout
    got = np.load(tmp_path / "out.npz")
    for i, want in enumerate(interpret(g, [x])):
        np.testing.assert_allclose(got[f"arr_{i}"], want, rtol=1e-5, atol=1e-5)


def test_bad_inputs_are_named(mlp_artifact):
    _, _, path = mlp_artifact
    r = llmc.load(path)
    with pytest.raises(InputError, match="rank"):
        r(np.zeros((2, 16), np.float32))
    with pytest.raises(InputError, match="dtype"):
        r(np.zeros((1, 2, 16), np.float64))
    with pytest.raises(InputError, match="outside its bounds"):
        r(np.zeros((5, 2, 16), np.float32))
    with pytest.raises(InputError, match="expected shape"):
        r(np.zeros((1, 2, 15), np.float32))
    with pytest.raises(InputError, match="missing"):
        r()
    with pytest.raises(InputError, match="unknown input"):
        r(y=np.zeros((1, 2, 16), np.float32))


def test_outputs_survive_the_next_call(mlp_artifact):
    _, compiled, _ = mlp_artifact
    a = compiled(_inputs(1, 4, seed=2))
    keep = [x.copy() for x in a]
    compiled(_inputs(1, 4, seed=3))
    for x, y in zip(a, keep):
        np.testing.assert_array_equal(x, y)


def test_memory_of_dropped_outputs_is_reused_and_held_outputs_are_not(mlp_artifact):
    """An output's memory is handed out again only once no array of it is left (a view, a
    slice): what the caller holds never changes, and fresh pages are not faulted in per call."""
    _, compiled, _ = mlp_artifact
    first = compiled(_inputs(2, 8, seed=4))[0]
    view = first[1, 2:5]  # the caller keeps a view only
    want = view.copy()
    address = first.ctypes.data
    del first
    seen = set()
    for seed in range(5, 10):  # each call's output dropped before the next
        out = compiled(_inputs(2, 8, seed=seed))[0]
        seen.add(out.ctypes.data)
        del out
    assert address not in seen  # the viewed memory was never handed out again
    np.testing.assert_array_equal(view, want)
    assert len(seen) == 1  # the dropped outputs' memory was: one buffer served every call
    held = [compiled(_inputs(2, 8, seed=s))[0] for s in range(3)]  # all held: all distinct
    assert len({h.ctypes.data for h in held}) == 3
    np.testing.assert_array_equal(held[0], compiled(_inputs(2, 8, seed=0))[0])


def _copy(path, tmp_path):
    dst = tmp_path / "copy.llmc"
    shutil.copytree(path, dst)
    return dst


def test_truncated_weights(mlp_artifact, tmp_path):
    dst = _copy(mlp_artifact[2], tmp_path)
    w = dst / "weights.safetensors"
    w.write_bytes(w.read_bytes()[:-10])
    with pytest.raises(ArtifactError, match="truncated"):
        llmc.load(dst)


def test_missing_weights_and_manifest(mlp_artifact, tmp_path):
    dst = _copy(mlp_artifact[2], tmp_path)
    (dst / "weights.safetensors").unlink()
    with pytest.raises(ArtifactError, match="missing weights.safetensors"):
        llmc.load(dst)
    (dst / "manifest.json").unlink()
    with pytest.raises(ArtifactError, match="missing manifest.json"):
        llmc.load(dst)
    with pytest.raises(ArtifactError, match="not an llmc artifact"):
        llmc.load(tmp_path / "nope")


def test_incompatible_version(mlp_artifact, tmp_path):
    dst = _copy(mlp_artifact[2], tmp_path)
    m = json.loads((dst / "manifest.json").read_text())
    m["format_version"] = 999
    m["llmc_version"] = "9.9"
    (dst / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="format version 999.*llmc 9.9"):
        llmc.load(dst)


def test_interrupted_export_leaves_nothing(mlp_artifact, tmp_path):
    _, compiled, _ = mlp_artifact
    dest = tmp_path / "out.llmc"

    def boom(_file):
        raise KeyboardInterrupt

    from llmc.backends.artifact import weights_of, write_artifact

    with pytest.raises(KeyboardInterrupt):
        write_artifact(dest, boom, compiled.manifest, weights_of(compiled.program))
    assert not dest.exists()
    assert list(tmp_path.iterdir()) == []  # no temporary left behind either


def test_export_refuses_to_clobber_other_folders(mlp_artifact, tmp_path):
    _, compiled, _ = mlp_artifact
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "notes.txt").write_text("keep me")
    with pytest.raises(ArtifactError, match="refusing"):
        compiled.export(tmp_path / "docs")
    assert (tmp_path / "docs" / "notes.txt").read_text() == "keep me"
