// llmc CUDA shim: one-shot all-reduce of small messages between the GPUs of one host.
//
//   llmc_allreduce_oneshot(x, out, rank, world, slot_bytes, base0, ..., base7)
//
// Why: a tensor-parallel decode step sums a few KiB (the hidden state of the batch) twice per
// layer. NCCL's ring takes ~20 us for that however it is launched: its latency, not the bytes,
// sets the step time. Here every rank pushes its message into every rank's buffer (CUDA IPC,
// set up by runtime/dist/oneshot.py; the stores to peers cross NVLink without waiting for an
// answer), raises a flag in each peer's memory, waits for the peers' flags and sums the messages
// from its own memory: one kernel, one round of flags, no read across NVLink.
//
// It is launched as a programmatic dependent launch (Hopper): it lets the next kernel start at
// once (that kernel fetches its first weights while the flags travel, then waits for this one),
// and waits itself for the kernel before it before touching anything.
//
// Each rank's region (`base_r`, cudaMalloc'd, mapped by every peer):
//   [0, 2 KiB)      flags[block][src]: the last call at which rank src's block `block` data came
//   [2 KiB, 4 KiB)  epoch[block]: this rank's count of calls (read and written by it alone)
//   [4 KiB, +2 * world * slot_bytes) two slots of `world` parts; rank src's message of call e
//                   lands in part src of slot e % 2 on every rank.
// Two slots make one round of flags enough: a rank writing slot e % 2 at call e has seen every
// peer's call e-1 flag, and a peer raises that only after its call e-2 (the last reader of this
// slot) has finished. Every call runs the same kBlocks blocks, so the per-block epochs all count
// calls and agree across calls of different sizes.
//
// The epochs live in device memory and are advanced by the kernel, so a CUDA graph holding the
// call replays correctly. Every rank must make the same sequence of calls (the same program);
// a peer that never arrives ends the wait with a trap after ~20 s (a launch failure the host
// sees) rather than a hang. Sums are in float32, in rank order on every rank, so all ranks get
// the same bits.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "llmc_shim_common.h"
#include "llmc_stream_kernels.h"

