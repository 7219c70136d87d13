"""GPU checks of llmc_gemm_fused and of llmc_gemm_ex's decode-sized path (backends/cuda/shim/
llmc_gemv.cu): RMSNorm -> x @ W^T (+ bias) -> SwiGLU of the halves (+ residual) against the same
math in float64 on the host, for the GEMV rows (1-2), the tensor-core GEMV's (3-16 rows,
llmc_tc_gemv.cu: K a multiple of 128, the norm inside where its blocks are few; other K fall back)
and the prefill path (norm kernel, cuBLASLt, SwiGLU pass through scratch), float16 and bfloat16
(inputs rounded to the dtype first, so the reference sees what the kernel reads)."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _ref(x, g, w, bias, res, glu, eps):
    x = x.double()
    if g is not None:
        x = x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * g.double()
    h = x @ w.double().T
    if bias is not None:
        h = h + bias.double()
    if glu:
        n = h.shape[-1] // 2
        h = torch.nn.functional.silu(h[:, :n]) * h[:, n:]
    if res is not None:
        h = h + res.double()
    return h


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 2, 3, 8, 9, 16, 40])
@pytest.mark.parametrize("norm,glu,bias,res", [(True, False, False, False), (True, True, False, False),
                                               (False, False, False, True), (False, True, True, False),
                                               (True, False, True, True)])
@pytest.mark.parametrize("n,k", [(384, 512), (2 * 173, 1024), (2 * 48, 8200),  # 8200: 5 batches of loads, a ragged last
                                 (2 * 61, 2056),  # 2-3 batches: two warps share a channel, the second's slice ragged
                                 (2 * 80, 8192)])  # tensor cores: K split over 8 warps of a block
def test_gemm_fused_matches_reference(shim, dtype, rows, norm, glu, bias, res, n, k):
    gen = torch.Generator().manual_seed(rows * 7 + n + k + 3 * norm + 5 * glu)
    x = (torch.randn(rows, k, generator=gen) * 3).to(dtype)
    g = (1 + 0.3 * torch.randn(k, generator=gen)).to(dtype) if norm else None
    w = (torch.randn(n, k, generator=gen) / k ** 0.5).to(dtype)
    b = (0.1 * torch.randn(n, generator=gen)).to(dtype) if bias else None
    n_out = n // 2 if glu else n
    r = torch.randn(rows, n_out, generator=gen).to(dtype) if res else None
    ref = _ref(x, g, w, b, r, glu, 1e-5)
    y = torch.full((rows, n_out), float("nan"), dtype=dtype, device="cuda")
    cu = lambda t: None if t is None else t.cuda()  # noqa: E731
    shim["llmc_gemm_fused"](x.cuda(), cu(g), w.cuda(), cu(b), cu(r), y, int(glu), 1e-5)
    torch.cuda.synchronize()
    got = y.double().cpu()
    err = (torch.linalg.norm(got - ref) / torch.linalg.norm(ref)).item()
    assert err < 1e-2, err


@pytest.mark.parametrize("rows", [3, 16])
@pytest.mark.parametrize("glu", [False, True])
@pytest.mark.parametrize("n", [20000, 40000])  # 625 / 1250 tiles: the norm kernel first; 40000 without the
def test_gemm_fused_many_tiles_match_reference(shim, rows, glu, n):  # SwiGLU: cuBLASLt (an LM head's route)
    gen = torch.Generator().manual_seed(rows + n + glu)
    k = 256
    x = (torch.randn(rows, k, generator=gen) * 3).to(torch.bfloat16)
    g = (1 + 0.3 * torch.randn(k, generator=gen)).to(torch.bfloat16)
    w = (torch.randn(n, k, generator=gen) / k ** 0.5).to(torch.bfloat16)
    ref = _ref(x, g, w, None, None, glu, 1e-5)
    y = torch.full((rows, n // 2 if glu else n), float("nan"), dtype=torch.bfloat16, device="cuda")
    shim["llmc_gemm_fused"](x.cuda(), g.cuda(), w.cuda(), None, None, y, int(glu), 1e-5)
    torch.cuda.synchronize()
    err = (torch.linalg.norm(y.double().cpu() - ref) / torch.linalg.norm(ref)).item()
    assert err < 1e-2, err


@pytest.mark.parametrize("rows", [1, 4, 8])
def test_gemm_fused_reads_strided_rows_and_residual_in_place(shim, rows):
    """x a column slice of a wider buffer, the residual the output itself (y += ...)."""
    gen = torch.Generator().manual_seed(rows)
    wide = torch.randn(rows, 768, generator=gen).to(torch.bfloat16).cuda()
    x = wide[:, 128:640]
    w = (torch.randn(256, 512, generator=gen) / 512 ** 0.5).to(torch.bfloat16).cuda()
    y = torch.randn(rows, 256, generator=gen).to(torch.bfloat16).cuda()
    ref = _ref(x.cpu(), None, w.cpu(), None, y.cpu(), False, 0.0)
    shim["llmc_gemm_fused"](x, None, w, None, y, y, 0, 0.0)
    torch.cuda.synchronize()
    err = (torch.linalg.norm(y.double().cpu() - ref) / torch.linalg.norm(ref)).item()
    assert err < 1e-2, err


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 16, 17])
def test_gemm_ex_decode_rows_match_torch(shim, dtype, rows):
    """llmc_gemm_ex with W^T sends 1 row to the GEMV (bias and residual epilogues), more to cuBLASLt:
    both against torch's F.linear in float32."""
    gen = torch.Generator().manual_seed(rows + 11)
    x = torch.randn(rows, 2048, generator=gen).to(dtype).cuda()
    w = (torch.randn(1000, 2048, generator=gen) / 45).to(dtype).cuda()
    b = (0.1 * torch.randn(1000, generator=gen)).to(dtype).cuda()
    r = torch.randn(rows, 1000, generator=gen).to(dtype).cuda()
    ref = torch.nn.functional.linear(x.float(), w.float(), b.float()) + r.float()
    y = torch.empty(rows, 1000, dtype=dtype, device="cuda")
    shim["llmc_gemm_ex"](x, w, b, r, y, 1, 0)
    torch.cuda.synchronize()
    err = (torch.linalg.norm(y.float() - ref) / torch.linalg.norm(ref)).item()
    assert err < 1e-2, err


def test_gemm_fused_refuses_bad_arguments(shim):
    x = torch.randn(2, 256, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)
    y = torch.empty(2, 64, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(Exception, match="glu must be 0 or 1"):
        shim["llmc_gemm_fused"](x, None, w, None, None, y, 2, 1e-5)
    with pytest.raises(Exception, match="must be \\[2, 32\\]"):
        shim["llmc_gemm_fused"](x, None, w, None, None, y, 1, 1e-5)  # glu halves N
    with pytest.raises(Exception, match="norm_w must be"):
        shim["llmc_gemm_fused"](x, torch.ones(128, device="cuda", dtype=torch.bfloat16), w, None, None, y, 0, 1e-5)
    with pytest.raises(Exception, match="float16 or bfloat16"):
        shim["llmc_gemm_fused"](x.float(), None, w.float(), None, None, y.float(), 0, 1e-5)
