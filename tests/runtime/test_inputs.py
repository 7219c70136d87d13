"""Bad runtime inputs: each an InputError naming the input (and value / index / table for
index inputs), or a correct result (NaN propagates like torch)."""
import numpy as np
import pytest

import llmc
from llmc.compiler.interpreter import interpret
from llmc.errors import InputError
from llmc.runtime.manifest import Manifest

VOCAB = 50  # conftest.embed_graph's table rows


def _ids(b, s, seed=0):
    return np.random.default_rng(seed).integers(0, VOCAB, (b, s)).astype(np.int64)


def test_valid_ids_match_the_interpreter(embed_artifact):
    g, compiled, path = embed_artifact
    r = llmc.load(path)
    assert [c.input for c in r.manifest.input_checks] == ["input_ids"]
    for b, s in [(1, 1), (2, 7), (4, 32)]:
        ids = _ids(b, s, seed=b * s)
        ids[0, 0], ids[-1, -1] = 0, VOCAB - 1  # both edges of the table are valid
        np.testing.assert_allclose(r(ids)[0], interpret(g, [ids])[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad", [VOCAB, VOCAB + 1, 10 ** 6, 2 ** 31, 2 ** 62, -1, -(2 ** 40)])
def test_ids_outside_the_table_are_refused(embed_artifact, bad):
    r = llmc.load(embed_artifact[2])
    ids = _ids(2, 5)
    ids[1, 3] = bad
    with pytest.raises(InputError) as e:
        r(ids)
    msg = str(e.value)
    assert "'input_ids'" in msg and f"value {bad} " in msg and "(1, 3)" in msg and "'wte'" in msg, msg
    assert f"[0, {VOCAB})" in msg


def test_in_memory_model_checks_ids_too(embed_artifact):
    _, compiled, _ = embed_artifact  # CompiledModel._runner validates the manifest and checks inputs
    ids = _ids(1, 4)
    ids[0, 2] = -7
    with pytest.raises(InputError, match="value -7 at index \\(0, 2\\)"):
        compiled(ids)


def test_first_bad_index_is_reported(embed_artifact):
    r = llmc.load(embed_artifact[2])
    ids = _ids(3, 6)
    ids[2, 5], ids[1, 0] = 999, 1000
    with pytest.raises(InputError, match="value 1000 at index \\(1, 0\\)"):
        r(ids)


@pytest.mark.parametrize("value, match", [
    (np.zeros((2, 5), np.int32), "dtype"),
    (np.zeros((2, 5), np.float32), "dtype"),
    (np.zeros((2, 5), np.uint64), "dtype"),
    (np.zeros((2, 5, 1), np.int64), "rank"),
    (np.zeros(5, np.int64), "rank"),
    (np.zeros((0, 5), np.int64), "outside its bounds"),
    (np.zeros((2, 0), np.int64), "outside its bounds"),
    (np.zeros((2, 33), np.int64), "outside its bounds"),
    ("hello", "expected a numpy array"),
    (None, "expected a numpy array"),
    ({"a": 1}, "expected a numpy array"),
    (True, "expected a numpy array"),
    ([[1, 2], [3]], "not an array"),
    (np.ma.masked_array(np.zeros((1, 2), np.int64)), "plain numpy array"),
    (np.array([["a", "b"]]), "dtype"),
    (np.zeros((1, 2), object), "dtype"),
])
def test_malformed_inputs(embed_artifact, value, match):
    r = llmc.load(embed_artifact[2])
    with pytest.raises(InputError, match=match):
        r(value)


def test_non_contiguous_and_list_inputs_work(embed_artifact):
    g, _, path = embed_artifact
    r = llmc.load(path)
    ids = _ids(4, 10)[:, ::2]  # a strided view
    np.testing.assert_allclose(r(ids)[0], interpret(g, [np.ascontiguousarray(ids)])[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(r(ids.tolist())[0], r(ids)[0])


def test_nan_propagates_like_torch(mlp_artifact):
    g, _, path = mlp_artifact
    r = llmc.load(path)
    x = np.random.default_rng(3).standard_normal((2, 4, 16)).astype(np.float32)
    x[1, 2, 5] = np.nan
    x[0, 1, 0] = np.inf
    got = r(x)
    want = interpret(g, [x])
    for a, b in zip(got, want):
        assert np.array_equal(np.isnan(a), np.isnan(b))  # NaN exactly where the reference has it
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, equal_nan=True)
    assert np.isnan(got[0][1, 2]).all() and not np.isnan(got[0][0, 0]).any()  # the NaN row only


def test_input_checks_section_is_validated(embed_artifact):
    from llmc.errors import ArtifactError

    m = dict(embed_artifact[1].manifest)
    for bad, match in [({"input": "nope", "lo": 0, "hi": 5, "table": "t"}, "unknown input 'nope'"),
                       ({"input": "input_ids", "lo": 5, "hi": 5, "table": "t"}, "empty range"),
                       ({"input": "input_ids", "lo": True, "hi": 5, "table": "t"}, "lo: expected an integer"),
                       ({"input": "input_ids", "lo": 0, "hi": 5.0, "table": "t"}, "hi: expected an integer"),
                       ({"input": "input_ids", "lo": 0, "hi": 5}, "missing key 'table'")]:
        m["input_checks"] = {"version": 1, "checks": [bad]}
        with pytest.raises(ArtifactError, match=match):
            Manifest.from_json(m)


def test_cpu_section_is_typed(embed_artifact):
    from llmc.errors import ArtifactError

    m = dict(embed_artifact[1].manifest)
    m["cpu"] = {"version": 1, "triple": "x86_64-pc-linux-gnu", "mcpu": "x86-64-v2", "features": ["+sse4.2"]}
    cpu = Manifest.from_json(m).cpu
    assert (cpu.triple, cpu.mcpu, cpu.features) == ("x86_64-pc-linux-gnu", "x86-64-v2", ("+sse4.2",))
    m["cpu"] = dict(m["cpu"], features="+avx")
    with pytest.raises(ArtifactError, match="cpu.features: expected a list"):
        Manifest.from_json(m)