namespace llmc_shim_allreduce {
using namespace llmc_shim;
namespace {

constexpr int kMaxRanks = 8;
constexpr int kBlocks = 16;  // every call: see the epochs above
constexpr int kThreads = 512;
constexpr int64_t kFlagsOffset = 0;
constexpr int64_t kEpochOffset = 2048;
constexpr int64_t kDataOffset = 4096;
constexpr long long kTimeoutCycles = 40LL * 1000 * 1000 * 1000;  // ~20 s at ~2 GHz

struct Bases {
  char* p[kMaxRanks];
};

__device__ __forceinline__ void store_release(uint32_t* addr, uint32_t v) {
  asm volatile("st.release.sys.global.u32 [%0], %1;" ::"l"(addr), "r"(v) : "memory");
}

__device__ __forceinline__ uint32_t load_acquire(const uint32_t* addr) {
  uint32_t v;
  asm volatile("ld.acquire.sys.global.u32 %0, [%1];" : "=r"(v) : "l"(addr) : "memory");
  return v;
}

// 16 bytes of T as float32 and back
template <typename T> struct Pack;
template <> struct Pack<float> {
  static constexpr int N = 4;
  __device__ static void add(float* acc, const uint4& v) {
    const float* f = reinterpret_cast<const float*>(&v);
#pragma unroll
    for (int i = 0; i < N; ++i) acc[i] += f[i];
  }
  __device__ static uint4 pack(const float* acc) {
    uint4 v;
    float* f = reinterpret_cast<float*>(&v);
#pragma unroll
    for (int i = 0; i < N; ++i) f[i] = acc[i];
    return v;
  }
};
template <> struct Pack<__half> {
  static constexpr int N = 8;
  __device__ static void add(float* acc, const uint4& v) {
    const __half* h = reinterpret_cast<const __half*>(&v);
#pragma unroll
    for (int i = 0; i < N; ++i) acc[i] += __half2float(h[i]);
  }
  __device__ static uint4 pack(const float* acc) {
    uint4 v;
    __half* h = reinterpret_cast<__half*>(&v);
#pragma unroll
    for (int i = 0; i < N; ++i) h[i] = __float2half(acc[i]);
    return v;
  }
};
template <> struct Pack<__nv_bfloat16> {
  static constexpr int N = 8;
  __device__ static void add(float* acc, const uint4& v) {
    const __nv_bfloat16* h = reinterpret_cast<const __nv_bfloat16*>(&v);
#pragma unroll
    for (int i = 0; i < N; ++i) acc[i] += __bfloat162float(h[i]);
  }
  __device__ static uint4 pack(const float* acc) {
    uint4 v;
    __nv_bfloat16* h = reinterpret_cast<__nv_bfloat16*>(&v);
#pragma unroll
    for (int i = 0; i < N; ++i) h[i] = __float2bfloat16(acc[i]);
    return v;
  }
};

// Block b owns the 16-byte vectors [b * per, min(n, (b + 1) * per)): it pushes them to every rank,
// meets its peers' block b through the flags, and sums the parts. No block waits for another.
template <typename T>
__global__ void __launch_bounds__(kThreads) oneshot_kernel(const uint4* x, uint4* out,  // may alias: in place
                                                           int64_t n, int64_t per, int rank, int world,
                                                           int64_t slot_bytes, Bases bases) {
  pdl_launch_dependents();  // the next kernel may start its weight fetch now
  pdl_wait();               // x, and the previous call's epoch, are complete
  const int b = blockIdx.x, t = threadIdx.x;
  char* mine = bases.p[rank];
  uint32_t* epoch_slot = reinterpret_cast<uint32_t*>(mine + kEpochOffset) + b;
  __shared__ uint32_t epoch_s;
  if (t == 0) epoch_s = *epoch_slot + 1;
  __syncthreads();
  const uint32_t epoch = epoch_s;
  const int64_t slot = kDataOffset + int64_t(epoch & 1) * world * slot_bytes;
  const int64_t lo = int64_t(b) * per, hi = min(n, lo + per);
  for (int64_t i = lo + t; i < hi; i += kThreads) {
    const uint4 v = x[i];
    for (int r = 0; r < world; ++r) reinterpret_cast<uint4*>(bases.p[r] + slot + rank * slot_bytes)[i] = v;
  }
  __syncthreads();
  if (t < world) {  // thread t tells rank t that this block's part is there, then waits for rank t's
    __threadfence_system();
    store_release(reinterpret_cast<uint32_t*>(bases.p[t] + kFlagsOffset) + b * kMaxRanks + rank, epoch);
    const uint32_t* flag = reinterpret_cast<const uint32_t*>(mine + kFlagsOffset) + b * kMaxRanks + t;
    const long long start = clock64();
    // at least this call: a fast peer may already have raised its next call's flag
    while (static_cast<int32_t>(load_acquire(flag) - epoch) < 0) {
      if (clock64() - start > kTimeoutCycles) __trap();  // a peer never came: fail, do not hang
    }
  }
  __syncthreads();
  for (int64_t i = lo + t; i < hi; i += kThreads) {
    float acc[Pack<T>::N] = {};
    for (int r = 0; r < world; ++r) Pack<T>::add(acc, __ldcv(reinterpret_cast<const uint4*>(mine + slot + r * slot_bytes) + i));
    out[i] = Pack<T>::pack(acc);
  }
  if (t == 0) *epoch_slot = epoch;
}

void AllReduceOneShot(DLTensor* x, DLTensor* out, int64_t rank, int64_t world, int64_t slot_bytes, int64_t b0,
                      int64_t b1, int64_t b2, int64_t b3, int64_t b4, int64_t b5, int64_t b6, int64_t b7) {
  check_cuda_tensor(x, "x");
  check_cuda_tensor(out, "out");
  const DT dt = dtype_of(x);
  LLMC_CHECK(dt == DT::kF16 || dt == DT::kBF16 || dt == DT::kF32) << "dtype " << dtype_name(dt);
  LLMC_CHECK(dtype_of(out) == dt && compact(x) && compact(out)) << "x and out must be compact and of one dtype";
  int64_t count = 1, count_out = 1;
  for (int i = 0; i < x->ndim; ++i) count *= x->shape[i];
  for (int i = 0; i < out->ndim; ++i) count_out *= out->shape[i];
  LLMC_CHECK(count == count_out) << "x " << shape_str(x) << " and out " << shape_str(out) << " differ in size";
  const int64_t nbytes = count * (dt == DT::kF32 ? 4 : 2);
  LLMC_CHECK(world >= 1 && world <= kMaxRanks && rank >= 0 && rank < world) << "rank " << rank << " of " << world;
  LLMC_CHECK(nbytes % 16 == 0 && nbytes <= slot_bytes) << nbytes << " bytes (a multiple of 16, at most " << slot_bytes
                                                       << ")";
  LLMC_CHECK(reinterpret_cast<uintptr_t>(data_of(x)) % 16 == 0 && reinterpret_cast<uintptr_t>(data_of(out)) % 16 == 0)
      << "x and out must be 16-byte aligned";
  if (nbytes == 0) return;
  Bases bases{};
  const int64_t given[kMaxRanks] = {b0, b1, b2, b3, b4, b5, b6, b7};
  for (int r = 0; r < kMaxRanks; ++r) {
    LLMC_CHECK(r >= world || given[r] != 0) << "no buffer for rank " << r;
    bases.p[r] = reinterpret_cast<char*>(given[r]);
  }
  const int64_t n = nbytes / 16;
  const int64_t per = (n + kBlocks - 1) / kBlocks;
  const int dev = x->device.device_id;
  DeviceGuard guard(dev);
  cudaStream_t stream = current_stream(dev);
  const uint4* xi = reinterpret_cast<const uint4*>(data_of(x));
  uint4* o = reinterpret_cast<uint4*>(data_of(out));
  const dim3 grid(kBlocks), block(kThreads);
  const int r = int(rank), w = int(world);
  if (dt == DT::kF16) launch_pdl(oneshot_kernel<__half>, grid, block, dev, stream, xi, o, n, per, r, w, slot_bytes, bases);
  else if (dt == DT::kBF16)
    launch_pdl(oneshot_kernel<__nv_bfloat16>, grid, block, dev, stream, xi, o, n, per, r, w, slot_bytes, bases);
  else launch_pdl(oneshot_kernel<float>, grid, block, dev, stream, xi, o, n, per, r, w, slot_bytes, bases);
  LLMC_CUDA_CHECK(cudaGetLastError());
}

}  // namespace
}  // namespace llmc_shim_allreduce

TVM_FFI_DLL_EXPORT_TYPED_FUNC(llmc_allreduce_oneshot, llmc_shim_allreduce::AllReduceOneShot);
