"""ONNX sequence ops resolved at import time, against onnxruntime; clear errors where they cannot be."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from onnx import helper  # noqa: E402

from test_onnx_ops import F, I, check, make_model  # noqa: E402

from llmc.compiler.frontend.onnx import from_onnx  # noqa: E402
from llmc.errors import UnsupportedOpError  # noqa: E402


def test_split_insert_erase_at_concat():
    nodes = [helper.make_node("SplitToSequence", ["x", "three"], ["s"], axis=1),  # chunks 3, 3, 1
             helper.make_node("SequenceInsert", ["s", "y", "neg1"], ["s2"]),
             helper.make_node("SequenceErase", ["s2", "zero"], ["s3"]),
             helper.make_node("SequenceAt", ["s3", "neg1"], ["last"]),
             helper.make_node("SequenceLength", ["s3"], ["n"]),
             helper.make_node("SplitToSequence", ["x"], ["cols"], axis=1, keepdims=0),
             helper.make_node("ConcatFromSequence", ["cols"], ["stacked"], axis=-1, new_axis=1),
             helper.make_node("SequenceConstruct", ["x", "x"], ["pair"]),
             helper.make_node("ConcatFromSequence", ["pair"], ["cat"], axis=0)]
    inits = {"three": np.array(3, np.int64), "neg1": np.array(-1, np.int64), "zero": np.array(0, np.int64)}
    inputs = [("x", F, ["n", 7]), ("y", F, ["n", 2])]
    m = make_model(nodes, inputs, [("last", F, None), ("n", I, None), ("stacked", F, None), ("cat", F, None)], inits)
    check(m, inputs, tol=0)


def test_sequence_errors_are_clear():
    nodes = [helper.make_node("SequenceConstruct", ["x", "x"], ["s"]), helper.make_node("SequenceAt", ["s", "p"], ["y"])]
    m = make_model(nodes, [("x", F, [2]), ("p", I, [])], [("y", F, None)])
    with pytest.raises(UnsupportedOpError, match="position read from runtime data"):
        from_onnx(m)
    m = make_model([helper.make_node("SequenceConstruct", ["x"], ["s"])], [("x", F, [2])], [("s", F, None)])
    with pytest.raises(UnsupportedOpError, match="is a sequence"):
        from_onnx(m)
    nodes = [helper.make_node("SequenceConstruct", ["x"], ["s"]), helper.make_node("Relu", ["s"], ["y"])]
    with pytest.raises(UnsupportedOpError, match=r"'s'\) is a sequence, where Relu takes a tensor"):
        from_onnx(make_model(nodes, [("x", F, [2])], [("y", F, None)]))
