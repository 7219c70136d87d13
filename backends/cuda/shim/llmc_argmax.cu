// llmc CUDA shim: greedy decoding on the device.
//
//   llmc_argmax_rows(logits [rows, vocab], out [rows] int32)
//
// Each row's index of its largest value, the first one among equal maxima, NaN counting as the
// largest (as numpy's argmax, which the host path uses). float16, bfloat16 or float32 logits.
// A serving step then copies rows * 4 bytes to the host instead of rows * vocab * 2 (a batch
// of 64 rows of a 128k vocabulary: 16 MB, milliseconds of copy and conversion per step). One block per row, a strided pass per thread, then warp and block reductions
// of (value, index) pairs. Runs on TVM-FFI's current stream (graph-capturable).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "llmc_shim_common.h"

namespace llmc_shim_argmax {
using namespace llmc_shim;
namespace {

constexpr int kThreads = 512;

__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f(float x) { return x; }

// (v, i) beats (w, j) as numpy's argmax scans a row: NaN is the largest value (the first NaN
// wins), equal values go to the smaller index; an index of -1 is "nothing seen yet".
__device__ __forceinline__ bool better(float v, int i, float w, int j) {
  if (j < 0) return i >= 0;
  if (i < 0) return false;
  const bool vn = v != v, wn = w != w;
  if (vn || wn) return vn && (!wn || i < j);
  return v > w || (v == w && i < j);
}

__device__ __forceinline__ void warp_best(float& best, int& arg) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float w = __shfl_xor_sync(0xffffffffu, best, o);
    const int j = __shfl_xor_sync(0xffffffffu, arg, o);
    if (better(w, j, best, arg)) best = w, arg = j;
  }
}

template <typename T>
__global__ void argmax_kernel(const T* __restrict__ x, int* __restrict__ out, int vocab) {
  const T* row = x + size_t(blockIdx.x) * vocab;
  float best = 0.f;
  int arg = -1;
  for (int k = threadIdx.x; k < vocab; k += kThreads) {
    const float v = to_f(row[k]);
    if (better(v, k, best, arg)) best = v, arg = k;
  }
  warp_best(best, arg);
  __shared__ float vals[kThreads / 32];
  __shared__ int idxs[kThreads / 32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) vals[warp] = best, idxs[warp] = arg;
  __syncthreads();
  if (warp == 0) {
    best = lane < kThreads / 32 ? vals[lane] : 0.f;
    arg = lane < kThreads / 32 ? idxs[lane] : -1;
    warp_best(best, arg);
    if (lane == 0) out[blockIdx.x] = arg;
  }
}

void ArgmaxRows(DLTensor* x, DLTensor* out) {
  check_cuda_tensor(x, "logits");
  check_cuda_tensor(out, "out");
  const DT dt = dtype_of(x);
  LLMC_CHECK(dt == DT::kF16 || dt == DT::kBF16 || dt == DT::kF32) << "logits dtype " << dtype_name(dt);
  LLMC_CHECK(x->ndim == 2 && compact(x)) << "logits must be a contiguous [rows, vocab], got " << shape_str(x);
  LLMC_CHECK(out->ndim == 1 && out->shape[0] == x->shape[0] && out->dtype.code == kDLInt && out->dtype.bits == 32 &&
             compact(out))
      << "out must be int32 [" << x->shape[0] << "], got " << shape_str(out);
  const int64_t rows = x->shape[0], vocab = x->shape[1];
  LLMC_CHECK(vocab > 0 && vocab < (int64_t(1) << 31)) << "bad vocab " << vocab;
  if (rows == 0) return;
  const int dev = x->device.device_id;
  DeviceGuard guard(dev);
  cudaStream_t stream = current_stream(dev);
  int* o = reinterpret_cast<int*>(data_of(out));
  const dim3 grid(static_cast<unsigned>(rows)), block(kThreads);
  if (dt == DT::kF16) argmax_kernel<<<grid, block, 0, stream>>>(reinterpret_cast<const __half*>(data_of(x)), o, int(vocab));
  else if (dt == DT::kBF16)
    argmax_kernel<<<grid, block, 0, stream>>>(reinterpret_cast<const __nv_bfloat16*>(data_of(x)), o, int(vocab));
  else argmax_kernel<<<grid, block, 0, stream>>>(reinterpret_cast<const float*>(data_of(x)), o, int(vocab));
  LLMC_CUDA_CHECK(cudaGetLastError());
}

}  // namespace
}  // namespace llmc_shim_argmax

TVM_FFI_DLL_EXPORT_TYPED_FUNC(llmc_argmax_rows, llmc_shim_argmax::ArgmaxRows);
