// llmc CUDA shim: fused flash-attention forward (prefill), FlashAttention-2 style.
//
// A thread block of 4 warps computes 64 or 128 query rows (1 or 2 m-tiles of 16 rows per warp,
// see launch_variant) of one (batch, q-head); it walks the keys in tiles of 64 with an online
// softmax, so the S x T score matrix never exists in memory. Q K^T and P V run on tensor cores
// (mma.sync m16n8k16, fp32 accumulate; P stays in registers); tiles move global -> shared with
// cp.async (16 B, zero-filled past the end) and shared -> registers with ldmatrix; shared rows
// are XOR-swizzled in 16-byte chunks so that ldmatrix is conflict-free. K tile i+1 loads while
// P V of tile i runs, and V tile i loads while Q K^T of tile i runs. Causal blocks are launched
// heaviest first.
//
// The general entry point, the one llmc's artifacts call:
//
//   llmc_attention_ext(q, k, v, mask or None, out, scale: float, causal: int, layout: int)
//
// layout bits: 1 q, 2 k, 4 v, 8 out; a set bit means token-major [B,S,H,D], a clear bit
// head-major [B,H,S,D] (so the attention reads the token-major q/k/v that a projection wrote
// and writes the token-major output the next projection reads). Bit 16: q is a packed QKV
// projection output [B,S,Hq+2Hk,D] (k and v are then ignored), as a fused QKV GEMM writes it.
// mask: up to 4-D, broadcastable to [B,Hq,S,T] (size-1 dims broadcast): bool/uint8 (nonzero =
// attend) or additive float32, added to the scaled scores; a mask broadcast over the rows (a
// key-padding mask [B,1,1,T]) is read once per key and thread, not once per score.
//
// Fixed-layout entry points (inputs, outputs, then scalars):
//   llmc_attention(q, k, v, out, scale, causal)        head-major  q/out [B,Hq,S,D], k/v [B,Hk,T,D]
//   llmc_attention_bshd(q, k, v, out, scale, causal)   token-major q/out [B,S,Hq,D], k/v [B,T,Hk,D]
//   llmc_attention_qkv(qkv, out, scale, causal)        packed QKV [B,S,Hq+2*Hk,D] (or the same
//        memory as [B,S,(Hq+2*Hk)*D]): heads [0,Hq) are q, [Hq,Hq+Hk) k, [Hq+Hk,Hq+2Hk) v;
//        out [B,S,Hq,D]; Hq comes from out, Hk = (H - Hq) / 2.
// Any strides are honoured for the batch, head and sequence dims (the last dim must be
// contiguous, strides multiples of 8 elements, base pointers 16-byte aligned). dtype float16 or
// bfloat16 (all tensors alike but the mask); D in {16, 32, 64, 128}; GQA: kv head = q head /
// (Hq / Hk). causal != 0: bottom-right aligned, query i sees keys j <= i + T - S (same as
// top-left when S == T); a query row that sees no key gets zeros (as llmc's CPU kernels).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdlib>

#include "llmc_paged.h"
#include "llmc_shim_common.h"

