// llmc CUDA shim: small-batch matmuls on tensor cores, y = epi(x @ W^T) for 3-16 rows a pass,
// W dense ([N, K] float16 / bfloat16) or weight-only quantized (int8 per channel / int4 groups,
// the codes of llmc_qgemv.cu), with an RMSNorm before it (where the grid has few blocks: each
// block reads its rows whole), the SwiGLU of gate / up halves, a bias and a residual in the same
// launch (tc_gemv in llmc_lt.h). llmc_qgemv.cu routes 3-63 rows here (passes of 16), for which it
// replaces a GEMV that read x once per weight row and row; llmc_gemv.cu its 3-16-row calls but a
// wide matrix without the SwiGLU (the LM head, where cuBLASLt reads faster).
//
// Why: a decode step of 16 sequences has 16 rows per matmul. The FMA GEMVs read x once per
// weight row and row (their cost grows with the rows: at 16 rows the quantized GEMV streamed
// its weights twice and multiplied 16x per weight), and cuBLASLt needs the norm, the SwiGLU and
// the dequantization as launches of their own around it. Here a weight is read once for 16 rows
// and multiplied on tensor cores (mma.sync m16n8k16: 16 weight rows x 8 tokens x 16 k), so the
// kernel is bound by the weight bytes like the one-row GEMV.
//
// A warp computes 32 weight rows (two m16 tiles; with the SwiGLU 16 gate rows and their 16 up
// rows) against 16 x rows (two n8 tiles). The dot products do not care in which order k is
// summed, so the fragments' k order is ours to choose: lane (g, t) (g = lane / 4, t = lane % 4)
// reads four runs of 8 k of its rows (16-byte loads; where they lie: k_at), and each run enters
// the mma as the pairs (0, 4), (1, 5), (2, 6), (3, 7): the order int4 codes come out of a word two
// at a time (llmc_stream_kernels.h: Packed, pairs), used alike for x and dense W. The
// warps of a block split K and sum through shared memory, where the block applies the epilogue.
// Where the output channels make fewer blocks than the GPU has SMs (N = 2048 at 32 rows a block:
// 64 blocks on 132 SMs) and K is long (kMinChunksZ), K is split across blocks too (grid z): each
// block leaves its sums in a scratch slot, and the tile's last block to finish (a counter per
// tile, put back to zero by that block, so a CUDA graph replays it) adds the slots in z order and
// applies the epilogue. Quantized codes become the half type exactly ((q - zero) is a
// small integer), times their group's scale, as the prefill path's dequantized slab holds them.
// A programmatic dependent launch (llmc_stream_kernels.h): the first weight loads are issued
// before waiting for the kernel that writes x.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <mutex>
#include <set>

#include "llmc_lt.h"
#include "llmc_shim_common.h"
#include "llmc_stream_kernels.h"

