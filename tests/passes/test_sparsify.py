"""sparsify: 2:4 along K of the quantize pass's target matmuls; before/after on a hand-built
graph (against the numpy interpreter with the pruned weights), sparsegpt against
magnitude on calibration inputs, the compile keywords and their errors."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

import llmc
from llmc.compiler import ir
from llmc.compiler.dtypes import DType
from llmc.compiler.interpreter import interpret
from llmc.compiler.ir import Graph, TensorType, input_node, sym, weight_node
from llmc.compiler.ops import Op, PermuteAttrs
from llmc.compiler.quant_layout import dequantize
from llmc.compiler.symbolic import SymDim
from llmc.compiler.verifier import verify
from llmc.passes.quant import QuantScheme
from llmc.passes.quantize import quantize_weights
from llmc.passes.sparsify import SparsityScheme, magnitude_24, sparsegpt_24, sparsify_weights

from causal_lms import tiny_causal_lm


def mlp_graph(k: int = 64, hidden: int = 96, vocab: int = 40, seed: int = 0) -> Graph:
    """x -> up ([K, N] weight) -> relu -> down (nn.Linear layout through a permute) -> + x -> head (LM head)."""
    rng = np.random.default_rng(seed)
    b, s = sym("b"), sym("s")
    x = input_node("x", TensorType((b, s, k), DType.F32))
    params = {"up.weight": rng.standard_normal((k, hidden)).astype(np.float32),
              "down.weight": rng.standard_normal((k, hidden)).astype(np.float32),
              "head.weight": rng.standard_normal((k, vocab)).astype(np.float32)}
    w = {n: weight_node(n, TensorType(a.shape, x.dtype)) for n, a in params.items()}
    h = ir.node(Op.RELU, [ir.node(Op.MATMUL, [x, w["up.weight"]], where="mlp.up_proj")])
    wt = ir.node(Op.PERMUTE, [w["down.weight"]], PermuteAttrs((1, 0)))
    h = ir.node(Op.ADD, [ir.node(Op.MATMUL, [h, wt], where="mlp.down_proj"), x])
    out = ir.node(Op.MATMUL, [h, w["head.weight"]], where="lm_head")
    return Graph((x,), (out,), params, {"b": SymDim("b", 1, 2), "s": SymDim("s", 1, 32)})


def _zeros_per_4(w_nk: np.ndarray) -> np.ndarray:
    n, k = w_nk.shape
    return (w_nk.reshape(n, k // 4, 4) == 0).sum(-1)


def test_magnitude_keeps_the_two_largest_of_each_four():
    w = np.random.default_rng(0).standard_normal((16, 32))
    p = magnitude_24(w)
    assert np.all(_zeros_per_4(p) == 2)
    g, pg = np.abs(w).reshape(16, 8, 4), np.abs(p).reshape(16, 8, 4)
    kept_min = np.where(pg > 0, g, np.inf).min(-1)
    dropped_max = np.where(pg == 0, g, -np.inf).max(-1)
    assert np.all(kept_min >= dropped_max)  # never drops a larger one than it keeps
    np.testing.assert_array_equal(p[p != 0], w[p != 0])  # kept weights unchanged


def test_sparsegpt_lowers_output_error_below_magnitude():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((512, 64)) * np.linspace(0.2, 3.0, 64)  # uneven channels, as real activations
    x[:, 1:] += 0.5 * x[:, :-1]  # correlated: compensation has something to work with
    w = rng.standard_normal((24, 64))
    sg = sparsegpt_24(w, x.T @ x)
    assert np.all(_zeros_per_4(sg) >= 2)
    err = lambda v: float(np.mean((x @ v.T - x @ w.T) ** 2))  # noqa: E731
    assert err(sg) < 0.9 * err(magnitude_24(w))  # (0.83 with this seed)


def test_before_after_on_the_graph():
    g = mlp_graph()
    out, report = sparsify_weights(g, SparsityScheme())
    verify(out)
    assert Counter(n.op for n in out.nodes())[Op.MATMUL] == 3
    assert report.counts["pruned"] == 2 and report.counts["kept"] == 1 and "lm_head" in str(report)
    assert report.counts["zeros"] == report.counts["weights"] // 2
    up, down = out.params["up.weight.sparse24"], out.params["down.weight.sparse24"]
    assert np.all(_zeros_per_4(up.T) == 2) and np.all(_zeros_per_4(down) == 2)  # along K of each output row
    np.testing.assert_array_equal(out.params["head.weight"], g.params["head.weight"])  # the LM head stays dense
    marked = {n.attrs.name for n in out.nodes() if n.op is Op.WEIGHT and n.attrs.sparse24}
    assert marked == {"up.weight.sparse24", "down.weight.sparse24"}  # what a sparse GEMM route may rely on
    assert not any(n.op is Op.WEIGHT and n.attrs.sparse24 for n in g.nodes())
    # the pruned graph computes the original graph with the numpy-pruned weights
    ref = dict(g.params, **{"up.weight": magnitude_24(g.params["up.weight"].T).T,
                            "down.weight": magnitude_24(g.params["down.weight"])})
    x = np.random.default_rng(2).standard_normal((2, 5, 64)).astype(np.float32)
    np.testing.assert_allclose(interpret(out, [x])[0], interpret(Graph(g.inputs, g.outputs, ref, g.symbols), [x])[0],
                               rtol=1e-5, atol=1e-4)
    # int4 after 2:4 (rtn) keeps every pruned weight exactly zero
    q, _ = quantize_weights(out, QuantScheme("int4", 32))
    qn = next(n for n in q.nodes() if n.op is Op.QMATMUL and "down" in n.inputs[1].attrs.name)
    p = [q.params[i.attrs.name] for i in qn.inputs[1:]]
    assert np.all(dequantize(p[0], p[1], p[2], 4, 32)[down == 0] == 0)


def test_compile_keyword_and_errors(tmp_path):
    model = tiny_causal_lm("llama", tie_word_embeddings=True)
    ids = np.random.default_rng(3).integers(0, 96, (1, 11))
    cm = llmc.compile(model, (), {"input_ids": torch.tensor([[1, 2, 3]])}, dim_bounds={"batch": (1, 1), "seq": (1, 16)},
                      generate=False, sparsity="2:4")
    assert "pruned 8 matmuls to 2:4" in cm.report
    pruned = {n: a for n, a in cm.program.graph.params.items() if n.endswith(".sparse24")}
    assert len(pruned) == 8
    # torch with the same matmul weights pruned by magnitude gives the same logits
    with torch.no_grad():
        for name, mod in model.named_modules():
            if type(mod) is torch.nn.Linear and name != "lm_head":
                mod.weight.copy_(torch.from_numpy(magnitude_24(mod.weight.numpy().astype(np.float64))))
        want = model(input_ids=torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(cm(input_ids=ids)[0], want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    calib = tmp_path / "c.txt"
    calib.write_text("x = 1\n")
    for kw, msg in [({"sparsity": "1:4"}, "2:4 is"), ({"sparsity": "2:4", "method": "obs"}, "quantization method"),
                    ({"method": "sparsegpt"}, "sparsity='2:4'"),
                    ({"sparsity": "2:4", "method": "sparsegpt"}, "needs calibration text"),
                    ({"sparsity": "2:4", "method": "sparsegpt", "calib": str(tmp_path / "none.txt")}, "does not exist"),
                    ({"sparsity": "2:4", "quant": "int4", "method": "gptq", "calib": str(calib)}, "gptq")]:
        with pytest.raises(llmc.LLMCError, match=msg):
            llmc.compile(torch.nn.Linear(3, 3), (torch.zeros(1, 3),), **kw)  # refused before the capture


def test_cli_sparsity(tmp_path, capsys):
    from llmc.cli import main

    assert main(["compile", "tiny-llama", "-o", str(tmp_path / "bad"), "--sparsity", "2:4", "--method",
                 "sparsegpt"]) == 2
    err = capsys.readouterr().err
    assert "needs calibration text" in err and "loading" not in err  # refused before the model is loaded
    assert main(["compile", "tiny-llama", "-o", str(tmp_path / "s.llmc"), "--sparsity", "2:4", "--no-generate",
                 "--seq-len", "16"]) == 0
    from safetensors.numpy import load_file

    pruned = {k: v for k, v in load_file(tmp_path / "s.llmc" / "weights.safetensors").items() if "sparse24" in k}
    assert pruned and all(float((v == 0).mean()) == 0.5 for v in pruned.values())
    ids = np.array([[1, 2, 3]])
    assert llmc.load(tmp_path / "s.llmc")(input_ids=ids, attention_mask=np.ones_like(ids))[0].shape[:2] == (1, 3)
