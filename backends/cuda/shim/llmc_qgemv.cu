// llmc CUDA shim: weight-only quantized matmul, y = x @ W^T with W dequantized as it is read
// (Op.QMATMUL; layout in compiler/ops.py QMatmulAttrs), with a decode layer's neighbours fused in.
//
//   llmc_qgemv(x [M, K], qweight, scales [N, K / group], zeros [N, K / group] or None, y [M, N],
//              bits: 4 | 8, group: int)
//     bits 8: qweight int8 [N, K], W = q * scale
//     bits 4: qweight uint8 [N, K / 2] (k = 2i low nibble of byte i, 2i + 1 high), W = (q - zero) * scale,
//             zero = 8 without a zeros input; zeros hold integers 0..15 (compiler/quant_layout.py)
//   llmc_qgemv_fused(x, norm_w [K] or None, qweight, scales, zeros or None, residual or None, y,
//                    bits, group, glu: int, eps: float)
//     a = rmsnorm(x) * norm_w (where given), h = a @ W^T,
//     y = (glu ? silu(h[:, :N/2]) * h[:, N/2:] : h) (+ residual [M, N_out])
//     the int4 / int8 counterpart of llmc_gemm_fused (llmc_gemv.cu): a decode layer's norm + QKV,
//     O projection + residual, norm + gate/up + SwiGLU and down + residual are one launch each.
//   x, scales, zeros, residual, y: float16 or bfloat16 alike; accumulation in float32; x, y and
//   the residual may have strided rows (16-byte aligned). 1-2 rows (decode) run the GEMV below;
//   3-63 rows the tensor-core GEMV of llmc_tc_gemv.cu (where K is a multiple of 128 and the group
//   of 32; else this GEMV, in chunks of 8 rows, each re-reading the weights); from 64 rows on, W is
//   dequantized into slabs for tensor-core GEMMs (llmc_qgemm.cu), the norm and the SwiGLU /
//   residual running as passes of their own.
//
// Decode reads every weight once, so time is bytes: a warp streams the packed rows of one output
// channel (or of 2 or 4 when rows are short, as many as keep 8 warps an SM: launch_rows; with the
// SwiGLU, gate row n and up row n + N/2 side by side) with 16-byte loads, 8 in flight per lane
// before any math, each load 32 int4 or 16 int8 weights of one group; per load the dot product is
// s * (sum q x - z * sum x), so the dequantization is two multiply-adds per group slice, not one per
// weight, and codes become floats by bit tricks, not conversions (int4: two at a time, packed
// bf16/fp16 math; see chunk_dot_int4x2; int8: one byte permute and one subtraction a code,
// int8_code). A chunk's scale (and zero) is loaded with its weights: loaded when the chunk's math
// began, it put a second memory round trip into every step (measured, H200, 1 row: int8 down
// projection 12.8 -> 10.4 us, int4 11.6 -> 8.1; a 1B decode step's quantized calls int8 0.76 ->
// 0.62 ms, int4 0.61 -> 0.51). x ([M, K], a few KB) is read through the L1 cache by every warp,
// once per chunk for all its channels, times the norm weight as it is read; the norm's 1/rms is per
// row, so it factors out of the dot products and each block sums x^2 for its rows while its first
// weight loads are in flight. On Hopper the kernel is a programmatic dependent launch
// (llmc_stream_kernels.h): its first weight loads overlap the previous kernel's tail. Runs on
// TVM-FFI's current stream (graph-capturable). (The first version, one channel per warp and two
// loads in flight at K = 2048, read at 27% of the copy bandwidth: latency-bound.)
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "llmc_lt.h"
#include "llmc_shim_common.h"
#include "llmc_stream_kernels.h"

