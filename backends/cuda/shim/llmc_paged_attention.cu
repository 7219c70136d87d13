// llmc CUDA shim: paged attention over a ragged batch, the CUDA route of Op.PAGED_ATTENTION.
//
//   llmc_paged_attention(q, k, v, kv_cache, page_table, kv_lens, q_starts, out, scale: float, window: int,
//                        layout: int)   (layout: token-major bits 1 q, 2 k, 4 v, 8 out; 16 / 32 a quantized cache;
//                                        64 packed: q, k and v are one [1, T, H + 2 Hkv, D] tensor, the QKV
//                                        projection's output, heads q | k | v, and out tells H)
//   llmc_paged_attention_rope(q, k, v, kv_cache, page_table, kv_lens, q_starts, out, cos, sin, scale, window,
//                             layout)   (the same, q and k rotated first by the rotary tables cos / sin [T, D]
//                                        of q's dtype or float32, rotate-half form: llmc_paged.h)
//
// One call serves a whole step of the step function (passes/serve/derive_step.py): the T tokens
// of S sequences lie on one axis; sequence s owns tokens q_starts[s] .. q_starts[s+1]-1, the
// newest of its kv_lens[s] positions. q/out [1, H, T, D], k/v [1, Hkv, T, D] (any strides but
// the last dim; layout bits 1 q, 2 k, 4 v, 8 out mark a tensor token-major, [1, T, heads, D]),
// kv_cache [pages, 2, P, Hkv, D] (K and V of a page side by side), page_table [S, C] int32, kv_lens [S] int32, q_starts [S + 1] int32. Every token attends causally over its
// sequence's positions (and only the last `window` of them when window > 0); the step's own K/V
// are appended into the pages by the same launch.
//
// Work split: a block (4 warps) takes one sequence, one KV head and 16 rows (a row = one query
// token x one of the G = H / Hkv query heads sharing the KV head, so GQA reads each K/V tile
// once for the whole group), and walks the keys in tiles of 32 staged in shared memory: a lane
// scores one key, the warp keeps an online softmax per row. Keys older than the step come from
// the pages; the step's own keys are read from k/v directly, which is why the append (done by
// the blocks of split 0) needs no ordering against the reads.
//
// A quantized cache (layout bits 16 int8, 32 e4m3; runtime/engine/kv_codec.py) is uint8
// [pages, 2, P, Hkv, D + 4]: a row holds one token's K (or V) for one head as D codes, then the
// row's float32 scale (max |x| / 127 or / 448). The step's K/V are encoded by a launch of their
// own (a warp per row: the scale needs the whole row), then every key, the step's own included,
// is read back from the pages and decoded, as the CPU route does, so both see the same values.
// Prefill steps over a quantized cache take the CUDA-core kernel (the tensor-core one reads
// float pages).
//
// Decode (one token per sequence, T == S) over float pages goes to llmc_paged_decode.cu's kernel
// (GQA groups up to 8 query heads), which also applies the rotary embedding as it loads q and k;
// the other paths take q and k rotated by a launch of their own into a workspace. This file's kernel takes the rest of decode (a quantized
// cache, larger groups): it has few rows and long histories, so the keys are also split across
// blocks (flash-decoding): each split writes its partial softmax state to a workspace and the
// last block of the group to finish (an atomic counter, reset by that block, so a captured CUDA
// graph can replay it) merges them.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <algorithm>
#include <map>
#include <vector>
#include <mutex>
#include <tuple>
#include <utility>

#include "llmc_paged.h"
#include "llmc_shim_common.h"
#include "llmc_stream_kernels.h"

