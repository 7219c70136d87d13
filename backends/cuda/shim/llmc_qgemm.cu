// llmc CUDA shim: quantized matmuls on tensor cores through cuBLASLt (Op.QMATMUL; layouts in
// compiler/ops.py QMatmulAttrs).
//
//   llmc_qgemm_stats() -> str: how many calls took each path (FP8 scaled in the GEMM or after, ...)
//   llmc_qgemm_a8(x [M, K], qweight [N, K], scales [N, 1], sx [M, 1] or None, residual [M, N] or None,
//                 y [M, N], float8: 0 | 1, floor, qmax)
//     W8A8 (float8 0): qweight int8; xq = round-half-even(x / sx) clipped to [-127, 127];
//       y = (xq @ q^T, exact in int32) * sx * scale.
//     FP8 (float8 1): qweight float8 e4m3fn bit patterns; x8 = e4m3(x / sx) (round-half-even,
//       saturating); y = (x8 @ w8^T, float accumulation) * sx * scale.
//     residual (the graph's ADD after the matmul, as the bf16 GEMM takes it in its epilogue) is
//     added to y: by the GEMM (FP8, beta 1) or by the pass that applies the scales.
//     x, scales, sx, y: float16 or bfloat16 alike; sx are the rows' scales the graph computed
//     (max|row| / 127 or / 448); None: the call computes them as the graph would, in x's dtype,
//     sx = max(max|row|, floor) / qmax (the route absorbs those ops: backends/cuda/routes.py).
//   Weight-only int4 / int8 for many rows (llmc_qgemv's prefill path, qmatmul_dequant_gemm):
//     W dequantized into a scratch slab of output channels, then a bf16/fp16 GEMM.
//
// Why cuBLASLt and not a kernel of our own: at prefill sizes the GEMM is compute-bound and
// cuBLASLt's Hopper kernels (wgmma, TMA) reach the tensor cores' rate; what llmc adds is the
// activation quantization (one pass over x, written as codes the GEMM reads) and the scales.
// FP8 applies both scale vectors inside the GEMM (cuBLASLt's outer-vector scaling) where the
// library has an algorithm for it; otherwise the GEMM runs unscaled into y and a second pass
// scales y in place. int8 accumulates in int32 (scratch), then the same pass writes y.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <algorithm>
#include <atomic>
#include <map>
#include <mutex>
#include <sstream>
#include <tuple>
#include <type_traits>
#include <vector>

#include "llmc_lt.h"
#include "llmc_shim_common.h"

