"""GPU checks of the CUDA shim (run on the GPU machine: pytest -m gpu tests/backends/cuda).

References are computed by torch in float32 (float64 for small GEMMs); tensors reach the shim
through DLPack (tvm_ffi converts torch tensors) or as tvm.runtime.Tensor. Outputs are poisoned
with NaN before each call so that unwritten elements fail the check."""
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

DT = {"bf16": torch.bfloat16, "fp16": torch.float16}


def rel_err(got, ref):
    got, ref = got.double(), ref.double()
    return ((got - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def poisoned(shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype, device="cuda")


# ----------------------------------------------------------------------------------- GEMM
@pytest.mark.parametrize("dt", ["bf16", "fp16"])
@pytest.mark.parametrize("m,n,k", [(1, 256, 128), (17, 96, 200), (128, 512, 256), (333, 3072, 2048)])
@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_matches_torch(shim, dt, m, n, k, trans_b):
    g = torch.Generator(device="cuda").manual_seed(m * 7 + n + k)
    a = torch.randn(m, k, device="cuda", generator=g).to(DT[dt])
    w = torch.randn((n, k) if trans_b else (k, n), device="cuda", generator=g).to(DT[dt]) / math.sqrt(k)
    c = poisoned((m, n), DT[dt])
    (shim["llmc_gemm_nt"] if trans_b else shim["llmc_gemm"])(a, w, c)
    torch.cuda.synchronize()
    ref = a.double() @ (w.double().T if trans_b else w.double())
    assert not torch.isnan(c).any()
    assert rel_err(c, ref) < 1e-2


@pytest.mark.parametrize("dt", ["bf16", "fp16"])
@pytest.mark.parametrize("bias,residual,act", [(1, 0, 0), (0, 1, 0), (1, 1, 0), (0, 0, 1), (1, 0, 1), (1, 0, 2)])
def test_gemm_epilogues(shim, dt, bias, residual, act):
    m, n, k = 77, 384, 256
    g = torch.Generator(device="cuda").manual_seed(1 + bias + 2 * residual + 4 * act)
    a = torch.randn(m, k, device="cuda", generator=g).to(DT[dt])
    w = (torch.randn(n, k, device="cuda", generator=g) / math.sqrt(k)).to(DT[dt])
    b = torch.randn(n, device="cuda", generator=g).to(DT[dt]) if bias else None
    r = torch.randn(m, n, device="cuda", generator=g).to(DT[dt]) if residual else None
    c = poisoned((m, n), DT[dt])
    shim["llmc_gemm_ex"](a, w, b, r, c, 1, act)
    torch.cuda.synchronize()
    ref = a.float() @ w.float().T
    if bias:
        ref = ref + b.float()
    if act == 1:
        ref = torch.nn.functional.gelu(ref, approximate="tanh")
    elif act == 2:
        ref = torch.relu(ref)
    if residual:
        ref = ref + r.float()
    assert not torch.isnan(c).any()
    assert rel_err(c, ref) < 1e-2, rel_err(c, ref)


def test_gemm_residual_in_place_and_batched_rows(shim):
    """C = A @ W^T + C (residual aliasing the output), A and C with two leading dims."""
    g = torch.Generator(device="cuda").manual_seed(5)
    a = torch.randn(2, 40, 128, device="cuda", generator=g).bfloat16()
    w = (torch.randn(64, 128, device="cuda", generator=g) / 12).bfloat16()
    c = torch.randn(2, 40, 64, device="cuda", generator=g).bfloat16()
    ref = c.float() + a.float() @ w.float().T
    shim["llmc_gemm_ex"](a, w, None, c, c, 1, 0)
    torch.cuda.synchronize()
    assert rel_err(c, ref) < 1e-2


def test_gemm_with_tvm_tensors(shim, tvm_gpu):
    """The documented calling form: tvm.runtime.Tensor arguments on the GPU."""
    tvm = tvm_gpu
    rng = np.random.default_rng(0)
    a = rng.standard_normal((64, 96)).astype("float16")
    b = (rng.standard_normal((96, 48)) / 10).astype("float16")
    dev = tvm.cuda(0)
    ta, tb = tvm.runtime.tensor(a, dev), tvm.runtime.tensor(b, dev)
    tc = tvm.runtime.empty((64, 48), "float16", dev)
    shim["llmc_gemm"](ta, tb, tc)
    got = tc.numpy().astype(np.float64)
    ref = a.astype(np.float64) @ b.astype(np.float64)
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 1e-2


def test_gemm_shape_errors(shim):
    a = torch.randn(4, 8, device="cuda").half()
    b = torch.randn(9, 4, device="cuda").half()
    c = torch.empty(4, 4, device="cuda").half()
    with pytest.raises(ValueError, match="inner dims"):
        shim["llmc_gemm"](a, b, c)
    with pytest.raises(ValueError, match="dtype"):
        shim["llmc_gemm"](a, torch.randn(8, 4, device="cuda").bfloat16(), c)


# ------------------------------------------------------------------------------ attention
def sdpa_ref(q, k, v, scale, causal):
    """q [B,Hq,S,D], k/v [B,Hk,T,D] -> float32 [B,Hq,S,D]; causal bottom-right aligned."""
    B, Hq, S, D = q.shape
    Hk, T = k.shape[1], k.shape[2]
    k = k.float().repeat_interleave(Hq // Hk, dim=1)
    v = v.float().repeat_interleave(Hq // Hk, dim=1)
    s = (q.float() @ k.transpose(-1, -2)) * scale
    if causal:
        i = torch.arange(S, device="cuda")[:, None]
        j = torch.arange(T, device="cuda")[None, :]
        s = s.masked_fill(j > i + (T - S), float("-inf"))
    p = torch.softmax(s, dim=-1)
    return torch.nan_to_num(p) @ v


CASES = [  # B, Hq, Hk, S, T, D
    (1, 4, 4, 64, 64, 64),
    (2, 8, 2, 128, 128, 128),
    (1, 32, 8, 512, 512, 64),
    (2, 4, 1, 100, 100, 64),     # ragged tiles
    (1, 6, 3, 77, 200, 128),     # S < T (chunked prefill): bottom-right causal
    (3, 2, 2, 1, 130, 64),       # one query row (decode-like)
]


@pytest.mark.parametrize("dt", ["bf16", "fp16"])
@pytest.mark.parametrize("causal", [0, 1])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("variant", ["0", "1", "2"])  # tile configs (LLMC_ATTN_VARIANT; 0 = auto)
def test_attention_head_major(shim, dt, causal, case, variant, monkeypatch):
    monkeypatch.setenv("LLMC_ATTN_VARIANT", variant)
    B, Hq, Hk, S, T, D = case
    g = torch.Generator(device="cuda").manual_seed(sum(case) + causal)
    q = torch.randn(B, Hq, S, D, device="cuda", generator=g).to(DT[dt])
    k = torch.randn(B, Hk, T, D, device="cuda", generator=g).to(DT[dt])
    v = torch.randn(B, Hk, T, D, device="cuda", generator=g).to(DT[dt])
    out = poisoned((B, Hq, S, D), DT[dt])
    scale = 1.0 / math.sqrt(D)
    shim["llmc_attention"](q, k, v, out, scale, causal)
    torch.cuda.synchronize()
    assert not torch.isnan(out).any()
    err = rel_err(out, sdpa_ref(q, k, v, scale, causal))
    assert err < 1e-2, err


@pytest.mark.parametrize("dt", ["bf16", "fp16"])
@pytest.mark.parametrize("D", [64, 128])
def test_attention_token_major_and_packed_qkv(shim, dt, D):
    """[B,S,H,D] views of one fused-QKV output (strided, no copies) and the packed entry."""
    B, S, Hq, Hk = 2, 192, 8, 2
    g = torch.Generator(device="cuda").manual_seed(D)
    qkv = torch.randn(B, S, (Hq + 2 * Hk) * D, device="cuda", generator=g).to(DT[dt])
    q4 = qkv.view(B, S, Hq + 2 * Hk, D)
    q, k, v = q4[:, :, :Hq], q4[:, :, Hq:Hq + Hk], q4[:, :, Hq + Hk:]
    assert not q.is_contiguous()
    ref = sdpa_ref(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.1, 1).transpose(1, 2)
    out = poisoned((B, S, Hq, D), DT[dt])
    shim["llmc_attention_bshd"](q, k, v, out, 0.1, 1)
    torch.cuda.synchronize()
    assert not torch.isnan(out).any() and rel_err(out, ref) < 1e-2
    out2 = poisoned((B, S, Hq, D), DT[dt])
    shim["llmc_attention_qkv"](qkv, out2, 0.1, 1)
    torch.cuda.synchronize()
    assert torch.equal(out, out2)


def test_attention_matches_torch_sdpa_flash(shim):
    """Same function as torch's own SDPA (causal, S == T) on the Llama-3.2-1B shape."""
    q = torch.randn(1, 32, 512, 64, device="cuda").bfloat16()
    k = torch.randn(1, 8, 512, 64, device="cuda").bfloat16()
    v = torch.randn(1, 8, 512, 64, device="cuda").bfloat16()
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    out = poisoned(q.shape, q.dtype)
    shim["llmc_attention"](q, k, v, out, 0.125, 1)
    torch.cuda.synchronize()
    assert rel_err(out, ref) < 1e-2


def test_attention_errors(shim):
    q = torch.randn(1, 4, 16, 96, device="cuda").half()
    with pytest.raises(ValueError, match="head dim"):
        shim["llmc_attention"](q, q, q, q, 0.1, 0)
    q = torch.randn(1, 3, 16, 64, device="cuda").half()
    k = torch.randn(1, 2, 16, 64, device="cuda").half()
    with pytest.raises(ValueError, match="multiple"):
        shim["llmc_attention"](q, k, k, q.clone(), 0.1, 0)


# ----------------------------------------------------------------------------------- argmax
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("rows,vocab", [(1, 128256), (64, 32000), (5, 7), (3, 513)])
def test_argmax_rows_matches_numpy(shim, dtype, rows, vocab):
    """llmc_argmax_rows (greedy decoding on the device) against numpy's argmax of the same values,
    with planted ties (the first wins), a NaN (numpy picks it) and an all -inf row."""
    g = torch.Generator().manual_seed(rows * vocab)
    x = torch.randn(rows, vocab, generator=g).to(dtype)
    if vocab > 10:
        x[0, vocab // 3] = x[0, vocab - 2] = x[0].max() + 1  # a tie at the maximum
    if rows > 1:
        x[1, vocab // 2] = float("nan")
    if rows > 2:
        x[2] = float("-inf")
    out = torch.full((rows,), -7, dtype=torch.int32, device="cuda")
    shim["llmc_argmax_rows"](x.cuda(), out)
    torch.cuda.synchronize()
    want = np.argmax(x.float().numpy(), axis=1)
    assert out.cpu().numpy().tolist() == want.tolist()


def test_argmax_rows_refuses_bad_shapes(shim):
    x = torch.randn(4, 100, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(Exception, match="out must be int32"):
        shim["llmc_argmax_rows"](x, torch.zeros(3, dtype=torch.int32, device="cuda"))
    with pytest.raises(Exception, match="contiguous"):
        shim["llmc_argmax_rows"](x[:, ::2], torch.zeros(4, dtype=torch.int32, device="cuda"))
