// llmc CUDA shim: llmc_paged_attention's decode kernel (a step of one token per sequence over a
// float cache; llmc_paged_attention.cu takes prefill, mixed steps and quantized caches).
//
// Decode reads each sequence's whole history once per layer, so the kernel is a stream of K/V
// rows: a block takes one sequence, one KV head and one split of the keys (flash-decoding), and
// serves all G query heads that share the KV head from registers, so GQA reads each row once.
// In a warp, D / 8 lanes share a key (a 16-byte load of K and one of V each) and the warp walks
// its keys in chunks of NB such steps, every load of a chunk issued before any is used. A lane's
// dot products are summed over the key's lanes by shuffles; the warp keeps an online softmax per
// query head; the block's four warps, then the splits (the last block of a (sequence, KV head)
// to finish, by an atomic counter it resets so a captured CUDA graph can replay it), combine
// their states. The kernel is a programmatic dependent launch: the history's first loads are
// issued before it waits for the kernels that wrote q / k / v, and it lets the next launch (the
// output projection's GEMV, which then fetches its weights) start at once.
//
// The step's own key is read from k / v, not from the page it is appended to (split 0 appends),
// so no block depends on another's write. With a rotary table (PagedArgs::rope), q and the own key
// are rotated in registers as they are loaded (a dim's partner d +- D/2 is D/16 lanes away), so
// the step needs no rotary kernel of its own between the QKV projection and this one.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>

#include "llmc_paged.h"
#include "llmc_stream_kernels.h"

