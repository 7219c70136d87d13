// llmc CPU GEMM: C[M, N] = A[M, K] @ W[N, K]^T in float32, for x86-64 processors with AVX-512F and VL.
//
//   int llmc_sgemm_nt(const float* a, int64_t lda, const float* w, int64_t ldw, float* c, int64_t ldc,
//                     int64_t m, int64_t n, int64_t k, int threads)
//     returns 0, or -1 when this processor lacks AVX-512F/VL (the caller then uses another GEMM).
//   int llmc_sgemm_supported(void): 1 when llmc_sgemm_nt can run here.
//   llmc_sgemm_packed_floats, llmc_sgemm_pack_w, llmc_sgemm_nt_packed: the same product from a copy
//   of W packed once (see their definitions below).
//
// Why this shape of kernel: every weight llmc hands it is stored [N, K] (out features x in
// features, as torch.nn.Linear keeps it and as a tied embedding is read by the LM head), so both
// operands are K-contiguous. A tile of MR rows of A and NR rows of W keeps MR x NR 16-lane partial
// dot products in registers: per 16 values of k it loads MR + NR vectors and issues MR * NR FMAs
// (4 x 6: 10 loads, 24 FMAs, 24 of the 32 zmm registers), then reduces the partial sums once
// per K block (hsum8). Nothing is packed at compile time: rows are read in their natural layout,
// so the tied LM head needs no second copy, and a ragged N (50257) costs one narrow tile at the
// edge, not a padded panel. Only a block of W whose rows are a multiple of 2 KB apart is copied
// per call to rows that are not (see conflicting_stride). Measured on the 2-core Zen 4 VM: 90-98
// GFLOP/s on one core (peak 115) for GPT-2's shapes, against OpenBLAS's 80; 200-215 on two
// (benchmarks/RESULTS_CPU.md).
//
// From 16 rows of A on, a second kernel (below: A packed in panels, outer products) takes the
// call; its rates on a 2-core Xeon are in benchmarks/RESULTS_CPU.md (sessions 15 and 16).
//
// Blocking: N in blocks of NB weight rows, which stay in L2 while every row of A passes over
// them (A, M x K floats, stays in L2 or L3). Threads split N (chunks of whole tiles, taken in turn);
// a GEMV (M = 1..3) runs the same code with MR = M, reading each weight once.
//
// Threads: the library's pool (llmc_pool.h; workers wait for the next call yielding the processor for
// 2 ms, then block on a condition variable; see Pool).
#include "llmc_pool.h"

#include <immintrin.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <utility>
#include <vector>

namespace {

constexpr int MR = 4;       // rows of A per tile
constexpr int NR = 6;       // rows of W per tile
// K blocks only bound a tile's rows to L2 for very long rows: each block's partial sums are
// reduced and added to C. Measured at K = 768 .. 3072: KC = 512 cost 25-35% with separate
// reductions; with the shuffle tree, KC = 768 .. 1536 changed nothing (M = 512, K = 3072, N = 768
// stays at 165-170 GFLOP/s on two cores, the other GPT-2 shapes 205-215).
constexpr int64_t KC = 8192;
constexpr int64_t NB = 48;  // rows of W per block: they stay in L2 while all of A passes

// The 16-lane sums of 8 vectors, as 8 floats: a shuffle tree (8 -> 4 -> 2 -> 1 vectors, each
// step adding halves of two vectors side by side), 24 instructions where 8 separate
// reductions take ~64. Measured: the per-tile reductions were 8% (K = 768) to 15% (K = 384)
// of a tile's time with separate reductions.
__attribute__((target("avx512f,avx512vl"))) inline __m256 hsum8(const __m512* x) {
  __m512 v[4], w[2];
#pragma GCC unroll 4
  for (int p = 0; p < 4; ++p)  // 128-bit lanes [a0+a2, a1+a3, b0+b2, b1+b3]
    v[p] = _mm512_add_ps(_mm512_shuffle_f32x4(x[2 * p], x[2 * p + 1], 0x44),
                         _mm512_shuffle_f32x4(x[2 * p], x[2 * p + 1], 0xEE));
#pragma GCC unroll 2
  for (int q = 0; q < 2; ++q)  // lane L: 4 partial sums of x[4q + L]
    w[q] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * q], v[2 * q + 1], 0x88),
                         _mm512_shuffle_f32x4(v[2 * q], v[2 * q + 1], 0xDD));
  // lane L: [x_L, x_L, x_{4+L}, x_{4+L}] partial pairs, then whole sums
  const __m512 t = _mm512_add_ps(_mm512_shuffle_ps(w[0], w[1], 0x88), _mm512_shuffle_ps(w[0], w[1], 0xDD));
  const __m512 u = _mm512_add_ps(t, _mm512_shuffle_ps(t, t, 0xB1));
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 2, 6, 10, 14, 0, 0, 0, 0, 0, 0, 0, 0);
  return _mm512_castps512_ps256(_mm512_permutexvar_ps(order, u));
}