namespace llmc_shim_attention {
using namespace llmc_shim;
namespace {

struct AttnParams {
  const void* q;
  const void* k;
  const void* v;
  void* o;
  int64_t q_b, q_h, q_s;  // element strides
  int64_t k_b, k_h, k_s;
  int64_t v_b, v_h, v_s;
  int64_t o_b, o_h, o_s;
  const void* m;          // mask (nullptr: none), broadcast over dims whose stride is 0
  int64_t m_b, m_h, m_s, m_t;
  int B, Hq, Hk, S, T, group;
  float scale_log2;  // softmax scale * log2(e)
  float inv_scale;   // 1 / scale: an additive mask is applied to the unscaled scores
};

template <typename T>
struct MmaType;
template <>
struct MmaType<__half> {
  static __device__ __forceinline__ uint32_t pack(float a, float b) {
    __half2 h = __floats2half2_rn(a, b);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  static __device__ __forceinline__ void mma(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};
template <>
struct MmaType<__nv_bfloat16> {
  static __device__ __forceinline__ uint32_t pack(float a, float b) {
    __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  static __device__ __forceinline__ void mma(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  const int n = valid ? 16 : 0;  // 0 source bytes: the 16 destination bytes are zero-filled
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(smem)), "l"(gmem), "r"(n));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::); }

__device__ __forceinline__ void ldmatrix_x4(uint32_t* r, const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t* r, const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
}

template <int D>
__device__ __forceinline__ int swz(int row, int chunk) {  // element offset of 16-byte chunk
  constexpr int kSw = (D / 8) >= 8 ? 7 : (D / 8) - 1;     // a permutation of the row's chunks
  return row * D + ((chunk ^ (row & kSw)) << 3);
}

constexpr int kThreads = 128;  // 4 warps

__device__ __forceinline__ float fast_exp2(float x) {  // ex2.approx.ftz: exp2(-inf) = +0
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// Copy a ROWS x D tile (row stride `stride` elements) into swizzled shared memory; rows at or
// past `valid` are zero-filled.
template <typename T, int D, int ROWS>
__device__ __forceinline__ void load_tile(T* s, const T* g, int64_t stride, int valid, int tid) {
  constexpr int CH = D / 8;
#pragma unroll
  for (int i = tid; i < ROWS * CH; i += kThreads) {
    const int r = i / CH, c = i % CH;
    const bool ok = r < valid;
    cp_async16(s + swz<D>(r, c), ok ? g + r * stride + c * 8 : g, ok);
  }
}

// The mask tensor's term for one score: 0 or -inf (bool), or the additive float mask, applied
// to the unscaled score. MK: mask kind (1 bool, 3 additive float32).
template <int MK>
__device__ __forceinline__ float mask_term(const AttnParams& p, int64_t offset) {
  if (MK == 1) return static_cast<const uint8_t*>(p.m)[offset] == 0 ? -INFINITY : 0.f;
  return static_cast<const float*>(p.m)[offset] * p.inv_scale;
}

// Key (column) and query row of accumulator element e of an m16n8 MMA tile: thread (g, t4)
// holds columns 2*t4 + {0, 1} of rows g and g + 8.
__device__ __forceinline__ int score_key(int n0, int nt, int t4, int e) { return n0 + nt * 8 + 2 * t4 + (e & 1); }
__device__ __forceinline__ int score_row(int m0, int mt, int warp, int g, int e) {
  return m0 + mt * 64 + warp * 16 + g + ((e >> 1) << 3);
}

// MK: mask kind (0 none, 1 bool, 3 additive float32).
// MT: 16-row m-tiles per warp (block = 4 warps x 16*MT rows; warp w owns rows mt*64 + w*16 + [0,16));
// BN: keys per tile; QREG: keep the Q fragments in registers (else re-read them from shared memory).
template <typename T, int D, bool CAUSAL, int MK, int MT, int BN, bool QREG>
__global__ void __launch_bounds__(kThreads) flash_fwd_kernel(const AttnParams p) {
  using Mma = MmaType<T>;
  constexpr int BM = 64 * MT;
  constexpr int CH = D / 8;      // 16-byte chunks per row
  constexpr int KD = D / 16;     // k-slices of Q K^T
  constexpr int NT = BN / 8;     // n-tiles of S per m-tile
  constexpr int DT = D / 8;      // n-tiles of O per m-tile
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + BM * D;
  T* sV = sK + BN * D;

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int m_block = gridDim.x - 1 - blockIdx.x;  // heaviest (causal) blocks first
  const int h = blockIdx.y, b = blockIdx.z, hk = h / p.group;
  const T* q = static_cast<const T*>(p.q) + b * p.q_b + h * p.q_h;
  const T* k = static_cast<const T*>(p.k) + b * p.k_b + hk * p.k_h;
  const T* v = static_cast<const T*>(p.v) + b * p.v_b + hk * p.v_h;
  T* o = static_cast<T*>(p.o) + b * p.o_b + h * p.o_h;
  const int m0 = m_block * BM;
  const int shift = p.T - p.S;  // causal: row i sees keys j <= i + shift
  const int64_t m_off = b * p.m_b + h * p.m_h;

  int n_end = p.T;
  if (CAUSAL) n_end = min(p.T, m0 + BM + shift);
  const int n_tiles = n_end > 0 ? (n_end + BN - 1) / BN : 0;

  load_tile<T, D, BM>(sQ, q + m0 * p.q_s, p.q_s, p.S - m0, tid);
  if (n_tiles > 0) load_tile<T, D, BN>(sK, k, p.k_s, p.T, tid);
  cp_async_commit();

  float acc_o[MT][DT][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int i = 0; i < DT; ++i) acc_o[mt][i][0] = acc_o[mt][i][1] = acc_o[mt][i][2] = acc_o[mt][i][3] = 0.f;
  float row_max[MT][2], row_sum[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) row_max[mt][0] = row_max[mt][1] = -INFINITY, row_sum[mt][0] = row_sum[mt][1] = 0.f;
  uint32_t qf[QREG ? MT : 1][QREG ? KD : 1][4];
  const int g = lane >> 2, t4 = lane & 3;

  for (int it = 0; it < n_tiles; ++it) {
    const int n0 = it * BN;
    cp_async_wait_all();
    __syncthreads();  // K[it] (and Q) in shared memory; every warp is done with V[it-1]
    if (QREG && it == 0) {
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int kk = 0; kk < KD; ++kk)
          ldmatrix_x4(qf[QREG ? mt : 0][QREG ? kk : 0],
                      sQ + swz<D>(mt * 64 + warp * 16 + (lane & 15), kk * 2 + (lane >> 4)));
    }
    load_tile<T, D, BN>(sV, v + n0 * p.v_s, p.v_s, p.T - n0, tid);
    cp_async_commit();

    // S = Q K^T for this warp's MT x 16 rows x BN keys
    float s[MT][NT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int i = 0; i < NT; ++i) s[mt][i][0] = s[mt][i][1] = s[mt][i][2] = s[mt][i][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < KD; ++kk) {
      uint32_t qa[MT][4];
      if (!QREG) {
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
          ldmatrix_x4(qa[mt], sQ + swz<D>(mt * 64 + warp * 16 + (lane & 15), kk * 2 + (lane >> 4)));
      }
#pragma unroll
      for (int np = 0; np < NT / 2; ++np) {
        uint32_t kb[4];
        ldmatrix_x4(kb, sK + swz<D>(np * 16 + ((lane >> 4) << 3) + (lane & 7), kk * 2 + ((lane >> 3) & 1)));
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          const uint32_t* a = QREG ? qf[QREG ? mt : 0][QREG ? kk : 0] : qa[mt];
          Mma::mma(s[mt][2 * np], a, kb[0], kb[1]);
          Mma::mma(s[mt][2 * np + 1], a, kb[2], kb[3]);
        }
      }
    }

    // mask the keys past T, when causal past each row's diagonal, and by the mask tensor
    const bool need_mask = MK != 0 || (n0 + BN > p.T) || (CAUSAL && n0 + BN - 1 > m0 + shift);
    if (MK != 0 && p.m_s == 0) {
      // a mask broadcast over the rows (a key-padding mask [B,1,1,T]): each thread reads the
      // mask of its 2*NT keys once and applies it to all of its rows. Kept apart from the
      // general loop below: one loop choosing per score between the two ran MiniLM's
      // attention at 21.6 instead of 14.2 us on an H100.
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int e2 = 0; e2 < 2; ++e2) {
          const int key = score_key(n0, nt, t4, e2);
          const float add = key >= p.T ? -INFINITY : mask_term<MK>(p, m_off + int64_t(key) * p.m_t);
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            s[mt][nt][e2] += add;
            s[mt][nt][e2 + 2] += add;
          }
        }
      if (CAUSAL) {
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
          for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e)
              if (score_key(n0, nt, t4, e) > score_row(m0, mt, warp, g, e) + shift) s[mt][nt][e] = -INFINITY;
      }
    } else if (need_mask) {
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int key = score_key(n0, nt, t4, e), row = score_row(m0, mt, warp, g, e);
            if (key >= p.T || (CAUSAL && key > row + shift)) {
              s[mt][nt][e] = -INFINITY;
            } else if (MK != 0) {
              s[mt][nt][e] += mask_term<MK>(p, m_off + int64_t(min(row, p.S - 1)) * p.m_s + int64_t(key) * p.m_t);
            }
          }
    }

    // online softmax (each row is spread over the 4 threads of a quad)
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float mx = row_max[mt][r];
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) mx = fmaxf(mx, fmaxf(s[mt][nt][2 * r], s[mt][nt][2 * r + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float m_use = (mx == -INFINITY) ? 0.f : mx * p.scale_log2;
        const float corr = fast_exp2(row_max[mt][r] * p.scale_log2 - m_use);  // 0 when row_max was -inf
        row_max[mt][r] = mx;
        float sum = 0.f;
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          s[mt][nt][2 * r] = fast_exp2(s[mt][nt][2 * r] * p.scale_log2 - m_use);
          s[mt][nt][2 * r + 1] = fast_exp2(s[mt][nt][2 * r + 1] * p.scale_log2 - m_use);
          sum += s[mt][nt][2 * r] + s[mt][nt][2 * r + 1];
        }
        row_sum[mt][r] = row_sum[mt][r] * corr + sum;
#pragma unroll
        for (int dt = 0; dt < DT; ++dt) {
          acc_o[mt][dt][2 * r] *= corr;
          acc_o[mt][dt][2 * r + 1] *= corr;
        }
      }

    cp_async_wait_all();
    __syncthreads();  // V[it] in shared memory; every warp is done with K[it]
    if (it + 1 < n_tiles) load_tile<T, D, BN>(sK, k + (n0 + BN) * p.k_s, p.k_s, p.T - n0 - BN, tid);
    cp_async_commit();

    // O += P V  (P straight from the S accumulators: two n-tiles make one k-slice)
#pragma unroll
    for (int j = 0; j < BN / 16; ++j) {
      uint32_t pa[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        pa[mt][0] = Mma::pack(s[mt][2 * j][0], s[mt][2 * j][1]);
        pa[mt][1] = Mma::pack(s[mt][2 * j][2], s[mt][2 * j][3]);
        pa[mt][2] = Mma::pack(s[mt][2 * j + 1][0], s[mt][2 * j + 1][1]);
        pa[mt][3] = Mma::pack(s[mt][2 * j + 1][2], s[mt][2 * j + 1][3]);
      }
#pragma unroll
      for (int dp = 0; dp < DT / 2; ++dp) {
        uint32_t vb[4];
        ldmatrix_x4_trans(vb, sV + swz<D>(j * 16 + (((lane >> 3) & 1) << 3) + (lane & 7), dp * 2 + (lane >> 4)));
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          Mma::mma(acc_o[mt][2 * dp], pa[mt], vb[0], vb[1]);
          Mma::mma(acc_o[mt][2 * dp + 1], pa[mt], vb[2], vb[3]);
        }
      }
    }
  }
  cp_async_wait_all();
  __syncthreads();  // no copy in flight into shared memory; every warp is done reading sQ

  // normalise, stage this warp's rows in sQ (its own rows), then 16-byte coalesced stores
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float l = row_sum[mt][r];
      l += __shfl_xor_sync(0xffffffffu, l, 1);
      l += __shfl_xor_sync(0xffffffffu, l, 2);
      const float inv = l > 0.f ? 1.f / l : 0.f;
      const int srow = mt * 64 + warp * 16 + g + 8 * r;