namespace llmc_shim {
namespace {

constexpr int kWarps = 4;
constexpr int kMaxSplits = 64;
constexpr float kLog2e = 1.4426950408889634f;
// blocks an SM holds (the registers of G = 8's query and accumulator rows allow two)
constexpr int blocks_per_sm(int g) { return g > 4 ? 2 : 3; }

template <typename T>
__device__ __forceinline__ void to8(const uint4& u, float* f) {
  const T* e = reinterpret_cast<const T*>(&u);
#pragma unroll
  for (int i = 0; i < 8; ++i) f[i] = Packed<T>::f(e[i]);
}

template <typename T>
__device__ __forceinline__ uint4 from8(const float* f) {
  uint4 u;
  T* e = reinterpret_cast<T*>(&u);
#pragma unroll
  for (int i = 0; i < 8; ++i) e[i] = Packed<T>::t(f[i]);
  return u;
}

template <int D, int G>
struct DecodeTile {
  static constexpr int LPK = D / 8;          // lanes per key
  static constexpr int KPS = 32 / LPK;       // keys a warp reads per step
  static constexpr int NB = G <= 2 ? 8 : 16 / G;  // steps per chunk (registers: 2 NB uint4, NB G scores)
  static constexpr int CHUNK = NB * KPS;     // keys per warp chunk
};

template <typename T, int D, int G, bool ROPE>
__global__ void __launch_bounds__(kWarps * 32, blocks_per_sm(G)) paged_decode_kernel(const PagedArgs a, const DecodeSplits w) {
  using Tile = DecodeTile<D, G>;
  constexpr int LPK = Tile::LPK, KPS = Tile::KPS, NB = Tile::NB, CHUNK = Tile::CHUNK;
  __shared__ float s_acc[kWarps][G][D];
  __shared__ float2 s_ml[kWarps][G];
  __shared__ float s_wt[kMaxSplits][G];
  __shared__ bool last;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, kg = lane / LPK, c = lane % LPK;
  const int s = blockIdx.z, h = blockIdx.y, split = blockIdx.x;
  const int gn = a.H / a.Hkv;
  const int q0 = a.starts[s], L = a.lens[s], first = L - 1;
  if (a.starts[s + 1] - q0 != 1 || L < 1) return;  // (every split of the sequence alike)
  const int k_lo = a.window > 0 ? max(0, L - a.window) : 0;
  const int n_chunks = (L - k_lo + CHUNK - 1) / CHUNK;
  // The launch's splits fit the longest history the page table holds (a captured graph replays
  // for any length); this sequence uses those that get a round of chunks (a chunk a warp) at
  // least, so a short history's merge reads a few partial results, not all of them.
  const int n_split = min(w.n_split, (n_chunks + kWarps - 1) / kWarps);
  if (split >= n_split) return;
  const int per = (n_chunks + n_split - 1) / n_split;
  const int c_b = split * per, c_e = min(n_chunks, c_b + per);
  const int* table = a.table + int64_t(s) * a.C;
  T* cache = static_cast<T*>(a.cache);
  const int64_t page_stride = int64_t(2) * a.P * a.Hkv * D, v_off = int64_t(a.P) * a.Hkv * D;
  const T* K = static_cast<const T*>(a.k) + h * a.k_h + int64_t(q0) * a.k_t + c * 8;
  const T* V = static_cast<const T*>(a.v) + h * a.v_h + int64_t(q0) * a.v_t + c * 8;

  uint4 kr[NB], vr[NB];
  // a chunk's history rows (keys before the step's own), straight from the pages
  auto load_history = [&](int ch) {
#pragma unroll
    for (int i = 0; i < NB; ++i) {
      const int key = k_lo + ch * CHUNK + i * KPS + kg;
      kr[i] = vr[i] = make_uint4(0, 0, 0, 0);
      if (key < first) {
        const T* src = cache + __ldg(table + key / a.P) * page_stride + (int64_t(key % a.P) * a.Hkv + h) * D + c * 8;
        kr[i] = ld_stream(src);
        vr[i] = ld_stream(src + v_off);
      }
    }
  };
  int ch = c_b + warp;
  if (ch < c_e) load_history(ch);
  pdl_launch_dependents();
  pdl_wait();
  // the step's own key (this lane's 8 dims), written by the kernels before this one; rotated here
  // when the call rotates (every lane of the warp takes part in the rotation's shuffles)
  float cs[8], sn[8];
  uint4 k_own = *reinterpret_cast<const uint4*>(K);
  if constexpr (ROPE) {
    rope_row8<T>(a.cos, a.rope, q0, D, c * 8, cs);
    rope_row8<T>(a.sin, a.rope, q0, D, c * 8, sn);
    float kf[8];
    to8<T>(k_own, kf);
    rope8(kf, cs, sn, LPK, c < LPK / 2);
    k_own = from8<T>(kf);
  }
  auto load_own = [&](int ch) {
#pragma unroll
    for (int i = 0; i < NB; ++i) {
      if (k_lo + ch * CHUNK + i * KPS + kg == first) {
        kr[i] = k_own;
        vr[i] = *reinterpret_cast<const uint4*>(V);
      }
    }
  };
  if (split == 0 && warp == 0 && lane < LPK) {  // append the step's K / V (head h) to its page
    T* dst = cache + table[first / a.P] * page_stride + (int64_t(first % a.P) * a.Hkv + h) * D + c * 8;
    *reinterpret_cast<uint4*>(dst) = k_own;
    *reinterpret_cast<uint4*>(dst + v_off) = *reinterpret_cast<const uint4*>(V);
  }
  // this lane's 8 dims of each query head, as float (rotated), times scale * log2(e)
  float q[G][8];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    if (g < gn) {
      to8<T>(*reinterpret_cast<const uint4*>(static_cast<const T*>(a.q) + (h * gn + g) * a.q_h + int64_t(q0) * a.q_t + c * 8), q[g]);
      if constexpr (ROPE) rope8(q[g], cs, sn, LPK, c < LPK / 2);
#pragma unroll
      for (int e = 0; e < 8; ++e) q[g][e] *= a.scale * kLog2e;
    } else {
#pragma unroll
      for (int e = 0; e < 8; ++e) q[g][e] = 0.f;
    }
  }
  float m[G], l[G], acc[G][8];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    m[g] = -INFINITY;
    l[g] = 0.f;
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[g][e] = 0.f;
  }
  for (; ch < c_e; ch += kWarps) {
    load_own(ch);
    float sc[NB][G];
#pragma unroll
    for (int i = 0; i < NB; ++i) {
      float kf[8];
      to8<T>(kr[i], kf);
      const bool ok = k_lo + ch * CHUNK + i * KPS + kg < L;
#pragma unroll
      for (int g = 0; g < G; ++g) {
        float d = 0.f;
#pragma unroll
        for (int e = 0; e < 8; ++e) d = fmaf(q[g][e], kf[e], d);
#pragma unroll
        for (int o = 1; o < LPK; o <<= 1) d += __shfl_xor_sync(0xffffffffu, d, o);
        sc[i][g] = ok ? d : -INFINITY;
      }
    }
#pragma unroll
    for (int g = 0; g < G; ++g) {
      float mx = sc[0][g];
#pragma unroll
      for (int i = 1; i < NB; ++i) mx = fmaxf(mx, sc[i][g]);
#pragma unroll
      for (int o = LPK; o < 32; o <<= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
      const float m_new = fmaxf(m[g], mx);  // finite: a chunk holds at least one visible key
      const float corr = exp2f(m[g] - m_new);
      float sum = 0.f;
#pragma unroll
      for (int i = 0; i < NB; ++i) {
        sc[i][g] = exp2f(sc[i][g] - m_new);
        sum += sc[i][g];
      }
#pragma unroll
      for (int o = LPK; o < 32; o <<= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
      l[g] = l[g] * corr + sum;
      m[g] = m_new;
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[g][e] *= corr;
    }
#pragma unroll
    for (int i = 0; i < NB; ++i) {
      float vf[8];
      to8<T>(vr[i], vf);
#pragma unroll
      for (int g = 0; g < G; ++g)
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[g][e] = fmaf(sc[i][g], vf[e], acc[g][e]);
    }
    if (ch + kWarps < c_e) load_history(ch + kWarps);
  }
  // the warp's lanes of one dim slice hold different keys' sums: add them, then combine the warps
#pragma unroll
  for (int g = 0; g < G; ++g) {
#pragma unroll
    for (int e = 0; e < 8; ++e) {
#pragma unroll
      for (int o = LPK; o < 32; o <<= 1) acc[g][e] += __shfl_xor_sync(0xffffffffu, acc[g][e], o);
      if (kg == 0) s_acc[warp][g][c * 8 + e] = acc[g][e];
    }
    if (lane == 0) s_ml[warp][g] = make_float2(m[g], l[g]);
  }
  __syncthreads();
  const int rows = gn * D;
  const bool split_up = n_split > 1;
  T* O = static_cast<T*>(a.out);
  for (int i = threadIdx.x; i < rows; i += blockDim.x) {
    const int g = i / D, d = i % D, head = h * gn + g;
    float mx = -INFINITY;
#pragma unroll
    for (int v = 0; v < kWarps; ++v) mx = fmaxf(mx, s_ml[v][g].x);
    float num = 0.f, den = 0.f;
#pragma unroll
    for (int v = 0; v < kWarps; ++v) {
      const float wt = s_ml[v][g].x == -INFINITY ? 0.f : exp2f(s_ml[v][g].x - mx);
      num += wt * s_acc[v][g][d];
      den += wt * s_ml[v][g].y;
    }
    if (!split_up) {
      O[head * a.o_h + int64_t(q0) * a.o_t + d] = Packed<T>::t(den > 0.f ? num / den : 0.f);
    } else {
      const int64_t idx = (int64_t(split) * a.T + q0) * a.H + head;
      w.part_o[idx * D + d] = num;
      if (d == 0) w.part_ml[idx] = make_float2(mx, den);
    }
  }
  if (!split_up) return;
  __threadfence();
  __syncthreads();
  unsigned* counter = w.counters + int64_t(s) * a.Hkv + h;
  if (threadIdx.x == 0) last = atomicAdd(counter, 1u) == unsigned(n_split - 1);
  __syncthreads();
  if (!last) return;
  __threadfence();
  // the splits' weights per query head (a warp each), then every output element
  for (int g = warp; g < gn; g += kWarps) {
    const int64_t head = h * gn + g;
    float mx = -INFINITY;
    for (int sp = lane; sp < n_split; sp += 32) mx = fmaxf(mx, __ldcg(&w.part_ml[(sp * a.T + q0) * a.H + head]).x);
    mx = warp_max(mx);
    float den = 0.f;
    for (int sp = lane; sp < n_split; sp += 32) {
      const float2 ml = __ldcg(&w.part_ml[(sp * a.T + q0) * a.H + head]);
      const float wt = ml.x == -INFINITY ? 0.f : exp2f(ml.x - mx);
      s_wt[sp][g] = wt;
      den += wt * ml.y;
    }
    den = warp_sum(den);
    const float inv = den > 0.f ? 1.f / den : 0.f;
    for (int sp = lane; sp < n_split; sp += 32) s_wt[sp][g] *= inv;
  }
  __syncthreads();
  // Every output element sums n_split partials: a thread takes 4 elements (16-byte loads) and,
  // where the block has threads to spare, a share of the splits, so each thread's chain of
  // dependent L2 reads is short; the shares meet in shared memory (s_acc is free again).
  const int cols = rows / 4, shares = min(kWarps, max(1, int(blockDim.x) / cols));
  float4* s_sum = reinterpret_cast<float4*>(&s_acc[0][0][0]);  // [shares][cols]: kWarps * G * D floats
  for (int t = threadIdx.x; t < cols * shares; t += blockDim.x) {
    const int col = t % cols, share = t / cols, g = col * 4 / D;
    const float4* part = reinterpret_cast<const float4*>(w.part_o + ((int64_t(q0) * a.H + h * gn + g) * D + col * 4 % D));
    const int64_t split_stride = int64_t(a.T) * a.H * D / 4;  // float4s from one split's partials to the next
    float4 num = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll 4
    for (int sp = share; sp < n_split; sp += shares) {
      const float wt = s_wt[sp][g];
      const float4 x = __ldcg(part + sp * split_stride);
      num.x = fmaf(wt, x.x, num.x);
      num.y = fmaf(wt, x.y, num.y);
      num.z = fmaf(wt, x.z, num.z);
      num.w = fmaf(wt, x.w, num.w);
    }
    s_sum[share * cols + col] = num;
  }
  __syncthreads();
  const float* sums = reinterpret_cast<const float*>(s_sum);
  for (int i = threadIdx.x; i < rows; i += blockDim.x) {
    const int g = i / D, d = i % D, head = h * gn + g;
    float num = 0.f;
    for (int sh = 0; sh < shares; ++sh) num += sums[sh * rows + i];
    O[head * a.o_h + int64_t(q0) * a.o_t + d] = Packed<T>::t(num);
  }
  if (threadIdx.x == 0) *counter = 0;  // ready for the next launch (graph replays)
}

template <typename T, int D, bool ROPE>
void launch_g(const PagedArgs& a, const DecodeSplits& w, int dev, cudaStream_t stream) {
  const dim3 grid(w.n_split, a.Hkv, a.S), block(kWarps * 32);
  const int g = a.H / a.Hkv;
  if (g == 1) launch_pdl(paged_decode_kernel<T, D, 1, ROPE>, grid, block, dev, stream, a, w);
  else if (g == 2) launch_pdl(paged_decode_kernel<T, D, 2, ROPE>, grid, block, dev, stream, a, w);
  else if (g <= 4) launch_pdl(paged_decode_kernel<T, D, 4, ROPE>, grid, block, dev, stream, a, w);
  else launch_pdl(paged_decode_kernel<T, D, 8, ROPE>, grid, block, dev, stream, a, w);
}

template <typename T, int D>
void launch_r(const PagedArgs& a, const DecodeSplits& w, int dev, cudaStream_t stream) {
  if (a.rope) launch_g<T, D, true>(a, w, dev, stream);
  else launch_g<T, D, false>(a, w, dev, stream);
}

template <typename T>
void launch_d(const PagedArgs& a, const DecodeSplits& w, int dev, cudaStream_t stream) {
  if (a.D == 64) launch_r<T, 64>(a, w, dev, stream);
  else if (a.D == 128) launch_r<T, 128>(a, w, dev, stream);
  else launch_r<T, 32>(a, w, dev, stream);
}

// One thread per (token, head of q or k, 8 dims d0 .. d0 + 7 of the head's first half): those dims
// and their partners d0 + D/2 .. rotated, in 16-byte loads and stores (the rotated q and k,
// token-major).
template <typename T>
__global__ void paged_rope_kernel(const PagedArgs a, T* q_out, T* k_out) {
  const int half = a.D / 2, per_head = half / 8, heads = a.H + a.Hkv;
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= int64_t(a.T) * heads * per_head) return;
  const int d0 = int(i % per_head) * 8, head = int((i / per_head) % heads);
  const int64_t t = i / (int64_t(per_head) * heads);
  const bool is_q = head < a.H;
  const int hh = is_q ? head : head - a.H;
  const T* x = is_q ? static_cast<const T*>(a.q) + hh * a.q_h + t * a.q_t : static_cast<const T*>(a.k) + hh * a.k_h + t * a.k_t;
  T* y = is_q ? q_out + (t * a.H + hh) * a.D : k_out + (t * a.Hkv + hh) * a.D;
  float lo[8], hi[8], c_lo[8], s_lo[8], c_hi[8], s_hi[8], out_lo[8], out_hi[8];
  to8<T>(*reinterpret_cast<const uint4*>(x + d0), lo);
  to8<T>(*reinterpret_cast<const uint4*>(x + d0 + half), hi);
  rope_row8<T>(a.cos, a.rope, t, a.D, d0, c_lo);
  rope_row8<T>(a.sin, a.rope, t, a.D, d0, s_lo);
  rope_row8<T>(a.cos, a.rope, t, a.D, d0 + half, c_hi);
  rope_row8<T>(a.sin, a.rope, t, a.D, d0 + half, s_hi);
#pragma unroll
  for (int e = 0; e < 8; ++e) {
    out_lo[e] = fmaf(lo[e], c_lo[e], -hi[e] * s_lo[e]);
    out_hi[e] = fmaf(hi[e], c_hi[e], lo[e] * s_hi[e]);
  }
  *reinterpret_cast<uint4*>(y + d0) = from8<T>(out_lo);
  *reinterpret_cast<uint4*>(y + d0 + half) = from8<T>(out_hi);
}

}  // namespace

