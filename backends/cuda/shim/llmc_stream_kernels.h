// llmc CUDA shim: device helpers of the weight-streaming decode kernels (llmc_gemv.cu's fused
// GEMV, llmc_qgemv.cu's dequantizing GEMV, llmc_tc_gemv.cu's tensor-core one) and their
// programmatic dependent launch.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <map>
#include <mutex>
#include <utility>

#include "llmc_shim_common.h"

namespace llmc_shim {

// A 16-byte weight load that skips L1 (weights are read once), so x stays there for the block's
// other warps.
__device__ __forceinline__ uint4 ld_stream(const void* p) {
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(p));
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// A GEMV's dot products of M rows x R channels, each warp's over its slice of K: summed over the
// warp's lanes, then, where KS > 1 warps (`part` 0 .. KS - 1 of the set whose first warp is
// `warp - part`) share the channels, over the set in shared memory. True in the lane-summed warp
// that holds the totals (the set's first); the other warps of a set are done.
template <int KS, int WARPS, int M, int R>
__device__ __forceinline__ bool sum_k_slices(float (&acc)[M][R], int warp, int lane, int part) {
#pragma unroll
  for (int m = 0; m < M; ++m)
#pragma unroll
    for (int r = 0; r < R; ++r) acc[m][r] = warp_sum(acc[m][r]);
  if constexpr (KS > 1) {
    __shared__ float s_part[WARPS][M][R];
    if (lane == 0) {
#pragma unroll
      for (int m = 0; m < M; ++m)
#pragma unroll
        for (int r = 0; r < R; ++r) s_part[warp][m][r] = acc[m][r];
    }
    __syncthreads();
    if (part != 0) return false;
#pragma unroll
    for (int m = 0; m < M; ++m)
#pragma unroll
      for (int r = 0; r < R; ++r)
#pragma unroll
        for (int q = 1; q < KS; ++q) acc[m][r] += s_part[warp + q][m][r];
  }
  return true;
}

// The RMSNorm factor 1 / sqrt(mean(x^2) + eps) of each of the first `rows` (<= M) rows of x (k
// elements, k % 8 == 0, row stride ldx, 16-byte aligned rows) into scale[0..M), summed by all
// WARPS warps of the block (every thread must call it). The fused GEMVs call it while their first
// weight loads are in flight. to8(u, f): the 8 halves of a 16-byte load as floats.
template <int M, int WARPS, typename T, typename To8>
__device__ __forceinline__ void block_rms_scales(const T* x, int64_t ldx, int rows, int k, float eps, To8 to8,
                                                 float* scale) {
  __shared__ float part[WARPS][M];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int m = 0; m < M; ++m) {
    float sq = 0.f;
    if (m < rows) {
      for (int c = threadIdx.x; c < k / 8; c += WARPS * 32) {
        float v[8];
        to8(__ldg(reinterpret_cast<const uint4*>(x + m * ldx) + c), v);
#pragma unroll
        for (int j = 0; j < 8; ++j) sq = fmaf(v[j], v[j], sq);
      }
    }
    sq = warp_sum(sq);
    if (lane == 0) part[warp][m] = sq;
  }
  __syncthreads();
#pragma unroll
  for (int m = 0; m < M; ++m) {
    float sq = 0.f;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) sq += part[w][m];
    scale[m] = rsqrtf(sq / float(k) + eps);
  }
}

// Code j of a 32-bit word as a float, without the int->float conversion (a quarter-rate
// instruction that bounded the first llmc_qgemv): the code goes into the mantissa of 2^23, and
// subtracting 2^23 (+128 for a signed byte, stored biased) leaves it exactly.
template <int BITS>
__device__ __forceinline__ float code(unsigned word, int j) {
  if constexpr (BITS == 4) {
    return __uint_as_float(0x4B000000u | ((word >> (4 * j)) & 15u)) - 8388608.f;
  } else {
    return __uint_as_float(0x4B000000u | (((word >> (8 * j)) & 255u) ^ 128u)) - 8388736.f;
  }
}

