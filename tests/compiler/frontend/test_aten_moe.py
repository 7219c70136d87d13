"""The ATen rules of aten_rules_moe (top-k, repeat_interleave by an int, in-place `/=`) and
the experts-implementation switch of moe_capture, through from_torch, against torch."""
import numpy as np
import pytest
import torch

from llmc.compiler.frontend.moe_capture import use_exportable_experts
from llmc.compiler.frontend.torch_export import from_torch
from llmc.compiler.interpreter import interpret
from llmc.compiler.ops import Op
from llmc.errors import UnsupportedOpError


def _check(module, x, shapes=((2, 5), (1, 1), (3, 7))):
    graph = from_torch(module, (x,))
    for b, s in shapes:
        xi = torch.randn(b, s, *x.shape[2:], generator=torch.Generator().manual_seed(b * 10 + s))
        with torch.no_grad():
            want = module(xi)
        want = want if isinstance(want, tuple) else (want,)
        got = interpret(graph, [xi.numpy()])
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert g.shape == tuple(w.shape) and g.dtype == w.numpy().dtype
            np.testing.assert_allclose(g, w.numpy(), rtol=1e-6, atol=1e-6)
    return graph


class Router(torch.nn.Module):
    def __init__(self, largest=True):
        super().__init__()
        self.largest = largest

    def forward(self, x):
        probs = x.softmax(-1)
        vals, idx = torch.topk(probs, 3, dim=-1, largest=self.largest)
        vals /= vals.sum(dim=-1, keepdim=True)  # python rebinds vals to div_'s result
        return vals, idx


@pytest.mark.parametrize("largest", [True, False])
def test_topk_values_and_indices(largest):
    graph = _check(Router(largest), torch.randn(2, 4, 8))
    ops = [n.op for n in graph.nodes()]
    assert ops.count(Op.TOPK) == 1 and ops.count(Op.GATHER) == 1  # values gathered by the indices


class TopkMiddleAxis(torch.nn.Module):
    def forward(self, x):
        return torch.topk(x, 2, dim=2).indices


def test_topk_on_a_static_middle_axis():
    _check(TopkMiddleAxis(), torch.randn(2, 3, 6, 4))


class TopkOverSeq(torch.nn.Module):
    def forward(self, x):
        return torch.topk(x, 1, dim=1).indices


def test_topk_along_a_symbolic_axis_is_refused_clearly():
    with pytest.raises(UnsupportedOpError, match="top-k along a symbolic axis"):
        from_torch(TopkOverSeq(), (torch.randn(2, 5, 4),))


class Repeat(torch.nn.Module):
    def forward(self, x):
        return x.repeat_interleave(3, dim=1), x.repeat_interleave(2, dim=-1), x.repeat_interleave(2)


def test_repeat_interleave_by_an_int():
    _check(Repeat(), torch.randn(2, 4, 5))


class InPlaceReadAfter(torch.nn.Module):
    def forward(self, x):
        y = x * 2
        z = y.div_(3.0 + x.abs())
        return z + y  # export makes this later read of y read the in-place node


class InPlaceThroughView(torch.nn.Module):
    def forward(self, x):
        y = x * 2
        v = y.view(-1, 5)
        z = y.div_(3.0 + x.abs())
        return z.view(-1, 5) + v  # a view taken before the update sees it


def test_in_place_update_read_afterwards():
    _check(InPlaceReadAfter(), torch.randn(2, 4, 5))


def test_in_place_update_seen_through_a_view_is_refused_or_right():
    try:
        graph = from_torch(InPlaceThroughView(), (torch.randn(2, 4, 5),))
    except UnsupportedOpError as e:
        assert "in-place" in str(e)
        return
    x = torch.randn(2, 3, 5)  # a broader in-place rule (aten_rules) took over: then it must be right
    np.testing.assert_allclose(interpret(graph, [x.numpy()])[0], InPlaceThroughView()(x).numpy(), rtol=1e-6)


def test_experts_switch_is_undone():
    import transformers as T

    cfg = T.MixtralConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                          num_key_value_heads=1, intermediate_size=8, num_local_experts=4, num_experts_per_tok=2)
    model = T.MixtralForCausalLM(cfg)
    before = model.get_experts_implementation()
    restore = use_exportable_experts(model)
    assert model.get_experts_implementation() == {"": "batched_mm"}
    restore()
    assert model.get_experts_implementation() == before
    dense = T.LlamaForCausalLM(T.LlamaConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1,
                                             num_attention_heads=2, intermediate_size=8))
    impl = dense.get_experts_implementation()
    use_exportable_experts(dense)()  # no experts blocks: left alone
    assert dense.get_experts_implementation() == impl
