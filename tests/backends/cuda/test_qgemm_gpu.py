"""GPU checks of the tensor-core quantized matmuls (backends/cuda/shim/llmc_qgemm.cu):
llmc_qgemm_a8 (W8A8 int8 and FP8 e4m3, activations quantized per row at run time) against the
numpy reference of Op.QMATMUL (compiler/reference.py: integer / float8 products of the same codes,
then both scales), and llmc_qgemv's many-row path (weights dequantized into a scratch slab, then
cuBLASLt) against the numpy dequantization. x and y bfloat16 or float16."""
import numpy as np
import pytest

from llmc.compiler.ops import QMatmulAttrs
from llmc.compiler.dtypes import DType
from llmc.compiler.quant_layout import E4M3_MAX, dequantize, float8_codes, pack_int4, row_scales
from llmc.compiler.reference import REFERENCE
from llmc.compiler.ops import Op

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _rel(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("float8", [0, 1])
@pytest.mark.parametrize("rows,n,k", [(1, 2048, 2048), (7, 256, 512), (33, 200, 320), (512, 3072, 2048),
                                      (4096, 1024, 1024)])
@pytest.mark.parametrize("given_sx,residual", [(True, False), (False, False), (False, True)])
def test_qgemm_a8_matches_reference(shim, dtype, float8, rows, n, k, given_sx, residual):
    """given_sx False: the call computes the rows' scales itself (the route that absorbs the
    graph's abs/max/maximum/div), the same values the graph's ops give; residual: y gets r added
    (the route that takes the graph's ADD into the call)."""
    rng = np.random.default_rng(rows + n + k + float8)
    w = rng.standard_normal((n, k)).astype(np.float32) * 0.05
    qmax = E4M3_MAX if float8 else 127.0
    scales = (np.abs(w).max(axis=1, keepdims=True) / qmax).astype(np.float32)
    s_dev = torch.from_numpy(scales).to(dtype)
    s_seen = s_dev.float().numpy()  # the scales as the kernel reads them (rounded to x's dtype)
    qweight = float8_codes(w / s_seen) if float8 else np.clip(np.rint(w / s_seen), -127, 127).astype(np.int8)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(n)).to(dtype)
    x[:, 3] *= 20  # an outlier channel, as in real activations
    xn = x.float().numpy()
    sx = torch.from_numpy(row_scales(xn, qmax)).to(dtype)  # what the graph's ops compute, in x's dtype
    attrs = QMatmulAttrs(8, k, True, DType.BF16, 8, bool(float8))
    ref = REFERENCE[Op.QMATMUL](attrs, xn, qweight, s_seen, sx.float().numpy())
    r = torch.randn(rows, n, generator=torch.Generator().manual_seed(k)).to(dtype) if residual else None
    if r is not None:
        ref = ref + r.double().numpy()
    y = torch.full((rows, n), float("nan"), dtype=dtype, device="cuda")
    shim["llmc_qgemm_a8"](x.cuda(), torch.from_numpy(qweight.view(np.uint8) if float8 else qweight).cuda(),
                          s_dev.cuda(), sx.cuda() if given_sx else None, None if r is None else r.cuda(), y, float8,
                          1e-6, qmax)
    torch.cuda.synchronize()
    err = _rel(y.double().cpu().numpy(), ref)
    assert err < 5e-3, err


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits,symmetric", [(4, True), (4, False), (8, True)])
@pytest.mark.parametrize("rows,n,k,group", [(64, 300, 256, 64), (512, 2048, 2048, 128), (200, 8200, 1024, 32)])
def test_qgemv_many_rows_dequantize_then_gemm(shim, dtype, bits, symmetric, rows, n, k, group):
    """From 64 rows on llmc_qgemv dequantizes W into scratch slabs and runs cuBLASLt."""
    rng = np.random.default_rng(rows * n + k)
    if bits == 4:
        qweight = pack_int4(rng.integers(0, 16, (n, k)))
        group_ = group
    else:
        qweight = rng.integers(-127, 128, (n, k)).astype(np.int8)
        group_ = k
    scales = torch.from_numpy((rng.random((n, k // group_)) * 0.02 + 0.005).astype(np.float32)).to(dtype)
    zeros = None if symmetric or bits == 8 else torch.from_numpy(
        rng.integers(0, 16, (n, k // group_)).astype(np.float32)).to(dtype)
    w = dequantize(qweight, scales.float().numpy(), None if zeros is None else zeros.float().numpy(), bits, group_)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(n)).to(dtype)
    ref = x.double().numpy() @ w.T
    y = torch.full((rows, n), float("nan"), dtype=dtype, device="cuda")
    shim["llmc_qgemv"](x.cuda(), torch.from_numpy(qweight).cuda(), scales.cuda(),
                       None if zeros is None else zeros.cuda(), y, bits, group_)
    torch.cuda.synchronize()
    err = _rel(y.double().cpu().numpy(), ref)
    assert err < 5e-3, err


def test_qgemm_a8_refuses_bad_arguments(shim):
    x = torch.randn(2, 24, device="cuda", dtype=torch.bfloat16)
    qw = torch.zeros(64, 24, dtype=torch.uint8, device="cuda")
    s = torch.ones(64, 1, dtype=torch.bfloat16, device="cuda")
    sx = torch.ones(2, 1, dtype=torch.bfloat16, device="cuda")
    y = torch.empty(2, 64, dtype=torch.bfloat16, device="cuda")
    with pytest.raises(Exception, match="multiple of 16"):
        shim["llmc_qgemm_a8"](x, qw, s, sx, None, y, 1, 1e-6, 448.0)
    x, qw = torch.randn(2, 32, device="cuda", dtype=torch.bfloat16), torch.zeros(64, 32, dtype=torch.uint8, device="cuda")
    with pytest.raises(Exception, match="float8 must be 0"):
        shim["llmc_qgemm_a8"](x, qw, s, sx, None, y, 2, 1e-6, 448.0)
    with pytest.raises(Exception, match="sx"):
        shim["llmc_qgemm_a8"](x, qw, s, torch.ones(3, 1, dtype=torch.bfloat16, device="cuda"), None, y, 1, 1e-6, 448.0)
    with pytest.raises(Exception, match="must be > 0"):
        shim["llmc_qgemm_a8"](x, qw, s, None, None, y, 1, 0.0, 448.0)
