"""Hand-built test graphs spelling transformer pieces the way HF eager code does."""
from __future__ import annotations

import math
from collections import Counter

import numpy as np

from llmc.compiler import ir
from llmc.compiler.dtypes import DType
from llmc.compiler.interpreter import interpret
from llmc.compiler.ir import Graph, Node, TensorType, input_node, sym, weight_node
from llmc.compiler.ops import (ArangeAttrs, AxisAttrs, CastAttrs, ConstAttrs, FullAttrs, Op,
                               PermuteAttrs, ReduceAttrs, ShapeAttrs, SliceAttrs)
from llmc.compiler.symbolic import SymDim, evaluate

F32, F16, I64, BOOL = DType.F32, DType.F16, DType.I64, DType.BOOL


class GB:
    """A tiny graph builder: inputs, seeded random weights, and one method per op family."""

    def __init__(self, seq_hi: int = 16, batch_hi: int = 2, seed: int = 0) -> None:
        self.inputs: list[Node] = []
        self.params: dict[str, np.ndarray] = {}
        self.symbols = {"b": SymDim("b", 1, batch_hi), "s": SymDim("s", 1, seq_hi)}
        self.rng = np.random.default_rng(seed)
        self.where = ""

    # sources
    def input(self, name: str, shape, dtype=F32) -> Node:
        n = input_node(name, TensorType(tuple(shape), dtype))
        self.inputs.append(n)
        return n

    def weight(self, name: str, shape, dtype=F32, scale: float = 0.3, offset: float = 0.0) -> Node:
        self.params[name] = (self.rng.standard_normal(shape) * scale + offset).astype(dtype.numpy)
        return weight_node(name, TensorType(tuple(shape), dtype))

    def c(self, v, dtype=F32) -> Node:
        return ir.node(Op.CONST, [], ConstAttrs(v, dtype))

    def full(self, shape, v, dtype=F32) -> Node:
        return ir.node(Op.FULL, [], FullAttrs(tuple(shape), v, dtype))

    def arange(self, end, dtype=I64) -> Node:
        return ir.node(Op.ARANGE, [], ArangeAttrs(0, end, 1, dtype))

    def op(self, op: Op, *inputs, attrs=None) -> Node:
        ins = [i if isinstance(i, Node) else self.c(float(i)) for i in inputs]
        return ir.node(op, ins, attrs, self.where)

    # conveniences
    def add(self, a, b): return self.op(Op.ADD, a, b)
    def sub(self, a, b): return self.op(Op.SUB, a, b)
    def mul(self, a, b): return self.op(Op.MUL, a, b)
    def div(self, a, b): return self.op(Op.DIV, a, b)
    def un(self, op, a): return self.op(op, a)
    def cast(self, a, dt): return self.op(Op.CAST, a, attrs=CastAttrs(dt))
    def mean(self, a, keep=True): return self.op(Op.MEAN, a, attrs=ReduceAttrs((a.type.rank - 1,), keep))
    def sum(self, a, keep=True): return self.op(Op.SUM, a, attrs=ReduceAttrs((a.type.rank - 1,), keep))
    def reshape(self, a, shape): return self.op(Op.RESHAPE, a, attrs=ShapeAttrs(tuple(shape)))
    def expand(self, a, shape): return self.op(Op.EXPAND, a, attrs=ShapeAttrs(tuple(shape)))
    def permute(self, a, perm): return self.op(Op.PERMUTE, a, attrs=PermuteAttrs(tuple(perm)))
    def slice(self, a, axis, start, end): return self.op(Op.SLICE, a, attrs=SliceAttrs(axis, start, end))
    def concat(self, xs, axis): return ir.node(Op.CONCAT, xs, AxisAttrs(axis), self.where)
    def softmax(self, a): return self.op(Op.SOFTMAX, a, attrs=AxisAttrs(a.type.rank - 1))
    def matmul(self, a, b): return self.op(Op.MATMUL, a, b)
    def where_(self, c, a, b): return self.op(Op.WHERE, c, a, b)

    def linear(self, x: Node, name: str, k: int, n: int, bias: bool = False) -> Node:
        """torch nn.Linear as export shows it: x @ W.T (+ b), W stored [out, in]."""
        w = self.weight(f"{name}.weight", (n, k))
        y = self.matmul(x, self.permute(w, (1, 0)))
        return self.add(y, self.weight(f"{name}.bias", (n,))) if bias else y

    def graph(self, *outputs: Node) -> Graph:
        return Graph(tuple(self.inputs), tuple(outputs), dict(self.params), dict(self.symbols))