namespace llmc_shim {

// ---- scratch per (device, stream, slot) ------------------------------------------------------
namespace {
struct Scratch {
  void* buf = nullptr;
  size_t bytes = 0;
  std::vector<void*> retired;
};
std::mutex g_scratch_mu;
std::map<std::tuple<int, cudaStream_t, int>, Scratch> g_scratch;
}  // namespace

void* scratch(int dev, cudaStream_t stream, int slot, size_t bytes) {
  std::lock_guard<std::mutex> lock(g_scratch_mu);
  Scratch& s = g_scratch[{dev, stream, slot}];
  if (s.bytes < bytes) {
    if (s.buf) s.retired.push_back(s.buf);
    bytes = std::max(bytes, s.bytes + s.bytes / 2);
    DeviceGuard guard(dev);
    LLMC_CUDA_CHECK(cudaMalloc(&s.buf, bytes));
    s.bytes = bytes;
  }
  return s.buf;
}

namespace qgemm {
namespace {

enum Slot { kCodes = 0, kScales = 1, kAcc = 2, kWeights = 3 };
// calls by route, for llmc_qgemm_stats (a benchmark's check of which path ran)
std::atomic<int64_t> g_fp8_scaled_calls{0}, g_fp8_rescaled_calls{0}, g_int8_calls{0}, g_dequant_calls{0};
constexpr int kThreads = 256;
constexpr size_t kMaxSlabBytes = size_t(64) << 20;  // dequantized weights per GEMM of the prefill path

__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Blocks [0, M): row m of x as codes (8 values a thread-step, one 16-byte load), and its scale as
// float; blocks [M, M + ceil(N / kThreads)): the weight scales as float.
// max|v| over the block's threads (kThreads = 8 warps)
__device__ __forceinline__ float block_max(float v) {
  __shared__ float part[kThreads / 32];
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = v;
  __syncthreads();
  v = part[0];
#pragma unroll
  for (int w = 1; w < kThreads / 32; ++w) v = fmaxf(v, part[w]);
  return v;
}

template <typename T, bool FP8>
__global__ void quantize_rows(const T* __restrict__ x, const T* __restrict__ sx, const T* __restrict__ s,
                              uint8_t* __restrict__ codes, float* __restrict__ sx32, float* __restrict__ s32, int M,
                              int N, int K, float floor, float qmax) {
  const int b = blockIdx.x;
  if (b >= M) {
    const int n = (b - M) * kThreads + threadIdx.x;
    if (n < N) s32[n] = to_f(s[n]);
    return;
  }
  const T* row = x + size_t(b) * K;
  float scale;
  if (sx != nullptr) {
    scale = to_f(sx[b]);
  } else {  // the graph's ops, in T: max(max|row|, floor) / qmax, each result rounded to T
    float amax = 0.f;
    for (int k = threadIdx.x * 8; k < K; k += kThreads * 8) {
      const uint4 u = *reinterpret_cast<const uint4*>(row + k);
      const T* e = reinterpret_cast<const T*>(&u);
#pragma unroll
      for (int j = 0; j < 8; ++j) amax = fmaxf(amax, fabsf(to_f(e[j])));
    }
    amax = block_max(amax);
    scale = to_f(from_f<T>(fmaxf(amax, to_f(from_f<T>(floor))) / qmax));
  }
  if (threadIdx.x == 0) sx32[b] = scale;
  uint8_t* out = codes + size_t(b) * K;
  for (int k = threadIdx.x * 8; k < K; k += kThreads * 8) {
    const uint4 u = *reinterpret_cast<const uint4*>(row + k);
    const T* e = reinterpret_cast<const T*>(&u);
    uint2 packed;
    uint8_t* p = reinterpret_cast<uint8_t*>(&packed);
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const float v = to_f(e[j]) / scale;  // an IEEE division, as the numpy reference does
      if constexpr (FP8) {
        p[j] = __nv_cvt_float_to_fp8(v, __NV_SATFINITE, __NV_E4M3);
      } else {
        p[j] = static_cast<uint8_t>(static_cast<int8_t>(fminf(fmaxf(rintf(v), -127.f), 127.f)));
      }
    }
    *reinterpret_cast<uint2*>(out + k) = packed;
  }
}

// y[m, n] = acc[m, n] * sx[m] * s[n]; acc int32 (W8A8) or y itself (FP8 without fused scales).
template <typename T, typename Acc>
__global__ void rescale(const Acc* __restrict__ acc, const float* __restrict__ sx32, const float* __restrict__ s32,
                        const T* __restrict__ r, T* __restrict__ y, int64_t M, int N) {
  const int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= M * N) return;
  const int64_t m = i / N;
  const int n = int(i - m * N);
  float v;
  if constexpr (std::is_same<Acc, int32_t>::value) v = float(acc[i]);
  else v = to_f(acc[i]);
  y[i] = from_f<T>(v * sx32[m] * s32[n] + (r ? to_f(r[i]) : 0.f));
}

// W rows [n0, n0 + rows) dequantized into w [rows, K]; a thread per 4 bytes of packed codes.
template <typename T, int BITS>
__global__ void dequantize(const uint8_t* __restrict__ qw, const T* __restrict__ s, const T* __restrict__ z,
                           T* __restrict__ w, int64_t n0, int rows, int K, int group) {
  const int per_word = BITS == 4 ? 8 : 4;  // codes in 4 bytes
  const int words = K / per_word;
  const int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= int64_t(rows) * words) return;
  const int r = int(i / words), wi = int(i - int64_t(r) * words);
  const int64_t n = n0 + r;
  const int k0 = wi * per_word;
  const int gi = k0 / group, groups = K / group;
  const float scale = to_f(s[n * groups + gi]);
  const unsigned word = reinterpret_cast<const unsigned*>(qw + n * (BITS == 4 ? K / 2 : K))[wi];
  T* out = w + int64_t(r) * K + k0;
  // one 16-byte (int4: 8 values) or 8-byte (int8: 4 values) store a thread: the slab write is the
  // bulk of this kernel's traffic (scalar 2-byte stores ran it at a fraction of the bandwidth)
  if constexpr (BITS == 4) {
    const float zero = z ? to_f(z[n * groups + gi]) : 8.f;
    uint4 v;
    T* e = reinterpret_cast<T*>(&v);
#pragma unroll
    for (int j = 0; j < 8; ++j) e[j] = from_f<T>((float((word >> (4 * j)) & 15u) - zero) * scale);
    *reinterpret_cast<uint4*>(out) = v;
  } else {
    uint2 v;
    T* e = reinterpret_cast<T*>(&v);
#pragma unroll
    for (int j = 0; j < 4; ++j) e[j] = from_f<T>(float(int8_t((word >> (8 * j)) & 255u)) * scale);
    *reinterpret_cast<uint2*>(out) = v;
  }
}