#pragma unroll
      for (int dt = 0; dt < DT; ++dt) {
        uint32_t val = Mma::pack(acc_o[mt][dt][2 * r] * inv, acc_o[mt][dt][2 * r + 1] * inv);
        *reinterpret_cast<uint32_t*>(sQ + swz<D>(srow, dt) + 2 * t4) = val;
      }
    }
  __syncwarp();
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int i = lane; i < 16 * CH; i += 32) {
      const int r = i / CH, c = i % CH;
      const int srow = mt * 64 + warp * 16 + r;
      const int row = m0 + srow;
      if (row < p.S) {
        *reinterpret_cast<uint4*>(o + row * p.o_s + c * 8) = *reinterpret_cast<const uint4*>(sQ + swz<D>(srow, c));
      }
    }
}

template <typename T, int D, bool CAUSAL, int MK, int MT, int BN, bool QREG>
void launch_cfg(const AttnParams& p, cudaStream_t stream) {
  constexpr int BM = 64 * MT;
  constexpr int smem = (BM + 2 * BN) * D * sizeof(T);
  auto kernel = flash_fwd_kernel<T, D, CAUSAL, MK, MT, BN, QREG>;
  static bool attr_set = false;  // per instantiation (benign race: the call is idempotent)
  if (!attr_set) {
    LLMC_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    attr_set = true;
  }
  dim3 grid((p.S + BM - 1) / BM, p.Hq, p.B);
  kernel<<<grid, kThreads, smem, stream>>>(p);
  LLMC_CUDA_CHECK(cudaGetLastError());
}