// c[i, j] (+)= sum over kc of a[i, :] * w[j, :] for an M x N tile (M <= MR, N <= NR).
template <int M, int N>
__attribute__((target("avx512f,avx512vl"))) void tile(int64_t kc, const float* a, int64_t lda, const float* w, int64_t ldw,
                                              float* c, int64_t ldc, bool accumulate) {
  __m512 acc[M][N];
#pragma GCC unroll 8
  for (int i = 0; i < M; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < N; ++j) acc[i][j] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= kc; k += 16) {
    __m512 wv[N];
#pragma GCC unroll 8
    for (int j = 0; j < N; ++j) wv[j] = _mm512_loadu_ps(w + j * ldw + k);
#pragma GCC unroll 8
    for (int i = 0; i < M; ++i) {
      const __m512 av = _mm512_loadu_ps(a + i * lda + k);
#pragma GCC unroll 8
      for (int j = 0; j < N; ++j) acc[i][j] = _mm512_fmadd_ps(av, wv[j], acc[i][j]);
    }
  }
  if (k < kc) {  // the last k % 16 values, masked (nothing is read past a row's end)
    const __mmask16 mk = static_cast<__mmask16>((1u << (kc - k)) - 1);
    __m512 wv[N];
#pragma GCC unroll 8
    for (int j = 0; j < N; ++j) wv[j] = _mm512_maskz_loadu_ps(mk, w + j * ldw + k);
#pragma GCC unroll 8
    for (int i = 0; i < M; ++i) {
      const __m512 av = _mm512_maskz_loadu_ps(mk, a + i * lda + k);
#pragma GCC unroll 8
      for (int j = 0; j < N; ++j) acc[i][j] = _mm512_fmadd_ps(av, wv[j], acc[i][j]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < M; ++i) {
    __m512 row[8];
#pragma GCC unroll 8
    for (int j = 0; j < 8; ++j) row[j] = j < N ? acc[i][j] : _mm512_setzero_ps();
    const __m256 sums = hsum8(row);
    const __mmask8 mn = static_cast<__mmask8>((1u << N) - 1);
    float* ci = c + i * ldc;
    _mm256_mask_storeu_ps(ci, mn, accumulate ? _mm256_add_ps(sums, _mm256_maskz_loadu_ps(mn, ci)) : sums);
  }
}

using TileFn = void (*)(int64_t, const float*, int64_t, const float*, int64_t, float*, int64_t, bool);

// Every (M, N) tile shape, so edge tiles (a ragged N, M = 1..3) run the same register code.
template <int M, int... Ns>
constexpr std::array<TileFn, NR> row_of(std::integer_sequence<int, Ns...>) { return {&tile<M, Ns + 1>...}; }
template <int... Ms>
constexpr std::array<std::array<TileFn, NR>, MR> table_of(std::integer_sequence<int, Ms...>) {
  return {row_of<Ms + 1>(std::make_integer_sequence<int, NR>{})...};
}
const std::array<std::array<TileFn, NR>, MR> kTiles = table_of(std::make_integer_sequence<int, MR>{});

// Whether rows ld floats apart collide in the L1 cache: with a row stride of a multiple of 2 KB
// (K = 512, 1024, 3072, ...), the tile's 10 rows map to one or two of the 64 sets of a 32 KB
// 8-way L1 at every k, and evict each other. Measured on the 2-core Zen 4 VM at M = 512,
// K = 3072, N = 768 (GPT-2's MLP down-projection): 140 GFLOP/s on two cores with W read in
// place, 213 with W's rows 64 bytes further apart; K = 1024: 164 -> 198; K = 768 (3 KB rows)
// unchanged.
inline bool conflicting_stride(int64_t ld) { return (ld * 4) % 2048 == 0; }

// The row stride of a packed block of kc-long rows: a multiple of 16 floats that is not.
inline int64_t packed_stride(int64_t kc) {
  int64_t ld = (kc + 15) / 16 * 16;
  return conflicting_stride(ld) ? ld + 16 : ld;
}

// The next block of W, fetched into L2 a slice per row tile of the current block: inside a
// model a GEMM's weights come from memory (GPT-2's are 500 MB), and the first row tile over a
// block otherwise waits for them. Measured on the 2-core VM, GPT-2 1 x 128 forward (0.2 s idle
// before each): 173 -> 169 and 186 -> 178 ms in two A/B runs; 4 x 128 within +-1%. Not for
// GEMVs (fewer than 4 row tiles), where the hardware's stream prefetch keeps up on its own.
struct Prefetch {
  const float* w;  // first row of the block
  int64_t ldw, rows, lines;  // lines: 64-byte lines per row
  int64_t row = 0, line = 0, per_step = 0;

  Prefetch(const float* w_, int64_t ldw_, int64_t rows_, int64_t kc, int64_t steps)
      : w(w_), ldw(ldw_), rows(steps >= 4 ? rows_ : 0), lines((kc * 4 + 63) / 64) {
    per_step = (std::max<int64_t>(rows, 0) * lines + steps - 1) / std::max<int64_t>(steps, 1);
  }

  void step() {
    for (int64_t x = 0; x < per_step && row < rows; ++x) {
      _mm_prefetch(reinterpret_cast<const char*>(w + row * ldw) + line * 64, _MM_HINT_T1);
      if (++line == lines) {
        line = 0;
        ++row;
      }
    }
  }
};

struct Gemm {
  const float* a; int64_t lda; const float* w; int64_t ldw; float* c; int64_t ldc; int64_t m, n, k;

  // Output columns [n0, n1) for every row. A block of W with colliding rows is first copied to
  // a per-thread buffer with a stride that does not collide, when enough rows of A (M >= 8) pass
  // over it to repay the copy (2-4% of the block's FMAs at M = 512); the values and the order of
  // the FMAs are the same, so the result is the same bits either way.
  void columns(int64_t n0, int64_t n1) const {
    const bool pack = m >= 8 && conflicting_stride(ldw);
    thread_local std::vector<float> buffer;
    for (int64_t k0 = 0; k0 < k; k0 += KC) {
      const int64_t kc = std::min(KC, k - k0);
      const int64_t ldp = packed_stride(kc);
      if (pack && buffer.size() < static_cast<size_t>(NB * ldp)) buffer.resize(NB * ldp);
      for (int64_t j0 = n0; j0 < n1; j0 += NB) {
        const int64_t j1 = std::min(n1, j0 + NB);
        const float* wb = w + j0 * ldw + k0;  // row j of the block at wb + (j - j0) * ldb
        int64_t ldb = ldw;
        if (pack) {
          for (int64_t j = j0; j < j1; ++j) std::copy_n(w + j * ldw + k0, kc, buffer.data() + (j - j0) * ldp);
          wb = buffer.data();
          ldb = ldp;
        }
        Prefetch next{w + j1 * ldw + k0, ldw, std::min(n1, j1 + NB) - j1, kc, (m + MR - 1) / MR};
        for (int64_t i = 0; i < m; i += MR) {
          const int mi = static_cast<int>(std::min<int64_t>(MR, m - i));
          next.step();
          for (int64_t j = j0; j < j1; j += NR) {
            const int nj = static_cast<int>(std::min<int64_t>(NR, j1 - j));
            kTiles[mi - 1][nj - 1](kc, a + i * lda + k0, lda, wb + (j - j0) * ldb, ldb, c + i * ldc + j, ldc,
                                   k0 > 0);
          }
        }
      }
    }
  }
};

// ---- many rows: A packed transposed, outer products ---------------------------------------
//
// Why a second kernel: the dot-product tile above reads MR + NR = 10 vectors per 24 FMAs and keeps
// no W row in L1 across k, so at M >= 16 it is bound by the L2's bandwidth on processors whose
// L2 feeds a core ~32 bytes a cycle (measured on a 2-core Xeon with AVX-512: 108-157 GFLOP/s on
// GPT-2's shapes against MKL's 155-232). Here A (the activations: small, and read by every tile) is
// packed once per call into panels of PM rows stored k-major ([k][PM]); a tile of PM rows by PN
// weight rows keeps PV * PN accumulators of 16 rows each and per k loads PV vectors of A and
// broadcasts PN scalars of W (one per weight row, read in place: no copy of W, so the tied LM head
// keeps one copy): 4 + 6 loads for 24 FMAs. (Panels of 32 rows x 12 weight rows, 2 + 12 loads, were
// 14% slower over GPT-2's, MiniLM's and the small Llama's shapes on the Xeon: sum of medians 368 /
// 371 ms against 314 / 320 in two rounds.) The loop order is in PackedGemm::columns.
// Each output is one sequential FMA chain over all of k, its partial sums kept exactly between K
// blocks (the same bits for any thread count or column split).
constexpr int PV = 4;               // vectors of 16 rows of A per panel
constexpr int PM = 16 * PV;         // rows of A per panel
constexpr int PN = 6;               // rows of W per tile
// k per block: a panel's block of A (PM x PKC, 32 KB) stays in L1 while a column block's tiles pass.
// Measured inside the compiled models (same-process pairs, 30 rounds, median of per-round ratios):
// 128 against 384: GPT-2 1 x 128 0.996, 4 x 128 0.956, the small Llama 0.946; 96 against 384: GPT-2
// 0.90, MiniLM 0.91; 64 and 128 level with 96. (A scratch harness of the bare GEMMs, weights hot
// in L3, had ranked 384 first: the models' weights and activations do not stay there.)
constexpr int64_t PKC = 128;
// From this many rows of A on, the packed kernel. Measured on the Xeon (scratch harness, 2 threads,
// median of 5, GPT-2's and the small Llama's layer shapes, two rounds): at 16 rows 66-100 GFLOP/s
// dot-product tiles against 83-106 packed (one outlier at 28), at 24 rows 52-106 against 94-126.
constexpr int64_t kPackedRows = 16;
constexpr int64_t kWBlockBytes = 1 << 20;  // W rows (all of K) a column block holds: half a core's L2
constexpr int kAccFloats = PV * PN * 16;    // a tile's accumulators, kept between K blocks
// A work item's column chunk is at least this many tiles (where N allows): every chunk reads its
// panels' packed A, so narrow chunks (N / 16 at 2 threads: 4 tiles for MiniLM's N = 384) read A
// many times over. Measured on MiniLM's 1024-row shapes: 6.7 ms against 7.6 at 1024 x 384 x 1536.
constexpr int64_t kMinChunkTiles = 16;
// Packed A a work item holds (a group of panels, all of K): a quarter of a core's L2, beside the
// W block. Against one group of all panels, inside the compiled models (same-process pairs, 30
// rounds): MiniLM 8 x 128 0.934, GPT-2 1 x 128 0.971; groups of 1 MB 0.969 / 1.008.
constexpr int64_t kAGroupBytes = 512 << 10;

// x[i] := lane i of x[0..15] (a 16 x 16 transpose): pairs within 128-bit lanes, then 128-bit lanes.
__attribute__((target("avx512f,avx512vl"))) inline void transpose16(__m512* x) {
  __m512 t[16];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) {  // t[2i] lane L: x2i[4L], x2i+1[4L], x2i[4L+1], x2i+1[4L+1]; t[2i+1]: 4L+2, 4L+3
    t[2 * i] = _mm512_unpacklo_ps(x[2 * i], x[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(x[2 * i], x[2 * i + 1]);
  }
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {  // y[4i + e] lane L: element 4L + e of x4i .. x4i+3
    const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 2]);
    const __m512d c = _mm512_castps_pd(t[4 * i + 1]), d = _mm512_castps_pd(t[4 * i + 3]);
    t[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
    t[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
    t[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(c, d));
    t[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(c, d));
  }
#pragma GCC unroll 4
  for (int e = 0; e < 4; ++e) {  // row 4L + e: lane L of y[e], y[4 + e], y[8 + e], y[12 + e]
    const __m512 a = _mm512_shuffle_f32x4(t[e], t[4 + e], 0x88), b = _mm512_shuffle_f32x4(t[e], t[4 + e], 0xDD);
    const __m512 c = _mm512_shuffle_f32x4(t[8 + e], t[12 + e], 0x88);
    const __m512 d = _mm512_shuffle_f32x4(t[8 + e], t[12 + e], 0xDD);
    x[e] = _mm512_shuffle_f32x4(a, c, 0x88);
    x[8 + e] = _mm512_shuffle_f32x4(a, c, 0xDD);
    x[4 + e] = _mm512_shuffle_f32x4(b, d, 0x88);
    x[12 + e] = _mm512_shuffle_f32x4(b, d, 0xDD);
  }
}

// A[0 : rows, :] into dst[k][PM], rows past `rows` zero: blocks of 16 rows x 16 values of k
// loaded a row at a time and transposed in registers.
__attribute__((target("avx512f,avx512vl"))) void pack_panel(const float* a, int64_t lda, int64_t rows, int64_t k,
                                                        float* dst) {
  for (int64_t k0 = 0; k0 < k; k0 += 16) {
    const int64_t kn = std::min<int64_t>(16, k - k0);
    const __mmask16 mk = static_cast<__mmask16>((1u << kn) - 1);
    for (int v = 0; v < PV; ++v) {
      __m512 x[16];
      for (int64_t i = 0; i < 16; ++i) {
        const int64_t r = 16 * v + i;
        x[i] = r < rows ? _mm512_maskz_loadu_ps(mk, a + r * lda + k0) : _mm512_setzero_ps();
      }
      transpose16(x);
      for (int64_t kk = 0; kk < kn; ++kk) _mm512_store_ps(dst + (k0 + kk) * PM + 16 * v, x[kk]);
    }
  }
}

// The panels of rows [0, rows) of x (rows ld apart) into dst, each thread a share of them: A per call,
// W once.
void pack_panels(const float* x, int64_t ld, int64_t rows, int64_t k, float* dst, int threads) {
  llmc::run_in_turn(threads, (rows + PM - 1) / PM, [&](int64_t p) {
    pack_panel(x + p * PM * ld, ld, std::min<int64_t>(PM, rows - p * PM), k, dst + p * PM * k);
  });
}

// acc[v][j] += a[16 v .. 16 v + 15] * w[j * ldw]: one k of a tile (V vector loads, N broadcasts).
template <int V, int N>
__attribute__((target("avx512f,avx512vl"), always_inline)) inline void outer_product(__m512 (&acc)[V][N], const float* a,
                                                                                 const float* w, int64_t ldw) {
  __m512 av[V];
#pragma GCC unroll 4
  for (int v = 0; v < V; ++v) av[v] = _mm512_load_ps(a + 16 * v);
#pragma GCC unroll 16
  for (int j = 0; j < N; ++j) {
    const __m512 b = _mm512_set1_ps(w[j * ldw]);
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) acc[v][j] = _mm512_fmadd_ps(av[v], b, acc[v][j]);
  }
}

// c[i, j] = sum over k of ap[k][i] * w[j, k] for i < rows (<= 16 V), j < N (<= PN), over one K
// block of kc: the first block starts from zero, later ones from the tile's accumulators in
// acc_buf (stored as they are, no transpose), the last writes C. A last panel of fewer rows does
// no FMAs on its empty vectors.
template <int V, int N, bool kDirect>
__attribute__((target("avx512f,avx512vl"))) void panel_tile(int64_t kc, const float* ap, const float* w, int64_t ldw,
                                                        float* acc_buf, bool first, bool last, float* c,
                                                        int64_t ldc, int64_t rows, const float* next) {
  __m512 acc[V][N];
#pragma GCC unroll 16
  for (int j = 0; j < N; ++j)
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) acc[v][j] = first ? _mm512_setzero_ps() : _mm512_load_ps(acc_buf + (j * PV + v) * 16);
  // k in steps of 16, unrolled: the prefetch test and the loop's own work once per 16 steps
  // (measured against one k a turn: 11 of the models' 14 shapes 4-40% faster in a scratch harness,
  // GPT-2 1 x 128 and MiniLM 8 x 128 0.97 in same-process pairs)
  int64_t k = 0;
  for (; k + 16 <= kc; k += 16) {
    if (next != nullptr)  // the next tile's rows, a line each per 16 values of k
#pragma GCC unroll 16
      for (int j = 0; j < PN; ++j) _mm_prefetch(reinterpret_cast<const char*>(next + j * ldw + k), _MM_HINT_T0);
#pragma GCC unroll 16
    for (int kk = 0; kk < 16; ++kk) outer_product<V, N>(acc, ap + (k + kk) * PM, w + k + kk, ldw);
  }
  for (; k < kc; ++k) outer_product<V, N>(acc, ap + k * PM, w + k, ldw);
  if (!last) {
#pragma GCC unroll 16
    for (int j = 0; j < N; ++j)
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) _mm512_store_ps(acc_buf + (j * PV + v) * 16, acc[v][j]);
    return;
  }
  if (kDirect) {  // the panel holds W: lane i of acc[v][j] is column 16 v + i of C's row j
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) {
      if (16 * v >= rows) break;
      const int64_t lanes = std::min<int64_t>(16, rows - 16 * v);
      const __mmask16 ml = static_cast<__mmask16>((1u << lanes) - 1);
#pragma GCC unroll 16
      for (int j = 0; j < N; ++j) _mm512_mask_storeu_ps(c + j * ldc + 16 * v, ml, acc[v][j]);
    }
    return;
  }
  // Out through a 16 x 16 transpose (row i of the tile is lane i of every accumulator): 64
  // shuffles and one masked store per row, where element-wise stores cost ~2 instructions an output.
  const __mmask16 mn = static_cast<__mmask16>((1u << N) - 1);
