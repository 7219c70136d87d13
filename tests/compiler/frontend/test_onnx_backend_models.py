"""A fixed sample of ONNX's own backend test models (shipped in the `onnx` wheel): each either
matches its expected outputs or is refused with an LLMCError at import.

The sample covers opset 6-12 files (upgraded on import), float64 graphs, CNN ops lowered
without new IR ops, and ops llmc refuses (sequences, strings, training ops). Most run through
the importer and the IR interpreter (fast); a few go through `llmc.compile` for the CPU.
The whole set is `tools/onnx_backend_suite.py` (results in docs/onnx_backend_tests.md).
"""
from __future__ import annotations

import importlib.util
import os
import pathlib

import pytest

onnx = pytest.importorskip("onnx")

from llmc.compiler.frontend.onnx import from_onnx  # noqa: E402
from llmc.compiler.interpreter import interpret  # noqa: E402
from llmc.errors import LLMCError  # noqa: E402

_SUITE = pathlib.Path(__file__).resolve().parents[3] / "tools" / "onnx_backend_suite.py"
_spec = importlib.util.spec_from_file_location("onnx_backend_suite", _SUITE)
suite = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(suite)

SAMPLE = [
    # simple/ (opset 9-12 and newer; sequences, strings and training ops are refused)
    "simple/test_single_relu_model", "simple/test_shrink", "simple/test_sign_model",
    "simple/test_expand_shape_model1", "simple/test_sequence_model1", "simple/test_sequence_model7",
    "simple/test_sequence_model8",
    "simple/test_strnorm_model_monday_casesensintive_lower", "simple/test_gradient_of_add",
    # pytorch-converted/ (opset 6): pools, convs, norms, pads, activations
    "pytorch-converted/test_AvgPool1d", "pytorch-converted/test_AvgPool2d_stride", "pytorch-converted/test_AvgPool3d",
    "pytorch-converted/test_BatchNorm1d_3d_input_eval", "pytorch-converted/test_BatchNorm3d_momentum_eval",
    "pytorch-converted/test_ConstantPad2d", "pytorch-converted/test_Conv1d_dilated", "pytorch-converted/test_Conv1d_groups",
    "pytorch-converted/test_Conv2d_depthwise_padded", "pytorch-converted/test_Conv2d_strided",
    "pytorch-converted/test_Conv3d_dilated_strided", "pytorch-converted/test_ConvTranspose2d",
    "pytorch-converted/test_ELU", "pytorch-converted/test_Embedding", "pytorch-converted/test_GLU_dim",
    "pytorch-converted/test_LeakyReLU_with_negval", "pytorch-converted/test_Linear", "pytorch-converted/test_LogSoftmax",
    "pytorch-converted/test_MaxPool1d_stride_padding_dilation", "pytorch-converted/test_MaxPool2d",
    "pytorch-converted/test_MaxPool3d_stride_padding", "pytorch-converted/test_PReLU_2d_multiparam",
    "pytorch-converted/test_PixelShuffle", "pytorch-converted/test_PoissonNLLLLoss_no_reduce",
    "pytorch-converted/test_ReflectionPad2d", "pytorch-converted/test_ReplicationPad2d", "pytorch-converted/test_SELU",
    "pytorch-converted/test_Softmin", "pytorch-converted/test_Softplus", "pytorch-converted/test_Softsign",
    "pytorch-converted/test_softmax_functional_dim3",
    # pytorch-operator/ (opset 6-9, float64 among them)
    "pytorch-operator/test_operator_add_size1_singleton_broadcast", "pytorch-operator/test_operator_addconstant",
    "pytorch-operator/test_operator_addmm", "pytorch-operator/test_operator_chunk", "pytorch-operator/test_operator_clip",
    "pytorch-operator/test_operator_convtranspose", "pytorch-operator/test_operator_index",
    "pytorch-operator/test_operator_maxpool", "pytorch-operator/test_operator_non_float_params",
    "pytorch-operator/test_operator_pad", "pytorch-operator/test_operator_pow", "pytorch-operator/test_operator_reduced_mean_keepdim",
    "pytorch-operator/test_operator_repeat_dim_overflow", "pytorch-operator/test_operator_selu",
    "pytorch-operator/test_operator_symbolic_override_nested", "pytorch-operator/test_operator_view",
]
COMPILED = ["pytorch-operator/test_operator_addconstant",  # float64
            "simple/test_sequence_model6",  # a constant (scalar) graph output
            "pytorch-converted/test_Conv2d_depthwise_strided", "pytorch-converted/test_MaxPool1d_stride_padding_dilation"]


def _path(case: str) -> str:
    return os.path.join(suite.data_root(), case, "model.onnx")


def _check(case: str, run) -> str:
    """'pass' or 'refused'; anything else fails the test."""
    path = _path(case)
    if not os.path.isfile(path):
        pytest.skip(f"{case} is not in this onnx wheel")
    try:
        runner = run(path)
    except LLMCError:
        return "refused"
    model = onnx.load(path)
    for k, (inputs, wants) in enumerate(suite._data_sets(path, model)):
        gots = runner(inputs)
        assert len(gots) == len(wants), f"{case}: {len(gots)} outputs, expected {len(wants)}"
        for i, (g, w) in enumerate(zip(gots, wants)):
            why = suite.compare(g, w)
            assert why is None, f"{case} data set {k} output {i}: {why}"
    return "pass"


def _interpreted(path):
    g = from_onnx(path)
    return lambda inputs: interpret(g, inputs)


def _compiled(path):
    import llmc

    cm = llmc.compile(path)
    return lambda inputs: cm(*inputs)


def test_sample_through_the_interpreter():
    results = {case: _check(case, _interpreted) for case in SAMPLE}
    passed = [c for c, r in results.items() if r == "pass"]
    # the upgraded, float64 and CNN models above must pass, not merely be refused
    for must in ("pytorch-converted/test_Conv2d_strided", "pytorch-converted/test_AvgPool3d",
                 "pytorch-operator/test_operator_addconstant", "pytorch-converted/test_ConvTranspose2d",
                 "simple/test_sign_model", "pytorch-converted/test_BatchNorm3d_momentum_eval"):
        assert results[must] == "pass", must
    assert results["simple/test_sequence_model1"] == "pass"  # sequences resolved at import time
    assert results["simple/test_strnorm_model_monday_casesensintive_lower"] == "refused"  # strings
    assert len(passed) >= 40, sorted(set(SAMPLE) - set(passed))


@pytest.mark.parametrize("case", COMPILED)
def test_sample_compiled_for_cpu(case):
    assert _check(case, _compiled) == "pass"
