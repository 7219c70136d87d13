// llmc CPU attention: out = softmax(q k^T * scale [+ mask] [causal]) v in float32, AVX-512F/VL.
//
//   int llmc_attention_f32(const float* q, const float* k, const float* v, float* out,
//                          const void* mask, int mask_kind, const int64_t* mask_strides,
//                          int64_t b, int64_t h, int64_t hk, int64_t s, int64_t t, int64_t d, int64_t dv,
//                          float scale, int causal, int threads)
//     q [b, h, s, d], k [b, hk, t, d], v [b, hk, t, dv], out [b, h, s, dv], all contiguous; query
//     head i reads key/value head i / (h / hk) (grouped-query attention). causal: query row i sees
//     keys j <= i + t - s. mask_kind 0: none; 1: bool (uint8, nonzero = attend); 2: float32 added
//     to the scores; its element (b, h, i, j) is at mask[sum of index * mask_strides] (a stride of
//     0 broadcasts). A row that sees no key gives zeros. Returns 0; -1 without AVX-512F/VL; -2 for
//     head counts that do not divide (h % hk), a negative t or d, an unknown mask_kind.
//
// Why a kernel of its own: TVM's schedule (backends/schedule.py) computes every score of a causal
// row, masked or not, and reached about a quarter of this processor's rate on GPT-2's 12 heads of
// 64; here a row's loops stop at its last visible key. Per (batch, head): K is transposed once to
// [d, t] (keys contiguous), then for 4 query rows at a time the scores are a register tile of
// 4 rows x 64 keys (per head-dim step: 4 key vectors loaded, 4 query values broadcast, 16 FMAs),
// the softmax runs in place over each row's visible keys, and p v is a tile of 4 rows x 64 value
// columns (per key: 4 value vectors, 4 broadcasts, 16 FMAs). Heads go to threads in turn.
#include "llmc_pool.h"

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

constexpr int R = 4;    // query rows per tile
constexpr int L = 16;   // floats per vector
constexpr int KV = 4;   // key (score) or value-column vectors per tile

#define AVX512 __attribute__((target("avx512f,avx512vl")))

// exp(x) for x <= 0 (a score minus its row's max), 1-2 ulp: x = n ln2 + r with |r| <= ln2 / 2,
// exp(r) by Cephes' degree-6 polynomial, times 2^n. Below -120 (and -inf, a masked score) the
// result is exactly 0, as the TVM kernel's exp gives.
AVX512 inline __m512 exp_nonpositive(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-120.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(p, n);
}

AVX512 inline __mmask16 lanes_below(int64_t count) {  // the first min(count, 16) lanes
  return count >= L ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << std::max<int64_t>(count, 0)) - 1);
}

struct Attention {
  const float *q, *k, *v;
  float* out;
  const void* mask;
  int mask_kind;
  int64_t ms[4];  // mask strides (b, h, i, j)
  int64_t b, h, hk, s, t, d, dv;
  float scale;
  bool causal;

  // keys query row i sees: [0, visible(i))
  int64_t visible(int64_t i) const { return causal ? std::clamp<int64_t>(i + t - s + 1, 0, t) : t; }

