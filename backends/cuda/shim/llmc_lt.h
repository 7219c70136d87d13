// llmc CUDA shim: the internal matmul interface the quantized and fused entry points share with
// llmc_gemm.cu (which owns the cuBLASLt library, handles and plan cache), and their scratch.
#pragma once

#include <cuda_runtime.h>
#include <dlpack/dlpack.h>
#include <library_types.h>

#include <cstddef>
#include <cstdint>

namespace llmc_shim {

// D[M, N] = A[M, K] @ W[N, K]^T, all row-major with the given row strides (elements), and, where
// given, float scales per row of A (a_scale [M]) and per row of W (w_scale [N]) applied to the
// products: cuBLASLt's outer-vector scaling (float8 inputs). Types: bf16/fp16 (float compute),
// float8 e4m3 (float compute, D bf16/fp16) or int8 (int32 compute, D int32).
struct LtNT {
  const void* a = nullptr;
  cudaDataType_t a_type = CUDA_R_16BF;
  int64_t lda = 0;
  const void* w = nullptr;
  cudaDataType_t w_type = CUDA_R_16BF;
  int64_t ldw = 0;
  void* d = nullptr;
  cudaDataType_t d_type = CUDA_R_16BF;
  int64_t ldd = 0;
  int64_t m = 0, n = 0, k = 0;
  const float* a_scale = nullptr;
  const float* w_scale = nullptr;
  const void* c = nullptr;  // optional [M, N] (ld ldd, D's type) added to the products: D = AW^T + C
};

// Enqueues the matmul on `stream`. Returns false, enqueuing nothing, when cuBLASLt has no
// algorithm for the problem (the caller may fall back, e.g. to unscaled products); throws on
// any other failure. The plan (descriptors, algorithm) is cached per problem.
bool lt_matmul_nt(int dev, cudaStream_t stream, const LtNT& p);

// llmc_gemm_ex's cuBLASLt GEMM C = A op(B) + bias + residual on DLTensors (bias / residual may be
// null): the dense route other entry points fall back to.
void gemm_dense(DLTensor* A, DLTensor* B, DLTensor* bias, DLTensor* residual, DLTensor* C, int64_t trans_b);

// A device buffer of at least `bytes` for (dev, stream, slot), kept between calls. It grows only
// at a call outside CUDA-graph capture (the first eager run of a shape); a buffer it outgrew is
// kept alive, since graphs captured earlier still address it.
void* scratch(int dev, cudaStream_t stream, int slot, size_t bytes);

// Weight-only quantized matmul y[M, N] = x[M, K] @ dequant(W)^T for many rows: W dequantized into
// scratch in slabs of output channels, then tensor-core GEMMs (llmc_qgemm.cu). T: __half or
// __nv_bfloat16 as `half_dtype` says.
void qmatmul_dequant_gemm(int dev, cudaStream_t stream, cudaDataType_t half_dtype, int bits, const void* x,
                          const void* qw, const void* scales, const void* zeros, void* y, int64_t rows, int64_t n,
                          int64_t k, int64_t group);


// The decode GEMV of llmc_gemv.cu: y[M, n_out] = act(rmsnorm(x) @ W^T + bias) + res, W [N, K]
// row-major (ld ldw), N = 2 n_out with glu (SwiGLU of the halves), else n_out; norm_w, bias, res
// may be null. Returns false, enqueuing nothing, when the problem is not GEMV-sized (more than
// max_rows rows, K not a multiple of 8, unaligned rows): the caller runs the GEMM. max_rows is the
// measured break-even against cuBLASLt (benchmarks/bench_gemv_gpu.py --fused, H100): with the norm
// and the SwiGLU saved, 2 rows; a plain GEMM, 1 (cuBLASLt's small-M kernels win from 2 rows).
struct GemvArgs {
  cudaDataType_t dtype = CUDA_R_16BF;
  const void* x = nullptr;
  int64_t ldx = 0;
  const void* norm_w = nullptr;
  float eps = 0.f;
  const void* w = nullptr;
  int64_t ldw = 0;
  const void* bias = nullptr;
  const void* res = nullptr;
  int64_t ldr = 0;
  void* y = nullptr;
  int64_t ldy = 0;
  int64_t m = 0, n_out = 0, k = 0;
  bool glu = false;
  int64_t max_rows = 2;
  int bits = 16;  // tc_gemv only: 16 dense W; 8 / 4 the codes below
  const void* scales = nullptr;
  const void* zeros = nullptr;
  int64_t group = 0;
};
bool gemv_nt(int dev, cudaStream_t stream, const GemvArgs& a);

// The tensor-core small-batch GEMV (llmc_tc_gemv.cu): the same product for any M (16 rows a pass;
// meant for 3-63) with the RMSNorm (norm_w, eps; max_rows unused) or without (norm_w null), W dense
// [N, K] (bits 16) or weight-only codes (bits 8 / 4, row stride ldw bytes, llmc_qgemv.cu's layout)
// with scales [N, K / group] and zeros (or null). Returns false, enqueuing nothing, where it does
// not apply (K not a multiple of 128, group not a multiple of 32, unaligned rows or norm weight, a
// bias with codes, a norm over more than four blocks an SM): the caller runs another route.
bool tc_gemv(int dev, cudaStream_t stream, const GemvArgs& a);

// The prefill paths' elementwise epilogue (llmc_gemv.cu): y[m, :n] = (glu ? silu(h[m, :n]) * h[m, n:2n]
// : h[m, :n]) + res[m, :n] (res may be null), h compact [rows, glu ? 2n : n], y and res with row
// strides ldy, ldr; bf16 or fp16 as `dtype` says; on `stream`.
void gemm_epilogue_rows(cudaDataType_t dtype, const void* h, void* y, int64_t ldy, const void* res, int64_t ldr,
                        int64_t rows, int64_t n, bool glu, cudaStream_t stream);

// RMSNorm(x)·g of x's rows (row stride ld, 16-bit `like`'s dtype) into the shim scratch buffer
// `slot`, compact [rows, cols]; returns it (llmc_gemv.cu; the prefill paths' norm).
void* rms_rows_to_scratch(int dev, cudaStream_t stream, const DLTensor* like, const void* x, int64_t rows, int64_t cols,
                          int64_t ld, const DLTensor* g, float eps, int slot);

// llmc_norm_ext's row norm (LayerNorm with b, or RMSNorm) of contiguous x into y, on the current stream.
void norm_rows(const DLTensor* x, const DLTensor* w, const DLTensor* b, DLTensor* y, float eps, bool rms);

}  // namespace llmc_shim