unsigned blocks_for(int64_t n) { return static_cast<unsigned>((n + kThreads - 1) / kThreads); }

template <typename T>
void run_a8(int dev, cudaStream_t stream, const T* x, const uint8_t* qw, const T* s, const T* sx, const T* r, T* y,
            int M, int N, int K, bool fp8, cudaDataType_t half, float floor, float qmax) {
  uint8_t* codes = static_cast<uint8_t*>(scratch(dev, stream, kCodes, size_t(M) * K));
  const size_t m_pad = (size_t(M) + 63) / 64 * 64;  // the weights' scales 256-byte aligned too (cuBLASLt's vectors)
  float* f32 = static_cast<float*>(scratch(dev, stream, kScales, sizeof(float) * (m_pad + N)));
  float* sx32 = f32;
  float* s32 = f32 + m_pad;
  const unsigned grid = static_cast<unsigned>(M) + blocks_for(N);
  if (fp8) quantize_rows<T, true><<<grid, kThreads, 0, stream>>>(x, sx, s, codes, sx32, s32, M, N, K, floor, qmax);
  else quantize_rows<T, false><<<grid, kThreads, 0, stream>>>(x, sx, s, codes, sx32, s32, M, N, K, floor, qmax);
  LLMC_CUDA_CHECK(cudaGetLastError());
  LtNT p;
  p.a = codes; p.lda = K;
  p.w = qw; p.ldw = K;
  p.m = M; p.n = N; p.k = K;
  if (fp8) {
    p.a_type = p.w_type = CUDA_R_8F_E4M3;
    p.d = y; p.d_type = half; p.ldd = N;
    p.a_scale = sx32; p.w_scale = s32;
    p.c = r;
    if (lt_matmul_nt(dev, stream, p)) {
      ++g_fp8_scaled_calls;
      return;
    }
    ++g_fp8_rescaled_calls;
    p.a_scale = p.w_scale = nullptr;  // no scaled algorithm here: unscaled products, then scale y
    p.c = nullptr;
    LLMC_CHECK(lt_matmul_nt(dev, stream, p)) << "cuBLASLt has no float8 GEMM for M=" << M << " N=" << N << " K=" << K;
    rescale<T, T><<<blocks_for(int64_t(M) * N), kThreads, 0, stream>>>(y, sx32, s32, r, y, M, N);
  } else {
    ++g_int8_calls;
    int32_t* acc = static_cast<int32_t*>(scratch(dev, stream, kAcc, sizeof(int32_t) * size_t(M) * N));
    p.a_type = p.w_type = CUDA_R_8I;
    p.d = acc; p.d_type = CUDA_R_32I; p.ldd = N;
    LLMC_CHECK(lt_matmul_nt(dev, stream, p)) << "cuBLASLt has no int8 GEMM for M=" << M << " N=" << N << " K=" << K;
    rescale<T, int32_t><<<blocks_for(int64_t(M) * N), kThreads, 0, stream>>>(acc, sx32, s32, r, y, M, N);
  }
  LLMC_CUDA_CHECK(cudaGetLastError());
}