#pragma GCC unroll 4
  for (int v = 0; v < V; ++v) {
    if (16 * v >= rows) break;
    __m512 x[16];
#pragma GCC unroll 16
    for (int j = 0; j < 16; ++j) x[j] = j < N ? acc[v][j] : _mm512_setzero_ps();
    transpose16(x);
    const int64_t n_rows = std::min<int64_t>(16, rows - 16 * v);
    for (int64_t i = 0; i < n_rows; ++i) _mm512_mask_storeu_ps(c + (16 * v + i) * ldc, mn, x[i]);
  }
}

using PanelTileFn = void (*)(int64_t, const float*, const float*, int64_t, float*, bool, bool, float*, int64_t,
                            int64_t, const float*);
template <bool kDirect, int V, int... Ns>
constexpr std::array<PanelTileFn, PN> panel_row_of(std::integer_sequence<int, Ns...>) {
  return {&panel_tile<V, Ns + 1, kDirect>...};
}
template <bool kDirect, int... Vs>
constexpr std::array<std::array<PanelTileFn, PN>, PV> panel_tiles_of(std::integer_sequence<int, Vs...>) {
  return {panel_row_of<kDirect, Vs + 1>(std::make_integer_sequence<int, PN>{})...};
}
// [packed W?][vectors of the panel that hold rows - 1][rows of the tile's other operand - 1]
const std::array<std::array<std::array<PanelTileFn, PN>, PV>, 2> kPanelTiles = {
    panel_tiles_of<false>(std::make_integer_sequence<int, PV>{}),
    panel_tiles_of<true>(std::make_integer_sequence<int, PV>{})};

