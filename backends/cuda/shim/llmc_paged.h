// llmc CUDA shim: the kernels llmc_paged_attention (llmc_paged_attention.cu) hands a step to: the
// tensor-core paged prefill kernel (llmc_attention.cu, beside the flash kernel whose tiles and
// MMAs it shares) for steps that are not pure decode, and the decode kernel (llmc_paged_decode.cu)
// for a float cache.
#pragma once

#include "llmc_shim_common.h"

namespace llmc_shim {

struct PagedArgs {
  const void* q; const void* k; const void* v; void* out; void* cache;
  int64_t q_h, q_t, k_h, k_t, v_h, v_t, o_h, o_t;  // element strides (head, token)
  const int* table; const int* lens; const int* starts;
  int C, P, H, Hkv, T, S, D, window;
  float scale;
  // Rotary embedding of q and k, rotate-half form (Llama, GPT-NeoX): x'[d] = x[d] cos[t][d] +
  // (d < D/2 ? -x[d + D/2] : x[d - D/2]) sin[t][d], tables [T, D] indexed by the step's token
  // row. rope: 0 none (q / k already rotated), 1 tables of q's dtype, 2 float32 tables.
  const void* cos = nullptr; const void* sin = nullptr;
  int rope = 0;
};

// This lane's 8 entries (dims d0 .. d0 + 7) of row t of a rotary table, as float.
template <typename T>
__device__ __forceinline__ void rope_row8(const void* table, int rope, int64_t t, int D, int d0, float* f) {
  if (rope == 2) {
    const float4* p = reinterpret_cast<const float4*>(static_cast<const float*>(table) + t * D + d0);
    const float4 a = p[0], b = p[1];
    f[0] = a.x; f[1] = a.y; f[2] = a.z; f[3] = a.w; f[4] = b.x; f[5] = b.y; f[6] = b.z; f[7] = b.w;
  } else {
    const uint4 u = *reinterpret_cast<const uint4*>(static_cast<const T*>(table) + t * D + d0);
    const T* e = reinterpret_cast<const T*>(&u);
#pragma unroll
    for (int i = 0; i < 8; ++i) f[i] = float(e[i]);
  }
}

// x (8 dims from d0 of one head, as float) rotated in place, where the lanes holding the head's
// D / 8 slices are `lanes` consecutive lanes (a power of two) and this lane holds slice d0 / 8:
// each dim's partner d +- D/2 sits `lanes / 2` lanes away.
__device__ __forceinline__ void rope8(float* x, const float* cs, const float* sn, int lanes, bool low_half) {
#pragma unroll
  for (int e = 0; e < 8; ++e) {
    const float other = __shfl_xor_sync(0xffffffffu, x[e], lanes / 2);
    x[e] = fmaf(x[e], cs[e], (low_half ? -other : other) * sn[e]);
  }
}

// Rotates the step's q and k into q_out [T, H, D] and k_out [T, Hkv, D] (token-major, contiguous),
// for the kernels that read q / k as given (prefill, a quantized cache's decode).
void paged_rope(const PagedArgs& a, void* q_out, void* k_out, bool bf16, cudaStream_t stream);

// Appends the step's K/V into the pages and writes out = causal (windowed) attention of every
// token over its sequence; one block per (64 query tokens, query head, sequence). D in
// {16, 32, 64, 128}; float16 or bfloat16 (`bf16`).
void paged_prefill(const PagedArgs& a, bool bf16, cudaStream_t stream);

// Flash-decoding's workspace: n_split partial states per query row, and a counter per
// (sequence, KV head) that the last split to finish uses (and resets) to merge them.
struct DecodeSplits {
  int n_split;
  float* part_o;       // [n_split][T][H][D] (unnormalized)
  float2* part_ml;     // [n_split][T][H]: (max, sum of exp2) of the split
  unsigned* counters;  // [S][Hkv], zero between launches
};

constexpr int kDecodeMaxGroup = 8;  // query heads per KV head the decode kernel takes

// Decode (T == S: one token per sequence, the newest of its kv_lens): appends each sequence's
// K/V into its page and writes out; float16 or bfloat16 (`bf16`) pages, D in {32, 64, 128},
// H / Hkv <= kDecodeMaxGroup. A programmatic dependent launch on sm_90.
void paged_decode(const PagedArgs& a, const DecodeSplits& w, bool bf16, int dev, cudaStream_t stream);

// How many key splits paged_decode takes for these arguments (from the page table's width: the
// host cannot see the lengths).
int paged_decode_splits(const PagedArgs& a, int dev);

}  // namespace llmc_shim
