// llmc CUDA shim: weight-only quantized matmul for decode, y = x @ W^T with W dequantized as it
// is read (Op.QMATMUL; layout in compiler/ops.py QMatmulAttrs).
//
//   llmc_qgemv(x [M, K], qweight, scales [N, K / group], zeros [N, K / group] or None, y [M, N],
//              bits: 4 | 8, group: int)
//     bits 8: qweight int8 [N, K], W = q * scale
//     bits 4: qweight uint8 [N, K / 2] (k = 2i low nibble of byte i, 2i + 1 high), W = (q - zero) * scale,
//             zero = 8 without a zeros input; zeros hold integers 0..15 (compiler/quant_layout.py)
//   x, scales, zeros, y: float16 or bfloat16 alike; accumulation in float32. Any M: rows go in
//   chunks of 8 (a grid row each), every chunk streaming the weights again (from L2 when they fit:
//   right for decode and small batches, a fallback for prefill, which wants a tensor-core GEMM).
//
// Decode reads every weight once, so time is bytes: a warp streams the packed rows of one output
// channel (or of 4 when rows are short) with 16-byte loads, 8 in flight per lane before any math,
// each load 32 int4 or 16 int8 weights of one group; per load the dot product is
// s * (sum q x - z * sum x), so the dequantization is two multiply-adds per group slice, not one
// per weight, and codes become floats by bit tricks, not conversions (int4: two at a time, packed
// bf16/fp16 math; see chunk_dot_int4x2). x ([M, K], a few KB) is
// read through the L1 cache by every warp, once per chunk for all its channels. Runs on TVM-FFI's
// current stream (graph-capturable). (The first version, one channel per warp and two loads in
// flight at K = 2048, read at 27% of the copy bandwidth: latency-bound.)
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "llmc_lt.h"
#include "llmc_shim_common.h"