namespace llmc_shim {
namespace {

constexpr int kTokens = 16;     // x rows a pass: two n8 tiles
constexpr int kTileRows = 32;   // weight rows a warp: two m16 tiles
constexpr int kChunk = 128;     // k a warp covers per step: 4 lanes x 32
constexpr int kMaxSplit = 16;    // warps of a block, splitting K
constexpr int kWarpsPerSm = 16;  // resident at <= 128 registers: the launch keeps its warps to one wave of these
constexpr int kMaxTiles = 1 << 16;  // tiles (column block x token pass) with a counter for the z split
// The z split pays where K is long: int4 down (8192 x 2048, 16 rows) 20.0 -> 10.3 us, int8 24.5 ->
// 13.5 (H200); with K = 2048 it cost more than it gained (int4 O projection 7.4 -> 13.8 us).
constexpr int kMinChunksZ = 32;
constexpr int kSlotPartials = 40, kSlotCounters = 41;  // scratch slots (llmc_lt.h scratch())

template <typename T>
struct TcParams {
  const T* x; int64_t ldx;
  const T* g; float eps;  // RMSNorm weight [K] (or null: no norm) and epsilon
  const void* w; int64_t ldw;  // dense: elements a row; codes: bytes a row
  const T* scales; const T* zeros;  // quantized: [N, K / group]; zeros may be null
  int group;
  const T* bias;  // dense: [N] or null
  const T* res; int64_t ldr;  // [rows, n_out] or null
  T* y; int64_t ldy;
  int rows, n_out, k;
  float* part; int* count;  // split across blocks (gridDim.z > 1): the blocks' sums, a counter per tile
};

template <typename T> struct Mma;
template <> struct Mma<__nv_bfloat16> {
  static __device__ __forceinline__ void run(float* d, const unsigned* a, const unsigned* b) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
};
template <> struct Mma<__half> {
  static __device__ __forceinline__ void run(float* d, const unsigned* a, const unsigned* b) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
};

template <typename T2>
__device__ __forceinline__ unsigned bits_of(T2 v) {
  return *reinterpret_cast<const unsigned*>(&v);
}

// Where the lane's i-th run of 8 k lies in chunk c (an element index). Dense W: run i of the four
// lanes of a row (t = 0..3) is 64 contiguous bytes, so every load instruction uses the whole 32-byte
// sectors it fetches (a lane's 32 k in one piece left half of each sector to a second instruction,
// which read-no-allocate loads fetched from L2 again: L2 hit rates near 60% in Nsight Compute). Codes
// keep a lane's 32 k in one piece (one scale group; int4's are one 16-byte load anyway).
template <int BITS>
__device__ __forceinline__ int k_at(int c, int t, int i) {
  return BITS == 16 ? c * kChunk + 32 * i + 8 * t : c * kChunk + 32 * t + 8 * i;
}

// The 16-byte loads of one weight row's 32 k: 4 dense, 2 int8, 1 int4.
template <int BITS> constexpr int kLoadsPerRow = BITS == 16 ? 4 : BITS == 8 ? 2 : 1;

// Weight pairs of 8 consecutive k (group `i` of the lane's 32) of one row, in the pairs() order.
template <typename T, int BITS>
__device__ __forceinline__ void weight_pairs(const uint4* w, int i, float s, float z, typename Packed<T>::T2* out) {
  using P = Packed<T>;
  using T2 = typename P::T2;
  if constexpr (BITS == 16) {
    pairs(w[i], out);
  } else if constexpr (BITS == 4) {
    const unsigned word = reinterpret_cast<const unsigned*>(w)[i];
    const T2 zz = P::splat(P::kBase + z), ss = P::splat(s);
#pragma unroll
    for (int j = 0; j < 4; ++j)
      out[j] = __hmul2(__hsub2(as_pair<T2>(((word >> (4 * j)) & 0x000F000Fu) | P::kMagic), zz), ss);
  } else {  // int8: codes j and j + 4 are byte j of the group's two words (stored signed)
    const unsigned* words = reinterpret_cast<const unsigned*>(w) + 2 * i;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      out[j] = P::pack((code<8>(words[0], j) - z) * s, (code<8>(words[1], j) - z) * s);
    }
  }
}

// The RMSNorm's 1/rms of the pass's tokens (scale[m], m < rows; shared), from all of each x row: every
// thread sums x^2 over a share of a row's 16-byte words, 8 tokens a round (their loads in flight
// together while the weights' loads are still out), the warps' sums meet in shared memory.
template <typename T>
__device__ __forceinline__ void tc_rms_scales(const TcParams<T>& p, int tok0, int rows, float* scale) {
  using P = Packed<T>;
  __shared__ float part[kMaxSplit][kTokens];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, words = p.k / 8;
#pragma unroll
  for (int m0 = 0; m0 < kTokens; m0 += 8) {
    float sq[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) sq[j] = 0.f;
    for (int c = threadIdx.x; c < words; c += blockDim.x) {
      uint4 v[8];
#pragma unroll
      for (int j = 0; j < 8; ++j)
        v[j] = m0 + j < rows ? __ldg(reinterpret_cast<const uint4*>(p.x + int64_t(tok0 + m0 + j) * p.ldx) + c)
                             : make_uint4(0, 0, 0, 0);
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        typename P::T2 h[4];
        pairs(v[j], h);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float2 f = P::to_float2(h[e]);
          sq[j] = fmaf(f.x, f.x, fmaf(f.y, f.y, sq[j]));
        }
      }
    }
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const float s = warp_sum(sq[j]);
      if (lane == 0) part[warp][m0 + j] = s;
    }
  }
  __syncthreads();
  if (threadIdx.x < kTokens) {
    float sq = 0.f;
    for (int w = 0; w < (blockDim.x >> 5); ++w) sq += part[w][threadIdx.x];
    scale[threadIdx.x] = rsqrtf(sq / float(p.k) + p.eps);
  }
  __syncthreads();
}

