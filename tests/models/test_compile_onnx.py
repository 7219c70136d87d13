"""End to end from ONNX: files from both torch exporters through llmc.compile (fusion,
TVM CPU kernels) against onnxruntime, two sequence lengths from one compile."""
import numpy as np
import pytest

import llmc
from onnx_export import export_onnx, ort_session

CASES = [(m, e) for m in ("gpt2", "bert", "llama", "minilm") for e in ("torchscript", "dynamo")]


@pytest.mark.parametrize("name,exporter", CASES)
def test_onnx_model_matches_onnxruntime(tmp_path, name, exporter):
    path = str(tmp_path / f"{name}.onnx")
    export_onnx(name, exporter, path)
    cm = llmc.compile(path, dim_bounds={"batch": (1, 4), "seq": (1, 64)})
    ops = {n.op.name for n in cm.program.graph.nodes()}
    assert "ATTENTION" in ops and ("RMS_NORM" in ops or "LAYER_NORM" in ops), cm.report
    assert "SOFTMAX" not in ops and "ERF" not in ops, cm.report  # attention and GELU fused
    sess = ort_session(path)
    rng = np.random.default_rng(0)
    for seq in (7, 16):
        ids = rng.integers(0, 100, (2, seq)).astype(np.int64)
        mask = np.ones((2, seq), np.int64)
        mask[1, -3:] = 0
        want = sess.run(None, {"input_ids": ids, "attention_mask": mask})[0]
        got = cm(input_ids=ids, attention_mask=mask)[0]
        err = float(np.abs(got - want).max())
        assert err <= 1e-4, f"{name}/{exporter} seq={seq}: max abs error {err:.2e}"
