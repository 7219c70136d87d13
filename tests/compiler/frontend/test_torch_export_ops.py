"""The torch.export frontend on small hand-written modules: op rules, names, dims, errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.export import Dim

from llmc.compiler.frontend.torch_export import from_torch
from llmc.compiler.interpreter import interpret
from llmc.compiler.verifier import verify
from llmc.errors import LLMCError, UnsupportedOpError


def _check(module, graph, *inputs, tol=1e-5):
    with torch.no_grad():
        ref = module(*inputs)
    ref = list(ref) if isinstance(ref, (tuple, list)) else [ref]
    out = interpret(graph, [t.numpy() for t in inputs])
    assert len(out) == len(ref)
    for o, r in zip(out, ref):
        assert o.shape == tuple(r.shape)
        assert o.dtype == r.numpy().dtype
        np.testing.assert_allclose(o.astype(np.float64), r.numpy().astype(np.float64), atol=tol, rtol=tol)


class KitchenSink(torch.nn.Module):
    """One module touching many rules that the HF models do not."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Linear(8, 8)
        self.ln = torch.nn.LayerNorm(8, elementwise_affine=False)
        self.register_buffer("table", torch.randn(10, 8))

    def forward(self, x, ids):  # x: f32[b, s, 8], ids: i64[b, s]
        b, s = x.shape[0], x.shape[1]
        h = self.ln(self.proj(x)) * s + (ids > 3).float().unsqueeze(-1)  # SymInt * tensor, bool -> float
        h = h + self.table[ids]  # index.Tensor on the leading dim
        cols = h[:, :, torch.tensor([0, 2, 5])]  # index with leading Nones
        a, c = h.chunk(2, dim=-1)
        g = F.gelu(a, approximate="tanh") * torch.sigmoid(c)
        q = g.view(b, s, 2, 2).transpose(1, 2)  # [b, 2, s, 2]
        k = q[:, :1]  # GQA: one kv head
        att = F.scaled_dot_product_attention(q, k, k, is_causal=True, enable_gqa=True)
        att = att.transpose(1, 2).reshape(b, s, 4)
        pos = torch.cumsum(ids.ne(0).long(), dim=1) - 1  # int arithmetic
        d = torch.diff(ids, dim=1)
        sm = torch.softmax(h.masked_fill(ids.unsqueeze(-1) == 0, -1e9), dim=-1)
        z = torch.where(pos.unsqueeze(-1) >= 0, sm, torch.zeros_like(sm)).amax(-1)
        last = h.select(1, -1) @ self.proj.weight.T  # select, matmul
        ratio = ids / 2  # int / int -> float
        g2 = torch.gather(h, 2, ids.unsqueeze(-1).clamp(0, 7))
        return att, cols, pos, d, z, last, ratio + 1, g2.squeeze(-1), 1 - x.sum(dim=(1, 2))


def test_kitchen_sink_matches_eager():
    m = KitchenSink().eval()
    x, ids = torch.randn(2, 6, 8), torch.randint(0, 10, (2, 6))
    graph = from_torch(m, (x, ids), dim_bounds={"seq": (3, 64)})  # diff guards seq - 1 != 1
    verify(graph)
    assert [i.attrs.name for i in graph.inputs] == ["x", "ids"]
    assert graph.output_names == tuple(f"output_{i}" for i in range(9))
    assert set(graph.params) == {"proj.weight", "proj.bias", "table", "lifted_tensor_0"}  # torch.tensor([0, 2, 5])
    for b, s in [(1, 5), (3, 9)]:
        x, ids = torch.randn(b, s, 8), torch.randint(0, 10, (b, s))
        ids[0, 0] = 0
        _check(m, graph, x, ids)


class Rotary(torch.nn.Module):
    """A no-grad region and a disabled-autocast region, as HF's rotary embeddings have."""

    def __init__(self):
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / (10000 ** (torch.arange(0, 8, 2).float() / 8)), persistent=False)

    def forward(self, x):
        pos = torch.arange(x.shape[1]).unsqueeze(0)
        with torch.no_grad(), torch.autocast("cpu", enabled=False):
            f = pos.unsqueeze(-1).float() * self.inv_freq
            emb = torch.cat([f, f], dim=-1)
        return x * emb.cos() + torch.cat([-x[..., 4:], x[..., :4]], dim=-1) * emb.sin()


def test_higher_order_regions_are_inlined():
    m = Rotary()
    graph = from_torch(m, (torch.randn(2, 5, 8),))
    verify(graph)
    assert "inv_freq" in graph.params
    _check(m, graph, torch.randn(1, 11, 8))


def test_user_dynamic_shapes_name_the_symbols():
    class Scale(torch.nn.Module):
        def forward(self, x):
            return x.reshape(-1) * 2.0

    tokens = Dim("tokens", min=2, max=100)
    graph = from_torch(Scale(), (torch.randn(4, 3),), dynamic_shapes=({0: tokens},))
    assert str(graph.inputs[0].type) == "f32[tokens, 3]"
    assert graph.symbols["tokens"].lo == 2 and graph.symbols["tokens"].hi == 100
    assert str(graph.outputs[0].type) == "f32[3*tokens]"
    _check(Scale(), graph, torch.randn(7, 3))


def test_dim_bounds_override_the_defaults():
    graph = from_torch(torch.nn.Linear(4, 4), (torch.randn(2, 3, 4),), dim_bounds={"seq": (1, 100)})
    assert (graph.symbols["seq"].lo, graph.symbols["seq"].hi) == (1, 100)
    assert graph.symbols["batch"].hi == 64
    with pytest.raises(ValueError, match="unknown dim"):
        from_torch(torch.nn.Linear(4, 4), (torch.randn(2, 3, 4),), dim_bounds={"tokens": (1, 100)})


def test_example_dims_of_size_one_are_rejected_clearly():
    with pytest.raises(LLMCError, match="batch >= 2"):
        from_torch(torch.nn.Linear(4, 4), (torch.randn(1, 3, 4),))


def test_bounds_narrowed_to_what_the_model_supports():
    class Positions(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.pos = torch.nn.Parameter(torch.randn(1, 32, 4))

        def forward(self, x):
            return x + self.pos[:, : x.shape[1]]

    m = Positions()
    with pytest.warns(UserWarning, match="only supports"):
        graph = from_torch(m, (torch.randn(2, 5, 4),))
    assert graph.symbols["seq"].hi == 32
    verify(graph)
    _check(m, graph, torch.randn(2, 32, 4))


class Sorter(torch.nn.Module):
    def forward(self, x):
        return torch.sort(x, dim=-1).values + 1


class FFT(torch.nn.Module):
    def forward(self, x):
        return torch.fft.rfft(x).abs()


class Wrapper(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = torch.nn.Sequential(torch.nn.Identity(), inner)

    def forward(self, x):
        return self.inner(x * 2)


@pytest.mark.parametrize("inner, op", [(Sorter(), "aten.sort"), (FFT(), "aten.fft_rfft")])
def test_unsupported_op_names_op_and_module(inner, op):
    with pytest.raises(UnsupportedOpError) as err:
        from_torch(Wrapper(inner), (torch.randn(2, 3, 8),))
    msg = str(err.value)
    assert op in msg
    assert "inner.1" in msg and type(inner).__name__ in msg
    assert "test_torch_export_ops.py" in msg  # the source line