// The first 64-byte aligned float of a buffer allocated 16 floats longer than it needs.
inline float* aligned64(std::vector<float>& v) {
  return v.data() + (16 - reinterpret_cast<uintptr_t>(v.data()) / 4 % 16) % 16;
}

struct PackedGemm {
  const float* ap;  // the packed operand's panels, [panel][k][PM]: A packed per call, or W packed once
  const float* w; int64_t ldw; float* c; int64_t ldc; int64_t m, n, k;  // w: the other operand's rows
  bool direct;  // ap holds W (m: W's rows, n: A's): a panel's lanes are columns of C, stored as they are

  // Output columns [n0, n1) of panels [p0, p1). The columns go in blocks whose W rows (all of K, up to
  // kWBlockBytes) stay in L2 while every panel passes over them: W comes from memory once. For
  // each panel and K block, the block's tiles pass over the panel's block of A in turn, so per k a
  // tile's 4 vector loads of A come from L1 and its 6 broadcasts of W stream from L2. (Session
  // 15's order, a tile's W rows held in L1 while the panels' A streamed past, loaded 256 bytes of A
  // from L2 per 24 FMAs and was 10-15% slower over the models' shapes on the Xeon.) Partial sums
  // between K blocks wait in a per-thread buffer, a tile's 24 vectors each.
  void columns(int64_t n0, int64_t n1, int64_t p0, int64_t p1) const {
    const int64_t block = std::max<int64_t>(1, kWBlockBytes / (k * 4 * PN)) * PN;
    thread_local std::vector<float> accs;  // untouched where one K block holds all of K
    const size_t need = static_cast<size_t>(std::min(block, n1 - n0) / PN + 1) * kAccFloats + 16;
    if (k > PKC && accs.size() < need) accs.resize(need);
    float* acc0 = aligned64(accs);
    for (int64_t b0 = n0; b0 < n1; b0 += block) {
      const int64_t b1 = std::min(n1, b0 + block);
      const int64_t tiles_per_block = (b1 - b0 + PN - 1) / PN;
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t rows = std::min<int64_t>(PM, m - p * PM);
        const auto& tiles = kPanelTiles[direct][(rows + 15) / 16 - 1];
        for (int64_t k0 = 0; k0 < k; k0 += PKC) {
          const int64_t kc = std::min(PKC, k - k0);
          const float* apk = ap + (p * k + k0) * PM;
          // Packed W comes from memory (a model's weights do not stay in cache): the block after this
          // one (the next K block, or the next panel's first: they follow in memory) is fetched into
          // L2 a share per tile, so the first tile over it does not wait.
          const int64_t ahead = direct ? (kc * PM * 4 / 64 + tiles_per_block - 1) / tiles_per_block : 0;
          for (int64_t j = b0, t = 0; j < b1; j += PN, ++t) {
            const int nj = static_cast<int>(std::min<int64_t>(PN, b1 - j));
            for (int64_t l = t * ahead; l < (t + 1) * ahead; ++l)
              _mm_prefetch(reinterpret_cast<const char*>(apk + kc * PM) + l * 64, _MM_HINT_T1);
            const float* next = j + 2 * PN <= b1 ? w + (j + PN) * ldw + k0 : nullptr;
            tiles[nj - 1](kc, apk, w + j * ldw + k0, ldw, acc0 + t * kAccFloats, k0 == 0, k0 + PKC >= k,
                          direct ? c + j * ldc + p * PM : c + p * PM * ldc + j, ldc, rows, next);
          }
        }
      }
    }
  }
};