namespace llmc_shim_qgemv {
using namespace llmc_shim;
namespace {

constexpr int kWarps = 4;
constexpr int kLoads = 8;    // 16-byte weight loads in flight per lane before any math
constexpr int kMaxRows = 8;
// From this many rows on (prefill), W is dequantized into a scratch slab and multiplied on tensor
// cores (llmc_qgemm.cu): the GEMV streams the weights once per 8 rows.
constexpr int64_t kGemmRows = 64;
// Up to this many rows the norm, SwiGLU and residual run inside the GEMV (decode); with more, every
// block's x^2 sums and the gate + up rows per warp cost more than passes of their own.
constexpr int64_t kFusedRows = 2;
constexpr int kWarpsPerSm = 8;  // launch_rows: the fewest warps an SM gets before a warp takes more weight rows
// scratch slots (llmc_lt.h scratch()) of the prefill path: the normalized x, the GEMM's output
constexpr int kSlotNormed = 34, kSlotOut = 35;

__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// 8 consecutive x values (one 16-byte load) as floats.
template <typename T>
__device__ __forceinline__ void load8(const T* p, float* out) {
  const uint4 u = __ldg(reinterpret_cast<const uint4*>(p));
  const T* e = reinterpret_cast<const T*>(&u);
#pragma unroll
  for (int j = 0; j < 8; ++j) out[j] = to_f(e[j]);
}

// int8 code j (0..3) of a 32-bit word already XOR-ed with 0x80808080 (the signed byte made
// unsigned, u = q + 128) as a float: one byte permute puts u into the low mantissa byte of 2^23
// (0x4B0000uu = 2^23 + u exactly) and one subtraction leaves q, in place of a shift, mask, XOR and
// OR. (Alone, with the sum of x skipped where there are no zero points, this gained 2-13% a call;
// the int8 GEMV's real limit was the scale load's round trip, see the top of the file.)
__device__ __forceinline__ float int8_code(unsigned biased_word, int j) {
  return __uint_as_float(__byte_perm(biased_word, 0x4B000000u, 0x7440u | unsigned(j))) - 8388736.f;
}

// One 16-byte chunk of int8 codes (16 weights from k) per weight row of R rows (w[r]) against M
// rows of x (times the norm weight g where given): x is loaded once for all R rows; each row's dot
// product is s * (sum q x - z * sum x), the sum of x only where the weight has zero points (ZERO).
template <typename T, int M, int R, bool ZERO>
__device__ __forceinline__ void chunk_dot_int8(const uint4* w, const T* x, int64_t ldx, const T* g, int k,
                                               const float* s, const float* z, float (*acc)[R], int rows) {
  unsigned words[R][4];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const unsigned* v = reinterpret_cast<const unsigned*>(&w[r]);
#pragma unroll
    for (int i = 0; i < 4; ++i) words[r][i] = v[i] ^ 0x80808080u;
  }
#pragma unroll
  for (int m = 0; m < M; ++m) {
    if (m >= rows) break;  // the last chunk of 8 rows may be short
    float qx[R], sx = 0.f;
#pragma unroll
    for (int r = 0; r < R; ++r) qx[r] = 0.f;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float xv[8];
      load8(x + m * ldx + k + h * 8, xv);
      if (g != nullptr) {
        float gv[8];
        load8(g + k + h * 8, gv);
#pragma unroll
        for (int j = 0; j < 8; ++j) xv[j] *= gv[j];
      }
      if constexpr (ZERO) {
#pragma unroll
        for (int j = 0; j < 8; ++j) sx += xv[j];
      }
#pragma unroll
      for (int r = 0; r < R; ++r)
#pragma unroll
        for (int j = 0; j < 8; ++j) qx[r] = fmaf(int8_code(words[r][h * 2 + j / 4], j % 4), xv[j], qx[r]);
    }
#pragma unroll
    for (int r = 0; r < R; ++r) acc[m][r] = fmaf(s[r], ZERO ? qx[r] - z[r] * sx : qx[r], acc[m][r]);
  }
}