template <typename T, int BITS, bool GLU, bool NORM>
__global__ void __launch_bounds__(kMaxSplit * 32, 1) tc_gemv_kernel(TcParams<T> p) {  // <= 128 registers
  using P = Packed<T>;
  using T2 = typename P::T2;
  constexpr int L = kLoadsPerRow<BITS>;
  constexpr int kCw = GLU ? kTileRows / 2 : kTileRows;  // output channels a block
  extern __shared__ float red[];                         // [split][kTokens][kTileRows]
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, split = blockDim.x >> 5;
  const int kz = gridDim.z, gw = blockIdx.z * split + warp, stride = split * kz;  // the chunks' warps
  const int g = lane >> 2, t = lane & 3;
  const int c0 = blockIdx.x * kCw, tok0 = blockIdx.y * kTokens;
  const int rows = min(kTokens, p.rows - tok0);
  const int chunks = p.k / kChunk;

  // the lane's 4 weight rows: tile mt, half h -> tile row 16 mt + g + 8 h (a channel past the end
  // reads the last one's row, never stored)
  int64_t wrow[2][2];
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int c = min(c0 + (GLU ? 0 : 16 * mt) + g + 8 * h, p.n_out - 1);
      wrow[mt][h] = c + (GLU && mt == 1 ? p.n_out : 0);
    }
  const int bytes_per_k2 = BITS == 16 ? 4 : BITS == 8 ? 2 : 1;  // bytes of 2 k
  const char* wbase = static_cast<const char*>(p.w);
  const int64_t row_bytes = BITS == 16 ? p.ldw * 2 : p.ldw;
  uint4 wv[2][2][L];
  auto load_w = [&](int c) {
#pragma unroll
    for (int u = 0; u < L; ++u) {
      const int64_t off = BITS == 16 ? int64_t(k_at<16>(c, t, u)) * 2 : int64_t(k_at<BITS>(c, t, 0)) * bytes_per_k2 / 2 + 16 * u;
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int h = 0; h < 2; ++h) wv[mt][h][u] = ld_stream(wbase + wrow[mt][h] * row_bytes + off);
    }
  };
  if (gw < chunks) load_w(gw);
  pdl_launch_dependents();
  pdl_wait();
  __shared__ float norm_scale[kTokens];
  float xs[2] = {1.f, 1.f};  // the lane's tokens' 1/rms
  if constexpr (NORM) {
    tc_rms_scales(p, tok0, rows, norm_scale);
    xs[0] = norm_scale[g], xs[1] = norm_scale[8 + g];
  }

  const T* xr[2];  // the lane's x rows (tokens g and g + 8 of the pass), null past the last
#pragma unroll
  for (int nt = 0; nt < 2; ++nt) xr[nt] = 8 * nt + g < rows ? p.x + int64_t(tok0 + 8 * nt + g) * p.ldx : nullptr;
  float acc[2][2][4];
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mt][nt][e] = 0.f;
  const int groups = BITS == 16 ? 1 : p.k / p.group;
  const float zero_default = BITS == 4 ? 8.f : 0.f;
  for (int c = gw; c < chunks; c += stride) {
    if (c != gw) load_w(c);
    const int k = k_at<BITS>(c, t, 0);
    uint4 xv[2][4];
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i)
        xv[nt][i] = xr[nt] ? __ldg(reinterpret_cast<const uint4*>(xr[nt] + k_at<BITS>(c, t, i))) : make_uint4(0, 0, 0, 0);
    float s[2][2], z[2][2];
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        s[mt][h] = 1.f, z[mt][h] = 0.f;
        if constexpr (BITS != 16) {  // the lane's 32 k (from k) lie in one group (group % 32 == 0)
          const int64_t at = wrow[mt][h] * groups + k / p.group;
          s[mt][h] = P::f(p.scales[at]);
          z[mt][h] = p.zeros ? P::f(p.zeros[at]) : zero_default;
        }
      }
#pragma unroll
    for (int i = 0; i < 4; ++i) {  // 8 k at a time: two mma steps
      T2 wp[2][2][4], xp[2][4];
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int h = 0; h < 2; ++h) weight_pairs<T, BITS>(wv[mt][h], i, s[mt][h], z[mt][h], wp[mt][h]);
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) pairs(xv[nt][i], xp[nt]);
      if constexpr (NORM) {  // x / rms * norm weight in float, rounded to T as the norm kernel's output is
        T2 gp[4];
        pairs(__ldg(reinterpret_cast<const uint4*>(p.g + k_at<BITS>(c, t, i))), gp);
#pragma unroll
        for (int nt = 0; nt < 2; ++nt)
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            const float2 xf = P::to_float2(xp[nt][j]), gf = P::to_float2(gp[j]);
            xp[nt][j] = P::pack(xf.x * xs[nt] * gf.x, xf.y * xs[nt] * gf.y);
          }
      }