// ---- paged prefill: the flash kernel's tiles over a ragged batch whose keys live in pages ----
// Sequence s owns query tokens starts[s]..starts[s+1]-1, the newest of its lens[s] positions;
// row i (0-based among them) is position first + i and sees keys <= first + i (and > first + i
// - window). Keys older than the step come from the pages (row addresses through the page
// table), the step's own from k/v; the blocks of the first query head of each KV head also
// append their tokens' K/V into the pages (nothing in this launch reads those slots back).
struct PagedParams {
  const void* q; const void* k; const void* v; void* o; void* cache;
  int64_t q_h, q_t, k_h, k_t, v_h, v_t, o_h, o_t;
  const int* table; const int* lens; const int* starts;
  int C, P, Hq, Hk, group, window;
  float scale_log2;
};

template <typename T, int D, int ROWS>
__device__ __forceinline__ void load_paged_tile(T* s, const PagedParams& p, const T* cache, const T* kv, int64_t kv_t,
                                                int which, int s_idx, int hk, int n0, int valid, int first, int q0,
                                                int tid) {
  constexpr int CH = D / 8;
  const int64_t page_stride = int64_t(2) * p.P * p.Hk * D;
#pragma unroll
  for (int i = tid; i < ROWS * CH; i += kThreads) {
    const int r = i / CH, c = i % CH, pos = n0 + r;
    const bool ok = r < valid;
    const T* src = kv;
    if (ok) {
      src = pos < first ? cache + p.table[int64_t(s_idx) * p.C + pos / p.P] * page_stride +
                              (int64_t(which) * p.P + pos % p.P) * p.Hk * D + int64_t(hk) * D + c * 8
                        : kv + int64_t(q0 + pos - first) * kv_t + c * 8;
    }
    cp_async16(s + swz<D>(r, c), src, ok);
  }
}

