// llmc CUDA shim: device helpers of the weight-streaming decode kernels (llmc_gemv.cu's fused
// GEMV, llmc_qgemv.cu's dequantizing GEMV) and their programmatic dependent launch.
#pragma once

#include <cuda_runtime.h>

#include <map>
#include <mutex>

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

// Whether `dev` takes programmatic dependent launches (compute capability 9.0+), asked once per device.
inline bool pdl_capable(int dev) {
  static std::mutex mu;
  static std::map<int, bool> known;
  std::lock_guard<std::mutex> lock(mu);
  auto it = known.find(dev);
  if (it != known.end()) return it->second;
  int major = 0;
  LLMC_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
  return known[dev] = major >= 9;
}

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
