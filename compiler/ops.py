"""The op set of the llmc Graph IR and the typed attributes each op family carries.

Ops are enum members, never strings; every table that gives ops meaning (shape
inference, numpy reference, TVM lowering) is a dict keyed by `Op`, and a test checks the
tables cover the enum.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from .dtypes import DType
from .symbolic import Dim


class Op(enum.Enum):
    # sources
    INPUT = enum.auto()
    WEIGHT = enum.auto()
    CONST = enum.auto()  # scalar constant
    FULL = enum.auto()  # tensor filled with one value
    ARANGE = enum.auto()
    # elementwise unary
    NEG = enum.auto(); EXP = enum.auto(); LOG = enum.auto(); SQRT = enum.auto()
    RSQRT = enum.auto(); TANH = enum.auto(); ERF = enum.auto(); SIGMOID = enum.auto()
    RELU = enum.auto(); GELU = enum.auto(); SILU = enum.auto(); ABS = enum.auto()
    SIN = enum.auto(); COS = enum.auto(); RECIPROCAL = enum.auto(); NOT = enum.auto()
    CAST = enum.auto()
    # elementwise binary / ternary (numpy broadcasting)
    ADD = enum.auto(); SUB = enum.auto(); MUL = enum.auto(); DIV = enum.auto()
    POW = enum.auto(); MAXIMUM = enum.auto(); MINIMUM = enum.auto()
    EQ = enum.auto(); NE = enum.auto(); LT = enum.auto(); LE = enum.auto()
    GT = enum.auto(); GE = enum.auto(); AND = enum.auto(); OR = enum.auto()
    WHERE = enum.auto()
    # reductions and scans
    SUM = enum.auto(); MEAN = enum.auto(); MAX = enum.auto(); MIN = enum.auto()
    CUMSUM = enum.auto(); SOFTMAX = enum.auto()
    TOPK = enum.auto()  # (x) -> int64 indices of the k largest (smallest) along an axis, best first
    # linear algebra
    MATMUL = enum.auto()  # numpy matmul semantics (batched, broadcast leading dims)
    # (x [*, K], w [E, N, K] or [E, K, N], ids [*]) -> [*, N]: each row times the matrix its id
    # picks (mixture-of-experts); a kernel reads only the picked experts' weights
    ROUTED_MATMUL = enum.auto()
    # (x [*, K], qweight, scales[, zeros]) -> [*, N]: weight-only quantized matmul, x @ W^T with W
    # [N, K] dequantized from packed integers (layout: compiler/quant_layout.py; QMatmulAttrs)
    QMATMUL = enum.auto()
    # (qweight, ids, scales[, zeros]) -> [*ids, K]: rows of a quantized table W [N, K] picked by ids
    # and dequantized (an embedding whose table the LM head's QMATMUL reads too; QMatmulAttrs,
    # weight-only). Table first and ids second, as in TAKE along axis 0.
    QTAKE = enum.auto()
    # data movement
    RESHAPE = enum.auto(); PERMUTE = enum.auto(); EXPAND = enum.auto(); SLICE = enum.auto()
    CONCAT = enum.auto()
    TAKE = enum.auto()  # x.take(indices, axis): embedding, index_select, select-by-tensor
    INDEX = enum.auto()  # x[i0, i1, ...] advanced indexing of leading dims, broadcast indices
    GATHER = enum.auto()  # torch.gather(x, axis, index)
    # transformer building blocks (produced by the frontends or by fusion)
    LAYER_NORM = enum.auto()  # (x, weight, bias) over the last axis
    RMS_NORM = enum.auto()  # (x, weight) over the last axis
    ATTENTION = enum.auto()  # (q, k, v[, mask]) as [B, H, S, D]; GQA when k/v have fewer heads
    # (q [1, H, T, D], k, v [1, Hkv, T, D], kv_cache [pages, 2, page, Hkv, D], page_table [S, C] i32,
    # kv_lens [S] i32, q_starts [S + 1] i32) -> [1, H, T, D]: the step's tokens of S sequences on one
    # ragged axis; writes their K/V into the cache pages, then each token attends causally over its
    # sequence's whole history (made by passes/serve/derive_step.py; a runtime route on every device)
    PAGED_ATTENTION = enum.auto()
    # collectives over the ranks of a tensor-parallel group (made by passes/shard.py; a runtime route
    # on every device: NCCL on CUDA, the host communicator on the CPU)
    ALL_REDUCE = enum.auto()  # (x) -> x summed over the ranks
    ALL_GATHER = enum.auto()  # (x) -> [world, *x.shape]: every rank's x stacked in rank order
    # point-to-point between pipeline stages (made by passes/stage_split.py)
    SEND = enum.auto()  # (x) -> x: hands x to the next stage (the result is x itself, to keep it live)
    RECV = enum.auto()  # () -> the previous stage's SEND of the same tag; the type is carried in RecvAttrs


UNARY = frozenset({Op.NEG, Op.EXP, Op.LOG, Op.SQRT, Op.RSQRT, Op.TANH, Op.ERF, Op.SIGMOID, Op.RELU,
                   Op.GELU, Op.SILU, Op.ABS, Op.SIN, Op.COS, Op.RECIPROCAL, Op.NOT, Op.CAST})
BINARY = frozenset({Op.ADD, Op.SUB, Op.MUL, Op.DIV, Op.POW, Op.MAXIMUM, Op.MINIMUM, Op.EQ, Op.NE,
                    Op.LT, Op.LE, Op.GT, Op.GE, Op.AND, Op.OR})
COMPARE = frozenset({Op.EQ, Op.NE, Op.LT, Op.LE, Op.GT, Op.GE, Op.AND, Op.OR})
ELEMENTWISE = UNARY | BINARY | {Op.WHERE}
REDUCE = frozenset({Op.SUM, Op.MEAN, Op.MAX, Op.MIN})
SOURCES = frozenset({Op.INPUT, Op.WEIGHT, Op.CONST, Op.FULL, Op.ARANGE})
COLLECTIVES = frozenset({Op.ALL_REDUCE, Op.ALL_GATHER})
POINT_TO_POINT = frozenset({Op.SEND, Op.RECV})
# Ops whose output is the input's bytes reinterpreted: no kernel, an alias buffer.
VIEWS = frozenset({Op.RESHAPE})


# ---- attributes: one small frozen dataclass per op family -----------------------------
@dataclass(frozen=True)
class NoAttrs:
    pass


@dataclass(frozen=True)
class InputAttrs:
    name: str


@dataclass(frozen=True)
class WeightAttrs:
    name: str  # key into Graph.params
    # 2 of every 4 consecutive elements along the consuming matmul's K are exact zeros
    # (passes/sparsify.py): what a sparse tensor-core route may rely on
    sparse24: bool = False
    # stored [N, K] for GEMMs that read it through a (1, 0) permute, on purpose
    # (passes/gemm_weight_layout.py): simplify keeps that permute instead of folding it into a copy
    gemm_rows: bool = False


@dataclass(frozen=True)
class ConstAttrs:
    value: float | int | bool
    dtype: DType


@dataclass(frozen=True)
class FullAttrs:
    shape: tuple[Dim, ...]
    value: float | int | bool
    dtype: DType


@dataclass(frozen=True)
class ArangeAttrs:
    start: Dim
    end: Dim
    step: int
    dtype: DType


@dataclass(frozen=True)
class CastAttrs:
    dtype: DType


@dataclass(frozen=True)
class GeluAttrs:
    approximate: bool = False  # True: tanh approximation


@dataclass(frozen=True)
class ReduceAttrs:
    axes: tuple[int, ...]  # non-negative
    keepdims: bool


@dataclass(frozen=True)
class AxisAttrs:
    axis: int  # non-negative


@dataclass(frozen=True)
class ShapeAttrs:
    shape: tuple[Dim, ...]


@dataclass(frozen=True)
class PermuteAttrs:
    perm: tuple[int, ...]


@dataclass(frozen=True)
class SliceAttrs:
    axis: int
    start: Dim
    end: Dim
    step: int = 1


@dataclass(frozen=True)
class NormAttrs:
    eps: float


@dataclass(frozen=True)
class AttentionAttrs:
    scale: float
    causal: bool
    has_mask: bool  # the 4th input: bool (True = attend) or additive float, by its dtype


@dataclass(frozen=True)
class PagedAttentionAttrs:
    scale: float
    layer: int  # which KV cache input this is (for reports and the manifest's kv section)
    window: int = 0  # sliding window: a token at position p sees keys in (p - window, p]; 0: all
    # A quantized cache: I8 or F8E4M3 codes, the cache uint8 [pages, 2, page, kv_heads, head_dim + 4]
    # (each row's float32 scale after its codes: runtime/engine/kv_codec.py); None: k's own dtype.
    kv_store: DType | None = None


@dataclass(frozen=True)
class TopkAttrs:
    k: int
    axis: int  # non-negative
    largest: bool = True  # False: the k smallest
    # ties go to the lower index; NaN counts as larger than any number (torch's order)


@dataclass(frozen=True)
class RoutedMatmulAttrs:
    weight_nk: bool = True  # w is [E, N, K] (nn.Linear layout, y = x @ w[id].T); False: [E, K, N]


@dataclass(frozen=True)
class QMatmulAttrs:
    """Weight-only quantized matmul y = x @ W^T, W [N, K] stored output-channel major.

    bits 8: qweight int8 [N, K], W = q * scale, scales [N, K // group] (group = K: per channel).
    bits 4: qweight uint8 [N, K // 2], k = 2i in the low nibble of byte i, k = 2i + 1 in the
    high one, unsigned 0..15; W = (q - zero) * scale per group of `group` consecutive k, with
    scales and zeros [N, K // group] in the scales' float dtype; symmetric: zero = 8 and no
    zeros input. The dequantize is part of the op so kernels fold it into their loads.

    act_bits 8 (W8A8, with bits 8 and one scale per output channel): x is quantized too, per
    row (token), symmetric, at run time. The op's 4th input is the rows' scales sx [..., 1]
    (max|x_row| / 127, made by ordinary ops before it, so the reduction is its own kernel and the
    GEMM keeps one); xq = round-half-even(x / sx) clipped to [-127, 127];
    y = (xq @ q^T over the integer codes) * sx * scale. 0: x stays float.

    float8 (FP8, with act_bits 8 and one scale per output channel): qweight holds float8 e4m3fn
    bit patterns (uint8 [N, K]); x's rows are rounded to e4m3 (round-half-even) after dividing by
    sx = max|x_row| / 448 (e4m3's largest finite value); y = (x8 @ w8^T) * sx * scale."""
    bits: int  # 4 | 8
    group: int  # elements of K sharing one scale (and zero)
    symmetric: bool  # True: no zeros input (int8: zero 0; int4: zero 8)
    out_dtype: DType  # the activation / output float dtype
    act_bits: int = 0  # 0: weight-only; 8: per-token dynamic int8 activations (W8A8)
    float8: bool = False  # FP8: the codes are float8 e4m3fn bit patterns (uint8), both sides (act_bits 8)


@dataclass(frozen=True)
class CollectiveAttrs:
    world: int  # ranks in the group


@dataclass(frozen=True)
class SendAttrs:
    tag: int  # pairs a SEND with the RECV of the next stage
    peer: int  # the stage it goes to


@dataclass(frozen=True)
class RecvAttrs:
    tag: int
    peer: int  # the stage it comes from
    shape: tuple[Dim, ...]
    dtype: DType