// The dot-product kernel's g.columns over [0, n) on `parts` threads, in chunks of whole tiles (`tile`
// columns wide), about 8 a thread, taken in turn (run_in_turn). Each output is still computed by one
// thread in one order: the same bits for any number of parts.
void by_column_chunks(const Gemm& g, int64_t n, int64_t tile, int parts) {
  if (parts <= 1) {
    g.columns(0, n);
    return;
  }
  const int64_t chunk = std::max<int64_t>(1, (n + tile - 1) / tile / (8 * parts)) * tile;
  llmc::run_in_turn(parts, (n + chunk - 1) / chunk,
                    [&](int64_t q) { g.columns(q * chunk, std::min(n, (q + 1) * chunk)); });
}

// The packed kernel's work over `panels` panels of g.ap, taken in turn by the threads: items of a
// group of panels (their packed operand, all of K, within kAGroupBytes, stays in L2 over the item)
// by a chunk of the other operand's rows (about 8 items a thread, at least kMinChunkTiles tiles
// where it has them). Each output is computed by one item.
void run_packed(const PackedGemm& g, int64_t panels, int threads) {
  const int64_t tiles = (g.n + PN - 1) / PN;
  const int64_t fit = std::max<int64_t>(1, kAGroupBytes / (PM * g.k * 4));
  int64_t groups = (panels + fit - 1) / fit;
  int parts = static_cast<int>(std::min<int64_t>(threads, tiles * groups));
  int64_t chunk_tiles =
      std::max<int64_t>({1, tiles / (8 * parts), std::min(kMinChunkTiles, (tiles * groups + parts - 1) / parts)});
  // Packed W and A's rows within one block (1 MB: they stay in L2): the rows go in one chunk and
  // the threads split W into at least 4 groups each, so W comes from memory once (chunks of rows
  // would each read all of their groups' panels). Measured at 128 rows, weights from memory
  // (GPT-2's and the small Llama's shapes, 30 of each): with this and the block prefetch in
  // PackedGemm::columns, level with packing A per call (geomean 0.99-1.05); without, 1.055. With
  // rows of up to 2 MB in one chunk, MiniLM's shapes (1.5 MB) took 1.04x the time of chunks of
  // rows (twice, 21 rounds), GPT-2's at 512 rows 1.03x.
  if (g.direct && g.n * g.k * 4 <= kWBlockBytes && panels >= 2 * threads) {
    chunk_tiles = tiles;
    groups = std::max(groups, std::min<int64_t>(panels, 4 * threads));
    parts = static_cast<int>(std::min<int64_t>(threads, groups));
  }
  const int64_t per_group = (panels + groups - 1) / groups;
  groups = (panels + per_group - 1) / per_group;
  const int64_t chunk = chunk_tiles * PN;
  const int64_t chunks = (g.n + chunk - 1) / chunk;
  llmc::run_in_turn(parts, chunks * groups, [&](int64_t q) {
    const int64_t n0 = q % chunks * chunk, p0 = q / chunks * per_group;
    g.columns(n0, std::min(g.n, n0 + chunk), p0, std::min(panels, p0 + per_group));
  });
}