void QGemmA8(DLTensor* x, DLTensor* qw, DLTensor* s, tvm::ffi::AnyView sx_any, tvm::ffi::AnyView r_any, DLTensor* y,
             int64_t float8, double floor, double qmax) {
  DLTensor* sx = optional_tensor(sx_any);
  DLTensor* r = optional_tensor(r_any);
  for (auto [t, name] : {std::pair<const DLTensor*, const char*>{x, "x"}, {qw, "qweight"}, {s, "scales"}, {y, "y"}}) {
    check_cuda_tensor(t, name);
    LLMC_CHECK(compact(t)) << name << " must be contiguous";
  }
  if (sx != nullptr) {
    check_cuda_tensor(sx, "sx");
    LLMC_CHECK(compact(sx) && sx->ndim == 2 && dtype_of(sx) == dtype_of(x)) << "sx must be a contiguous [M, 1] of x's dtype";
  } else {
    LLMC_CHECK(qmax > 0 && floor > 0) << "without sx, floor (" << floor << ") and qmax (" << qmax << ") must be > 0";
  }
  LLMC_CHECK(float8 == 0 || float8 == 1) << "float8 must be 0 (int8) or 1 (e4m3), got " << float8;
  const DT dt = dtype_of(x);
  LLMC_CHECK(dt == DT::kF16 || dt == DT::kBF16) << "x dtype " << dtype_name(dt) << " (float16 or bfloat16)";
  LLMC_CHECK(dtype_of(s) == dt && dtype_of(y) == dt) << "x, scales and y must share a dtype";
  LLMC_CHECK(x->ndim == 2 && y->ndim == 2 && qw->ndim == 2 && s->ndim == 2) << "x, qweight, scales, y must be 2-D";
  const int64_t M = x->shape[0], K = x->shape[1], N = qw->shape[0];
  LLMC_CHECK(qw->shape[1] == K && qw->dtype.bits == 8 && qw->dtype.lanes == 1) << "qweight " << shape_str(qw)
                                                                               << " must be 8-bit [N, " << K << "]";
  LLMC_CHECK(K % 16 == 0 && N % 8 == 0) << "K (" << K << ") must be a multiple of 16 and N (" << N << ") of 8";
  LLMC_CHECK(s->shape[0] == N && s->shape[1] == 1) << "scales " << shape_str(s) << " must be [" << N << ", 1]";
  LLMC_CHECK(sx == nullptr || (sx->shape[0] == M && sx->shape[1] == 1)) << "sx " << shape_str(sx) << " must be ["
                                                                       << M << ", 1]";
  LLMC_CHECK(y->shape[0] == M && y->shape[1] == N) << "y " << shape_str(y);
  if (r != nullptr) {
    check_cuda_tensor(r, "residual");
    LLMC_CHECK(compact(r) && r->ndim == 2 && r->shape[0] == M && r->shape[1] == N && dtype_of(r) == dt)
        << "residual " << shape_str(r) << " must be a contiguous [" << M << ", " << N << "] of x's dtype";
  }
  LLMC_CHECK(M < (int64_t(1) << 31) && M * N < (int64_t(1) << 40)) << "x has " << M << " rows";
  LLMC_CHECK(reinterpret_cast<uintptr_t>(data_of(x)) % 16 == 0) << "x must be 16-byte aligned";
  if (M == 0 || N == 0) return;
  const int dev = x->device.device_id;
  DeviceGuard guard(dev);
  cudaStream_t stream = current_stream(dev);
  const uint8_t* w = reinterpret_cast<const uint8_t*>(data_of(qw));
  if (dt == DT::kF16) {
    run_a8<__half>(dev, stream, reinterpret_cast<const __half*>(data_of(x)), w,
                   reinterpret_cast<const __half*>(data_of(s)),
                   sx ? reinterpret_cast<const __half*>(data_of(sx)) : nullptr,
                   r ? reinterpret_cast<const __half*>(data_of(r)) : nullptr, reinterpret_cast<__half*>(data_of(y)),
                   int(M), int(N), int(K), float8 == 1, CUDA_R_16F, float(floor), float(qmax));
  } else {
    run_a8<__nv_bfloat16>(dev, stream, reinterpret_cast<const __nv_bfloat16*>(data_of(x)), w,
                          reinterpret_cast<const __nv_bfloat16*>(data_of(s)),
                          sx ? reinterpret_cast<const __nv_bfloat16*>(data_of(sx)) : nullptr,
                          r ? reinterpret_cast<const __nv_bfloat16*>(data_of(r)) : nullptr,
                          reinterpret_cast<__nv_bfloat16*>(data_of(y)), int(M), int(N), int(K), float8 == 1,
                          CUDA_R_16BF, float(floor), float(qmax));
  }
}