# ---- spelled-out pieces ---------------------------------------------------------------
def hf_rms_norm(g: GB, x: Node, name: str, eps: float = 1e-6) -> Node:
    """HF LlamaRMSNorm: upcast, pow(2).mean, * rsqrt(var + eps), downcast, weight *."""
    w = g.weight(f"{name}.weight", (x.shape[-1],), offset=1.0)
    x32 = g.cast(x, F32)
    var = g.mean(g.op(Op.POW, x32, 2.0))
    h = g.mul(x32, g.un(Op.RSQRT, g.add(var, eps)))
    return g.mul(w, g.cast(h, x.dtype))


def rms_norm_div(g: GB, x: Node, name: str, eps: float = 1e-5) -> Node:
    """x / sqrt(sum(x*x)/D + eps) * w."""
    w = g.weight(f"{name}.weight", (x.shape[-1],), offset=1.0)
    ms = g.div(g.sum(g.mul(x, x)), float(x.shape[-1]))
    return g.mul(g.div(x, g.un(Op.SQRT, g.add(ms, eps))), w)


def layer_norm_spelled(g: GB, x: Node, name: str, eps: float = 1e-12, style: str = "div") -> Node:
    w = g.weight(f"{name}.weight", (x.shape[-1],), offset=1.0)
    b = g.weight(f"{name}.bias", (x.shape[-1],))
    d = g.sub(x, g.mean(x))
    var = g.mean(g.op(Op.POW, d, 2.0) if style == "div" else g.mul(d, d))
    if style == "div":
        y = g.div(d, g.un(Op.SQRT, g.add(var, eps)))
    else:
        y = g.mul(d, g.div(1.0, g.un(Op.SQRT, g.add(eps, var))))
    return g.add(g.mul(y, w), b)


def gelu_exact(g: GB, x: Node) -> Node:
    return g.mul(g.mul(x, 0.5), g.add(1.0, g.un(Op.ERF, g.div(x, math.sqrt(2.0)))))


def gelu_tanh(g: GB, x: Node) -> Node:
    inner = g.mul(math.sqrt(2 / math.pi), g.add(x, g.mul(0.044715, g.op(Op.POW, x, 3.0))))
    return g.mul(g.mul(0.5, x), g.add(1.0, g.un(Op.TANH, inner)))


def silu(g: GB, x: Node) -> Node:
    return g.mul(x, g.un(Op.SIGMOID, x))


