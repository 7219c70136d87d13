"""Writes the ONNX frontend's regression inputs: minimal models reproducing crashes the fuzzer
(test_onnx_fuzz.py) found. Each once raised something other than LLMCError (or hung);
test_replay_regression_cases checks they now import cleanly or raise LLMCError.

    python tests/compiler/frontend/onnx_cases/make_cases.py
"""
from __future__ import annotations

import pathlib

import numpy as np
from onnx import TensorProto, helper, numpy_helper

HERE = pathlib.Path(__file__).parent
F, I, B = TensorProto.FLOAT, TensorProto.INT64, TensorProto.BOOL


def const(name, value, dtype=np.int64):
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.array(value, dtype=dtype)))


def model(nodes, inputs=(("x", F, ["n", 4]),), out_type=F, opset=17):
    g = helper.make_graph(nodes, "case", [helper.make_tensor_value_info(*i) for i in inputs],
                          [helper.make_tensor_value_info("y", out_type, None)])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 9
    return m.SerializeToString()


CASES = {
    # IndexError: Concat of inputs with different ranks
    "concat_rank_mismatch": model([const("v", [1, 2]), helper.make_node("Concat", ["x", "v"], ["y"], axis=1)]),
    # OverflowError: IsInf on integers built an int +inf constant
    "isinf_int": model([helper.make_node("IsInf", ["x"], ["y"])], inputs=(("x", I, ["n"]),), out_type=B),
    # hang: Split with a huge num_outputs built a list of that many sizes
    "split_huge_num_outputs": model([helper.make_node("Split", ["x"], ["y"], axis=1, num_outputs=2**63 - 1)],
                                    opset=18),
    # ValueError: folding an integer Pow with a negative exponent
    "int_pow_negative_const": model([const("a", 2), const("b", -1), helper.make_node("Pow", ["a", "b"], ["y"])],
                                    out_type=I),
    # ValueError: ConstantOfShape with a zero and a huge dim tried to allocate
    "constant_of_shape_zero_huge": model([const("s", [0, 2**62]), helper.make_node("ConstantOfShape", ["s"], ["y"])]),
    # AttributeError: casting a symbolic scalar (Shape(x)[0]) to bool
    "cast_symbolic_scalar_bool": model([helper.make_node("Shape", ["x"], ["s"]), const("i", 0),
                                        helper.make_node("Gather", ["s", "i"], ["n"]),
                                        helper.make_node("Cast", ["n"], ["y"], to=B)], out_type=B),
    # TypeError: folding Sub of two bool constants
    "sub_bool_consts": model([const("a", True, np.bool_), helper.make_node("Sub", ["a", "a"], ["y"])], out_type=B),
    # UFuncTypeError: Sign of a bool constant
    "sign_bool_const": model([const("a", [True, False], np.bool_), helper.make_node("Sign", ["a"], ["y"])],
                             out_type=B),
    # ValueError: Range with an infinite limit
    "range_inf": model([const("a", 0.0, np.float32), const("b", np.inf, np.float32), const("c", 1.0, np.float32),
                        helper.make_node("Range", ["a", "b", "c"], ["y"])]),
    # KeyError: folding a Slice of a constant with symbolic bounds (Shape(x)[0] - 1 : Shape(x)[0])
    "slice_const_symbolic_bounds": model([helper.make_node("Shape", ["x"], ["s"]), const("i0", [0]), const("i1", [1]),
                                          helper.make_node("Slice", ["s", "i0", "i1"], ["n"]), const("one", [1]),
                                          helper.make_node("Sub", ["n", "one"], ["n1"]), const("d", [5, 6, 7, 8]),
                                          helper.make_node("Slice", ["d", "n1", "n"], ["y"])], out_type=I),
    # IndexError: GatherND of a shape vector with an out-of-range index
    "gathernd_shape_out_of_range": model([helper.make_node("Shape", ["x"], ["s"]), const("i", [[-2**63]]),
                                          helper.make_node("GatherND", ["s", "i"], ["y"])], out_type=I),
}


def non_utf8_name() -> bytes:
    """TypeError: protobuf returns bytes for a name that is not UTF-8."""
    data = model([helper.make_node("Relu", ["x"], ["y"], name="NAME_XX")])
    return data.replace(b"NAME_XX", b"NAME\xff\xfeX")


if __name__ == "__main__":
    for name, data in {**CASES, "non_utf8_node_name": non_utf8_name()}.items():
        (HERE / f"{name}.onnx").write_bytes(data)
        print(name, len(data), "bytes")
