"""GPU checks of llmc_gemm_sparse24 (backends/cuda/shim/llmc_sparse24.cu): a GEMM whose weight is
2:4 sparse along K, on cuSPARSELt's sparse tensor cores, against numpy's float64 product of the
same (pruned) values, with bias and residual epilogues; several row counts over one compressed
weight (below 1024 rows, and for float16, the call runs the dense GEMM); a weight that is not 2:4
is refused."""
import numpy as np
import pytest

from llmc.passes.sparsify import magnitude_24

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _rel(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,k", [(2048, 2048), (96, 256), (16384, 2048)])
@pytest.mark.parametrize("epilogue", ["none", "bias", "residual"])
@pytest.mark.parametrize("trans_b", [1, 0])
def test_sparse24_gemm_matches_reference(shim, dtype, n, k, epilogue, trans_b):
    rng = np.random.default_rng(n + k)
    w = torch.from_numpy(magnitude_24(rng.standard_normal((n, k)) * 0.05).astype(np.float32)).to(dtype)
    wn = w.double().numpy()
    bias = torch.randn(n, generator=torch.Generator().manual_seed(k)).to(dtype) if epilogue == "bias" else None
    w_dev = w.cuda() if trans_b else w.T.contiguous().cuda()  # [N, K], or [K, N] as llmc stores folded weights
    shim["llmc_sparse24_forget"](w_dev)  # torch may hand out an earlier case's address: what the runtime does
    for rows in (1, 7, 2048, 64, 1024):  # compressed at the first sparse call (>= 1024 rows), then reused
        x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows)).to(dtype)
        res = torch.randn(rows, n, generator=torch.Generator().manual_seed(rows + 1)).to(dtype) \
            if epilogue == "residual" else None
        ref = x.double().numpy() @ wn.T
        if bias is not None:
            ref = ref + bias.double().numpy()
        if res is not None:
            ref = ref + res.double().numpy()
        y = torch.full((rows, n), float("nan"), dtype=dtype, device="cuda")
        shim["llmc_gemm_sparse24"](x.cuda(), w_dev, None if bias is None else bias.cuda(),
                                   None if res is None else res.cuda(), y, trans_b)
        torch.cuda.synchronize()
        err = _rel(y.double().cpu().numpy(), ref)
        assert err < 5e-3, (rows, err)


def test_sparse24_refuses_a_dense_weight_and_bad_shapes(shim):
    w = torch.randn(64, 128, device="cuda", dtype=torch.bfloat16)  # no zeros: not 2:4
    x = torch.randn(1024, 128, device="cuda", dtype=torch.bfloat16)  # (fewer rows take the dense GEMM)
    y = torch.empty(1024, 64, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(Exception, match="not 2:4"):
        shim["llmc_gemm_sparse24"](x, w, None, None, y, 1)
    with pytest.raises(Exception, match="multiples of 32"):
        shim["llmc_gemm_sparse24"](torch.randn(1024, 120, device="cuda", dtype=torch.bfloat16),
                                   torch.zeros(64, 120, device="cuda", dtype=torch.bfloat16), None, None, y, 1)
