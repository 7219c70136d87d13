// llmc CUDA shim: device helpers of the weight-streaming decode kernels (llmc_gemv.cu's fused
// GEMV, llmc_qgemv.cu's dequantizing GEMV) and their programmatic dependent launch.
#pragma once

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

// kernel<<<grid, block, 0, stream>>>(args...) as a programmatic dependent launch where the device has it.
template <typename... KArgs, typename... Args>
void launch_pdl(void (*kernel)(KArgs...), dim3 grid, dim3 block, int dev, cudaStream_t stream, Args&&... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = pdl_capable(dev) ? 1 : 0;
  LLMC_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...));
}

}  // namespace llmc_shim