template <typename T, int D, int BN>
__global__ void __launch_bounds__(kThreads) paged_prefill_kernel(const PagedParams p) {
  using Mma = MmaType<T>;
  constexpr int BM = 64;
  constexpr int CH = D / 8, KD = D / 16, NT = BN / 8, DT = D / 8;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + BM * D;
  T* sV = sK + BN * D;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int m_block = gridDim.x - 1 - blockIdx.x;  // heaviest (causal) blocks first
  const int h = blockIdx.y, s_idx = blockIdx.z, hk = h / p.group;
  const int q0 = p.starts[s_idx], nq = p.starts[s_idx + 1] - q0, L = p.lens[s_idx], first = L - nq;
  const int m0 = m_block * BM;
  if (m0 >= nq) return;
  const T* k = static_cast<const T*>(p.k) + int64_t(hk) * p.k_h;
  const T* v = static_cast<const T*>(p.v) + int64_t(hk) * p.v_h;
  T* cache = static_cast<T*>(p.cache);
  if (h % p.group == 0) {  // append this block's tokens' K/V (16-byte copies)
    const int64_t page_stride = int64_t(2) * p.P * p.Hk * D;
    for (int i = tid; i < min(BM, nq - m0) * CH; i += kThreads) {
      const int r = i / CH, c = (i % CH) * 8, pos = first + m0 + r;
      T* dst = cache + p.table[int64_t(s_idx) * p.C + pos / p.P] * page_stride + (int64_t(pos % p.P) * p.Hk + hk) * D + c;
      const int64_t t = q0 + m0 + r;
      *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(k + t * p.k_t + c);
      *reinterpret_cast<uint4*>(dst + int64_t(p.P) * p.Hk * D) = *reinterpret_cast<const uint4*>(v + t * p.v_t + c);
    }
  }
  const T* q = static_cast<const T*>(p.q) + int64_t(h) * p.q_h;
  T* o = static_cast<T*>(p.o) + int64_t(h) * p.o_h;
  const int shift = first;  // row i sees keys <= i + shift
  const int n_end = min(L, m0 + BM + shift);
  int n_begin = 0;
  if (p.window > 0) n_begin = max(0, m0 + shift - p.window + 1) / BN * BN;
  const int n_tiles = n_end > n_begin ? (n_end - n_begin + BN - 1) / BN : 0;

  load_tile<T, D, BM>(sQ, q + int64_t(q0 + m0) * p.q_t, p.q_t, nq - m0, tid);
  if (n_tiles > 0) load_paged_tile<T, D, BN>(sK, p, cache, k, p.k_t, 0, s_idx, hk, n_begin, L - n_begin, first, q0, tid);
  cp_async_commit();

  float acc_o[DT][4];
#pragma unroll
  for (int i = 0; i < DT; ++i) acc_o[i][0] = acc_o[i][1] = acc_o[i][2] = acc_o[i][3] = 0.f;
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f};
  uint32_t qf[KD][4];
  const int g = lane >> 2, t4 = lane & 3;

  for (int it = 0; it < n_tiles; ++it) {
    const int n0 = n_begin + it * BN;
    cp_async_wait_all();
    __syncthreads();
    if (it == 0) {
#pragma unroll
      for (int kk = 0; kk < KD; ++kk) ldmatrix_x4(qf[kk], sQ + swz<D>(warp * 16 + (lane & 15), kk * 2 + (lane >> 4)));
    }
    load_paged_tile<T, D, BN>(sV, p, cache, v, p.v_t, 1, s_idx, hk, n0, L - n0, first, q0, tid);
    cp_async_commit();

    float sc[NT][4];
#pragma unroll
    for (int i = 0; i < NT; ++i) sc[i][0] = sc[i][1] = sc[i][2] = sc[i][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < KD; ++kk) {
#pragma unroll
      for (int np = 0; np < NT / 2; ++np) {
        uint32_t kb[4];
        ldmatrix_x4(kb, sK + swz<D>(np * 16 + ((lane >> 4) << 3) + (lane & 7), kk * 2 + ((lane >> 3) & 1)));
        Mma::mma(sc[2 * np], qf[kk], kb[0], kb[1]);
        Mma::mma(sc[2 * np + 1], qf[kk], kb[2], kb[3]);
      }
    }
    if (n0 + BN > L || n0 + BN - 1 > m0 + shift || p.window > 0) {
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int key = score_key(n0, nt, t4, e), row = score_row(m0, 0, warp, g, e);
          if (key >= L || key > row + shift || (p.window > 0 && key <= row + shift - p.window)) sc[nt][e] = -INFINITY;
        }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = row_max[r];
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) mx = fmaxf(mx, fmaxf(sc[nt][2 * r], sc[nt][2 * r + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_use = (mx == -INFINITY) ? 0.f : mx * p.scale_log2;
      const float corr = fast_exp2(row_max[r] * p.scale_log2 - m_use);
      row_max[r] = mx;
      float sum = 0.f;
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        sc[nt][2 * r] = fast_exp2(sc[nt][2 * r] * p.scale_log2 - m_use);
        sc[nt][2 * r + 1] = fast_exp2(sc[nt][2 * r + 1] * p.scale_log2 - m_use);
        sum += sc[nt][2 * r] + sc[nt][2 * r + 1];
      }
      row_sum[r] = row_sum[r] * corr + sum;
#pragma unroll
      for (int dt = 0; dt < DT; ++dt) {
        acc_o[dt][2 * r] *= corr;
        acc_o[dt][2 * r + 1] *= corr;
      }
    }
    cp_async_wait_all();
    __syncthreads();
    if (it + 1 < n_tiles)
      load_paged_tile<T, D, BN>(sK, p, cache, k, p.k_t, 0, s_idx, hk, n0 + BN, L - n0 - BN, first, q0, tid);
    cp_async_commit();
#pragma unroll
    for (int j = 0; j < BN / 16; ++j) {
      uint32_t pa[4];
      pa[0] = Mma::pack(sc[2 * j][0], sc[2 * j][1]);
      pa[1] = Mma::pack(sc[2 * j][2], sc[2 * j][3]);
      pa[2] = Mma::pack(sc[2 * j + 1][0], sc[2 * j + 1][1]);
      pa[3] = Mma::pack(sc[2 * j + 1][2], sc[2 * j + 1][3]);
#pragma unroll
      for (int dp = 0; dp < DT / 2; ++dp) {
        uint32_t vb[4];
        ldmatrix_x4_trans(vb, sV + swz<D>(j * 16 + (((lane >> 3) & 1) << 3) + (lane & 7), dp * 2 + (lane >> 4)));
        Mma::mma(acc_o[2 * dp], pa, vb[0], vb[1]);
        Mma::mma(acc_o[2 * dp + 1], pa, vb[2], vb[3]);
      }
    }
  }
  cp_async_wait_all();
  __syncthreads();
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float l = row_sum[r];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    const float inv = l > 0.f ? 1.f / l : 0.f;
    const int srow = warp * 16 + g + 8 * r;
#pragma unroll
    for (int dt = 0; dt < DT; ++dt) {
      uint32_t val = Mma::pack(acc_o[dt][2 * r] * inv, acc_o[dt][2 * r + 1] * inv);
      *reinterpret_cast<uint32_t*>(sQ + swz<D>(srow, dt) + 2 * t4) = val;
    }
  }
  __syncwarp();
