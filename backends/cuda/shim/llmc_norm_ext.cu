// llmc CUDA shim extension: LayerNorm and RMSNorm over the last axis, one warp per row.
//
//   llmc_norm_ext(x, w, b or None, y, eps: float, kind: int)
//     kind 0: y = (x - mean) / sqrt(var + eps) * w + b   (var biased; b may be None)
//     kind 1: y = x / sqrt(mean(x^2) + eps) * w
//
// x and y are contiguous [..., N] (leading dims are rows), w and b are [N]; all float16,
// bfloat16 or float32 alike; arithmetic in float32, as llmc's TE rules compute it. Rows of
// N elements are read with 16-byte vector loads when N and the pointers allow it; the mean
// and variance passes re-read the row (it stays in L1). Runs on TVM-FFI's current stream.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "llmc_lt.h"
#include "llmc_shim_common.h"

namespace llmc_shim_norm {
using namespace llmc_shim;
namespace {

template <typename T>
struct Cvt;
template <>
struct Cvt<__half> {
  static __device__ __forceinline__ float f(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half t(float x) { return __float2half_rn(x); }
};
template <>
struct Cvt<__nv_bfloat16> {
  static __device__ __forceinline__ float f(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 t(float x) { return __float2bfloat16_rn(x); }
};
template <>
struct Cvt<float> {
  static __device__ __forceinline__ float f(float x) { return x; }
  static __device__ __forceinline__ float t(float x) { return x; }
};

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

constexpr int kWarps = 4;

// chunk c of a row: VEC elements as one 16-byte load (VEC == 1: one element)
template <typename T, int VEC>
__device__ __forceinline__ void load_chunk(T* dst, const T* __restrict__ row, int c) {
  if constexpr (VEC > 1) *reinterpret_cast<uint4*>(dst) = reinterpret_cast<const uint4*>(row)[c];
  else dst[0] = row[c];
}

// VEC: elements per 16-byte access (1: scalar path).
template <typename T, bool RMS, int VEC>
__global__ void __launch_bounds__(kWarps * 32)
    norm_kernel(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ b, T* __restrict__ y,
                int64_t rows, int n, float eps) {
  using C = Cvt<T>;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t row = int64_t(blockIdx.x) * kWarps + warp;
  if (row >= rows) return;
  const T* xr = x + row * n;
  T* yr = y + row * n;
  const int chunks = n / VEC;
  const float inv_n = 1.f / float(n);
  float s = 0.f;
#pragma unroll 4
  for (int c = lane; c < chunks; c += 32) {
    T e[VEC];
    load_chunk<T, VEC>(e, xr, c);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const float v = C::f(e[j]);
      s += RMS ? v * v : v;
    }
  }
  s = warp_sum(s);
  float mean = 0.f, rstd;
  if (RMS) {
    rstd = 1.f / sqrtf(s * inv_n + eps);
  } else {
    mean = s * inv_n;
    float q = 0.f;
#pragma unroll 4
    for (int c = lane; c < chunks; c += 32) {
      T e[VEC];
      load_chunk<T, VEC>(e, xr, c);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float d = C::f(e[j]) - mean;
        q += d * d;
      }
    }
    q = warp_sum(q);
    rstd = 1.f / sqrtf(q * inv_n + eps);
  }
#pragma unroll 4
  for (int c = lane; c < chunks; c += 32) {
    T e[VEC], we[VEC], be[VEC], o[VEC];
    load_chunk<T, VEC>(e, xr, c);
    load_chunk<T, VEC>(we, w, c);
    if (!RMS && b != nullptr) load_chunk<T, VEC>(be, b, c);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      float v = (C::f(e[j]) - mean) * rstd * C::f(we[j]);
      if (!RMS && b != nullptr) v += C::f(be[j]);
      o[j] = C::t(v);
    }
    if constexpr (VEC > 1) reinterpret_cast<uint4*>(yr)[c] = *reinterpret_cast<const uint4*>(o);
    else yr[c] = o[0];
  }
}

template <typename T>
void launch(const DLTensor* x, const DLTensor* w, const DLTensor* b, DLTensor* y, int64_t rows, int n, float eps,
            bool rms, cudaStream_t stream) {
  const T* xp = reinterpret_cast<const T*>(data_of(x));
  const T* wp = reinterpret_cast<const T*>(data_of(w));
  const T* bp = b ? reinterpret_cast<const T*>(data_of(b)) : nullptr;
  T* yp = reinterpret_cast<T*>(data_of(y));
  constexpr int V = 16 / sizeof(T);
  const bool vec = n % V == 0 && (reinterpret_cast<uintptr_t>(xp) | reinterpret_cast<uintptr_t>(wp) |
                                  reinterpret_cast<uintptr_t>(bp) | reinterpret_cast<uintptr_t>(yp)) % 16 == 0;
  const dim3 grid(unsigned((rows + kWarps - 1) / kWarps)), block(kWarps * 32);
  if (vec) {
    if (rms) norm_kernel<T, true, V><<<grid, block, 0, stream>>>(xp, wp, bp, yp, rows, n, eps);
    else norm_kernel<T, false, V><<<grid, block, 0, stream>>>(xp, wp, bp, yp, rows, n, eps);
  } else {
    if (rms) norm_kernel<T, true, 1><<<grid, block, 0, stream>>>(xp, wp, bp, yp, rows, n, eps);
    else norm_kernel<T, false, 1><<<grid, block, 0, stream>>>(xp, wp, bp, yp, rows, n, eps);
  }
  LLMC_CUDA_CHECK(cudaGetLastError());
}

void NormExt(DLTensor* x, DLTensor* w, tvm::ffi::AnyView b_any, DLTensor* y, double eps, int64_t kind) {
  const DLTensor* b = optional_tensor(b_any);
  check_cuda_tensor(x, "x");
  check_cuda_tensor(w, "w");
  check_cuda_tensor(y, "y");
  const DT dt = dtype_of(x);
  LLMC_CHECK(dt == DT::kF16 || dt == DT::kBF16 || dt == DT::kF32) << "x dtype " << dtype_name(dt);
  LLMC_CHECK(dtype_of(w) == dt && dtype_of(y) == dt) << "x, w and y must share a dtype";
  LLMC_CHECK(kind == 0 || kind == 1) << "kind must be 0 (LayerNorm) or 1 (RMSNorm), got " << kind;
  LLMC_CHECK(x->ndim >= 1 && y->ndim == x->ndim) << "x " << shape_str(x) << " vs y " << shape_str(y);
  for (int i = 0; i < x->ndim; ++i) LLMC_CHECK(x->shape[i] == y->shape[i]) << "x " << shape_str(x) << " vs y " << shape_str(y);
  LLMC_CHECK(compact(x) && compact(y) && compact(w)) << "x, w and y must be contiguous";
  const int64_t n = x->shape[x->ndim - 1];
  LLMC_CHECK(n > 0 && n < (1 << 30)) << "bad row length " << n;
  LLMC_CHECK(w->ndim == 1 && w->shape[0] == n) << "w must be [" << n << "], got " << shape_str(w);
  if (b != nullptr) {
    check_cuda_tensor(b, "b");
    LLMC_CHECK(dtype_of(b) == dt && b->ndim == 1 && b->shape[0] == n && compact(b)) << "b must be [" << n << "]";
  }
  norm_rows(x, w, b, y, float(eps), kind == 1);
}

}  // namespace
}  // namespace llmc_shim_norm

namespace llmc_shim {
void norm_rows(const DLTensor* x, const DLTensor* w, const DLTensor* b, DLTensor* y, float eps, bool rms) {
  using namespace llmc_shim_norm;
  LLMC_CHECK(compact(x) && compact(y)) << "x and y of a row norm must be contiguous";
  const int64_t n = x->shape[x->ndim - 1];
  int64_t rows = 1;
  for (int i = 0; i + 1 < x->ndim; ++i) rows *= x->shape[i];
  if (rows == 0) return;
  const int dev = x->device.device_id;
  DeviceGuard guard(dev);
  cudaStream_t stream = current_stream(dev);
  const DT dt = dtype_of(x);
  if (dt == DT::kF16) launch<__half>(x, w, b, y, rows, int(n), eps, rms, stream);
  else if (dt == DT::kBF16) launch<__nv_bfloat16>(x, w, b, y, rows, int(n), eps, rms, stream);
  else launch<float>(x, w, b, y, rows, int(n), eps, rms, stream);
}
}  // namespace llmc_shim

TVM_FFI_DLL_EXPORT_TYPED_FUNC(llmc_norm_ext, llmc_shim_norm::NormExt);