def rotate_half(g: GB, x: Node) -> Node:
    d = x.shape[-1]
    x1, x2 = g.slice(x, 3, 0, d // 2), g.slice(x, 3, d // 2, d)
    return g.concat([g.un(Op.NEG, x2), x1], 3)


def rotary(g: GB, x: Node, cos: Node, sin: Node) -> Node:
    return g.add(g.mul(x, cos), g.mul(rotate_half(g, x), sin))


def repeat_kv(g: GB, x: Node, n_rep: int) -> Node:
    """HF repeat_kv: x[:, :, None].expand(b, hk, n_rep, s, d).reshape(b, hk * n_rep, s, d)."""
    b, hk, s, d = x.shape
    y = g.reshape(x, (b, hk, 1, s, d))
    return g.reshape(g.expand(y, (b, hk, n_rep, s, d)), (b, hk * n_rep, s, d))


def causal_mask(g: GB, s, dtype=F32, kind: str = "add") -> Node:
    """[1, 1, s, s] causal mask built from arange comparisons (a pure function of s)."""
    i = g.reshape(g.arange(s), (s, 1))
    j = g.reshape(g.arange(s), (1, s))
    keep = g.op(Op.LE, j, i)
    if kind == "bool":
        m = keep
    else:
        m = g.where_(keep, g.c(0.0, dtype), g.c(float(np.finfo(np.float32).min), dtype))
    return g.reshape(m, (1, 1, s, s))


def explicit_attention(g: GB, q: Node, k: Node, v: Node, mask: Node | None = None, mask_kind: str = "add",
                       scale_style: str = "mul") -> Node:
    """eager attention: softmax(q k^T * scale + mask) v, softmax in f32 and cast back."""
    d = q.shape[-1]
    s = g.matmul(q, g.permute(k, (0, 1, 3, 2)))
    s = g.mul(s, 1 / math.sqrt(d)) if scale_style == "mul" else g.div(s, math.sqrt(d))
    if mask is not None:
        if mask_kind == "add":
            s = g.add(s, mask)
        elif mask_kind == "bool":
            s = g.where_(mask, s, float("-inf"))
        else:  # masked_fill(~mask, min)
            s = g.where_(g.un(Op.NOT, mask), float(np.finfo(np.float32).min), s)
    p = g.cast(g.softmax(g.cast(s, F32)), q.dtype)
    return g.matmul(p, v)


def heads(g: GB, x: Node, h: int, d: int) -> Node:
    b, s, _ = x.shape
    return g.permute(g.reshape(x, (b, s, h, d)), (0, 2, 1, 3))


def unheads(g: GB, x: Node) -> Node:
    b, h, s, d = x.shape
    return g.reshape(g.permute(x, (0, 2, 1, 3)), (b, s, h * d))


def llama(n_layers: int = 2, hidden: int = 32, n_heads: int = 4, n_kv: int = 2, inter: int = 48,
          vocab: int = 50, seq_hi: int = 16) -> Graph:
    """A Llama-style decoder spelled as HF eager code: rms norms, rotary, repeat_kv, causal
    mask from arange, SwiGLU with x * sigmoid(x), untied lm_head."""
    g = GB(seq_hi=seq_hi)
    b, s = sym("b"), sym("s")
    d = hidden // n_heads
    ids = g.input("input_ids", (b, s), I64)
    emb = g.weight("model.embed_tokens.weight", (vocab, hidden))
    h = g.op(Op.TAKE, emb, ids, attrs=AxisAttrs(0))
    g.where = "model.rotary_emb"
    inv_freq = g.weight("model.rotary_emb.inv_freq", (1, d // 2))
    pos = g.reshape(g.cast(g.arange(s), F32), (s, 1))
    freqs = g.matmul(pos, inv_freq)  # [s, d/2]
    emb_f = g.concat([freqs, freqs], 1)
    cos, sin = g.reshape(g.un(Op.COS, emb_f), (1, 1, s, d)), g.reshape(g.un(Op.SIN, emb_f), (1, 1, s, d))
    mask = causal_mask(g, s)
    for i in range(n_layers):
        p = f"model.layers.{i}"
        g.where = f"{p}.input_layernorm"
        x = hf_rms_norm(g, h, f"{p}.input_layernorm")
        g.where = f"{p}.self_attn"
        q = heads(g, g.linear(x, f"{p}.self_attn.q_proj", hidden, n_heads * d), n_heads, d)
        k = heads(g, g.linear(x, f"{p}.self_attn.k_proj", hidden, n_kv * d), n_kv, d)
        v = heads(g, g.linear(x, f"{p}.self_attn.v_proj", hidden, n_kv * d), n_kv, d)
        q, k = rotary(g, q, cos, sin), rotary(g, k, cos, sin)
        k, v = repeat_kv(g, k, n_heads // n_kv), repeat_kv(g, v, n_heads // n_kv)
        a = unheads(g, explicit_attention(g, q, k, v, mask))
        h = g.add(h, g.linear(a, f"{p}.self_attn.o_proj", n_heads * d, hidden))
        g.where = f"{p}.post_attention_layernorm"
        x = hf_rms_norm(g, h, f"{p}.post_attention_layernorm")
        g.where = f"{p}.mlp"
        gate = g.linear(x, f"{p}.mlp.gate_proj", hidden, inter)
        up = g.linear(x, f"{p}.mlp.up_proj", hidden, inter)
        h = g.add(h, g.linear(g.mul(silu(g, gate), up), f"{p}.mlp.down_proj", inter, hidden))
    g.where = "model.norm"
    h = hf_rms_norm(g, h, "model.norm")
    g.where = "lm_head"
    return g.graph(g.linear(h, "lm_head", hidden, vocab))


def minilm(n_layers: int = 2, hidden: int = 32, n_heads: int = 4, inter: int = 64, vocab: int = 50,
           seq_hi: int = 16) -> Graph:
    """A BERT/MiniLM-style encoder: spelled LayerNorm, exact GELU, additive padding mask
    from an input, attention divided by sqrt(d), biases everywhere."""
    g = GB(seq_hi=seq_hi)
    b, s = sym("b"), sym("s")
    d = hidden // n_heads
    ids = g.input("input_ids", (b, s), I64)
    am = g.input("attention_mask", (b, s), I64)
    g.where = "embeddings"
    h = g.op(Op.TAKE, g.weight("embeddings.word_embeddings.weight", (vocab, hidden)), ids, attrs=AxisAttrs(0))
    pos = g.op(Op.TAKE, g.weight("embeddings.position_embeddings.weight", (seq_hi, hidden)), g.arange(s),
               attrs=AxisAttrs(0))
    h = layer_norm_spelled(g, g.add(h, pos), "embeddings.LayerNorm")
    ext = g.mul(g.sub(1.0, g.cast(g.reshape(am, (b, 1, 1, s)), F32)), float(np.finfo(np.float32).min))
    for i in range(n_layers):
        p = f"encoder.layer.{i}"
        g.where = f"{p}.attention"
        q = heads(g, g.linear(h, f"{p}.attention.self.query", hidden, hidden, bias=True), n_heads, d)
        k = heads(g, g.linear(h, f"{p}.attention.self.key", hidden, hidden, bias=True), n_heads, d)
        v = heads(g, g.linear(h, f"{p}.attention.self.value", hidden, hidden, bias=True), n_heads, d)
        a = unheads(g, explicit_attention(g, q, k, v, ext, scale_style="div"))
        a = g.linear(a, f"{p}.attention.output.dense", hidden, hidden, bias=True)
        h = layer_norm_spelled(g, g.add(a, h), f"{p}.attention.output.LayerNorm", style="mul" if i % 2 else "div")
        g.where = f"{p}.intermediate"
        m = gelu_exact(g, g.linear(h, f"{p}.intermediate.dense", hidden, inter, bias=True))
        g.where = f"{p}.output"
        m = g.linear(m, f"{p}.output.dense", inter, hidden, bias=True)
        h = layer_norm_spelled(g, g.add(m, h), f"{p}.output.LayerNorm")
    return g.graph(h)


# ---- checks ---------------------------------------------------------------------------
def counts(graph: Graph) -> Counter:
    return Counter(n.op for n in graph.nodes())


def random_inputs(graph: Graph, env: dict[str, int], seed: int = 1, vocab: int = 50) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for n in graph.inputs:
        shape = [evaluate(d, env) for d in n.shape]
        if n.dtype is I64:
            arr = rng.integers(0, vocab, size=shape).astype(np.int64)
            if n.attrs.name == "attention_mask":
                arr = np.ones(shape, np.int64)
                arr[..., -1:] = 0
        elif n.dtype is BOOL:
            arr = rng.random(shape) < 0.7
        else:
            arr = rng.standard_normal(shape).astype(n.dtype.numpy)
        out.append(arr)
    return out


def assert_same(before: Graph, after: Graph, envs=({"b": 2, "s": 5}, {"b": 1, "s": 3}), tol: float = 1e-4) -> None:
    for k, env in enumerate(envs):
        xs = random_inputs(before, env, seed=k)
        for a, b in zip(interpret(before, xs), interpret(after, xs)):
            assert a.shape == b.shape and a.dtype == b.dtype
            np.testing.assert_allclose(b.astype(np.float64), a.astype(np.float64), rtol=tol, atol=tol)