template <typename T>
void dequant_gemm(int dev, cudaStream_t stream, cudaDataType_t half, int bits, const T* x, const uint8_t* qw,
                  const T* s, const T* z, T* y, int64_t rows, int64_t n, int64_t K, int64_t group) {
  // slabs of output channels, so the dequantized copy stays small (the LM head is 0.5 GB in bf16)
  int64_t slab = std::max<int64_t>(int64_t(kMaxSlabBytes / (sizeof(T) * size_t(K))) / 128 * 128, 128);
  slab = std::min(slab, n);
  ++g_dequant_calls;
  T* w = static_cast<T*>(scratch(dev, stream, kWeights, sizeof(T) * size_t(slab) * K));
  for (int64_t n0 = 0; n0 < n; n0 += slab) {
    const int r = int(std::min(slab, n - n0));
    const int64_t words = int64_t(r) * (K / (bits == 4 ? 8 : 4));
    if (bits == 4) dequantize<T, 4><<<blocks_for(words), kThreads, 0, stream>>>(qw, s, z, w, n0, r, int(K), int(group));
    else dequantize<T, 8><<<blocks_for(words), kThreads, 0, stream>>>(qw, s, z, w, n0, r, int(K), int(group));
    LLMC_CUDA_CHECK(cudaGetLastError());
    LtNT p;
    p.a = x; p.a_type = half; p.lda = K;
    p.w = w; p.w_type = half; p.ldw = K;
    p.d = y + n0; p.d_type = half; p.ldd = n;
    p.m = rows; p.n = r; p.k = K;
    LLMC_CHECK(lt_matmul_nt(dev, stream, p)) << "cuBLASLt has no GEMM for M=" << rows << " N=" << r << " K=" << K;
  }
}

tvm::ffi::String QGemmStats() {
  std::ostringstream os;
  os << "fp8 scaled in the GEMM: " << g_fp8_scaled_calls << ", fp8 rescaled after: " << g_fp8_rescaled_calls
     << ", int8: " << g_int8_calls << ", dequantize + GEMM: " << g_dequant_calls;
  return tvm::ffi::String(os.str());
}

}  // namespace
}  // namespace qgemm

void qmatmul_dequant_gemm(int dev, cudaStream_t stream, cudaDataType_t half, int bits, const void* x, const void* qw,
                          const void* scales, const void* zeros, void* y, int64_t rows, int64_t n, int64_t k,
                          int64_t group) {
  const uint8_t* q = static_cast<const uint8_t*>(qw);
  if (half == CUDA_R_16F) {
    qgemm::dequant_gemm<__half>(dev, stream, half, bits, static_cast<const __half*>(x), q,
                                static_cast<const __half*>(scales), static_cast<const __half*>(zeros),
                                static_cast<__half*>(y), rows, n, k, group);
  } else {
    qgemm::dequant_gemm<__nv_bfloat16>(dev, stream, half, bits, static_cast<const __nv_bfloat16*>(x), q,
                                       static_cast<const __nv_bfloat16*>(scales),
                                       static_cast<const __nv_bfloat16*>(zeros), static_cast<__nv_bfloat16*>(y), rows,
                                       n, k, group);
  }
}

}  // namespace llmc_shim

TVM_FFI_DLL_EXPORT_TYPED_FUNC(llmc_qgemm_a8, llmc_shim::qgemm::QGemmA8);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(llmc_qgemm_stats, llmc_shim::qgemm::QGemmStats);