#pragma unroll
  for (int i = lane; i < 16 * CH; i += 32) {
    const int r = i / CH, c = i % CH;
    const int srow = warp * 16 + r, row = m0 + srow;
    if (row < nq) *reinterpret_cast<uint4*>(o + int64_t(q0 + row) * p.o_t + c * 8) = *reinterpret_cast<const uint4*>(sQ + swz<D>(srow, c));
  }
}

template <typename T, int D>
void launch_paged(const PagedParams& p, int T_tokens, int S, cudaStream_t stream) {
  constexpr int BM = 64, BN = 64;
  constexpr int smem = (BM + 2 * BN) * D * sizeof(T);
  auto kernel = paged_prefill_kernel<T, D, BN>;
  static bool attr_set = false;
  if (!attr_set) {
    LLMC_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    attr_set = true;
  }
  // a sequence has at most T tokens: blocks past its own return at once
  dim3 grid((T_tokens + BM - 1) / BM, p.Hq, S);
  kernel<<<grid, kThreads, smem, stream>>>(p);
  LLMC_CUDA_CHECK(cudaGetLastError());
}

template <typename T>
void launch_paged_d(const PagedParams& p, int D, int T_tokens, int S, cudaStream_t stream) {
  switch (D) {
    case 16: launch_paged<T, 16>(p, T_tokens, S, stream); break;
    case 32: launch_paged<T, 32>(p, T_tokens, S, stream); break;
    case 64: launch_paged<T, 64>(p, T_tokens, S, stream); break;
    default: launch_paged<T, 128>(p, T_tokens, S, stream);
  }
}

int num_sms(int dev) {
  static int cached[64] = {0};
  if (dev < 0 || dev >= 64) return 132;
  if (cached[dev] == 0) {
    int n = 0;
    LLMC_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev));
    cached[dev] = n;
  }
  return cached[dev];
}

// Tile choice as in llmc_attention.cu (D=128: 128-row blocks when they fill the GPU; smaller
// heads: only without the causal mask and with >= 2 blocks per multiprocessor).
template <typename T, bool CAUSAL, int MK>
void launch_variant(const AttnParams& p, int D, int dev, cudaStream_t stream) {
  const char* e = std::getenv("LLMC_ATTN_VARIANT");
  int variant = e ? std::atoi(e) : 0;
  if (variant != 1 && variant != 2) {
    const long blocks128 = long((p.S + 127) / 128) * p.Hq * p.B;
    const long sms = num_sms(dev);
    variant = (D == 128 ? blocks128 >= sms : (!CAUSAL && blocks128 >= 2 * sms)) ? 2 : 1;
  }
  switch (D) {
    case 16:
      if (variant == 2) launch_cfg<T, 16, CAUSAL, MK, 2, 64, true>(p, stream);
      else launch_cfg<T, 16, CAUSAL, MK, 1, 64, true>(p, stream);
      break;
    case 32:
      if (variant == 2) launch_cfg<T, 32, CAUSAL, MK, 2, 64, true>(p, stream);
      else launch_cfg<T, 32, CAUSAL, MK, 1, 64, true>(p, stream);
      break;
    case 64:
      if (variant == 2) launch_cfg<T, 64, CAUSAL, MK, 2, 64, true>(p, stream);
      else launch_cfg<T, 64, CAUSAL, MK, 1, 64, true>(p, stream);
      break;
    default:
      if (variant == 2) launch_cfg<T, 128, CAUSAL, MK, 2, 64, false>(p, stream);
      else launch_cfg<T, 128, CAUSAL, MK, 1, 64, true>(p, stream);
  }
}

template <typename T, int MK>
void launch_mask(const AttnParams& p, int D, bool causal, int dev, cudaStream_t stream) {
  if (causal) launch_variant<T, true, MK>(p, D, dev, stream);
  else launch_variant<T, false, MK>(p, D, dev, stream);
}

template <typename T>
void launch_dtype(const AttnParams& p, int D, bool causal, int mk, int dev, cudaStream_t stream) {
  switch (mk) {
    case 0: launch_mask<T, 0>(p, D, causal, dev, stream); break;
    case 1: launch_mask<T, 1>(p, D, causal, dev, stream); break;
    default: launch_mask<T, 3>(p, D, causal, dev, stream);
  }
}

// (b, h, s) index into the tensor's 4 dims for batch, head and sequence.
struct View4 {
  const DLTensor* t;
  int db, dh, ds;
  int64_t B() const { return t->shape[db]; }
  int64_t H() const { return t->shape[dh]; }
  int64_t S() const { return t->shape[ds]; }
  int64_t D() const { return t->shape[3]; }
  int64_t sb() const { return stride_of(t, db); }
  int64_t sh() const { return stride_of(t, dh); }
  int64_t ss() const { return stride_of(t, ds); }
};

View4 view_of(const DLTensor* t, bool token_major) {
  return token_major ? View4{t, 0, 2, 1} : View4{t, 0, 1, 2};
}