#pragma unroll
      for (int st = 0; st < 2; ++st) {  // A: rows g, g + 8 x pairs lo, hi; B: the same pairs of x
        const int lo = 2 * st, hi = 2 * st + 1;
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) {
          const unsigned a[4] = {bits_of(wp[mt][0][lo]), bits_of(wp[mt][1][lo]), bits_of(wp[mt][0][hi]),
                                 bits_of(wp[mt][1][hi])};
#pragma unroll
          for (int nt = 0; nt < 2; ++nt) {
            const unsigned b[2] = {bits_of(xp[nt][lo]), bits_of(xp[nt][hi])};
            Mma<T>::run(acc[mt][nt], a, b);
          }
        }
      }
    }
  }
  // D fragment: e = 0..3 -> tile row g + 8 (e / 2), token 2 t + e % 2 of the n8 tile
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e)
        red[(warp * kTokens + 8 * nt + 2 * t + (e & 1)) * kTileRows + 16 * mt + g + 8 * (e >> 1)] = acc[mt][nt][e];
  __syncthreads();
  int sums = split;  // the partial sums of each output in red: one per warp, or one after the z split
  if (kz > 1) {
    constexpr int kTile = kTokens * kTileRows;
    const int tile = blockIdx.y * gridDim.x + blockIdx.x;
    float* slots = p.part + int64_t(tile) * kz * kTile;
    for (int o = threadIdx.x; o < kTile; o += blockDim.x) {
      float v = 0.f;
      for (int w = 0; w < split; ++w) v += red[w * kTile + o];
      slots[blockIdx.z * kTile + o] = v;
    }
    __threadfence();  // the slot before the count
    __syncthreads();
    __shared__ int last;
    if (threadIdx.x == 0) {
      last = atomicAdd(p.count + tile, 1) == kz - 1;
      if (last) p.count[tile] = 0;  // ready for the next call (the next kernel runs after this grid)
    }
    __syncthreads();
    if (!last) return;
    __threadfence();
    for (int o = threadIdx.x; o < kTile; o += blockDim.x) {  // in z order: the same bits every run
      float v = 0.f;
      for (int z = 0; z < kz; ++z) v += __ldcg(slots + z * kTile + o);
      red[o] = v;
    }
    __syncthreads();
    sums = 1;
  }
  for (int o = threadIdx.x; o < kCw * kTokens; o += blockDim.x) {
    const int r = o % kCw, m = o / kCw, col = c0 + r;
    if (m >= rows || col >= p.n_out) continue;
    float h = 0.f, u = 0.f;
    for (int w = 0; w < sums; ++w) {
      h += red[(w * kTokens + m) * kTileRows + r];
      if constexpr (GLU) u += red[(w * kTokens + m) * kTileRows + 16 + r];
    }
    if (p.bias) {
      h += P::f(p.bias[col]);
      if constexpr (GLU) u += P::f(p.bias[p.n_out + col]);
    }
    if constexpr (GLU) h = h / (1.f + __expf(-h)) * u;
    if (p.res) h += P::f(p.res[int64_t(tok0 + m) * p.ldr + col]);
    p.y[int64_t(tok0 + m) * p.ldy + col] = P::t(h);
  }
}

// The K split of a call: kz blocks a tile (grid z), split warps a block.
void split_for(const GemvArgs& a, int dev, int* kz, int* split) {
  const int cw = a.glu ? kTileRows / 2 : kTileRows;
  const int64_t sms = sm_count(dev), wave = int64_t(kWarpsPerSm) * sms;
  const int64_t blocks = (a.n_out + cw - 1) / cw * ((a.m + kTokens - 1) / kTokens), chunks = a.k / kChunk;
  *kz = 1, *split = 1;
  if (blocks <= kMaxTiles && chunks >= kMinChunksZ)
    while (blocks * *kz * 2 <= sms && chunks >= 2 * *kz) *kz *= 2;
  while (*split < kMaxSplit && blocks * *kz * *split * 2 <= wave && chunks >= 2 * *kz * *split) *split *= 2;
}

// kMaxTiles counters in scratch, zeroed when first allocated; each call leaves them zero.
int* tile_counters(int dev, cudaStream_t stream) {
  static std::mutex mu;
  static std::set<void*> zeroed;
  void* buf = scratch(dev, stream, kSlotCounters, sizeof(int) * kMaxTiles);
  std::lock_guard<std::mutex> lock(mu);
  if (zeroed.insert(buf).second) LLMC_CUDA_CHECK(cudaMemsetAsync(buf, 0, sizeof(int) * kMaxTiles, stream));
  return static_cast<int*>(buf);
}