// The packed half type of T (bf16x2 / half2) and the magic number that makes int4 codes halves:
// OR-ing bf16's 128.0 (0x4300) or fp16's 1024.0 (0x6400), whose last mantissa bits are 1 apart,
// onto a code q in the low bits gives base + q exactly (llmc_qgemv.cu: chunk_dot_int4x2).
template <typename T> struct Packed;
template <> struct Packed<__nv_bfloat16> {
  using T2 = __nv_bfloat162;
  static constexpr unsigned kMagic = 0x43004300u;
  static constexpr float kBase = 128.f;
  static __device__ __forceinline__ T2 splat(float v) { return __float2bfloat162_rn(v); }
  static __device__ __forceinline__ T2 pack(float a, float b) { return __floats2bfloat162_rn(a, b); }
  static __device__ __forceinline__ float2 to_float2(T2 v) { return __bfloat1622float2(v); }
  static __device__ __forceinline__ float f(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 t(float v) { return __float2bfloat16_rn(v); }
};
template <> struct Packed<__half> {
  using T2 = __half2;
  static constexpr unsigned kMagic = 0x64006400u;
  static constexpr float kBase = 1024.f;
  static __device__ __forceinline__ T2 splat(float v) { return __float2half2_rn(v); }
  static __device__ __forceinline__ T2 pack(float a, float b) { return __floats2half2_rn(a, b); }
  static __device__ __forceinline__ float2 to_float2(T2 v) { return __half22float2(v); }
  static __device__ __forceinline__ float f(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half t(float v) { return __float2half_rn(v); }
};

template <typename T2>
__device__ __forceinline__ T2 as_pair(unsigned v) {
  return *reinterpret_cast<const T2*>(&v);
}

// The pairs (v_j, v_j+4), j = 0..3, of 8 consecutive halves: the order in which int4 codes come
// out of a 32-bit word two at a time (code j at bits 4j: the word shifted by 4j, masked with
// 0x000F000F, holds codes j and j + 4).
template <typename T2>
__device__ __forceinline__ void pairs(const uint4& u, T2* out) {
  out[0] = as_pair<T2>(__byte_perm(u.x, u.z, 0x5410));
  out[1] = as_pair<T2>(__byte_perm(u.x, u.z, 0x7632));
  out[2] = as_pair<T2>(__byte_perm(u.y, u.w, 0x5410));
  out[3] = as_pair<T2>(__byte_perm(u.y, u.w, 0x7632));
}

// Programmatic dependent launch (Hopper): a kernel launched with launch_pdl may start while the
// kernel before it finishes; it issues its first weight loads (weights are never written by an
// earlier kernel), then waits for that kernel's results (pdl_wait) before reading activations or
// writing its output. pdl_launch_dependents lets the next such launch start once all of this
// kernel's blocks run. So in a chain of GEMVs (O projection -> gate/up -> down -> next QKV) each
// one's weight fetch overlaps the previous one's tail. No-ops before sm_90.
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// A device attribute of `dev`, asked once per (device, attribute).
inline int device_attribute(int dev, cudaDeviceAttr attr) {
  static std::mutex mu;
  static std::map<std::pair<int, int>, int> known;
  std::lock_guard<std::mutex> lock(mu);
  auto it = known.find({dev, int(attr)});
  if (it != known.end()) return it->second;
  int v = 0;
  LLMC_CUDA_CHECK(cudaDeviceGetAttribute(&v, attr, dev));
  return known[{dev, int(attr)}] = v;
}

// Whether `dev` takes programmatic dependent launches (compute capability 9.0+).
inline bool pdl_capable(int dev) { return device_attribute(dev, cudaDevAttrComputeCapabilityMajor) >= 9; }

inline int sm_count(int dev) { return device_attribute(dev, cudaDevAttrMultiProcessorCount); }

// kernel<<<grid, block, smem, stream>>>(args...) as a programmatic dependent launch where the device has it.
template <typename... KArgs, typename... Args>
void launch_pdl_smem(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, int dev, cudaStream_t stream,
                     Args&&... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = pdl_capable(dev) ? 1 : 0;
  LLMC_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...));
}

template <typename... KArgs, typename... Args>
void launch_pdl(void (*kernel)(KArgs...), dim3 grid, dim3 block, int dev, cudaStream_t stream, Args&&... args) {
  launch_pdl_smem(kernel, grid, block, 0, dev, stream, std::forward<Args>(args)...);
}

}  // namespace llmc_shim