void paged_rope(const PagedArgs& a, void* q_out, void* k_out, bool bf16, cudaStream_t stream) {
  const int64_t n = int64_t(a.T) * (a.H + a.Hkv) * (a.D / 16);
  const unsigned blocks = unsigned((n + 255) / 256);
  if (bf16) paged_rope_kernel<__nv_bfloat16><<<blocks, 256, 0, stream>>>(a, static_cast<__nv_bfloat16*>(q_out), static_cast<__nv_bfloat16*>(k_out));
  else paged_rope_kernel<__half><<<blocks, 256, 0, stream>>>(a, static_cast<__half*>(q_out), static_cast<__half*>(k_out));
  LLMC_CUDA_CHECK(cudaGetLastError());
}

int paged_decode_splits(const PagedArgs& a, int dev) {
  // keys a block's warps take in one round (DecodeTile's chunk for this group size)
  const int g = a.H / a.Hkv;
  const int chunk = (g <= 2 ? 8 : 16 / (g <= 4 ? 4 : 8)) * (32 / (a.D / 8));
  const int max_rounds = (a.C * a.P + chunk * kWarps - 1) / (chunk * kWarps);
  // the blocks the SMs hold at once (what the registers allow), each with a round of chunks at least
  const int blocks = std::max(1, a.S * a.Hkv);
  return std::max(1, std::min({max_rounds, blocks_per_sm(g) * sm_count(dev) / blocks, kMaxSplits}));
}

void paged_decode(const PagedArgs& a, const DecodeSplits& w, bool bf16, int dev, cudaStream_t stream) {
  if (bf16) launch_d<__nv_bfloat16>(a, w, dev, stream);
  else launch_d<__half>(a, w, dev, stream);
}

}  // namespace llmc_shim