namespace llmc_shim_qgemv {
using namespace llmc_shim;
namespace {

constexpr int kWarps = 4;
constexpr int kLoads = 8;    // 16-byte weight loads in flight per lane before any math
constexpr int kMaxRows = 8;
constexpr int kWideRows = 4;
// From this many rows on (prefill), W is dequantized into a scratch slab and multiplied on tensor
// cores (llmc_qgemm.cu): the GEMV streams the weights once per 8 rows.
constexpr int64_t kGemmRows = 64;  // output channels per warp when a row is too short to fill kLoads alone

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

// Code j of a 32-bit word as a float, without the int->float conversion (a quarter-rate
// instruction that bounded the first version): the code goes into the mantissa of 2^23, and
// subtracting 2^23 (+128 for a signed byte, stored biased) leaves it exactly.
template <int BITS>
__device__ __forceinline__ float code(unsigned word, int j) {
  if constexpr (BITS == 4) {
    return __uint_as_float(0x4B000000u | ((word >> (4 * j)) & 15u)) - 8388608.f;
  } else {
    return __uint_as_float(0x4B000000u | (((word >> (8 * j)) & 255u) ^ 128u)) - 8388736.f;
  }
}

// One 16-byte chunk per row of R output channels (w[r]) against M rows of x: `per` weights from
// k. x is loaded once for all R channels; each channel's dot product is s * (sum q x - z * sum x).
template <typename T, int BITS, int M, int R>
__device__ __forceinline__ void chunk_dot(const uint4* w, const T* x, int64_t ldx, int k, const float* s,
                                          const float* z, float (*acc)[R], int rows) {
  constexpr int per = BITS == 4 ? 32 : 16;
  constexpr int words_per8 = BITS == 4 ? 1 : 2;  // 32-bit words holding 8 codes
#pragma unroll
  for (int m = 0; m < M; ++m) {
    if (m >= rows) break;  // the last chunk of 8 rows may be short
    float qx[R], sx = 0.f;
#pragma unroll
    for (int r = 0; r < R; ++r) qx[r] = 0.f;
#pragma unroll
    for (int h = 0; h < per / 8; ++h) {
      float xv[8];
      load8(x + m * ldx + k + h * 8, xv);
#pragma unroll
      for (int j = 0; j < 8; ++j) sx += xv[j];
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const unsigned* words = reinterpret_cast<const unsigned*>(&w[r]);
#pragma unroll
        for (int j = 0; j < 8; ++j)
          qx[r] = fmaf(code<BITS>(words[h * words_per8 + j / (8 / words_per8)], j % (8 / words_per8)), xv[j], qx[r]);
      }
    }
#pragma unroll
    for (int r = 0; r < R; ++r) acc[m][r] = fmaf(s[r], qx[r] - z[r] * sx, acc[m][r]);
  }
}

// int4 codes two at a time: a 32-bit word holds codes j = 0..7 at bits 4j; masking the word
// shifted by 4j with 0x000F000F leaves codes j and j + 4 in the low bits of its two halves, and
// OR-ing the packed type's magic (bf16 128.0 = 0x4300, fp16 1024.0 = 0x6400, whose last mantissa
// bits are 1 apart) makes the pair (base + q_j, base + q_j+4) exactly. Subtracting (base + zero)
// leaves q - zero exactly (|q - zero| <= 15), and packed FMAs against the matching x pairs add
// four products per half before the pair goes to float: ~2.4 instructions a weight instead of
// ~4.5 (shift, mask, float subtract, FMA, plus x converted per chunk), which bounded the scalar
// loop at ~3 T weights/s. The bf16 partials of four products cost ~2^-9 relative, the size of
// the output's own rounding.
template <typename T> struct Packed;
template <> struct Packed<__nv_bfloat16> {
  using T2 = __nv_bfloat162;
  static constexpr unsigned kMagic = 0x43004300u;
  static constexpr float kBase = 128.f;
  static __device__ __forceinline__ T2 splat(float v) { return __float2bfloat162_rn(v); }
  static __device__ __forceinline__ float2 to_float2(T2 v) { return __bfloat1622float2(v); }
};
template <> struct Packed<__half> {
  using T2 = __half2;
  static constexpr unsigned kMagic = 0x64006400u;
  static constexpr float kBase = 1024.f;
  static __device__ __forceinline__ T2 splat(float v) { return __float2half2_rn(v); }
  static __device__ __forceinline__ float2 to_float2(T2 v) { return __half22float2(v); }
};

template <typename T2>
__device__ __forceinline__ T2 as_pair(unsigned v) {
  return *reinterpret_cast<const T2*>(&v);
}

// One 16-byte chunk of int4 codes (32 weights from k) per channel against M rows of x: packed
// math, float accumulation per 8 codes. z is the zero point (8 without a zeros input), an integer.
template <typename T, int M, int R>
__device__ __forceinline__ void chunk_dot_int4x2(const uint4* w, const T* x, int64_t ldx, int k, const float* s,
                                                 const float* z, float (*acc)[R], int rows) {
  using P = Packed<T>;
  using T2 = typename P::T2;
  T2 zz[R];
#pragma unroll
  for (int r = 0; r < R; ++r) zz[r] = P::splat(P::kBase + z[r]);
#pragma unroll
  for (int m = 0; m < M; ++m) {
    if (m >= rows) break;
    float part[R];
#pragma unroll
    for (int r = 0; r < R; ++r) part[r] = 0.f;
#pragma unroll
    for (int i = 0; i < 4; ++i) {  // word i: codes 8i .. 8i + 7
      const uint4 u = __ldg(reinterpret_cast<const uint4*>(x + m * ldx + k + i * 8));
      T2 xp[4];  // (x_j, x_j+4), the order the codes come out in
      xp[0] = as_pair<T2>(__byte_perm(u.x, u.z, 0x5410));
      xp[1] = as_pair<T2>(__byte_perm(u.x, u.z, 0x7632));
      xp[2] = as_pair<T2>(__byte_perm(u.y, u.w, 0x5410));
      xp[3] = as_pair<T2>(__byte_perm(u.y, u.w, 0x7632));
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const unsigned word = reinterpret_cast<const unsigned*>(&w[r])[i];
        T2 a = P::splat(0.f);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const T2 q = __hsub2(as_pair<T2>(((word >> (4 * j)) & 0x000F000Fu) | P::kMagic), zz[r]);
          a = __hfma2(q, xp[j], a);
        }
        const float2 f = P::to_float2(a);
        part[r] += f.x + f.y;
      }
    }
#pragma unroll
    for (int r = 0; r < R; ++r) acc[m][r] = fmaf(s[r], part[r], acc[m][r]);
  }
}

