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
};

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