namespace llmc_shim_paged {
using namespace llmc_shim;
namespace {

constexpr int kWarps = 4;
constexpr int kRows = 16;            // rows per block
constexpr int kSlots = kRows / kWarps;
constexpr int kKeys = 32;            // keys per tile (one per lane)
constexpr int kMaxSplits = 64;       // flash-decoding: key splits per (sequence, KV head, row tile)
constexpr float kLog2e = 1.4426950408889634f;

struct Params {
  const void* q; const void* k; const void* v; void* out; void* cache;
  int64_t q_h, q_t, k_h, k_t, v_h, v_t, o_h, o_t;
  const int* table; const int* lens; const int* starts;
  int C, P, H, Hkv, G, T, S;
  int n_split, n_rowtiles, window;
  float scale_log2;
  float* part_o;   // [n_split][T][H][D]
  float2* part_ml; // [n_split][T][H]: (running max, running sum)
  unsigned* counters;  // [S][Hkv][n_rowtiles]
};

template <typename T> __device__ __forceinline__ float to_f(T x);
template <> __device__ __forceinline__ float to_f<__half>(__half x) { return __half2float(x); }
template <> __device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// ---- quantized cache codecs (CODEC 1: int8, 2: e4m3), as runtime/engine/kv_codec.py ----------
constexpr int kScaleBytes = 4;
template <int CODEC> __device__ __forceinline__ float code_max() { return CODEC == 1 ? 127.f : 448.f; }
template <int CODEC> __device__ __forceinline__ unsigned char encode_code(float y) {
  if (CODEC == 1) {  // round half to even, as numpy's rint; clipped to +-127
    const int q = max(-127, min(127, __float2int_rn(y)));
    return static_cast<unsigned char>(static_cast<signed char>(q));
  }
  y = fminf(fmaxf(y, -448.f), 448.f);  // (the division may round just past 448)
  return static_cast<unsigned char>(__nv_cvt_float_to_fp8(y, __NV_SATFINITE, __NV_E4M3));
}
template <int CODEC> __device__ __forceinline__ float decode_code(unsigned char c) {
  if (CODEC == 1) return float(static_cast<signed char>(c));
  return __half2float(__half(__nv_cvt_fp8_to_halfraw(static_cast<__nv_fp8_storage_t>(c), __NV_E4M3)));
}

// The step's K/V rows into a quantized cache: one warp per (token, KV head, K or V) row.
template <typename T, int D, int CODEC>
__global__ void __launch_bounds__(kWarps * 32) paged_append_quant_kernel(Params p) {
  constexpr int R = D + kScaleBytes, DL = D / 32;
  const int lane = threadIdx.x & 31;
  const int64_t row = int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (row >= int64_t(p.T) * p.Hkv * 2) return;
  const int which = int(row % 2), h = int((row / 2) % p.Hkv), t = int(row / (2 * p.Hkv));
  int lo = 0, hi = p.S;  // the sequence of token t: the last s with starts[s] <= t
  while (hi - lo > 1) {
    const int mid = (lo + hi) / 2;
    if (p.starts[mid] <= t) lo = mid; else hi = mid;
  }
  const int s = lo, pos = p.lens[s] - (p.starts[s + 1] - p.starts[s]) + (t - p.starts[s]);
  const T* src = which == 0 ? static_cast<const T*>(p.k) + h * p.k_h + int64_t(t) * p.k_t
                            : static_cast<const T*>(p.v) + h * p.v_h + int64_t(t) * p.v_t;
  float x[DL], amax = 0.f;
#pragma unroll
  for (int j = 0; j < DL; ++j) {
    x[j] = to_f<T>(src[lane + 32 * j]);
    amax = fmaxf(amax, fabsf(x[j]));
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
  const float scale = amax > 0.f ? amax / code_max<CODEC>() : 1.f;
  unsigned char* dst = static_cast<unsigned char*>(p.cache) + int64_t(p.table[int64_t(s) * p.C + pos / p.P]) * 2 * p.P * p.Hkv * R
                       + int64_t(which) * p.P * p.Hkv * R + (int64_t(pos % p.P) * p.Hkv + h) * R;
#pragma unroll
  for (int j = 0; j < DL; ++j) dst[lane + 32 * j] = encode_code<CODEC>(x[j] / scale);
  if (lane == 0) *reinterpret_cast<float*>(dst + D) = amax > 0.f ? scale : 0.f;  // a zero row decodes to zeros
}

template <typename T, int D, int CODEC>
__global__ void __launch_bounds__(kWarps * 32) paged_attention_kernel(Params p) {
  constexpr int DL = D / 32;  // dims per lane in P V
  __shared__ __align__(16) T ks[kKeys][D + 8];  // +8: a lane reads its own key row, rows 16 B apart in banks
  __shared__ __align__(16) T vs[kKeys][D];
  __shared__ float qs[kRows][D];
  __shared__ bool last;
  __shared__ float wts[kMaxSplits][kRows];  // flash-decoding merge: each split's weight per row
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int s = blockIdx.z, h = blockIdx.y;
  const int split = blockIdx.x % p.n_split, rowtile = blockIdx.x / p.n_split;
  const int q0 = p.starts[s], nq = p.starts[s + 1] - q0, L = p.lens[s], first = L - nq;
  const int r0 = rowtile * kRows;
  if (r0 >= nq * p.G) return;  // every split of this row tile returns alike: the counter stays consistent
  const int r_end = min(nq * p.G, r0 + kRows);
  const int t_lo = r0 / p.G, t_hi = (r_end - 1) / p.G;  // the tokens this block's rows belong to
  const T* K = static_cast<const T*>(p.k);
  const T* V = static_cast<const T*>(p.v);
  T* cache = static_cast<T*>(p.cache);
  const int64_t page_stride = int64_t(2) * p.P * p.Hkv * D;
  constexpr int R = D + kScaleBytes;  // a quantized cache's row bytes
  const unsigned char* qcache = static_cast<const unsigned char*>(p.cache);
  const int* table = p.table + int64_t(s) * p.C;

  // append this block's new tokens' K/V (head h) into the pages; rows of one token are in one block
  // only when G divides 16, so the block whose rows start a token writes it
  if (CODEC == 0 && split == 0) {
    for (int i = threadIdx.x; i < (t_hi - t_lo + 1) * (D / 8); i += blockDim.x) {
      const int t = t_lo + i / (D / 8), c = (i % (D / 8)) * 8;
      if (t * p.G < r0) continue;  // its first row belongs to the previous block
      const int pos = first + t;
      T* dst = cache + table[pos / p.P] * page_stride + (int64_t(pos % p.P) * p.Hkv + h) * D + c;
      *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(K + h * p.k_h + int64_t(q0 + t) * p.k_t + c);
      *reinterpret_cast<uint4*>(dst + int64_t(p.P) * p.Hkv * D) =
          *reinterpret_cast<const uint4*>(V + h * p.v_h + int64_t(q0 + t) * p.v_t + c);
    }
  }
  // the rows' queries, as float
  const T* Q = static_cast<const T*>(p.q);
  for (int i = threadIdx.x; i < kRows * D; i += blockDim.x) {
    const int r = i / D, d = i % D, row = r0 + r;
    float x = 0.f;
    if (row < r_end) x = to_f<T>(Q[(h * p.G + row % p.G) * p.q_h + int64_t(q0 + row / p.G) * p.q_t + d]);
    qs[r][d] = x;
  }
  // keys this block can see, then its split's share of them (whole tiles)
  int k_lo = 0;
  const int k_hi = first + t_hi + 1;
  if (p.window > 0) k_lo = max(0, first + t_lo - p.window + 1);
  const int n_tiles = (k_hi - k_lo + kKeys - 1) / kKeys;
  const int per_split = (n_tiles + p.n_split - 1) / p.n_split;
  const int tile_b = split * per_split, tile_e = min(n_tiles, tile_b + per_split);

  float m[kSlots], l[kSlots], acc[kSlots][DL];
#pragma unroll
  for (int j = 0; j < kSlots; ++j) {
    m[j] = -INFINITY;
    l[j] = 0.f;
#pragma unroll
    for (int d = 0; d < DL; ++d) acc[j][d] = 0.f;
  }
  // a tile's K/V go global -> registers -> shared memory; the next tile's loads are issued
  // before this tile's math, so their latency hides behind it
  constexpr int kChunks = kKeys * (D / 8) / (kWarps * 32);  // 16-byte chunks per thread per tile
  uint4 kr[kChunks], vr[kChunks];
  auto fetch = [&](int kb) {
#pragma unroll
    for (int u = 0; u < kChunks; ++u) {
      const int i = threadIdx.x + u * kWarps * 32;
      const int j = i / (D / 8), c = (i % (D / 8)) * 8, pos = kb + j;
      kr[u] = vr[u] = make_uint4(0, 0, 0, 0);
      if (pos < k_hi) {
        if (CODEC != 0) {  // every key from the pages (the step's own were encoded before this launch)
          const unsigned char* row = qcache + int64_t(table[pos / p.P]) * 2 * p.P * p.Hkv * R
                                     + (int64_t(pos % p.P) * p.Hkv + h) * R;
#pragma unroll
          for (int kv = 0; kv < 2; ++kv) {
            const unsigned char* r = row + int64_t(kv) * p.P * p.Hkv * R;
            const uint32_t lo4 = *reinterpret_cast<const uint32_t*>(r + c), hi4 = *reinterpret_cast<const uint32_t*>(r + c + 4);
            const float sc = *reinterpret_cast<const float*>(r + D);
            uint4 packed;
            T* e = reinterpret_cast<T*>(&packed);
#pragma unroll
            for (int i = 0; i < 8; ++i) e[i] = from_f<T>(decode_code<CODEC>((i < 4 ? lo4 >> (8 * i) : hi4 >> (8 * (i - 4))) & 0xffu) * sc);
            (kv == 0 ? kr[u] : vr[u]) = packed;
          }
        } else if (pos < first) {
          const T* src = cache + table[pos / p.P] * page_stride + (int64_t(pos % p.P) * p.Hkv + h) * D + c;
          kr[u] = *reinterpret_cast<const uint4*>(src);
          vr[u] = *reinterpret_cast<const uint4*>(src + int64_t(p.P) * p.Hkv * D);
        } else {
          const int64_t t = q0 + pos - first;
          kr[u] = *reinterpret_cast<const uint4*>(K + h * p.k_h + t * p.k_t + c);
          vr[u] = *reinterpret_cast<const uint4*>(V + h * p.v_h + t * p.v_t + c);
        }
      }
    }
  };
  if (tile_b < tile_e) fetch(k_lo + tile_b * kKeys);
  for (int tile = tile_b; tile < tile_e; ++tile) {
    const int kb = k_lo + tile * kKeys;
    __syncthreads();  // every warp is done with the previous tile
#pragma unroll
    for (int u = 0; u < kChunks; ++u) {
      const int i = threadIdx.x + u * kWarps * 32;
      const int j = i / (D / 8), c = (i % (D / 8)) * 8;
      *reinterpret_cast<uint4*>(&ks[j][c]) = kr[u];
      *reinterpret_cast<uint4*>(&vs[j][c]) = vr[u];
    }
    __syncthreads();
    if (tile + 1 < tile_e) fetch(kb + kKeys);
    float kf[D];
#pragma unroll
    for (int c = 0; c < D; c += 8) {
      const uint4 u = *reinterpret_cast<const uint4*>(&ks[lane][c]);
      const T* e = reinterpret_cast<const T*>(&u);
#pragma unroll
      for (int i = 0; i < 8; ++i) kf[c + i] = to_f<T>(e[i]);
    }
    const int key = kb + lane;
#pragma unroll
    for (int j = 0; j < kSlots; ++j) {
      const int r = warp + j * kWarps, row = r0 + r;
      if (row >= r_end) continue;  // warp-uniform
      const int qpos = first + row / p.G;
      float sc = 0.f;
#pragma unroll
      for (int d = 0; d < D; ++d) sc = fmaf(qs[r][d], kf[d], sc);
      const bool ok = key < k_hi && key <= qpos && (p.window <= 0 || key > qpos - p.window);
      sc = ok ? sc * p.scale_log2 : -INFINITY;
      float mx = sc;
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
      const float m_new = fmaxf(m[j], mx);
      if (m_new == -INFINITY) continue;  // nothing visible yet
      const float pr = ok ? exp2f(sc - m_new) : 0.f;
      const float corr = exp2f(m[j] - m_new);
      float sum = pr;
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
      l[j] = l[j] * corr + sum;
      m[j] = m_new;
#pragma unroll
      for (int d = 0; d < DL; ++d) acc[j][d] *= corr;
#pragma unroll 8
      for (int i = 0; i < kKeys; ++i) {
        const float pi = __shfl_sync(0xffffffffu, pr, i);
#pragma unroll
        for (int d = 0; d < DL; ++d) acc[j][d] = fmaf(pi, to_f<T>(vs[i][lane * DL + d]), acc[j][d]);
      }
    }
  }

  T* O = static_cast<T*>(p.out);
  if (p.n_split == 1) {
#pragma unroll
    for (int j = 0; j < kSlots; ++j) {
      const int row = r0 + warp + j * kWarps;
      if (row >= r_end) continue;
      const float inv = l[j] > 0.f ? 1.f / l[j] : 0.f;  // a row that sees no key gets zeros
      T* o = O + (h * p.G + row % p.G) * p.o_h + int64_t(q0 + row / p.G) * p.o_t;
#pragma unroll
      for (int d = 0; d < DL; ++d) o[lane * DL + d] = from_f<T>(acc[j][d] * inv);
    }
    return;
  }
  // flash-decoding: publish this split's state, the last split of the row tile merges
#pragma unroll
  for (int j = 0; j < kSlots; ++j) {
    const int row = r0 + warp + j * kWarps;
    if (row >= r_end) continue;
    const int64_t idx = (int64_t(split) * p.T + q0 + row / p.G) * p.H + h * p.G + row % p.G;
#pragma unroll
    for (int d = 0; d < DL; ++d) p.part_o[idx * D + lane * DL + d] = acc[j][d];
    if (lane == 0) p.part_ml[idx] = make_float2(m[j], l[j]);
  }
  __threadfence();
  __syncthreads();
  unsigned* counter = p.counters + (int64_t(s) * p.Hkv + h) * p.n_rowtiles + rowtile;
  if (threadIdx.x == 0) last = atomicAdd(counter, 1u) == unsigned(p.n_split - 1);
  __syncthreads();
  if (!last) return;
  __threadfence();
  // merge: per row (a warp each), the splits' weights exp2(m_sp - max) / sum, in shared memory;
  // then every output element is a weighted sum over the splits (independent loads, unrolled)
  const int rows = r_end - r0;
  for (int r = warp; r < rows; r += kWarps) {
    const int row = r0 + r;
    const int64_t t = q0 + row / p.G, head = h * p.G + row % p.G;
    float mx = -INFINITY;
    for (int sp = lane; sp < p.n_split; sp += 32) mx = fmaxf(mx, __ldcg(&p.part_ml[(sp * p.T + t) * p.H + head]).x);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    float den = 0.f;
    for (int sp = lane; sp < p.n_split; sp += 32) {
      const float2 ml = __ldcg(&p.part_ml[(sp * p.T + t) * p.H + head]);
      const float w = (ml.x == -INFINITY || mx == -INFINITY) ? 0.f : exp2f(ml.x - mx);
      wts[sp][r] = w;
      den += w * ml.y;
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) den += __shfl_xor_sync(0xffffffffu, den, o);
    const float inv = den > 0.f ? 1.f / den : 0.f;  // a row that sees no key gets zeros
    for (int sp = lane; sp < p.n_split; sp += 32) wts[sp][r] *= inv;
  }
  __syncthreads();
  for (int i = threadIdx.x; i < rows * D; i += blockDim.x) {
    const int r = i / D, d = i % D, row = r0 + r;
    const int64_t t = q0 + row / p.G, head = h * p.G + row % p.G;
    float num = 0.f;
#pragma unroll 8
    for (int sp = 0; sp < p.n_split; ++sp) num += wts[sp][r] * __ldcg(&p.part_o[((sp * p.T + t) * p.H + head) * D + d]);
    O[head * p.o_h + t * p.o_t + d] = from_f<T>(num);
  }
  if (threadIdx.x == 0) *counter = 0;  // ready for the next launch (graph replays)
}

// ---- workspace per (device, stream), grown at a call outside graph capture ---------------------
// A CUDA graph captured earlier keeps the addresses it was captured with, so a workspace that
// grows never frees the buffers it outgrew (they stay valid for those graphs' replays; growth
// doubles, so a few retired buffers at most). Freeing them was a use-after-free: a serving
// engine captures small decode steps first and larger ones as its batch grows.
struct Workspace {
  void* buf = nullptr;
  size_t bytes = 0;
  unsigned* counters = nullptr;
  size_t n_counters = 0;
  std::vector<void*> retired;
};
std::mutex g_mu;
enum class Slot { kSplits, kRope };  // flash-decoding's partial states; rotated q / k
std::map<std::tuple<Slot, int, cudaStream_t>, Workspace> g_ws;

Workspace& workspace(int dev, cudaStream_t stream, size_t bytes, size_t counters, Slot slot = Slot::kSplits) {
  std::lock_guard<std::mutex> lock(g_mu);
  Workspace& ws = g_ws[{slot, dev, stream}];
  if (ws.bytes < bytes) {
    if (ws.buf) ws.retired.push_back(ws.buf);
    bytes = std::max(bytes, 2 * ws.bytes);
    LLMC_CUDA_CHECK(cudaMalloc(&ws.buf, bytes));
    ws.bytes = bytes;
  }
  if (ws.n_counters < counters) {
    if (ws.counters) ws.retired.push_back(ws.counters);
    counters = std::max(counters, 2 * ws.n_counters);
    LLMC_CUDA_CHECK(cudaMalloc(&ws.counters, counters * sizeof(unsigned)));
    LLMC_CUDA_CHECK(cudaMemset(ws.counters, 0, counters * sizeof(unsigned)));  // the kernels reset their own
    ws.n_counters = counters;
  }
  return ws;
}

constexpr size_t kMaxWorkspace = size_t(64) << 20;

// n key splits (fewer if their partial states would pass kMaxWorkspace) and their workspace
DecodeSplits split_workspace(int dev, cudaStream_t stream, int n, int T, int H, int D, size_t counters) {
  const size_t per = size_t(T) * H * (D + 2) * sizeof(float);
  while (n > 1 && n * per > kMaxWorkspace) --n;
  DecodeSplits w{std::max(1, n), nullptr, nullptr, nullptr};
  if (w.n_split > 1) {
    const size_t o_bytes = size_t(w.n_split) * T * H * D * sizeof(float);
    Workspace& ws = workspace(dev, stream, o_bytes + size_t(w.n_split) * T * H * sizeof(float2), counters);
    w.part_o = static_cast<float*>(ws.buf);
    w.part_ml = reinterpret_cast<float2*>(static_cast<char*>(ws.buf) + o_bytes);
    w.counters = ws.counters;
  }
  return w;
}

void check_i32(const DLTensor* t, const char* name, int ndim) {
  check_cuda_tensor(t, name);
  LLMC_CHECK(t->dtype.code == kDLInt && t->dtype.bits == 32 && t->dtype.lanes == 1) << name << " must be int32";
  LLMC_CHECK(t->ndim == ndim) << name << " must be " << ndim << "-D, got " << shape_str(t);
  LLMC_CHECK(stride_of(t, ndim - 1) == 1 && (ndim == 1 || stride_of(t, 0) == t->shape[1])) << name << " must be contiguous";
}

template <typename T, int D, int CODEC>
void launch(Params& p, dim3 grid, cudaStream_t stream) {
  if (CODEC != 0) {  // the step's K/V encoded into the pages first: the attention reads them back
    const int64_t rows = int64_t(p.T) * p.Hkv * 2;
    paged_append_quant_kernel<T, D, CODEC><<<unsigned((rows + kWarps - 1) / kWarps), kWarps * 32, 0, stream>>>(p);
    LLMC_CUDA_CHECK(cudaGetLastError());
  }
  paged_attention_kernel<T, D, CODEC><<<grid, kWarps * 32, 0, stream>>>(p);
  LLMC_CUDA_CHECK(cudaGetLastError());
}

template <typename T, int D>
void launch_codec(Params& p, int codec, dim3 grid, cudaStream_t stream) {
  if (codec == 1) launch<T, D, 1>(p, grid, stream);
  else if (codec == 2) launch<T, D, 2>(p, grid, stream);
  else launch<T, D, 0>(p, grid, stream);
}

template <typename T>
void launch_d(Params& p, int D, int codec, dim3 grid, cudaStream_t stream) {
  if (D == 64) launch_codec<T, 64>(p, codec, grid, stream);
  else if (D == 128) launch_codec<T, 128>(p, codec, grid, stream);
  else launch_codec<T, 32>(p, codec, grid, stream);
}

// A [1, heads, tokens, D] view of q/k/v/out; token-major ([1, tokens, heads, D]) when `tm`.
struct HeadView {
  const DLTensor* t;
  bool tm;
  int64_t heads() const { return t->shape[tm ? 2 : 1]; }
  int64_t tokens() const { return t->shape[tm ? 1 : 2]; }
  int64_t head_stride() const { return stride_of(t, tm ? 2 : 1); }
  int64_t token_stride() const { return stride_of(t, tm ? 1 : 2); }
};

// The rotary tables' kind for PagedArgs::rope: 0 none, 1 q's dtype, 2 float32 (checked [T, D]).
int rope_kind(const DLTensor* cos, const DLTensor* sin, DT dt, int T, int D) {
  if (cos == nullptr) return 0;
  for (const DLTensor* t : {cos, sin}) {
    check_cuda_tensor(t, "rotary table");
    LLMC_CHECK(t->ndim == 2 && t->shape[0] == T && t->shape[1] == D && stride_of(t, 1) == 1 && stride_of(t, 0) == D
               && (reinterpret_cast<uintptr_t>(data_of(t)) & 15) == 0)
        << "rotary tables must be contiguous [" << T << ", " << D << "], 16-byte aligned, got " << shape_str(t);
  }
  const DT ct = dtype_of(cos);
  LLMC_CHECK(dtype_of(sin) == ct && (ct == dt || ct == DT::kF32)) << "rotary tables must be float32 or q's dtype, both alike";
  return ct == DT::kF32 ? 2 : 1;
}

void PagedAttentionImpl(DLTensor* q, DLTensor* k, DLTensor* v, DLTensor* cache, DLTensor* table, DLTensor* lens,
                        DLTensor* starts, DLTensor* out, DLTensor* cos, DLTensor* sin, double scale, int64_t window,
                        int64_t layout) {
  check_cuda_tensor(q, "q"); check_cuda_tensor(k, "k"); check_cuda_tensor(v, "v");
  check_cuda_tensor(cache, "kv_cache"); check_cuda_tensor(out, "out");
  check_i32(table, "page_table", 2); check_i32(lens, "kv_lens", 1); check_i32(starts, "q_starts", 1);
  const DT dt = dtype_of(q);
  LLMC_CHECK(dt == DT::kF16 || dt == DT::kBF16) << "q must be float16 or bfloat16, got " << dtype_name(dt);
  LLMC_CHECK(layout >= 0 && layout < 128 && ((layout >> 4) & 3) != 3)
      << "layout bits: 1 q, 2 k, 4 v, 8 out token-major; 16 an int8 cache, 32 an e4m3 cache; 64 packed q | k | v";
  const bool packed = layout & 64;
  if (packed) {
    LLMC_CHECK((layout & 15) == 15 && data_of(k) == data_of(q) && data_of(v) == data_of(q))
        << "packed q | k | v: one token-major tensor passed as q, k and v, out token-major too";
    LLMC_CHECK(q->ndim == 4 && out->ndim == 4 && (q->shape[2] - out->shape[2]) > 0 && (q->shape[2] - out->shape[2]) % 2 == 0)
        << "packed q | k | v must be [1, T, H + 2 Hkv, D] with out [1, T, H, D], got " << shape_str(q) << " and " << shape_str(out);
  }
  const int codec = int((layout >> 4) & 3);
  for (const DLTensor* t : {k, v, out}) LLMC_CHECK(dtype_of(t) == dt) << "q, k, v and out must share one dtype";
  if (codec == 0) {
    LLMC_CHECK(dtype_of(cache) == dt) << "a float kv_cache must have q's dtype";
  } else {
    LLMC_CHECK(cache->dtype.code == kDLUInt && cache->dtype.bits == 8 && cache->dtype.lanes == 1)
        << "a quantized kv_cache must be uint8 rows (codes, then a float32 scale)";
  }
  LLMC_CHECK(q->ndim == 4 && k->ndim == 4 && v->ndim == 4 && out->ndim == 4 && cache->ndim == 5)
      << "q/k/v/out must be 4-D and kv_cache 5-D";
  const HeadView vq{q, bool(layout & 1)}, vk{k, bool(layout & 2)}, vv{v, bool(layout & 4)}, vo{out, bool(layout & 8)};
  LLMC_CHECK(q->shape[0] == 1) << "q must be [1, H, T, D] (or token-major [1, T, H, D]), got " << shape_str(q);
  const int H = int(packed ? vo.heads() : vq.heads()), T = int(vq.tokens()), D = int(q->shape[3]);
  const int Hkv = int(packed ? (vq.heads() - H) / 2 : vk.heads());
  LLMC_CHECK(D == 32 || D == 64 || D == 128) << "head dim must be 32, 64 or 128, got " << D;
  LLMC_CHECK(Hkv > 0 && H % Hkv == 0) << "query heads " << H << " must be a multiple of KV heads " << Hkv;
  for (const HeadView& t : {vk, vv})
    LLMC_CHECK(packed || (t.t->shape[0] == 1 && t.heads() == Hkv && t.tokens() == T && t.t->shape[3] == D))
        << "k/v must hold " << Hkv << " heads of " << T << " tokens of " << D << ", got " << shape_str(t.t);
  const int rope = rope_kind(cos, sin, dt, T, D);
  LLMC_CHECK(out->shape[0] == 1 && vo.heads() == H && vo.tokens() == T && out->shape[3] == D) << "out must match q";
  const int row = codec == 0 ? D : D + 4;
  LLMC_CHECK(cache->shape[1] == 2 && cache->shape[3] == Hkv && cache->shape[4] == row)
      << "kv_cache must be [pages, 2, P, " << Hkv << ", " << row << "], got " << shape_str(cache);
  int64_t expect = 1;
  for (int i = 4; i >= 0; --i) {
    LLMC_CHECK(stride_of(cache, i) == expect) << "kv_cache must be contiguous";
    expect *= cache->shape[i];
  }
  for (const DLTensor* t : {q, k, v, out}) {
    LLMC_CHECK(stride_of(t, 3) == 1) << "the head dim must be contiguous";
    LLMC_CHECK(stride_of(t, 1) % 8 == 0 && stride_of(t, 2) % 8 == 0 && (reinterpret_cast<uintptr_t>(data_of(t)) & 15) == 0)
        << "head and token strides must be multiples of 8 elements, base pointers 16-byte aligned";
  }
  const int S = int(lens->shape[0]);
  LLMC_CHECK(starts->shape[0] == S + 1 && table->shape[0] == S) << "page_table [S, C], kv_lens [S] and q_starts [S+1] disagree";
  const int dev = q->device.device_id;
  if (T == 0 || S == 0) return;

  Params p{};
  p.q = data_of(q); p.k = data_of(k); p.v = data_of(v); p.out = data_of(out); p.cache = data_of(cache);
  p.q_h = vq.head_stride(); p.q_t = vq.token_stride();
  p.k_h = vk.head_stride(); p.k_t = vk.token_stride();
  p.v_h = vv.head_stride(); p.v_t = vv.token_stride();
  if (packed) {  // heads q | k | v of one row
    const size_t esize = 2;
    p.k = static_cast<const char*>(p.q) + size_t(H) * D * esize;
    p.v = static_cast<const char*>(p.q) + size_t(H + Hkv) * D * esize;
  }
  p.o_h = vo.head_stride(); p.o_t = vo.token_stride();
  p.table = reinterpret_cast<const int*>(data_of(table));
  p.lens = reinterpret_cast<const int*>(data_of(lens));
  p.starts = reinterpret_cast<const int*>(data_of(starts));
  p.C = int(table->shape[1]); p.P = int(cache->shape[2]);
  p.H = H; p.Hkv = Hkv; p.G = H / Hkv; p.T = T; p.S = S;
  p.window = int(window);
  p.scale_log2 = float(scale) * kLog2e;
  // a sequence has at most T * G rows (the host cannot see the lengths: blocks past a sequence's
  // rows return at once); a decode step (T == S, one token each) has G
  p.n_rowtiles = (T * p.G + kRows - 1) / kRows;
  p.n_split = 1;

  DeviceGuard guard(dev);
  cudaStream_t stream = current_stream(dev);
  PagedArgs a{p.q, p.k, p.v, p.out, p.cache, p.q_h, p.q_t, p.k_h, p.k_t, p.v_h, p.v_t, p.o_h, p.o_t,
              p.table, p.lens, p.starts, p.C, p.P, H, Hkv, T, S, D, p.window, float(scale)};
  if (rope) {
    a.cos = data_of(cos); a.sin = data_of(sin); a.rope = rope;
  }
  if (T == S && codec == 0 && p.G <= kDecodeMaxGroup) {  // decode over float pages: llmc_paged_decode.cu
    DecodeSplits w = split_workspace(dev, stream, paged_decode_splits(a, dev), T, H, D, size_t(S) * Hkv);
    paged_decode(a, w, dt == DT::kBF16, dev, stream);  // (rotates q / k itself)
    return;
  }
  if (rope) {  // the other kernels read q / k as given: rotate them into a workspace first
    const size_t q_bytes = size_t(T) * H * D * 2, k_bytes = size_t(T) * Hkv * D * 2;
    Workspace& ws = workspace(dev, stream, q_bytes + k_bytes, 0, Slot::kRope);
    void* qr = ws.buf;
    void* kr = static_cast<char*>(ws.buf) + q_bytes;
    paged_rope(a, qr, kr, dt == DT::kBF16, stream);
    a.q = p.q = qr; a.k = p.k = kr;
    a.q_h = p.q_h = D; a.q_t = p.q_t = int64_t(H) * D;
    a.k_h = p.k_h = D; a.k_t = p.k_t = int64_t(Hkv) * D;
    a.rope = 0;
  }
  if (T != S && codec == 0) {  // prefill chunks (perhaps mixed with decodes): the tensor-core kernel
    paged_prefill(a, dt == DT::kBF16, stream);
    return;
  }
  if (T == S) {  // decode over a quantized cache: split the keys until the GPU has ~4 blocks per SM
    const int blocks = S * Hkv * ((p.G + kRows - 1) / kRows);
    const int max_tiles = (p.C * p.P + kKeys - 1) / kKeys;
    const int n = std::min({(4 * sm_count(dev) + blocks - 1) / blocks, std::max(1, max_tiles / 2), kMaxSplits});
    const DecodeSplits w = split_workspace(dev, stream, n, T, H, D, size_t(S) * Hkv * p.n_rowtiles);
    p.n_split = w.n_split;
    p.part_o = w.part_o;
    p.part_ml = w.part_ml;
    p.counters = w.counters;
  }
  const dim3 grid(p.n_split * p.n_rowtiles, Hkv, S);
  if (dt == DT::kF16) launch_d<__half>(p, D, codec, grid, stream);
  else launch_d<__nv_bfloat16>(p, D, codec, grid, stream);
}

void PagedAttention(DLTensor* q, DLTensor* k, DLTensor* v, DLTensor* cache, DLTensor* table, DLTensor* lens,
                    DLTensor* starts, DLTensor* out, double scale, int64_t window, int64_t layout) {
  PagedAttentionImpl(q, k, v, cache, table, lens, starts, out, nullptr, nullptr, scale, window, layout);
}

void PagedAttentionRope(DLTensor* q, DLTensor* k, DLTensor* v, DLTensor* cache, DLTensor* table, DLTensor* lens,
                        DLTensor* starts, DLTensor* out, DLTensor* cos, DLTensor* sin, double scale, int64_t window,
                        int64_t layout) {
  PagedAttentionImpl(q, k, v, cache, table, lens, starts, out, cos, sin, scale, window, layout);
}

}  // namespace
}  // namespace llmc_shim_paged

TVM_FFI_DLL_EXPORT_TYPED_FUNC(llmc_paged_attention, llmc_shim_paged::PagedAttention);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(llmc_paged_attention_rope, llmc_shim_paged::PagedAttentionRope);