// int4 codes two at a time: a 32-bit word holds codes j = 0..7 at bits 4j; masking the word
// shifted by 4j with 0x000F000F leaves codes j and j + 4 in the low bits of its two halves, and
// OR-ing the packed type's magic (bf16 128.0 = 0x4300, fp16 1024.0 = 0x6400, whose last mantissa
// bits are 1 apart) makes the pair (base + q_j, base + q_j+4) exactly. Subtracting (base + zero)
// leaves q - zero exactly (|q - zero| <= 15), and packed FMAs against the matching x pairs add
// four products per half before the pair goes to float: ~2.4 instructions a weight instead of
// ~4.5 (shift, mask, float subtract, FMA, plus x converted per chunk), which bounded the scalar
// loop at ~3 T weights/s. The bf16 partials of four products cost ~2^-9 relative, the size of
// the output's own rounding.
// One 16-byte chunk of int4 codes (32 weights from k) per weight row against M rows of x (times
// the norm weight g where given, in the packed type): packed math, float accumulation per 8
// codes. z is the zero point (8 without a zeros input), an integer.
template <typename T, int M, int R>
__device__ __forceinline__ void chunk_dot_int4x2(const uint4* w, const T* x, int64_t ldx, const T* g, int k,
                                                 const float* s, const float* z, float (*acc)[R], int rows) {
  using P = Packed<T>;
  using T2 = typename P::T2;
  T2 zz[R];
#pragma unroll
  for (int r = 0; r < R; ++r) zz[r] = P::splat(P::kBase + z[r]);
#pragma unroll
  for (int m = 0; m < M; ++m) {
    if (m >= rows) break;
    float part[R];
#pragma unroll
    for (int r = 0; r < R; ++r) part[r] = 0.f;
#pragma unroll
    for (int i = 0; i < 4; ++i) {  // word i: codes 8i .. 8i + 7
      T2 xp[4];
      pairs(__ldg(reinterpret_cast<const uint4*>(x + m * ldx + k + i * 8)), xp);
      if (g != nullptr) {
        T2 gp[4];
        pairs(__ldg(reinterpret_cast<const uint4*>(g + k + i * 8)), gp);
#pragma unroll
        for (int j = 0; j < 4; ++j) xp[j] = __hmul2(xp[j], gp[j]);
      }
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const unsigned word = reinterpret_cast<const unsigned*>(&w[r])[i];
        T2 a = P::splat(0.f);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const T2 q = __hsub2(as_pair<T2>(((word >> (4 * j)) & 0x000F000Fu) | P::kMagic), zz[r]);
          a = __hfma2(q, xp[j], a);
        }
        const float2 f = P::to_float2(a);
        part[r] += f.x + f.y;
      }
    }
#pragma unroll
    for (int r = 0; r < R; ++r) acc[m][r] = fmaf(s[r], part[r], acc[m][r]);
  }
}

template <typename T>
struct QParams {
  const T* x; int64_t ldx;
  const T* g;  // the norm weight or null
  float eps;
  const uint4* qw;
  const T* scales;
  const T* zeros;  // or null
  const T* res;    // or null
  int64_t ldr;
  T* y; int64_t ldy;
  int n_out, k, group, rows;
  bool glu;  // R even: slots r < R/2 read gate rows, the others the matching up rows N/2 further
};

// A warp computes R weight rows: R consecutive output channels, or with glu R/2 channels' gate
// and up rows. Each lane issues kLoads 16-byte loads of those rows (kLoads / R chunks of each)
// before any math, so a short row (K = 2048 at int4 is 64 chunks, two per lane) still keeps
// enough bytes in flight to cover the memory latency.
// KS warps share a warp's rows, each taking a slice of K, where a row is several steps of loads
// long (int8 at K = 8192: two), as in llmc_gemv.cu's GEMV.
template <typename T, int BITS, int M, int R, int KS = 1>
__global__ void __launch_bounds__(kWarps * 32) qgemv_kernel(QParams<T> p) {
  constexpr int per = BITS == 4 ? 32 : 16;  // weights per 16-byte chunk
  constexpr int U = kLoads / R;             // chunks of each row per lane per step
  static_assert(kWarps % KS == 0, "a block holds whole row sets");
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, part = warp % KS;
  const int ch = p.glu ? R / 2 : R;  // output channels per warp
  const int n0 = (blockIdx.x * (kWarps / KS) + warp / KS) * ch;
  const int rows = min(M, p.rows - int(blockIdx.y) * M);
  const T* x = p.x + int64_t(blockIdx.y) * M * p.ldx;
  const int row_chunks = p.k / per, groups = p.k / p.group;
  // this warp's chunks [c_lo, chunks) of each row (all of them without a split)
  const int slice = (row_chunks + KS - 1) / KS;
  const int c_lo = KS == 1 ? 0 : min(row_chunks, part * slice);
  const int chunks = KS == 1 ? row_chunks : min(row_chunks, c_lo + slice);
  const float zero_default = BITS == 4 ? 8.f : 0.f;
  int nr[R];  // the weight row of slot r (clamped: a channel past the end recomputes the last, never stored)
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int c = p.glu && r >= R / 2 ? r - R / 2 : r;
    nr[r] = min(n0 + c, p.n_out - 1) + (p.glu && r >= R / 2 ? p.n_out : 0);
  }
  // Each chunk's scale (and zero point) is loaded with its weights, not when its math starts (see
  // the top of the file). Its group: chunks per group are a power of two in every layout met so
  // far (a shift, not a division per chunk); any other group divides.
  const int cpg = p.group / per, cpg_shift = __ffs(cpg) - 1;
  const bool cpg_pow2 = (cpg & (cpg - 1)) == 0;
  uint4 w[U][R];
  T sw[U][R], zw[U][R];
  auto load = [&](int c0) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int c = c0 + lane + 32 * u;
      const int gc = cpg_pow2 ? c >> cpg_shift : c / cpg;