// A warp computes R consecutive output channels: each lane issues kLoads 16-byte loads of their
// packed rows (kLoads / R chunks of each) before any math, so a short row (K = 2048 at int4 is 64
// chunks, two per lane) still keeps enough bytes in flight to cover the memory latency.
template <typename T, int BITS, int M, int R>
__global__ void __launch_bounds__(kWarps * 32) qgemv_kernel(const T* __restrict__ x, const uint4* __restrict__ qw,
                                                             const T* __restrict__ scales, const T* __restrict__ zeros,
                                                             T* __restrict__ y, int n_out, int K, int group,
                                                             int rows_total) {
  constexpr int per = BITS == 4 ? 32 : 16;  // weights per 16-byte chunk
  constexpr int U = kLoads / R;             // chunks of each channel per lane per step
  const int lane = threadIdx.x % 32;
  const int n0 = (blockIdx.x * kWarps + threadIdx.x / 32) * R;
  if (n0 >= n_out) return;
  const int rows = min(M, rows_total - int(blockIdx.y) * M);
  x += int64_t(blockIdx.y) * M * K;
  y += int64_t(blockIdx.y) * M * n_out;
  const int chunks = K / per, groups = K / group;
  const float zero_default = BITS == 4 ? 8.f : 0.f;
  int nr[R];  // the channel of slot r (clamped: a missing one recomputes the last, never stored)
#pragma unroll
  for (int r = 0; r < R; ++r) nr[r] = min(n0 + r, n_out - 1);
  float acc[M][R];
#pragma unroll
  for (int m = 0; m < M; ++m)
#pragma unroll
    for (int r = 0; r < R; ++r) acc[m][r] = 0.f;
  for (int c0 = 0; c0 < chunks; c0 += 32 * U) {
    uint4 w[U][R];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int c = c0 + lane + 32 * u;
#pragma unroll
      for (int r = 0; r < R; ++r)
        w[u][r] = c < chunks ? __ldg(qw + int64_t(nr[r]) * chunks + c) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int c = c0 + lane + 32 * u;
      if (c >= chunks) continue;
      const int k = c * per, g = k / group;
      float s[R], z[R];
#pragma unroll
      for (int r = 0; r < R; ++r) {
        s[r] = to_f(scales[int64_t(nr[r]) * groups + g]);
        z[r] = zeros ? to_f(zeros[int64_t(nr[r]) * groups + g]) : zero_default;
      }
      if constexpr (BITS == 4) chunk_dot_int4x2<T, M, R>(w[u], x, K, k, s, z, acc, rows);
      else chunk_dot<T, BITS, M, R>(w[u], x, K, k, s, z, acc, rows);
    }
  }
#pragma unroll
  for (int m = 0; m < M; ++m)
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) acc[m][r] += __shfl_xor_sync(0xffffffffu, acc[m][r], o);
  if (lane == 0) {
#pragma unroll
    for (int m = 0; m < M; ++m)
#pragma unroll
      for (int r = 0; r < R; ++r)
        if (m < rows && n0 + r < n_out) y[int64_t(m) * n_out + n0 + r] = from_f<T>(acc[m][r]);
  }
}

template <typename T, int BITS, int R>
void launch_grid(int64_t rows, const T* x, const uint4* qw, const T* s, const T* z, T* y, int n, int K, int group,
                 cudaStream_t stream) {
  const int warps = (n + R - 1) / R;
  const dim3 grid(static_cast<unsigned>((warps + kWarps - 1) / kWarps),
                  static_cast<unsigned>((rows + kMaxRows - 1) / kMaxRows)),
      block(kWarps * 32);
  const int m = rows > kMaxRows ? kMaxRows : int(rows);
#define LLMC_QGEMV_CASE(MR) \
  case MR: qgemv_kernel<T, BITS, MR, R><<<grid, block, 0, stream>>>(x, qw, s, z, y, n, K, group, int(rows)); break;
  if constexpr (R == 1) {
    switch (m) {
      LLMC_QGEMV_CASE(1) LLMC_QGEMV_CASE(2) LLMC_QGEMV_CASE(3) LLMC_QGEMV_CASE(4)
      LLMC_QGEMV_CASE(5) LLMC_QGEMV_CASE(6) LLMC_QGEMV_CASE(7) LLMC_QGEMV_CASE(8)
    }
  } else {
    switch (m) { LLMC_QGEMV_CASE(1) LLMC_QGEMV_CASE(2) }
  }
#undef LLMC_QGEMV_CASE
  LLMC_CUDA_CHECK(cudaGetLastError());
}

template <typename T, int BITS>
void launch_rows(int64_t rows, const T* x, const uint4* qw, const T* s, const T* z, T* y, int n, int K, int group,
                 cudaStream_t stream) {
  // a row of fewer than 32 * kLoads chunks leaves loads to spare: give the warp kWideRows channels
  // (decode's 1-2 rows only: more x rows would need more registers than the loads save)
  const int chunks = K / (BITS == 4 ? 32 : 16);
  if (rows <= 2 && chunks < 32 * kLoads) launch_grid<T, BITS, kWideRows>(rows, x, qw, s, z, y, n, K, group, stream);
  else launch_grid<T, BITS, 1>(rows, x, qw, s, z, y, n, K, group, stream);
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
  if (rows >= kGemmRows) {
    qmatmul_dequant_gemm(dev, stream, dt == DT::kF16 ? CUDA_R_16F : CUDA_R_16BF, int(bits), data_of(x), data_of(qw),
                         data_of(s), z ? data_of(z) : nullptr, data_of(y), rows, n, K, group);
    return;
  }
  if (dt == DT::kF16) launch<__half>(int(bits), rows, x, qw, s, z, y, int(n), int(K), int(group), stream);
  else launch<__nv_bfloat16>(int(bits), rows, x, qw, s, z, y, int(n), int(K), int(group), stream);
}

}  // namespace
}  // namespace llmc_shim_qgemv

TVM_FFI_DLL_EXPORT_TYPED_FUNC(llmc_qgemv, llmc_shim_qgemv::QGemv);
