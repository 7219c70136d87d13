"""CNN-style ONNX ops (Conv, pools, BatchNorm, Pad, activations) lowered to existing IR ops,
against onnxruntime on random inputs (interpreter, fp32, atol/rtol 1e-4)."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from onnx import helper  # noqa: E402

from test_onnx_ops import F, check, make_model, single  # noqa: E402

from llmc.errors import LLMCError, UnsupportedOpError  # noqa: E402
from llmc.compiler.frontend.onnx import from_onnx  # noqa: E402

RNG = np.random.default_rng(0)


def _w(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


CONV_CASES = [
    ([1, 3, 9], (4, 3, 3), {}),
    (["n", 4, 7, 6], (6, 2, 3, 2), {"group": 2, "strides": [2, 1], "pads": [1, 0, 1, 1]}),
    (["n", 3, 8, 8], (3, 1, 3, 3), {"group": 3, "dilations": [2, 2], "pads": [2, 1, 2, 1]}),
    ([2, 2, 5, 4, 3], (2, 2, 2, 2, 2), {"pads": [1, 0, 0, 0, 1, 1]}),
    ([1, 2, 7, 7], (3, 2, 3, 3), {"auto_pad": "SAME_LOWER", "strides": [2, 2]}),
]


@pytest.mark.parametrize("xshape,wshape,attrs", CONV_CASES)
def test_conv(xshape, wshape, attrs):
    inits = {"w": _w(*wshape), "b": _w(wshape[0])}
    m, inputs = single("Conv", 1, attrs, shapes=[xshape], inits=inits, extra_inputs=["w", "b"])
    check(m, inputs, envs=({"n": 1}, {"n": 3}), tol=1e-4)


CONV_T_CASES = [
    ([1, 3, 5], (3, 2, 3), {}),
    (["n", 4, 4, 5], (4, 3, 3, 2), {"group": 2, "strides": [2, 3], "pads": [1, 0, 0, 1], "output_padding": [1, 0]}),
    ([1, 2, 3, 3], (2, 2, 3, 3), {"strides": [2, 2], "dilations": [2, 1], "pads": [3, 1, 0, 1]}),
    ([1, 2, 4, 4], (2, 1, 3, 3), {"strides": [2, 2], "output_shape": [9, 8]}),
    ([1, 2, 4, 4], (2, 1, 2, 2), {"strides": [2, 2], "auto_pad": "SAME_UPPER"}),
]


@pytest.mark.parametrize("xshape,wshape,attrs", CONV_T_CASES)
def test_conv_transpose(xshape, wshape, attrs):
    inits = {"w": _w(*wshape), "b": _w(wshape[1] * attrs.get("group", 1))}
    m, inputs = single("ConvTranspose", 1, attrs, shapes=[xshape], inits=inits, extra_inputs=["w", "b"])
    check(m, inputs, envs=({"n": 1}, {"n": 2}), tol=1e-4)


POOL_CASES = [
    ("MaxPool", ["n", 2, 7, 7], {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}),
    ("MaxPool", [1, 2, 8, 6], {"kernel_shape": [3, 2], "ceil_mode": 1, "strides": [2, 2]}),
    ("MaxPool", [1, 1, 9], {"kernel_shape": [2], "dilations": [2], "pads": [1, 0]}),
    ("MaxPool", [1, 1, 9], {"kernel_shape": [3], "strides": [2], "auto_pad": "SAME_UPPER"}),
    ("AveragePool", ["n", 3, 6, 5], {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}),
    ("AveragePool", ["n", 3, 6, 5], {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "count_include_pad": 1}),
    ("AveragePool", [1, 2, 7, 7], {"kernel_shape": [2, 2], "strides": [2, 2], "ceil_mode": 1}),
    ("AveragePool", [1, 2, 4, 4, 4], {"kernel_shape": [2, 2, 2]}),
    ("LpPool", [1, 2, 5, 5], {"kernel_shape": [2, 2], "p": 2}),
    ("GlobalAveragePool", ["n", 3, 4, 5], {}),
    ("GlobalMaxPool", ["n", 3, 4, 5], {}),
]


@pytest.mark.parametrize("op,xshape,attrs", POOL_CASES)
def test_pools(op, xshape, attrs):
    m, inputs = single(op, 1, attrs, shapes=[xshape], opset=19 if op != "LpPool" else 18)
    check(m, inputs, envs=({"n": 1}, {"n": 2}), tol=1e-4)


def test_batch_norm_and_instance_norm():
    c = 3
    inits = {"s": _w(c), "b": _w(c), "m": _w(c), "v": np.abs(_w(c)) + 0.5}
    m, inputs = single("BatchNormalization", 1, {"epsilon": 1e-3}, shapes=[["n", c, 4, 5]], inits=inits,
                       extra_inputs=["s", "b", "m", "v"])
    check(m, inputs, tol=1e-4)
    m, inputs = single("InstanceNormalization", 1, {}, shapes=[["n", c, 6]], inits={"s": inits["s"], "b": inits["b"]},
                       extra_inputs=["s", "b"])
    check(m, inputs, tol=1e-4)


@pytest.mark.parametrize("size", [1, 3, 5])  # onnxruntime takes odd sizes only
def test_lrn(size):
    m, inputs = single("LRN", 1, {"size": size, "alpha": 0.2, "beta": 0.6, "bias": 1.5}, shapes=[["n", 5, 3, 2]])
    check(m, inputs, tol=1e-5)


@pytest.mark.parametrize("mode,pads", [("constant", [0, 1, 2, 0, 2, 1]), ("constant", [0, -1, 1, 0, 1, -1]),
                                       ("edge", [0, 2, 1, 0, 1, 2]), ("reflect", [0, 2, 1, 0, 1, 2]),
                                       ("wrap", [0, 1, 2, 0, 2, 1])])
def test_pad(mode, pads):
    inits = {"p": np.array(pads, np.int64), "v": np.array(1.5, np.float32)}
    m, inputs = single("Pad", 1, {"mode": mode}, shapes=[["n", 4, 5]], inits=inits,
                       extra_inputs=["p", "v"] if mode == "constant" else ["p"], opset=19)
    check(m, inputs, tol=0)


ACTIVATIONS = [("LeakyRelu", {"alpha": 0.1}), ("Elu", {"alpha": 0.7}), ("Celu", {"alpha": 1.3}), ("Selu", {}),
               ("HardSigmoid", {}), ("HardSwish", {}), ("Softplus", {}), ("Softsign", {}), ("Mish", {}),
               ("Shrink", {"lambd": 0.4, "bias": 0.2}), ("ThresholdedRelu", {"alpha": 0.3})]


@pytest.mark.parametrize("op,attrs", ACTIVATIONS)
def test_activations(op, attrs):
    m, inputs = single(op, 1, attrs, opset=22 if op == "Mish" else 17)
    check(m, inputs, tol=1e-5)


@pytest.mark.parametrize("elem", [F, 7])
def test_sign_on_runtime_data(elem):
    m, inputs = single("Sign", 1, types=[elem], out_type=elem)
    check(m, inputs, tol=0)


def test_prelu():
    m, inputs = single("PRelu", 1, shapes=[["n", 3, 4]], inits={"s": _w(3, 1)}, extra_inputs=["s"])
    check(m, inputs, tol=1e-6)


def test_clear_errors():
    with pytest.raises(UnsupportedOpError, match="static spatial"):
        m, _ = single("MaxPool", 1, {"kernel_shape": [2]}, shapes=[[1, 1, "n"]])
        from_onnx(m)
    node = helper.make_node("MaxPool", ["x"], ["y", "i"], kernel_shape=[2])
    m = make_model([node], [("x", F, [1, 1, 4])], [("y", F, None), ("i", 7, None)])
    with pytest.raises(UnsupportedOpError, match="Indices"):
        from_onnx(m)
    with pytest.raises(LLMCError, match="larger than the padded input"):
        from_onnx(single("AveragePool", 1, {"kernel_shape": [5]}, shapes=[[1, 1, 3]])[0])
