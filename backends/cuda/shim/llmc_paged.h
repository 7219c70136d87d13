// llmc CUDA shim: the tensor-core paged prefill kernel (defined in llmc_attention.cu, beside the
// flash kernel whose tiles and MMAs it shares) as called by llmc_paged_attention
// (llmc_paged_attention.cu) for steps that are not pure decode.
#pragma once

#include "llmc_shim_common.h"

namespace llmc_shim {

struct PagedPrefillArgs {
  const void* q; const void* k; const void* v; void* out; void* cache;
  int64_t q_h, q_t, k_h, k_t, v_h, v_t, o_h, o_t;  // element strides (head, token)
  const int* table; const int* lens; const int* starts;
  int C, P, H, Hkv, T, S, D, window;
  float scale;
};

// Appends the step's K/V into the pages and writes out = causal (windowed) attention of every
// token over its sequence; one block per (64 query tokens, query head, sequence). D in
// {16, 32, 64, 128}; float16 or bfloat16 (`bf16`).
void paged_prefill(const PagedPrefillArgs& a, bool bf16, cudaStream_t stream);

}  // namespace llmc_shim