void check_view(const View4& v, const char* name, DT dt) {
  check_cuda_tensor(v.t, name);
  LLMC_CHECK(v.t->ndim == 4) << name << " must be 4-D, got " << shape_str(v.t);
  LLMC_CHECK(dtype_of(v.t) == dt) << name << " dtype differs from q (" << dtype_name(dt) << ")";
  LLMC_CHECK(v.t->shape[3] <= 1 || stride_of(v.t, 3) == 1) << name << ": the head dim must be contiguous";
  LLMC_CHECK(reinterpret_cast<uintptr_t>(data_of(v.t)) % 16 == 0) << name << ": data must be 16-byte aligned";
  LLMC_CHECK(v.sb() % 8 == 0 && v.sh() % 8 == 0 && v.ss() % 8 == 0)
      << name << ": batch/head/seq strides must be multiples of 8 elements";
}

int mask_kind(const DLTensor* m, DT dt) {
  const DLDataType d = m->dtype;
  LLMC_CHECK(d.lanes == 1) << "mask: vector dtypes are not supported";
  if ((d.code == kDLBool || d.code == kDLUInt || d.code == kDLInt) && d.bits == 8) return 1;
  LLMC_CHECK(d.code == kDLFloat && d.bits == 32) << "mask must be bool or float32 (q is " << dtype_name(dt) << ")";
  return 3;
}

void AttentionExt(DLTensor* qt, DLTensor* kt, DLTensor* vt, tvm::ffi::AnyView mask_any, DLTensor* ot,
                  double scale, int64_t causal, int64_t layout) {
  const DLTensor* mt = optional_tensor(mask_any);
  // layout bit 16: q is one packed projection output [B,S,Hq+2Hk,D] (q heads, then k, then v;
  // Hq from out); k and v are ignored. Views of it share its memory: no copy, no transpose.
  DLTensor tq, tk, tv;
  int64_t shp_q[4], shp_kv[4], st[4];
  if (layout & 16) {
    check_cuda_tensor(qt, "qkv");
    check_cuda_tensor(ot, "out");
    LLMC_CHECK(qt->ndim == 4) << "packed qkv must be [B,S,H,D], got " << shape_str(qt);
    LLMC_CHECK(ot->ndim == 4) << "out must be 4-D, got " << shape_str(ot);
    const int64_t H = qt->shape[2], Hq = view_of(ot, layout & 8).H();
    LLMC_CHECK(H > Hq && (H - Hq) % 2 == 0) << "qkv has " << H << " heads; expected Hq + 2*Hk with Hq=" << Hq;
    const int64_t Hk = (H - Hq) / 2;
    for (int i = 0; i < 4; ++i) st[i] = stride_of(qt, i);
    shp_q[0] = shp_kv[0] = qt->shape[0];
    shp_q[1] = shp_kv[1] = qt->shape[1];
    shp_q[2] = Hq;
    shp_kv[2] = Hk;
    shp_q[3] = shp_kv[3] = qt->shape[3];
    tq = tk = tv = *qt;
    tq.shape = shp_q; tk.shape = shp_kv; tv.shape = shp_kv;
    tq.strides = tk.strides = tv.strides = st;
    const uint64_t esz = (qt->dtype.bits + 7) / 8;
    tk.byte_offset += uint64_t(Hq * st[2]) * esz;
    tv.byte_offset += uint64_t((Hq + Hk) * st[2]) * esz;
    qt = &tq; kt = &tk; vt = &tv;
    layout |= 7;
  }
  const View4 q = view_of(qt, layout & 1), k = view_of(kt, layout & 2), v = view_of(vt, layout & 4),
              o = view_of(ot, layout & 8);
  const DT dt = dtype_of(q.t);
  LLMC_CHECK(dt == DT::kF16 || dt == DT::kBF16) << "q dtype must be float16 or bfloat16, got " << dtype_name(dt);
  check_view(q, "q", dt);
  check_view(k, "k", dt);
  check_view(v, "v", dt);
  check_view(o, "out", dt);
  const int64_t B = q.B(), Hq = q.H(), S = q.S(), D = q.D(), Hk = k.H(), T = k.S();
  LLMC_CHECK(D == 16 || D == 32 || D == 64 || D == 128) << "head dim must be 16, 32, 64 or 128, got " << D;
  LLMC_CHECK(scale > 0) << "scale must be positive, got " << scale;
  LLMC_CHECK(k.B() == B && v.B() == B && o.B() == B) << "batch sizes differ";
  LLMC_CHECK(k.D() == D && v.D() == D && o.D() == D) << "head dims differ";
  LLMC_CHECK(v.H() == Hk && v.S() == T) << "k and v shapes differ";
  LLMC_CHECK(o.H() == Hq && o.S() == S) << "out shape must match q";
  LLMC_CHECK(Hk > 0 && Hq % Hk == 0) << "q heads (" << Hq << ") must be a multiple of kv heads (" << Hk << ")";
  LLMC_CHECK(S < (1 << 30) && T < (1 << 30) && Hq <= 65535 && B <= 65535) << "problem too large";
  AttnParams p;
  p.m = nullptr;
  p.m_b = p.m_h = p.m_s = p.m_t = 0;
  int mk = 0;
  if (mt != nullptr) {
    check_cuda_tensor(mt, "mask");
    LLMC_CHECK(mt->ndim >= 1 && mt->ndim <= 4) << "mask must have 1 to 4 dims, got " << shape_str(mt);
    mk = mask_kind(mt, dt);
    const int64_t want[4] = {B, Hq, S, T};
    int64_t st[4] = {0, 0, 0, 0};
    for (int i = 0; i < mt->ndim; ++i) {
      const int d = 4 - mt->ndim + i;
      const int64_t n = mt->shape[i];
      LLMC_CHECK(n == 1 || n == want[d]) << "mask " << shape_str(mt) << " does not broadcast to [" << B << ", "
                                         << Hq << ", " << S << ", " << T << "]";
      st[d] = n == 1 ? 0 : stride_of(mt, i);
    }
    p.m = data_of(mt);
    p.m_b = st[0]; p.m_h = st[1]; p.m_s = st[2]; p.m_t = st[3];
  }
  const int dev = q.t->device.device_id;
  if (B == 0 || Hq == 0 || S == 0) return;
  p.q = data_of(q.t); p.k = data_of(k.t); p.v = data_of(v.t); p.o = data_of(o.t);
  p.q_b = q.sb(); p.q_h = q.sh(); p.q_s = q.ss();
  p.k_b = k.sb(); p.k_h = k.sh(); p.k_s = k.ss();
  p.v_b = v.sb(); p.v_h = v.sh(); p.v_s = v.ss();
  p.o_b = o.sb(); p.o_h = o.sh(); p.o_s = o.ss();
  p.B = int(B); p.Hq = int(Hq); p.Hk = int(Hk); p.S = int(S); p.T = int(T);
  p.group = int(Hq / Hk);
  p.scale_log2 = float(scale * 1.4426950408889634);
  p.inv_scale = float(1.0 / scale);
  DeviceGuard guard(dev);
  cudaStream_t stream = current_stream(dev);
  if (dt == DT::kF16) launch_dtype<__half>(p, int(D), causal != 0, mk, dev, stream);
  else launch_dtype<__nv_bfloat16>(p, int(D), causal != 0, mk, dev, stream);
}