  // scores[r][j0 .. j0 + NV * 16) = q_r . k_j (q already scaled); kT is [d, tp]
  template <int NV>
  AVX512 void score_tile(const float* qs, const float* kT, int64_t tp, int64_t j0, float* scores) const {
    const int64_t n = d;
    __m512 acc[R][NV];
    #pragma GCC unroll 4
    for (int r = 0; r < R; ++r)
      #pragma GCC unroll 4
      for (int u = 0; u < NV; ++u) acc[r][u] = _mm512_setzero_ps();
    for (int64_t e = 0; e < n; ++e) {
      __m512 kv[NV];
      #pragma GCC unroll 4
      for (int u = 0; u < NV; ++u) kv[u] = _mm512_loadu_ps(kT + e * tp + j0 + u * L);
      #pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        const __m512 qb = _mm512_set1_ps(qs[r * n + e]);
        #pragma GCC unroll 4
        for (int u = 0; u < NV; ++u) acc[r][u] = _mm512_fmadd_ps(qb, kv[u], acc[r][u]);
      }
    }
    #pragma GCC unroll 4
    for (int r = 0; r < R; ++r)
      #pragma GCC unroll 4
      for (int u = 0; u < NV; ++u) _mm512_storeu_ps(scores + r * tp + j0 + u * L, acc[r][u]);
  }

  // out rows [.., R) columns [c0, c0 + NV * 16) (the last vector cut to dv) = p v / sums
  template <int NV>
  AVX512 void pv_tile(const float* p, int64_t tp, int64_t keys, const float* vh, int64_t c0, const float* inv,
                      float* o, int rows) const {
    const int64_t n = dv;  // (a local: the member was reloaded on every key)
    __m512 acc[R][NV];
    __mmask16 cols[NV];
    #pragma GCC unroll 4
    for (int u = 0; u < NV; ++u) cols[u] = lanes_below(n - c0 - u * L);
    #pragma GCC unroll 4
    for (int r = 0; r < R; ++r)
      #pragma GCC unroll 4
      for (int u = 0; u < NV; ++u) acc[r][u] = _mm512_setzero_ps();
    for (int64_t j = 0; j < keys; ++j) {
      __m512 vv[NV];
      #pragma GCC unroll 4
      for (int u = 0; u < NV; ++u) vv[u] = _mm512_maskz_loadu_ps(cols[u], vh + j * n + c0 + u * L);
      #pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        const __m512 pb = _mm512_set1_ps(p[r * tp + j]);
        #pragma GCC unroll 4
        for (int u = 0; u < NV; ++u) acc[r][u] = _mm512_fmadd_ps(pb, vv[u], acc[r][u]);
      }
    }
    // (a fixed trip count with a test inside: a loop to `rows` made GCC keep acc[][] on the stack,
    // stored on every key)
    #pragma GCC unroll 4
    for (int r = 0; r < R; ++r)
      #pragma GCC unroll 4
      for (int u = 0; u < NV; ++u)
        if (r < rows)
          _mm512_mask_storeu_ps(o + r * n + c0 + u * L, cols[u], _mm512_mul_ps(acc[r][u], _mm512_set1_ps(inv[r])));
  }

  // The mask of keys [j, j + 16) of the row whose mask starts at element mrow, as scores to add
  // (0 or -inf for a bool mask); lanes past t read nothing (their scores are masked anyway).
  AVX512 __m512 mask_bias(int64_t mrow, int64_t j) const {
    const __mmask16 in = lanes_below(t - j);
    if (ms[3] == 1) {  // keys contiguous: vector loads
      if (mask_kind == 2) return _mm512_maskz_loadu_ps(in, static_cast<const float*>(mask) + mrow + j);
      const uint8_t* row = static_cast<const uint8_t*>(mask) + mrow + j;
      alignas(16) uint8_t tail[L] = {};
      if (t - j < L) std::copy_n(row, std::max<int64_t>(t - j, 0), tail);  // (byte loads need AVX-512BW)
      const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(t - j < L ? tail : row)));
      return _mm512_mask_blend_ps(_mm512_test_epi32_mask(bytes, bytes) | static_cast<__mmask16>(~in),
                                  _mm512_set1_ps(-INFINITY), _mm512_setzero_ps());
    }
    alignas(64) float add[L];
    for (int u = 0; u < L; ++u) {
      const int64_t at = mrow + (j + u < t ? j + u : 0) * ms[3];
      add[u] = mask_kind == 1 ? (static_cast<const uint8_t*>(mask)[at] ? 0.f : -INFINITY)
                              : static_cast<const float*>(mask)[at];
    }
    return _mm512_load_ps(add);
  }

  // Row i's scores (row `sr`, `keys` of them computed, `n` visible) to probabilities in place;
  // returns 1 / their sum (or 1 when the row sees nothing: its probabilities are then all 0).
  AVX512 float softmax_row(float* sr, int64_t keys, int64_t n, int64_t bi, int64_t hi, int64_t i) const {
    const __m512 ninf = _mm512_set1_ps(-INFINITY);
    const int64_t mrow = bi * ms[0] + hi * ms[1] + i * ms[2];
    __m512 mx = ninf;
    for (int64_t j = 0; j < keys; j += L) {
      __m512 x = _mm512_loadu_ps(sr + j);
      x = _mm512_mask_blend_ps(lanes_below(n - j), ninf, x);  // keys past the row's last: masked
      if (mask_kind != 0) x = _mm512_add_ps(x, mask_bias(mrow, j));
      _mm512_storeu_ps(sr + j, x);
      mx = _mm512_max_ps(mx, x);
    }
    float m = _mm512_reduce_max_ps(mx);
    if (m == -INFINITY) m = 0.f;  // nothing visible: every exp is then exactly 0
    const __m512 mv = _mm512_set1_ps(m);
    __m512 sum = _mm512_setzero_ps();
    for (int64_t j = 0; j < keys; j += L) {
      const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(sr + j), mv));
      _mm512_storeu_ps(sr + j, e);
      sum = _mm512_add_ps(sum, e);
    }
    const float z = _mm512_reduce_add_ps(sum);
    return z > 0.f ? 1.f / z : 1.f;
  }

  // Every query row of head (bi, hi).
  AVX512 void head(int64_t bi, int64_t hi) const {
    const int64_t kvh = hi / (h / hk);
    const int64_t tp = (t + L - 1) / L * L;  // keys padded to whole vectors (zeros, never visible)
    thread_local std::vector<float> kT, scores, qs;
    kT.resize(d * tp);
    scores.resize(R * tp);
    qs.resize(R * d);
    const float* kh = k + (bi * hk + kvh) * t * d;
    // K^T by gathers: element e of 16 consecutive keys per instruction (past t: zeros)
    const __m512i rows = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                            _mm512_set1_epi32(static_cast<int>(d)));
    for (int64_t j = 0; j < t; j += L) {
      const __mmask16 in = lanes_below(t - j);
      for (int64_t e = 0; e < d; ++e)
        _mm512_storeu_ps(kT.data() + e * tp + j,
                         _mm512_mask_i32gather_ps(_mm512_setzero_ps(), in, rows, kh + j * d + e, 4));
    }
    const float* vh = v + (bi * hk + kvh) * t * dv;
    const float* qh = q + (bi * h + hi) * s * d;
    float* oh = out + (bi * h + hi) * s * dv;
    for (int64_t i0 = 0; i0 < s; i0 += R) {
      const int rows = static_cast<int>(std::min<int64_t>(R, s - i0));
      for (int r = 0; r < R; ++r) {  // rows past s repeat the last one (never stored)
        const float* qr = qh + std::min<int64_t>(i0 + r, s - 1) * d;
        for (int64_t e = 0; e < d; e += L) {
          const __mmask16 in = lanes_below(d - e);
          _mm512_mask_storeu_ps(qs.data() + r * d + e, in,
                                _mm512_mul_ps(_mm512_maskz_loadu_ps(in, qr + e), _mm512_set1_ps(scale)));
        }
      }
      const int64_t keys = visible(i0 + rows - 1);  // the tile's last row sees the most keys
      const int64_t keys16 = (keys + L - 1) / L * L;
      for (int64_t j0 = 0; j0 < keys16; j0 += KV * L) {
        switch (std::min<int64_t>(KV, (keys16 - j0) / L)) {
          case 1: score_tile<1>(qs.data(), kT.data(), tp, j0, scores.data()); break;
          case 2: score_tile<2>(qs.data(), kT.data(), tp, j0, scores.data()); break;
          case 3: score_tile<3>(qs.data(), kT.data(), tp, j0, scores.data()); break;
          default: score_tile<4>(qs.data(), kT.data(), tp, j0, scores.data()); break;
        }
      }
      float inv[R];
      for (int r = 0; r < R; ++r) {
        const int64_t i = std::min<int64_t>(i0 + r, s - 1);
        inv[r] = softmax_row(scores.data() + r * tp, keys16, visible(i), bi, hi, i);
      }
      for (int64_t c0 = 0; c0 < dv; c0 += KV * L) {
        switch (std::min<int64_t>(KV, (dv - c0 + L - 1) / L)) {
          case 1: pv_tile<1>(scores.data(), tp, keys, vh, c0, inv, oh + i0 * dv, rows); break;
          case 2: pv_tile<2>(scores.data(), tp, keys, vh, c0, inv, oh + i0 * dv, rows); break;
          case 3: pv_tile<3>(scores.data(), tp, keys, vh, c0, inv, oh + i0 * dv, rows); break;
          default: pv_tile<4>(scores.data(), tp, keys, vh, c0, inv, oh + i0 * dv, rows); break;
        }
      }
    }
  }
};

}  // namespace

