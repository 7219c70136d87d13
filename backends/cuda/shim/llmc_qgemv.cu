// llmc CUDA shim: weight-only quantized matmul for decode, y = x @ W^T with W dequantized as it
// is read (Op.QMATMUL; layout in compiler/ops.py QMatmulAttrs).
//
//   llmc_qgemv(x [M, K], qweight, scales [N, K / group], zeros [N, K / group] or None, y [M, N],
//              bits: 4 | 8, group: int)
//     bits 8: qweight int8 [N, K], W = q * scale
//     bits 4: qweight uint8 [N, K / 2] (k = 2i low nibble of byte i, 2i + 1 high), W = (q - zero) * scale,
//             zero = 8 without a zeros input
//   x, scales, zeros, y: float16 or bfloat16 alike; accumulation in float32. Any M: rows go in
//   chunks of 8 (a grid row each), every chunk streaming the weights again (from L2 when they fit:
//   right for decode and small batches, a fallback for prefill, which wants a tensor-core GEMM).
//
// Decode reads every weight once, so time is bytes: one warp per output channel streams its
// packed row with 16-byte loads (four in flight per lane before any math), each load 32 int4 or
// 16 int8 weights of one group; per load the dot product is s * (sum q x - z * sum x), so the
// dequantization is two multiply-adds per group slice, not one per weight. x ([M, K], a few KB)
// is read through the L1 cache by every warp. Runs on TVM-FFI's current stream (graph-capturable).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "llmc_shim_common.h"

namespace llmc_shim_qgemv {
using namespace llmc_shim;
namespace {

constexpr int kWarps = 8;
constexpr int kUnroll = 4;
constexpr int kMaxRows = 8;

__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// 8 consecutive x values (one 16-byte load) as floats.
template <typename T>
__device__ __forceinline__ void load8(const T* p, float* out) {
  const uint4 u = __ldg(reinterpret_cast<const uint4*>(p));
  const T* e = reinterpret_cast<const T*>(&u);
#pragma unroll
  for (int j = 0; j < 8; ++j) out[j] = to_f(e[j]);
}

// One 16-byte chunk of packed weights against M rows of x: `per` weights starting at k.
template <typename T, int BITS, int M>
__device__ __forceinline__ void chunk_dot(const uint4& w, const T* x, int64_t ldx, int k, float s, float z,
                                          float* acc, int rows) {
  constexpr int per = BITS == 4 ? 32 : 16;
  const unsigned char* b = reinterpret_cast<const unsigned char*>(&w);
#pragma unroll
  for (int m = 0; m < M; ++m) {
    if (m >= rows) break;  // the last chunk of 8 rows may be short
    float qx = 0.f, sx = 0.f;
#pragma unroll
    for (int h = 0; h < per / 8; ++h) {
      float xv[8];
      load8(x + m * ldx + k + h * 8, xv);
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        float q;
        if constexpr (BITS == 4) {
          const unsigned char byte = b[h * 4 + j / 2];
          q = float((j & 1) ? (byte >> 4) : (byte & 15));
        } else {
          q = float(static_cast<signed char>(b[h * 8 + j]));
        }
        qx = fmaf(q, xv[j], qx);
        sx += xv[j];
      }
    }
    acc[m] = fmaf(s, qx - z * sx, acc[m]);
  }
}

template <typename T, int BITS, int M>
__global__ void __launch_bounds__(kWarps * 32) qgemv_kernel(const T* __restrict__ x, const uint4* __restrict__ qw,
                                                             const T* __restrict__ scales, const T* __restrict__ zeros,
                                                             T* __restrict__ y, int n_out, int K, int group,
                                                             int rows_total) {
  constexpr int per = BITS == 4 ? 32 : 16;  // weights per 16-byte chunk
  const int lane = threadIdx.x % 32;
  const int n = blockIdx.x * kWarps + threadIdx.x / 32;
  if (n >= n_out) return;
  const int rows = min(M, rows_total - int(blockIdx.y) * M);
  x += int64_t(blockIdx.y) * M * K;
  y += int64_t(blockIdx.y) * M * n_out;
  const int chunks = K / per, groups = K / group;
  const uint4* row = qw + int64_t(n) * chunks;
  const T* srow = scales + int64_t(n) * groups;
  const T* zrow = zeros ? zeros + int64_t(n) * groups : nullptr;
  const float zero_default = BITS == 4 ? 8.f : 0.f;
  float acc[M];
#pragma unroll
  for (int m = 0; m < M; ++m) acc[m] = 0.f;
  int c = lane;
  for (; c + 32 * (kUnroll - 1) < chunks; c += 32 * kUnroll) {
    uint4 w[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) w[u] = __ldg(row + c + 32 * u);  // all loads in flight first
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int k = (c + 32 * u) * per, g = k / group;
      chunk_dot<T, BITS, M>(w[u], x, K, k, to_f(srow[g]), zrow ? to_f(zrow[g]) : zero_default, acc, rows);
    }
  }
  for (; c < chunks; c += 32) {
    const uint4 w = __ldg(row + c);
    const int k = c * per, g = k / group;
    chunk_dot<T, BITS, M>(w, x, K, k, to_f(srow[g]), zrow ? to_f(zrow[g]) : zero_default, acc, rows);
  }
#pragma unroll
  for (int m = 0; m < M; ++m) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) acc[m] += __shfl_xor_sync(0xffffffffu, acc[m], o);
  }
  if (lane == 0) {
#pragma unroll
    for (int m = 0; m < M; ++m)
      if (m < rows) y[int64_t(m) * n_out + n] = from_f<T>(acc[m]);
  }
}

