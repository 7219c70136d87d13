"""GPU checks of llmc_qgemv (backends/cuda/shim/llmc_qgemv.cu): the weight-only quantized matmul
for decode rows against the numpy dequantization of the same packed weights
(compiler/quant_layout.py), x and y in float16/bfloat16, accumulation in float32."""
import numpy as np
import pytest

from llmc.compiler.quant_layout import dequantize, pack_int4

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _packed(rng, bits: int, n: int, k: int, group: int, symmetric: bool):
    if bits == 4:
        q = rng.integers(0, 16, (n, k))
        qweight = pack_int4(q)
    else:
        q = rng.integers(-127, 128, (n, k))
        qweight = q.astype(np.int8)
    scales = (rng.random((n, k // group)) * 0.02 + 0.005).astype(np.float32)
    zeros = None if symmetric or bits == 8 else rng.integers(0, 16, (n, k // group)).astype(np.float32)
    return qweight, scales, zeros


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits,symmetric", [(4, True), (4, False), (8, True)])
@pytest.mark.parametrize("rows,n,k,group", [(1, 2048, 2048, 128), (3, 100, 704, 32), (8, 517, 1024, 64),
                                            (1, 101, 704, 32), (2, 517, 1024, 64), (1, 4227, 704, 32),  # 4 channels a warp (the last), ragged n
                                            (1, 8192, 4096, 4096), (20, 300, 256, 64)])
def test_qgemv_matches_dequantized_reference(shim, dtype, bits, symmetric, rows, n, k, group):
    if bits == 4 and group == k:  # per-channel scales are the int8 scheme; int4 keeps groups
        group = 128
    rng = np.random.default_rng(rows * n + k)
    qweight, scales, zeros = _packed(rng, bits, n, k, group, symmetric)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(n)).to(dtype)
    # the reference dequantizes with the scales as the kernel sees them (rounded to x's dtype)
    s_dev = torch.from_numpy(scales).to(dtype)
    z_dev = None if zeros is None else torch.from_numpy(zeros).to(dtype)
    w = dequantize(qweight, s_dev.float().numpy(), None if z_dev is None else z_dev.float().numpy(), bits, group)
    ref = x.double().numpy() @ w.T
    y = torch.full((rows, n), float("nan"), dtype=dtype, device="cuda")
    shim["llmc_qgemv"](x.cuda(), torch.from_numpy(qweight).cuda(), s_dev.cuda(),
                       None if z_dev is None else z_dev.cuda(), y, bits, group)
    torch.cuda.synchronize()
    got = y.double().cpu().numpy()
    err = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    assert err < 5e-3, err


def test_qgemv_refuses_bad_arguments(shim):
    x = torch.randn(2, 256, device="cuda", dtype=torch.bfloat16)
    qw = torch.zeros(64, 128, dtype=torch.uint8, device="cuda")
    s = torch.ones(64, 2, dtype=torch.bfloat16, device="cuda")
    y = torch.empty(2, 64, dtype=torch.bfloat16, device="cuda")
    with pytest.raises(Exception, match="bits must be 4 or 8"):
        shim["llmc_qgemv"](x, qw, s, None, y, 3, 128)
    with pytest.raises(Exception, match="multiples of 32"):
        shim["llmc_qgemv"](x, qw, s, None, y, 4, 48)
    with pytest.raises(Exception, match="scales"):
        shim["llmc_qgemv"](x, qw, torch.ones(64, 4, dtype=torch.bfloat16, device="cuda"), None, y, 4, 128)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits,symmetric", [(4, True), (4, False), (8, True)])
@pytest.mark.parametrize("norm,glu,residual", [(True, False, False), (True, True, False), (False, False, True),
                                               (False, True, True), (True, True, True)])
@pytest.mark.parametrize("rows,n,k,group", [(1, 2048, 2048, 128), (2, 258, 1024, 64), (1, 64, 8192, 128),
                                            (2, 70, 8192, 128),  # rows of 2-4 load steps: 2 or 4 warps share them
                                            (1, 8450, 512, 32), (2, 16896, 1024, 128), (1, 3072, 1024, 64),  # 4, 2 rows a warp
                                            (5, 100, 704, 32), (70, 96, 512, 64),  # 70 rows: the GEMM path
                                            # tensor cores (K % 128 == 0): one pass, two, three with a short last
                                            (3, 100, 1024, 32), (16, 258, 2048, 128), (33, 96, 512, 64), (4, 64, 8192, 128)])
def test_qgemv_fused_matches_the_reference(shim, dtype, bits, symmetric, norm, glu, residual, rows, n, k, group):
    """llmc_qgemv_fused: y = [silu(h[:, :N/2]) * h[:, N/2:] or h] (+ residual), h = rmsnorm(x) * g @ W^T,
    against numpy in float64 with the stored (rounded) scales; x and y with strided rows."""
    rng = np.random.default_rng(rows * n + k + 7 * glu)
    qweight, scales, zeros = _packed(rng, bits, n, k, group, symmetric)
    gen = torch.Generator().manual_seed(n + rows)
    xs = torch.randn(rows, k + 16, generator=gen).to(dtype)  # rows 16 elements apart from the next: a strided view
    x = xs[:, 8:8 + k]
    g = (torch.rand(k, generator=gen) + 0.5).to(dtype)
    n_out = n // 2 if glu else n
    res = torch.randn(rows, n_out, generator=gen).to(dtype)
    s_dev = torch.from_numpy(scales).to(dtype)
    z_dev = None if zeros is None else torch.from_numpy(zeros).to(dtype)
    w = dequantize(qweight, s_dev.float().numpy(), None if z_dev is None else z_dev.float().numpy(), bits, group)
    a = x.double().numpy()
    eps = 1e-5
    if norm:
        a = a / np.sqrt((a * a).mean(-1, keepdims=True) + eps) * g.double().numpy()
    h = a @ w.T
    ref = h[:, :n_out] / (1 + np.exp(-h[:, :n_out])) * h[:, n_out:] if glu else h
    if residual:
        ref = ref + res.double().numpy()
    ys = torch.full((rows, n_out + 8), float("nan"), dtype=dtype, device="cuda")
    y = ys[:, :n_out]
    shim["llmc_qgemv_fused"](xs.cuda()[:, 8:8 + k], g.cuda() if norm else None,
                             torch.from_numpy(qweight).cuda(), s_dev.cuda(), None if z_dev is None else z_dev.cuda(),
                             res.cuda() if residual else None, y, bits, group, int(glu), eps)
    torch.cuda.synchronize()
    got = y.double().cpu().numpy()
    assert np.isnan(ys[:, n_out:].float().cpu().numpy()).all()  # nothing written past the view
    err = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    assert err < 1e-2, err  # (bf16: x * g rounded to bf16 before the products, as the unfused norm's output is)


def test_qgemv_fused_refuses_bad_arguments(shim):
    x = torch.randn(2, 256, device="cuda", dtype=torch.bfloat16)
    qw = torch.zeros(63, 128, dtype=torch.uint8, device="cuda")
    s = torch.ones(63, 2, dtype=torch.bfloat16, device="cuda")
    y = torch.empty(2, 31, dtype=torch.bfloat16, device="cuda")
    with pytest.raises(Exception, match="even N"):
        shim["llmc_qgemv_fused"](x, None, qw, s, None, None, y, 4, 128, 1, 1e-5)
    with pytest.raises(Exception, match="norm_w"):
        shim["llmc_qgemv_fused"](x, torch.ones(128, device="cuda", dtype=torch.bfloat16), qw, s, None, None,
                                 torch.empty(2, 63, dtype=torch.bfloat16, device="cuda"), 4, 128, 0, 1e-5)
    with pytest.raises(Exception, match="residual"):
        shim["llmc_qgemv_fused"](x, None, qw, s, None, torch.empty(2, 5, device="cuda", dtype=torch.bfloat16),
                                 torch.empty(2, 63, dtype=torch.bfloat16, device="cuda"), 4, 128, 0, 1e-5)