extern "C" {

__attribute__((visibility("default"))) int llmc_attention_f32(
    const float* q, const float* k, const float* v, float* out, const void* mask, int mask_kind,
    const int64_t* mask_strides, int64_t b, int64_t h, int64_t hk, int64_t s, int64_t t, int64_t d, int64_t dv,
    float scale, int causal, int threads) {
  if (!(__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl"))) return -1;
  if (b <= 0 || h <= 0 || s <= 0 || dv <= 0) return 0;
  if (hk <= 0 || h % hk != 0 || t < 0 || d < 0 || mask_kind < 0 || mask_kind > 2) return -2;
  Attention a{q, k, v, out, mask, mask_kind, {0, 0, 0, 0}, b, h, hk, s, t, d, dv, scale, causal != 0};
  if (mask_kind != 0)
    for (int x = 0; x < 4; ++x) a.ms[x] = mask_strides[x];
  // a head is worth a worker's wake-up (tens of us) from ~1 MFLOP on
  const int64_t useful = std::max<int64_t>(1, b * h * s * t * (d + dv) / (1 << 19));
  llmc::run_in_turn(static_cast<int>(std::min<int64_t>(threads, useful)), b * h,
                    [&](int64_t c) { a.head(c / h, c % h); });
  return 0;
}

}  // extern "C"
