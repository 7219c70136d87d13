"""ONNX opset-23 transformer ops: Attention (to the IR's fused ATTENTION) and RotaryEmbedding.

The torch dynamo exporter emits these at opset_version >= 23.
"""
from __future__ import annotations

import math

from ...errors import LLMCError, UnsupportedOpError
from ..ops import AttentionAttrs, AxisAttrs, Op, SliceAttrs
from .onnx_context import NodeCtx, Val
from .onnx_rules import permute, reshape, rule


def _heads_first(x: NodeCtx, v: Val, heads: int | None, what: str) -> Val:
    """[B, S, H*D] -> [B, H, S, D] (4-D inputs pass through)."""
    if v.rank == 4:
        return v
    if v.rank != 3 or not heads or heads < 1:
        raise LLMCError(f"{what} must be 4-D, or 3-D with a positive num_heads attribute (got rank {v.rank})")
    b, s, hidden = v.shape
    if not isinstance(hidden, int) or hidden % heads:
        raise LLMCError(f"{what} hidden size {hidden} is not a multiple of {heads} heads")
    return permute(x, reshape(x, v, (b, s, heads, hidden // heads)), (0, 2, 1, 3))


def _heads_last(x: NodeCtx, v: Val) -> Val:
    """[B, H, S, D] -> [B, S, H*D]."""
    b, h, s, d = v.shape
    return reshape(x, permute(x, v, (0, 2, 1, 3)), (b, s, h * d))


@rule("Attention")
def _attention(x: NodeCtx):
    q3, k3, v3 = x.val(0), x.val(1), x.val(2)
    if not q3.rank == k3.rank == v3.rank:
        raise LLMCError("Q, K and V must have the same rank")
    q = _heads_first(x, q3, x.attr_int("q_num_heads"), "Q")
    k = _heads_first(x, k3, x.attr_int("kv_num_heads"), "K")
    v = _heads_first(x, v3, x.attr_int("kv_num_heads"), "V")
    if x.attr_float("softcap", 0.0) != 0.0 or x.attr_int("qk_matmul_output_mode", 0) != 0:
        raise UnsupportedOpError("Attention with softcap or a qk_matmul_output_mode is not supported")
    if len(x.proto.output) > 3 and x.proto.output[3]:
        raise UnsupportedOpError("Attention's qk_matmul_output is not supported")
    if x.has(6):
        raise UnsupportedOpError("Attention with nonpad_kv_seqlen is not supported")
    if x.has(4) != x.has(5):
        raise LLMCError("past_key and past_value must be given together")
    k_new_len = k.shape[2]
    if x.has(4):
        k = x.apply(Op.CONCAT, [x.val(4), k], AxisAttrs(2))
        v = x.apply(Op.CONCAT, [x.val(5), v], AxisAttrs(2))
    causal = bool(x.attr_int("is_causal", 0))
    # ONNX aligns the causal frontier after the past keys (key j <= query i + past); the IR
    # aligns it bottom-right (j <= i + total - queries): the same when the new keys and the
    # queries are equally many.
    if causal and k_new_len != q.shape[2]:
        raise UnsupportedOpError("causal Attention with a different number of new keys and queries")
    head = q.shape[3]
    if not isinstance(head, int) or head < 1:
        raise LLMCError(f"bad head size {head}")
    scale = x.attr_float("scale")
    scale = 1 / math.sqrt(head) if scale is None else scale
    mask = [x.val(3)] if x.has(3) else []
    if mask and mask[0].shape and not (mask[0].shape[-1] == k.shape[2] or mask[0].shape[-1] == 1):
        raise UnsupportedOpError(f"an attention mask shorter than the keys ({mask[0].shape[-1]} < {k.shape[2]})")
    y = x.apply(Op.ATTENTION, [q, k, v, *mask], AttentionAttrs(float(scale), causal, bool(mask)))
    if q3.rank == 3:
        y = _heads_last(x, y)
    return [y, k, v]


@rule("RotaryEmbedding")
def _rotary_embedding(x: NodeCtx):
    inp, cos, sin = x.val(0), x.val(1), x.val(2)
    v = _heads_first(x, inp, x.attr_int("num_heads"), "input")
    b, h, s, d = v.shape
    if not isinstance(d, int):
        raise LLMCError(f"symbolic head size {d}")
    rd = x.attr_int("rotary_embedding_dim", 0) or d
    if rd % 2 or not 0 < rd <= d:
        raise LLMCError(f"bad rotary_embedding_dim {rd} for head size {d}")
    half = rd // 2
    if x.has(3):  # caches indexed by position: [max_pos, rd/2] -> [B, S, rd/2]
        pos = x.val(3)
        cos = x.apply(Op.TAKE, [cos, pos], AxisAttrs(0))
        sin = x.apply(Op.TAKE, [sin, pos], AxisAttrs(0))
    if cos.rank != 3 or sin.shape != cos.shape or cos.shape[-1] != half:
        raise LLMCError(f"cos/sin caches {list(cos.shape)}/{list(sin.shape)} do not fit rotary dim {rd}")
    cos = reshape(x, cos, (cos.shape[0], 1, cos.shape[1], half))  # broadcast over heads
    sin = reshape(x, sin, (sin.shape[0], 1, sin.shape[1], half))

    def cut(t: Val, start: int, end: int, step: int = 1) -> Val:
        return x.apply(Op.SLICE, [t], SliceAttrs(3, start, end, step))

    interleaved = bool(x.attr_int("interleaved", 0))
    x1, x2 = (cut(v, 0, rd, 2), cut(v, 1, rd, 2)) if interleaved else (cut(v, 0, half), cut(v, half, rd))
    mul = lambda a, c: x.apply(Op.MUL, [a, c])  # noqa: E731
    real = x.apply(Op.SUB, [mul(cos, x1), mul(sin, x2)])
    imag = x.apply(Op.ADD, [mul(sin, x1), mul(cos, x2)])
    if interleaved:  # [..., half] pairs back to [..., rd] as (real0, imag0, real1, ...)
        pair = (b, h, s, half, 1)
        rot = x.apply(Op.CONCAT, [reshape(x, real, pair), reshape(x, imag, pair)], AxisAttrs(4))
        rot = reshape(x, rot, (b, h, s, rd))
    else:
        rot = x.apply(Op.CONCAT, [real, imag], AxisAttrs(3))
    if rd < d:
        rot = x.apply(Op.CONCAT, [rot, cut(v, rd, d)], AxisAttrs(3))
    return _heads_last(x, rot) if inp.rank == 3 else rot