#pragma unroll
      for (int r = 0; r < R; ++r) {
        if (c < chunks) {
          const int64_t gi = int64_t(nr[r]) * groups + gc;
          w[u][r] = ld_stream(p.qw + int64_t(nr[r]) * row_chunks + c);
          sw[u][r] = __ldg(p.scales + gi);
          if (p.zeros) zw[u][r] = __ldg(p.zeros + gi);
        } else {
          w[u][r] = make_uint4(0, 0, 0, 0);
        }
      }
    }
  };
  load(c_lo);
  pdl_launch_dependents();
  pdl_wait();

  float scale[M];  // the norm's 1/rms per row
#pragma unroll
  for (int m = 0; m < M; ++m) scale[m] = 1.f;
  if (p.g != nullptr)  // every block sums x^2 of its rows while its first weights are in flight
    block_rms_scales<M, kWarps>(x, p.ldx, rows, p.k, p.eps, [](const uint4& u, float* f) {
      const T* e = reinterpret_cast<const T*>(&u);
#pragma unroll
      for (int j = 0; j < 8; ++j) f[j] = to_f(e[j]);
    }, scale);

  float acc[M][R];
#pragma unroll
  for (int m = 0; m < M; ++m)
#pragma unroll
    for (int r = 0; r < R; ++r) acc[m][r] = 0.f;
  for (int c0 = c_lo; c0 < chunks; c0 += 32 * U) {
    if (c0 > c_lo) load(c0);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int c = c0 + lane + 32 * u;
      if (c >= chunks) continue;
      const int k = c * per;
      float s[R], z[R];
#pragma unroll
      for (int r = 0; r < R; ++r) {
        s[r] = to_f(sw[u][r]);
        z[r] = p.zeros ? to_f(zw[u][r]) : zero_default;
      }
      if constexpr (BITS == 4) chunk_dot_int4x2<T, M, R>(w[u], x, p.ldx, p.g, k, s, z, acc, rows);
      else if (p.zeros) chunk_dot_int8<T, M, R, true>(w[u], x, p.ldx, p.g, k, s, z, acc, rows);
      else chunk_dot_int8<T, M, R, false>(w[u], x, p.ldx, p.g, k, s, z, acc, rows);
    }
  }
  if (!sum_k_slices<KS, kWarps>(acc, warp, lane, part)) return;  // the slices meet in the first warp of the set
  if (lane != 0) return;
  const int64_t row0 = int64_t(blockIdx.y) * M;
#pragma unroll
  for (int m = 0; m < M; ++m) {
    if (m >= rows) break;
    T* y = p.y + (row0 + m) * p.ldy;
    const T* res = p.res ? p.res + (row0 + m) * p.ldr : nullptr;
#pragma unroll
    for (int r = 0; r < R; ++r) {
      if (p.glu && r >= R / 2) break;
      const int n = n0 + r;
      if (n >= p.n_out) break;
      float h = acc[m][r] * scale[m];
      if (p.glu) h = h / (1.f + __expf(-h)) * (acc[m][(r + R / 2) % R] * scale[m]);
      if (res) h += to_f(res[n]);
      y[n] = from_f<T>(h);
    }
  }
}