template <typename T, int BITS>
void launch_rows(int64_t rows, const T* x, const uint4* qw, const T* s, const T* z, T* y, int n, int K, int group,
                 cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((n + kWarps - 1) / kWarps),
                  static_cast<unsigned>((rows + kMaxRows - 1) / kMaxRows)),
      block(kWarps * 32);
  switch (rows > kMaxRows ? kMaxRows : int(rows)) {
#define LLMC_QGEMV_CASE(R) \
  case R: qgemv_kernel<T, BITS, R><<<grid, block, 0, stream>>>(x, qw, s, z, y, n, K, group, int(rows)); break;
    LLMC_QGEMV_CASE(1) LLMC_QGEMV_CASE(2) LLMC_QGEMV_CASE(3) LLMC_QGEMV_CASE(4)
    LLMC_QGEMV_CASE(5) LLMC_QGEMV_CASE(6) LLMC_QGEMV_CASE(7) LLMC_QGEMV_CASE(8)
#undef LLMC_QGEMV_CASE
  }
  LLMC_CUDA_CHECK(cudaGetLastError());
}

template <typename T>
void launch(int bits, int64_t rows, DLTensor* x, DLTensor* qw, DLTensor* s, const DLTensor* z, DLTensor* y, int n, int K,
            int group, cudaStream_t stream) {
  const T* xp = reinterpret_cast<const T*>(data_of(x));
  const uint4* wp = reinterpret_cast<const uint4*>(data_of(qw));
  const T* sp = reinterpret_cast<const T*>(data_of(s));
  const T* zp = z ? reinterpret_cast<const T*>(data_of(z)) : nullptr;
  T* yp = reinterpret_cast<T*>(data_of(y));
  if (bits == 4) launch_rows<T, 4>(rows, xp, wp, sp, zp, yp, n, K, group, stream);
  else launch_rows<T, 8>(rows, xp, wp, sp, zp, yp, n, K, group, stream);
}

void QGemv(DLTensor* x, DLTensor* qw, DLTensor* s, tvm::ffi::AnyView z_any, DLTensor* y, int64_t bits, int64_t group) {
  const DLTensor* z = optional_tensor(z_any);
  for (auto [t, name] : {std::pair<const DLTensor*, const char*>{x, "x"}, {qw, "qweight"}, {s, "scales"}, {y, "y"}}) {
    check_cuda_tensor(t, name);
    LLMC_CHECK(compact(t)) << name << " must be contiguous";
  }
  LLMC_CHECK(bits == 4 || bits == 8) << "bits must be 4 or 8, got " << bits;
  const DT dt = dtype_of(x);
  LLMC_CHECK(dt == DT::kF16 || dt == DT::kBF16) << "x dtype " << dtype_name(dt) << " (float16 or bfloat16)";
  LLMC_CHECK(dtype_of(s) == dt && dtype_of(y) == dt) << "x, scales and y must share a dtype";
  LLMC_CHECK(x->ndim == 2 && y->ndim == 2 && qw->ndim == 2 && s->ndim == 2) << "x, y, qweight, scales must be 2-D";
  const int64_t rows = x->shape[0], K = x->shape[1], n = qw->shape[0];
  LLMC_CHECK(rows >= 0 && rows / kMaxRows < 65535) << "x has " << rows << " rows";
  const int per = bits == 4 ? 32 : 16;
  LLMC_CHECK(K % per == 0 && group % per == 0 && K % group == 0)
      << "K " << K << " and group " << group << " must be multiples of " << per << ", group dividing K";
  LLMC_CHECK(qw->shape[1] == (bits == 4 ? K / 2 : K) && qw->dtype.bits == 8) << "qweight " << shape_str(qw);
  LLMC_CHECK(s->shape[0] == n && s->shape[1] == K / group) << "scales " << shape_str(s);
  LLMC_CHECK(y->shape[0] == rows && y->shape[1] == n) << "y " << shape_str(y);
  if (z != nullptr) {
    check_cuda_tensor(z, "zeros");
    LLMC_CHECK(dtype_of(z) == dt && z->ndim == 2 && z->shape[0] == n && z->shape[1] == K / group && compact(z))
        << "zeros " << shape_str(z);
  }
  if (rows == 0 || n == 0) return;
  const int dev = x->device.device_id;
  DeviceGuard guard(dev);
  cudaStream_t stream = current_stream(dev);
  if (dt == DT::kF16) launch<__half>(int(bits), rows, x, qw, s, z, y, int(n), int(K), int(group), stream);
  else launch<__nv_bfloat16>(int(bits), rows, x, qw, s, z, y, int(n), int(K), int(group), stream);
}

}  // namespace
}  // namespace llmc_shim_qgemv

TVM_FFI_DLL_EXPORT_TYPED_FUNC(llmc_qgemv, llmc_shim_qgemv::QGemv);
