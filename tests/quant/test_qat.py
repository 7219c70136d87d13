"""llmc.quant (QAT): prepare_qat swaps the linears the quantize pass would quantize for
fake-quantized ones (RTN-initialised, straight-through rounding, learnable scales);
convert puts the learned grid into plain weights; llmc's int4/int8 artifact of the
converted model computes the fake-quantized torch model's logits."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import llmc
import llmc.quant as Q
from llmc.compiler.ops import Op
from llmc.compiler.quant_layout import dequantize
from llmc.passes.quant import QuantScheme
from llmc.passes.quant.learned import GridEntry
from llmc.passes.quant.rtn import rtn

from causal_lms import VOCAB, tiny_causal_lm

BOUNDS = {"batch": (1, 2), "seq": (1, 16)}


def _finetune(model, steps: int = 12, seed: int = 0) -> float:
    """A few Adam steps on random tokens (moves weights and scales); returns the first loss."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, VOCAB, (4, 16), generator=g)
    scales = list(Q.scale_parameters(model))
    ids = {id(p) for p in scales}
    opt = torch.optim.Adam([{"params": [p for p in model.parameters() if id(p) not in ids], "lr": 1e-2},
                            {"params": scales, "lr": 1e-3}])
    model.train()
    first = None
    for _ in range(steps):
        loss = model(input_ids=x, labels=x).loss
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return first, loss.item()


def test_prepare_swaps_the_pass_targets_and_starts_at_rtn():
    model = tiny_causal_lm("llama", tie_word_embeddings=True)
    qat = Q.prepare_qat(model, "int4", group=32)
    fq = {n: m for n, m in qat.named_modules() if isinstance(m, Q.FakeQuantLinear)}
    assert len(fq) == 2 * 7  # q, k, v, o, gate, up, down per layer
    assert type(qat.lm_head) is torch.nn.Linear and qat.lm_head.weight is qat.model.embed_tokens.weight  # tied: kept
    assert not any(isinstance(m, Q.FakeQuantLinear) for m in model.modules())  # the original is untouched
    # untrained, the fake weight is llmc's RTN dequantization (the quantize pass's --method rtn)
    m = fq["model.layers.1.mlp.down_proj"]
    want = rtn(m.weight.detach().double().numpy(), 4, 32, False, np.float32).dequantize(32, 4)
    np.testing.assert_allclose(m.fake_weight().detach().numpy(), want, rtol=1e-6, atol=1e-7)
    # an untied LM head is the model's output embedding: kept too, unless asked for
    untied = tiny_causal_lm("llama")
    assert type(Q.prepare_qat(untied, "int4", group=32).lm_head) is torch.nn.Linear
    head = Q.prepare_qat(untied, QuantScheme("int4", 32, quantize_lm_head=True)).lm_head
    assert isinstance(head, Q.FakeQuantLinear)


def test_straight_through_gradients_reach_weights_and_scales():
    qat = Q.prepare_qat(tiny_causal_lm("llama", tie_word_embeddings=True), "int4", group=32)
    x = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(3))
    qat(input_ids=x, labels=x).loss.backward()
    m = qat.model.layers[0].self_attn.q_proj
    assert m.weight.grad is not None and m.weight.grad.abs().sum() > 0  # round() alone would give zero
    assert m.weight_scale.grad is not None and m.weight_scale.grad.abs().sum() > 0
    first, last = _finetune(qat)
    assert last < 0.7 * first  # fine-tuning through the fake quantization learns


@pytest.mark.parametrize("kind,group,sym", [("int4", 32, False), ("int8", None, True)])
def test_compiled_converted_model_equals_fake_quantized_torch(kind, group, sym):
    torch.manual_seed(0)
    qat = Q.prepare_qat(tiny_causal_lm("llama", tie_word_embeddings=True), kind, group=group, symmetric=sym)
    init = {n: p.detach().clone() for n, p in qat.named_parameters() if n.endswith("weight_scale")}
    _finetune(qat)
    moved = max(float((p.detach() - init[n]).abs().max() / init[n].abs().max()) for n, p in qat.named_parameters()
                if n.endswith("weight_scale"))
    assert moved > 1e-3  # the scales were learned, not left at their RTN start
    plain, grid = Q.convert(qat)
    assert not any(isinstance(m, Q.FakeQuantLinear) for m in plain.modules()) and len(grid.entries) == 14
    ids = torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        want = qat(input_ids=ids).logits.numpy()
        assert torch.equal(plain(input_ids=ids).logits, torch.from_numpy(want))  # on-grid weights: the same model
    cm = llmc.compile(plain, (), {"input_ids": torch.tensor([[1, 2, 3]])}, dim_bounds=BOUNDS, generate=False,
                      quant=grid)
    assert cm.manifest["quantization"]["method"] == "qat" and cm.manifest["quantization"]["quantized_matmuls"] == 8
    got = cm(input_ids=ids.numpy())[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    # the stored codes are the fake quantizer's: the packed q/k/v weight dequantizes to the converted rows
    g = cm.program.graph
    qkv = next(n for n in g.nodes() if n.op is Op.QMATMUL and "q_proj" in n.inputs[1].attrs.name
               and "layers.0" in n.inputs[1].attrs.name)
    p = [g.params[i.attrs.name] for i in qkv.inputs[1:]]
    w = dequantize(p[0], p[1], p[2] if len(p) > 2 else None, qkv.attrs.bits, qkv.attrs.group, np.float32)
    att = plain.model.layers[0].self_attn
    rows = torch.cat([att.q_proj.weight, att.k_proj.weight, att.v_proj.weight]).detach().numpy()
    np.testing.assert_array_equal(w, rows)
    if kind == "int4":  # and the learned grid is not the one RTN would pick for the same weights
        again = rtn(rows.astype(np.float64), 4, 32, False, np.float32).dequantize(32, 4)
        assert np.abs(again - rows).max() > 0


def test_errors_before_work():
    model = tiny_causal_lm("llama", tie_word_embeddings=True)
    with pytest.raises(llmc.LLMCError, match="does not divide the input size K"):
        Q.prepare_qat(model, "int4", group=128)  # K = 32 / 64
    with pytest.raises(llmc.LLMCError, match="not built yet"):
        Q.prepare_qat(model, "fp8")
    with pytest.raises(llmc.LLMCError, match="no FakeQuantLinear"):
        Q.convert(model)
    with pytest.raises(llmc.LLMCError, match="LearnedGrid"):
        llmc.compile(model, (), {"input_ids": torch.tensor([[1, 2]])}, quant="int4", method="qat")
    plain, grid = Q.convert(Q.prepare_qat(model, "int4", group=32))
    name = "model.layers.1.self_attn.o_proj.weight"
    e = grid.entries[name]
    grid.entries[name] = GridEntry(e.weight, e.scales * 1.01, e.zeros)  # rows found, scales not theirs
    with pytest.raises(llmc.LLMCError, match="not on its learned grid"):
        llmc.compile(plain, (), {"input_ids": torch.tensor([[1, 2]])}, dim_bounds=BOUNDS, generate=False, quant=grid)
    grid.entries[name] = e
    with torch.no_grad():
        plain.model.layers[0].mlp.up_proj.weight.add_(1e-3)  # changed after convert: off its grid
    with pytest.raises(llmc.LLMCError, match="no learned scales"):
        llmc.compile(plain, (), {"input_ids": torch.tensor([[1, 2]])}, dim_bounds=BOUNDS, generate=False, quant=grid)