template <typename T, int BITS, int R, int KS = 1>
void launch_grid(const QParams<T>& p, int dev, cudaStream_t stream) {
  const int ch = p.glu ? R / 2 : R;
  const int sets = (p.n_out + ch - 1) / ch, per_block = kWarps / KS;  // row sets, each KS warps
  const dim3 grid(static_cast<unsigned>((sets + per_block - 1) / per_block),
                  static_cast<unsigned>((p.rows + kMaxRows - 1) / kMaxRows)),
      block(kWarps * 32);
  const int m = p.rows > kMaxRows ? kMaxRows : p.rows;
#define LLMC_QGEMV_CASE(MR) \
  case MR: launch_pdl(qgemv_kernel<T, BITS, MR, R, KS>, grid, block, dev, stream, p); break;
  if constexpr (R > 1 || KS > 1) {  // short rows, the SwiGLU or split rows: decode's 1-2 rows only (launch_rows)
    switch (m) { LLMC_QGEMV_CASE(1) LLMC_QGEMV_CASE(2) }
  } else {
    switch (m) {
      LLMC_QGEMV_CASE(1) LLMC_QGEMV_CASE(2) LLMC_QGEMV_CASE(3) LLMC_QGEMV_CASE(4)
      LLMC_QGEMV_CASE(5) LLMC_QGEMV_CASE(6) LLMC_QGEMV_CASE(7) LLMC_QGEMV_CASE(8)
    }
  }
#undef LLMC_QGEMV_CASE
}

template <typename T, int BITS>
void launch_rows(const QParams<T>& p, int dev, cudaStream_t stream) {
  // A row of fewer than 32 * kLoads chunks leaves loads to spare: give the warp more weight rows
  // (decode's 1-2 rows only: more x rows would need more registers than the loads save), as many
  // (4, 2, 1) as keep >= kWarpsPerSm warps per SM: the dequantizing math makes each warp's
  // instruction stream long, and a GPU with 3-4 warps an SM cannot hide it (measured, H200, 1 row:
  // O projection 2048 x 2048 int4 5.5 us with 4 rows a warp, 4.1 with 1; QKV 6.5 vs 5.7 with 2;
  // the LM head 60 us with 4, 78 with 2). The SwiGLU needs a gate and an up row per channel.
  const int chunks = p.k / (BITS == 4 ? 32 : 16);
  if (p.rows > 2) return launch_grid<T, BITS, 1>(p, dev, stream);  // (never with glu: QGemvFused splits those)
  if (chunks < 32 * kLoads) {
    const int64_t enough = int64_t(kWarpsPerSm) * sm_count(dev);
    const auto warps = [&](int r) { return (p.n_out + (p.glu ? r / 2 : r) - 1) / (p.glu ? r / 2 : r); };
    if (warps(4) >= enough) return launch_grid<T, BITS, 4>(p, dev, stream);
    if (p.glu || warps(2) >= enough) return launch_grid<T, BITS, 2>(p, dev, stream);
    return launch_grid<T, BITS, 1>(p, dev, stream);
  }
  // rows of several steps of loads (int8 at K = 8192): split over 2 or 4 warps, a step each
  const int r = p.glu ? 2 : 1, steps = (chunks + 32 * (kLoads / r) - 1) / (32 * (kLoads / r));
  if (p.glu) {
    if (steps >= 4) return launch_grid<T, BITS, 2, 4>(p, dev, stream);
    if (steps >= 2) return launch_grid<T, BITS, 2, 2>(p, dev, stream);
    return launch_grid<T, BITS, 2>(p, dev, stream);
  }
  if (steps >= 4) return launch_grid<T, BITS, 1, 4>(p, dev, stream);
  if (steps >= 2) return launch_grid<T, BITS, 1, 2>(p, dev, stream);
  launch_grid<T, BITS, 1>(p, dev, stream);
}

template <typename T>
void launch(int bits, const QParams<T>& p, int dev, cudaStream_t stream) {
  if (bits == 4) launch_rows<T, 4>(p, dev, stream);
  else launch_rows<T, 8>(p, dev, stream);
}

// The kernel's arguments, typeless until run_gemv picks the element type.
struct GemvCall {
  Mat2D x;
  const void *g, *qw, *scales, *zeros;
  float eps;
  Mat2D res, y;
  int64_t n_out, group;
  bool glu;
};

GemvCall params_of(const Mat2D& x, const DLTensor* g, double eps, const DLTensor* qw, const DLTensor* s,
                   const DLTensor* z, const Mat2D& r, const Mat2D& y, int64_t n_out, int64_t group, int64_t glu) {
  return GemvCall{x, g ? data_of(g) : nullptr, data_of(qw), data_of(s), z ? data_of(z) : nullptr, float(eps), r, y,
                  n_out, group, glu != 0};
}