// C = 0, the product over an empty K; returns 0 (the entry points' success).
int zero_product(float* c, int64_t ldc, int64_t m, int64_t n) {
  for (int64_t i = 0; i < m; ++i) std::fill(c + i * ldc, c + i * ldc + n, 0.f);
  return 0;
}

// The packed kernel's call: A packed into panels (each thread a share of them), then the columns.
void packed_gemm(const float* a, int64_t lda, const float* w, int64_t ldw, float* c, int64_t ldc, int64_t m, int64_t n,
                 int64_t k, int threads) {
  const int64_t panels = (m + PM - 1) / PM;
  // The calling thread's buffer (run_in_turn returns once every part has run), kept between
  // calls up to 64 MB so a model's GEMMs do not allocate; a larger one is freed after its call.
  constexpr size_t kKeep = size_t{16} << 20;  // floats
  thread_local std::vector<float> packed;
  if (packed.size() < static_cast<size_t>(panels * PM * k + 16)) packed.resize(panels * PM * k + 16);
  // 64-byte aligned: a panel's k-th row is whole cache lines
  float* ap = aligned64(packed);
  pack_panels(a, lda, m, k, ap, threads);
  run_packed(PackedGemm{ap, w, ldw, c, ldc, m, n, k, false}, panels, threads);
  if (packed.size() > kKeep) std::vector<float>().swap(packed);
}

}  // namespace