void Attention(DLTensor* q, DLTensor* k, DLTensor* v, DLTensor* out, double scale, int64_t causal) {
  AttentionExt(q, k, v, tvm::ffi::AnyView(), out, scale, causal, 0);
}

void AttentionBSHD(DLTensor* q, DLTensor* k, DLTensor* v, DLTensor* out, double scale, int64_t causal) {
  AttentionExt(q, k, v, tvm::ffi::AnyView(), out, scale, causal, 15);
}

// Packed QKV, 4-D as is, or [B,S,H*D] viewed as [B,S,H,D] (D from out).
void AttentionQKV(DLTensor* qkv, DLTensor* out, double scale, int64_t causal) {
  check_cuda_tensor(qkv, "qkv");
  check_cuda_tensor(out, "out");
  LLMC_CHECK(out->ndim == 4) << "out must be [B,S,Hq,D], got " << shape_str(out);
  LLMC_CHECK(qkv->ndim == 3 || qkv->ndim == 4) << "qkv must be [B,S,H,D] or [B,S,H*D], got " << shape_str(qkv);
  if (qkv->ndim == 4) return AttentionExt(qkv, qkv, qkv, tvm::ffi::AnyView(), out, scale, causal, 31);
  const int64_t D = out->shape[3], width = qkv->shape[2];
  LLMC_CHECK(stride_of(qkv, 2) == 1) << "qkv: last dim must be contiguous";
  LLMC_CHECK(D > 0 && width % D == 0) << "qkv width " << width << " is not a multiple of D=" << D;
  int64_t shape[4] = {qkv->shape[0], qkv->shape[1], width / D, D};
  int64_t strides[4] = {stride_of(qkv, 0), stride_of(qkv, 1), D, 1};
  DLTensor t = *qkv;
  t.ndim = 4;
  t.shape = shape;
  t.strides = strides;
  AttentionExt(&t, &t, &t, tvm::ffi::AnyView(), out, scale, causal, 31);
}

}  // namespace
}  // namespace llmc_shim_attention

namespace llmc_shim {
void paged_prefill(const PagedArgs& a, bool bf16, cudaStream_t stream) {
  llmc_shim_attention::PagedParams p{};
  p.q = a.q; p.k = a.k; p.v = a.v; p.o = a.out; p.cache = a.cache;
  p.q_h = a.q_h; p.q_t = a.q_t; p.k_h = a.k_h; p.k_t = a.k_t; p.v_h = a.v_h; p.v_t = a.v_t; p.o_h = a.o_h; p.o_t = a.o_t;
  p.table = a.table; p.lens = a.lens; p.starts = a.starts;
  p.C = a.C; p.P = a.P; p.Hq = a.H; p.Hk = a.Hkv; p.group = a.H / a.Hkv; p.window = a.window;
  p.scale_log2 = a.scale * 1.4426950408889634f;
  if (bf16) llmc_shim_attention::launch_paged_d<__nv_bfloat16>(p, a.D, a.T, a.S, stream);
  else llmc_shim_attention::launch_paged_d<__half>(p, a.D, a.T, a.S, stream);
}
}  // namespace llmc_shim

TVM_FFI_DLL_EXPORT_TYPED_FUNC(llmc_attention_ext, llmc_shim_attention::AttentionExt);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(llmc_attention, llmc_shim_attention::Attention);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(llmc_attention_bshd, llmc_shim_attention::AttentionBSHD);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(llmc_attention_qkv, llmc_shim_attention::AttentionQKV);