template <typename T, int BITS>
void launch_typed(const GemvArgs& a, int dev, cudaStream_t stream) {
  TcParams<T> p{static_cast<const T*>(a.x), a.ldx, static_cast<const T*>(a.norm_w), a.eps, a.w, a.ldw, static_cast<const T*>(a.scales),
                static_cast<const T*>(a.zeros), int(a.group), static_cast<const T*>(a.bias),
                static_cast<const T*>(a.res), a.ldr, static_cast<T*>(a.y), a.ldy, int(a.m), int(a.n_out), int(a.k),
                nullptr, nullptr};
  const int cw = a.glu ? kTileRows / 2 : kTileRows;
  dim3 grid(unsigned((a.n_out + cw - 1) / cw), unsigned((a.m + kTokens - 1) / kTokens), 1);
  // K split first across blocks while they fit on the SMs, then across a block's warps while the grid
  // stays one wave (kWarpsPerSm an SM) and each warp has a chunk: a warp holds one chunk's loads, so
  // the more warps the more bytes in flight; a second wave waits for the first's slowest warp.
  int kz = 1, split = 1;
  split_for(a, dev, &kz, &split);
  const int64_t blocks = int64_t(grid.x) * grid.y;
  if (kz > 1) {
    grid.z = unsigned(kz);
    p.part = static_cast<float*>(scratch(dev, stream, kSlotPartials, sizeof(float) * blocks * kz * kTokens * kTileRows));
    p.count = tile_counters(dev, stream);
  }
  const size_t smem = size_t(split) * kTokens * kTileRows * sizeof(float);
  const dim3 block(32 * split);
  if (a.norm_w != nullptr) {
    if (a.glu) launch_pdl_smem(tc_gemv_kernel<T, BITS, true, true>, grid, block, smem, dev, stream, p);
    else launch_pdl_smem(tc_gemv_kernel<T, BITS, false, true>, grid, block, smem, dev, stream, p);
  } else {
    if (a.glu) launch_pdl_smem(tc_gemv_kernel<T, BITS, true, false>, grid, block, smem, dev, stream, p);
    else launch_pdl_smem(tc_gemv_kernel<T, BITS, false, false>, grid, block, smem, dev, stream, p);
  }
}

template <typename T>
void launch_bits(const GemvArgs& a, int dev, cudaStream_t stream) {
  if (a.bits == 4) launch_typed<T, 4>(a, dev, stream);
  else if (a.bits == 8) launch_typed<T, 8>(a, dev, stream);
  else launch_typed<T, 16>(a, dev, stream);
}

}  // namespace

bool tc_gemv(int dev, cudaStream_t stream, const GemvArgs& a) {
  if (a.m < 1 || a.m > int64_t(kTokens) * 65535 || a.n_out <= 0 || a.k <= 0 || a.k % kChunk != 0) return false;
  if (a.dtype != CUDA_R_16F && a.dtype != CUDA_R_16BF) return false;
  if (a.bits != 16 && a.bits != 8 && a.bits != 4) return false;
  if (a.bits != 16 && (a.group <= 0 || a.group % 32 != 0 || a.k % a.group != 0 || a.bias != nullptr)) return false;
  const int64_t row_bytes = a.bits == 16 ? a.ldw * 2 : a.ldw;
  if (a.norm_w != nullptr) {
    if (!aligned16(a.norm_w)) return false;
    // every block reads all of its 16 x rows for the norm: past a few blocks an SM that costs more
    // than the norm kernel's one pass (H200, 16 rows: norm + LM head, 4008 blocks, 152 against 132 us
    // with the norm kernel and cuBLASLt). Gate/up's 512 blocks (3.9 an SM) gain: 26.8 against 27.5 us,
    // the batch-16 decode step 1155 against 1175 us of GPU time (two rounds each).
    const int cw = a.glu ? kTileRows / 2 : kTileRows;
    if ((a.n_out + cw - 1) / cw * ((a.m + kTokens - 1) / kTokens) > 4 * sm_count(dev)) return false;
  }
  if (!aligned16(a.x) || a.ldx % 8 != 0 || !aligned16(a.w) || row_bytes % 16 != 0) return false;
  if (a.dtype == CUDA_R_16F) launch_bits<__half>(a, dev, stream);
  else launch_bits<__nv_bfloat16>(a, dev, stream);
  return true;
}

}  // namespace llmc_shim