namespace llmc {

Pool& pool() {
  // Never destroyed: workers outlive static destruction at exit. A forked child has none of its
  // parent's threads, and a mutex a worker held at the fork stays locked there: it gets a new
  // pool (the parent's copy is left alone).
  static Pool* p = nullptr;
  static pid_t owner = 0;
  if (p == nullptr || owner != getpid()) {
    p = new Pool();
    owner = getpid();
  }
  return *p;
}

void run_in_turn(int parts, int64_t chunks, const std::function<void(int64_t)>& work) {
  static std::mutex busy;  // one caller at a time uses the workers; a concurrent one runs alone
  std::unique_lock<std::mutex> owner(busy, std::try_to_lock);
  if (parts <= 1 || chunks <= 1 || !owner.owns_lock()) {
    for (int64_t c = 0; c < chunks; ++c) work(c);
    return;
  }
  std::atomic<int64_t> next{0};
  pool().run(static_cast<int>(std::min<int64_t>(parts, chunks)), [&](int) {
    for (int64_t c; (c = next.fetch_add(1, std::memory_order_relaxed)) < chunks;) work(c);
  });
}

}  // namespace llmc

extern "C" {

__attribute__((visibility("default"))) int llmc_sgemm_supported(void) {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") ? 1 : 0;
}

// W's panels as the packed kernel reads them, made once (at a weight's first use) so that a GEMM of
// many rows packs nothing per call:
//   int64_t llmc_sgemm_packed_floats(n, k): the floats `wp` holds (panels of 64 of W's rows, zero past n);
//   int llmc_sgemm_pack_w(w, ldw, n, k, wp, threads): fills wp (64-byte aligned);
//   int llmc_sgemm_nt_packed(a, lda, wp, c, ldc, m, n, k, threads): C = A @ W^T from wp.
// The packed call computes every output with the same FMAs in the same order as llmc_sgemm_nt's
// packed kernel (a product of the same two floats, added to the same partial sum): the same bits.
__attribute__((visibility("default"))) int64_t llmc_sgemm_packed_floats(int64_t n, int64_t k) {
  return (n + PM - 1) / PM * PM * k;
}

__attribute__((visibility("default"))) int llmc_sgemm_pack_w(const float* w, int64_t ldw, int64_t n, int64_t k,
                                                             float* wp, int threads) {
  if (!llmc_sgemm_supported()) return -1;
  if (reinterpret_cast<uintptr_t>(wp) % 64 != 0) return -2;
  pack_panels(w, ldw, n, k, wp, threads);
  return 0;
}

__attribute__((visibility("default"))) int llmc_sgemm_nt_packed(const float* a, int64_t lda, const float* wp, float* c,
                                                                int64_t ldc, int64_t m, int64_t n, int64_t k,
                                                                int threads) {
  if (!llmc_sgemm_supported()) return -1;
  if (reinterpret_cast<uintptr_t>(wp) % 64 != 0) return -2;
  if (m <= 0 || n <= 0) return 0;
  if (k <= 0) return zero_product(c, ldc, m, n);
  run_packed(PackedGemm{wp, a, lda, c, ldc, n, m, k, true}, (n + PM - 1) / PM, threads);
  return 0;
}

__attribute__((visibility("default"))) int llmc_sgemm_nt(const float* a, int64_t lda, const float* w, int64_t ldw,
                                                         float* c, int64_t ldc, int64_t m, int64_t n, int64_t k,
                                                         int threads) {
  if (!llmc_sgemm_supported()) return -1;
  if (m <= 0 || n <= 0) return 0;
  if (k <= 0) return zero_product(c, ldc, m, n);
  if (m >= kPackedRows) {
    packed_gemm(a, lda, w, ldw, c, ldc, m, n, k, threads);
    return 0;
  }
  const int64_t tiles = (n + NR - 1) / NR;
  // a part is worth a worker's wake-up (tens of us) from ~2 MFLOP or ~512 KB of weights on
  const int64_t useful = std::max<int64_t>({1, m * n * k / (1 << 20), n * k / (1 << 17)});
  const int parts = static_cast<int>(std::min<int64_t>({threads, tiles, useful}));
  by_column_chunks(Gemm{a, lda, w, ldw, c, ldc, m, n, k}, n, NR, parts);
  return 0;
}

}  // extern "C"