template <typename T>
void run_typed(int bits, const GemvCall& c, int dev, cudaStream_t stream) {
  QParams<T> p{reinterpret_cast<const T*>(c.x.ptr), c.x.ld, static_cast<const T*>(c.g), c.eps,
               static_cast<const uint4*>(c.qw), static_cast<const T*>(c.scales), static_cast<const T*>(c.zeros),
               reinterpret_cast<const T*>(c.res.ptr), c.res.ld, reinterpret_cast<T*>(c.y.ptr), c.y.ld, int(c.n_out),
               int(c.x.cols), int(c.group), int(c.x.rows), c.glu};
  launch<T>(bits, p, dev, stream);
}

void run_gemv(DT dt, int bits, const GemvCall& c, int dev, cudaStream_t stream) {
  if (dt == DT::kF16) run_typed<__half>(bits, c, dev, stream);
  else run_typed<__nv_bfloat16>(bits, c, dev, stream);
}

void QGemvFused(DLTensor* X, tvm::ffi::AnyView g_any, DLTensor* qw, DLTensor* s, tvm::ffi::AnyView z_any,
                tvm::ffi::AnyView res_any, DLTensor* Y, int64_t bits, int64_t group, int64_t glu, double eps) {
  DLTensor* G = optional_tensor(g_any);
  const DLTensor* z = optional_tensor(z_any);
  DLTensor* R = optional_tensor(res_any);
  for (auto [t, name] : {std::pair<const DLTensor*, const char*>{X, "x"}, {qw, "qweight"}, {s, "scales"}, {Y, "y"}})
    check_cuda_tensor(t, name);
  for (auto [t, name] : {std::pair<const DLTensor*, const char*>{qw, "qweight"}, {s, "scales"}})
    LLMC_CHECK(compact(t)) << name << " must be contiguous";
  LLMC_CHECK(bits == 4 || bits == 8) << "bits must be 4 or 8, got " << bits;
  LLMC_CHECK(glu == 0 || glu == 1) << "glu must be 0 or 1, got " << glu;
  const DT dt = dtype_of(X);
  LLMC_CHECK(dt == DT::kF16 || dt == DT::kBF16) << "x dtype " << dtype_name(dt) << " (float16 or bfloat16)";
  LLMC_CHECK(dtype_of(s) == dt && dtype_of(Y) == dt) << "x, scales and y must share a dtype";
  LLMC_CHECK(qw->ndim == 2 && s->ndim == 2) << "qweight and scales must be 2-D";
  const Mat2D x = as_matrix(X, "x"), y = as_matrix(Y, "y");
  const int64_t rows = x.rows, K = x.cols, n = qw->shape[0], n_out = glu ? n / 2 : n;
  LLMC_CHECK(rows >= 0 && rows / kMaxRows < 65535) << "x has " << rows << " rows";
  const int per = bits == 4 ? 32 : 16;
  LLMC_CHECK(K % per == 0 && group % per == 0 && K % group == 0)
      << "K " << K << " and group " << group << " must be multiples of " << per << ", group dividing K";
  LLMC_CHECK(qw->shape[1] == (bits == 4 ? K / 2 : K) && qw->dtype.bits == 8) << "qweight " << shape_str(qw);
  LLMC_CHECK(!glu || n % 2 == 0) << "glu needs an even N, qweight is " << shape_str(qw);
  LLMC_CHECK(s->shape[0] == n && s->shape[1] == K / group) << "scales " << shape_str(s);
  LLMC_CHECK(y.rows == rows && y.cols == n_out) << "y " << shape_str(Y) << " must be [" << rows << ", " << n_out << "]";
  // 16-byte loads of x rows (and of the norm weight)
  LLMC_CHECK(aligned16(x.ptr) && x.ld % 8 == 0) << "x rows must be 16-byte aligned (row stride " << x.ld << ")";
  if (z != nullptr) {
    check_cuda_tensor(z, "zeros");
    LLMC_CHECK(dtype_of(z) == dt && z->ndim == 2 && z->shape[0] == n && z->shape[1] == K / group && compact(z))
        << "zeros " << shape_str(z);
  }
  if (G != nullptr) {
    check_cuda_tensor(G, "norm_w");
    LLMC_CHECK(dtype_of(G) == dt && G->ndim == 1 && G->shape[0] == K && compact(G) && aligned16(data_of(G)))
        << "norm_w must be a contiguous, 16-byte aligned [" << K << "] of x's dtype, got " << shape_str(G);
  }
  Mat2D r{nullptr, 0, 0, 0};
  if (R != nullptr) {
    check_cuda_tensor(R, "residual");
    r = as_matrix(R, "residual");
    LLMC_CHECK(dtype_of(R) == dt && r.rows == rows && r.cols == n_out)
        << "residual " << shape_str(R) << " must be [" << rows << ", " << n_out << "] of x's dtype";
  }
  if (rows == 0 || n_out == 0) return;
  const int dev = X->device.device_id;
  DeviceGuard guard(dev);
  cudaStream_t stream = current_stream(dev);
  const cudaDataType_t half = dt == DT::kF16 ? CUDA_R_16F : CUDA_R_16BF;
  const bool fused = G != nullptr || glu || R != nullptr;
  void* normed = nullptr;  // x after the norm, where the tensor-core route made it and then refused
  if (rows > kFusedRows && rows < kGemmRows) {  // small batches: tensor cores, the norm first where asked
    GemvArgs t;
    t.dtype = half, t.x = x.ptr, t.ldx = x.ld, t.bits = int(bits), t.w = data_of(qw), t.ldw = qw->shape[1];
    t.scales = data_of(s), t.zeros = z ? data_of(z) : nullptr, t.group = group, t.res = r.ptr, t.ldr = r.ld;
    t.y = y.ptr, t.ldy = y.ld, t.m = rows, t.n_out = n_out, t.k = K, t.glu = glu != 0;
    if (G != nullptr) {  // the norm inside the GEMV's blocks where there are few of them, else a pass first
      t.norm_w = data_of(G), t.eps = float(eps);
      if (tc_gemv(dev, stream, t)) return;
      t.norm_w = nullptr;
      t.x = normed = rms_rows_to_scratch(dev, stream, X, x.ptr, rows, K, x.ld, G, float(eps), kSlotNormed), t.ldx = K;
    }
    if (tc_gemv(dev, stream, t)) return;
  }
  if (rows < kGemmRows && (!fused || rows <= kFusedRows)) {  // one launch
    run_gemv(dt, int(bits), params_of(x, G, eps, qw, s, z, r, y, n_out, group, glu), dev, stream);
    return;
  }
  // More rows: the norm into scratch, the GEMV (below kGemmRows) or dequantize + tensor-core GEMM,
  // the SwiGLU / residual as an epilogue pass from scratch.
  Mat2D a = x;
  if (G != nullptr) {  // (normalized once: the tensor-core route's pass is reused)
    if (normed == nullptr) normed = rms_rows_to_scratch(dev, stream, X, x.ptr, rows, K, x.ld, G, float(eps), kSlotNormed);
    a = Mat2D{static_cast<char*>(normed), rows, K, K};
  } else if (rows >= kGemmRows && x.ld != K) {  // the GEMM reads compact rows
    char* buf = static_cast<char*>(scratch(dev, stream, kSlotNormed, size_t(rows) * K * 2));
    copy_rows_compact(buf, x.ptr, rows, K, x.ld, stream);
    a = Mat2D{buf, rows, K, K};
  }
  const bool direct = !glu && R == nullptr && (rows < kGemmRows || y.ld == n_out);
  const Mat2D h = direct ? y : Mat2D{static_cast<char*>(scratch(dev, stream, kSlotOut, size_t(rows) * n * 2)), rows, n, n};
  if (rows >= kGemmRows) {
    qmatmul_dequant_gemm(dev, stream, half, int(bits), a.ptr, data_of(qw), data_of(s), z ? data_of(z) : nullptr, h.ptr,
                         rows, n, K, group);
  } else {
    run_gemv(dt, int(bits), params_of(a, nullptr, 0.0, qw, s, z, Mat2D{nullptr, 0, 0, 0}, h, n, group, 0), dev, stream);
  }
  if (!direct) gemm_epilogue_rows(half, h.ptr, y.ptr, y.ld, r.ptr, r.ld, rows, n_out, glu != 0, stream);
}

void QGemv(DLTensor* x, DLTensor* qw, DLTensor* s, tvm::ffi::AnyView z_any, DLTensor* y, int64_t bits, int64_t group) {
  QGemvFused(x, nullptr, qw, s, z_any, nullptr, y, bits, group, 0, 0.0);
}

}  // namespace
}  // namespace llmc_shim_qgemv

TVM_FFI_DLL_EXPORT_TYPED_FUNC(llmc_qgemv, llmc_shim_qgemv::QGemv);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(llmc_qgemv_fused, llmc_shim_qgemv::QGemvFused);
