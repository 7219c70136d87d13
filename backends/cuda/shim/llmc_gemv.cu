// llmc CUDA shim: decode-sized matmuls with their neighbours fused in.
//
//   llmc_gemm_fused(x [M, K], norm_w [K] or None, W [N, K], bias [N] or None, residual or None,
//                   y [M, N_out], glu: int, eps: float)
//     a = x / sqrt(mean(x^2) + eps) * norm_w     (RMSNorm over K, where norm_w is given; else a = x)
//     h = a @ W^T + bias                          [M, N]
//     y = glu ? silu(h[:, :N/2]) * h[:, N/2:] : h  (+ residual [M, N_out])
//   float16 or bfloat16 alike; arithmetic in float32. x, y, residual may have strided rows.
//
// Why: a decode step of a Llama-shaped model is ~150 launches, and at one token the small ones
// (the norm before the QKV and gate/up projections, the SwiGLU after gate/up) cost as much as
// their neighbours' weight reads. With 1-2 rows (GemvArgs::max_rows, the measured break-even; the
// kernel has row templates up to kMaxRows), the norm and the SwiGLU are done inside a
// weight-streaming GEMV (below); with more rows (batches, prefill), the same call runs the norm
// kernel, cuBLASLt and an elementwise SwiGLU pass through scratch memory, so the route is right
// for any step. llmc_gemm_ex (llmc_gemm.cu) sends its own one-row W^T calls to the GEMV too. On
// Hopper the GEMV is a programmatic dependent launch (llmc_stream_kernels.h).
//
// The GEMV: a warp per output channel (two weight rows with glu: gate row n and up row n + N/2),
// each lane with kLoads 16-byte weight loads in flight before any math, read past L1
// (ld.global.nc.L1::no_allocate) so x stays there for the block's other warps. The first batch of
// loads is issued before the norm's block reduction, which then hides under it: with the norm,
// each block sums x^2 over its rows (a few KB from L2) and scales the products once at the end
// (the norm's 1/rms is per row, so it factors out of the dot product); the norm weight multiplies
// x as it is read. Runs on TVM-FFI's current stream (graph-capturable).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "llmc_lt.h"
#include "llmc_shim_common.h"
#include "llmc_stream_kernels.h"

namespace llmc_shim {
namespace {

constexpr int kWarps = 4;
constexpr int kLoads = 8;  // 16-byte weight loads in flight per lane
constexpr int kMaxRows = 8;  // the kernel's row templates (1, 2, 4, 8); GemvArgs::max_rows picks the routes' limit
// Above max_rows and up to this many rows, a call runs the tensor-core GEMV (one launch for the norm
// where its blocks are few, the GEMM and the SwiGLU / bias / residual) in place of the norm kernel,
// cuBLASLt and an epilogue pass. H200, 16 rows (bench_gemv_gpu.py --fused, against the previous
// routes in the same call): norm + QKV 8.5 against 10.0 us, O + residual 4.6 against 6.4, norm +
// gate/up + SwiGLU 28.2 against 29.4 (the norm kernel first then; inside, 26.8), down + residual 15.1
// against 14.8 (kept there too: one launch chain with its neighbours); the decode step's matmuls 1.047
// against 1.103 ms.
constexpr int64_t kTcRows = 16;
// Except a matrix without the SwiGLU wider than this (a vocabulary's LM head): cuBLASLt reads the
// 128256 x 2048 head at 16 rows in 134.7 us (91% of the copy bandwidth), the tensor-core GEMV in 144.5.
constexpr int64_t kTcMaxCols = 32768;
// scratch slots (llmc_lt.h scratch()): the normalized x and the GEMM's output before the SwiGLU
constexpr int kSlotNormed = 32, kSlotGlu = 33;

template <typename T> struct Half;
template <> struct Half<__nv_bfloat16> {
  // bf16 -> float is a shift: the two halves of a word become the high halves of two floats
  static __device__ __forceinline__ void to8(const uint4& u, float* f) {
    const unsigned w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      f[2 * i] = __uint_as_float(w[i] << 16);
      f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
  }
  static __device__ __forceinline__ float f(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 t(float v) { return __float2bfloat16_rn(v); }
};
template <> struct Half<__half> {
  static __device__ __forceinline__ void to8(const uint4& u, float* f) {
    const unsigned w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 p = __half22float2(*reinterpret_cast<const __half2*>(&w[i]));
      f[2 * i] = p.x;
      f[2 * i + 1] = p.y;
    }
  }
  static __device__ __forceinline__ float f(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half t(float v) { return __float2half_rn(v); }
};

template <typename T>
struct GemvParams {
  const T* x; int64_t ldx;
  const T* g;  // the norm weight or null
  float eps;
  const T* w; int64_t ldw;
  const T* bias;
  const T* res; int64_t ldr;
  T* y; int64_t ldy;
  int rows, n_out, k;
};

// KS warps share an output channel, each taking a slice of K (KS = 1: a warp per channel). A warp
// streams its slice in steps of kLoads loads a lane, each a round trip to memory, so a long row
// (the down projection's K = 8192: 4 steps) is split until a warp's slice is one step. Measured on
// the H200 at one row (bench_gemv_gpu.py --fused, two A/B rounds): down + residual 8192 x 2048
// 15.1-16.6 -> 11.5-11.6 us (52% -> 68% of the copy bandwidth), norm + gate/up + SwiGLU 2048 x
// 16384 (2 warps a channel) 20.7-21.1 -> 19.9-20.0 us.
template <typename T, int M, bool NORM, bool GLU, int KS>
__global__ void __launch_bounds__(kWarps * 32) gemv_nt_kernel(const GemvParams<T> p) {
  using H = Half<T>;
  constexpr int NR = GLU ? 2 : 1;  // weight rows per output channel
  constexpr int U = kLoads / NR;    // 16-byte chunks of each row per lane per step
  static_assert(kWarps % KS == 0, "a block holds whole channels");
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, part = warp % KS;
  const int n = blockIdx.x * (kWarps / KS) + warp / KS;
  const int nn = min(n, p.n_out - 1);  // a warp past the end computes the last channel, stores nothing
  const int all_chunks = p.k / 8;
  // this warp's chunks [c_lo, chunks): slices of whole steps where they divide evenly
  const int per = (all_chunks + KS - 1) / KS;
  const int c_lo = KS == 1 ? 0 : min(all_chunks, part * per);
  const int chunks = KS == 1 ? all_chunks : min(all_chunks, c_lo + per);
  const T* wr[NR];
  wr[0] = p.w + int64_t(nn) * p.ldw;
  if constexpr (GLU) wr[NR - 1] = p.w + int64_t(nn + p.n_out) * p.ldw;

  uint4 buf[U][NR];
  auto load = [&](int c0) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int c = c0 + lane + 32 * u;
#pragma unroll
      for (int r = 0; r < NR; ++r) buf[u][r] = c < chunks ? ld_stream(wr[r] + int64_t(c) * 8) : make_uint4(0, 0, 0, 0);
    }
  };
  load(c_lo);
  pdl_launch_dependents();
  pdl_wait();

  float scale[M];
#pragma unroll
  for (int m = 0; m < M; ++m) scale[m] = 1.f;
  if constexpr (NORM)  // every block sums x^2 of its rows while its first weights are in flight
    block_rms_scales<M, kWarps>(p.x, p.ldx, p.rows, p.k, p.eps, [](const uint4& u, float* f) { H::to8(u, f); }, scale);

  float acc[M][NR];
#pragma unroll
  for (int m = 0; m < M; ++m)
#pragma unroll
    for (int r = 0; r < NR; ++r) acc[m][r] = 0.f;
  for (int c0 = c_lo; c0 < chunks; c0 += 32 * U) {
    if (c0 > c_lo) load(c0);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int c = c0 + lane + 32 * u;
      if (c >= chunks) break;
      float wv[NR][8];
#pragma unroll
      for (int r = 0; r < NR; ++r) H::to8(buf[u][r], wv[r]);
      float gv[8];
      if constexpr (NORM) H::to8(__ldg(reinterpret_cast<const uint4*>(p.g) + c), gv);
#pragma unroll
      for (int m = 0; m < M; ++m) {
        if (m >= p.rows) break;
        float xv[8];
        H::to8(__ldg(reinterpret_cast<const uint4*>(p.x + m * p.ldx) + c), xv);
        if constexpr (NORM) {
#pragma unroll
          for (int j = 0; j < 8; ++j) xv[j] *= gv[j];
        }
#pragma unroll
        for (int r = 0; r < NR; ++r)
#pragma unroll
          for (int j = 0; j < 8; ++j) acc[m][r] = fmaf(xv[j], wv[r][j], acc[m][r]);
      }
    }
  }
  if (!sum_k_slices<KS, kWarps>(acc, warp, lane, part)) return;  // the channel's slices meet in its first warp
  if (n >= p.n_out) return;
#pragma unroll
  for (int m = 0; m < M; ++m) {
    if (m >= p.rows || lane != m) continue;  // lane m stores row m
    float h = acc[m][0] * scale[m] + (p.bias ? H::f(p.bias[n]) : 0.f);
    if constexpr (GLU) {
      const float up = acc[m][NR - 1] * scale[m] + (p.bias ? H::f(p.bias[n + p.n_out]) : 0.f);
      h = h / (1.f + __expf(-h)) * up;
    }
    if (p.res) h += H::f(p.res[m * p.ldr + n]);
    p.y[m * p.ldy + n] = H::t(h);
  }
}

template <typename T, int M, bool NORM, bool GLU, int KS>
void launch_split(const GemvParams<T>& p, int dev, cudaStream_t stream) {
  constexpr int per_block = kWarps / KS;  // channels a block computes
  launch_pdl(gemv_nt_kernel<T, M, NORM, GLU, KS>, dim3(unsigned((p.n_out + per_block - 1) / per_block)),
             dim3(kWarps * 32), dev, stream, p);
}

template <typename T, int M, bool NORM, bool GLU>
void launch_kernel(const GemvParams<T>& p, int dev, cudaStream_t stream) {
  // the warps a channel takes: as many as its row has steps of kLoads loads a lane, up to kWarps
  const int steps = (p.k / 8 + 32 * (kLoads / (GLU ? 2 : 1)) - 1) / (32 * (kLoads / (GLU ? 2 : 1)));
  if (steps >= 4) launch_split<T, M, NORM, GLU, 4>(p, dev, stream);
  else if (steps >= 2) launch_split<T, M, NORM, GLU, 2>(p, dev, stream);
  else launch_split<T, M, NORM, GLU, 1>(p, dev, stream);
}

template <typename T, int M>
void launch_m(const GemvParams<T>& p, bool norm, bool glu, int dev, cudaStream_t stream) {
  if (norm && glu) launch_kernel<T, M, true, true>(p, dev, stream);
  else if (norm) launch_kernel<T, M, true, false>(p, dev, stream);
  else if (glu) launch_kernel<T, M, false, true>(p, dev, stream);
  else launch_kernel<T, M, false, false>(p, dev, stream);
}

template <typename T>
void launch(const GemvArgs& a, int dev, cudaStream_t stream) {
  GemvParams<T> p{static_cast<const T*>(a.x), a.ldx, static_cast<const T*>(a.norm_w), a.eps,
                  static_cast<const T*>(a.w), a.ldw, static_cast<const T*>(a.bias), static_cast<const T*>(a.res),
                  a.ldr, static_cast<T*>(a.y), a.ldy, int(a.m), int(a.n_out), int(a.k)};
  const bool norm = a.norm_w != nullptr;
  if (a.m == 1) launch_m<T, 1>(p, norm, a.glu, dev, stream);
  else if (a.m == 2) launch_m<T, 2>(p, norm, a.glu, dev, stream);
  else if (a.m <= 4) launch_m<T, 4>(p, norm, a.glu, dev, stream);
  else launch_m<T, 8>(p, norm, a.glu, dev, stream);
}

// The elementwise epilogue of the prefill paths (here and llmc_qgemv.cu's): y[m, j] = silu(h[m, j]) *
// h[m, j + n] with GLU, else h[m, j], (+ res[m, j]); h compact; VEC consecutive j per thread
// (16-byte accesses where n and the row strides allow).
template <typename T, int VEC, bool GLU>
__global__ void epilogue_kernel(const T* __restrict__ h, T* __restrict__ y, int64_t ldy, const T* __restrict__ res,
                                int64_t ldr, int64_t rows, int n) {
  using H = Half<T>;
  const int per_row = n / VEC;
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= rows * per_row) return;
  const int64_t m = i / per_row;
  const int j = int(i - m * per_row) * VEC;
  T g[VEC], u[VEC], r[VEC], o[VEC];
  const T* hr = h + m * (GLU ? 2 : 1) * n;
  if constexpr (VEC == 8) {
    *reinterpret_cast<uint4*>(g) = *reinterpret_cast<const uint4*>(hr + j);
    if constexpr (GLU) *reinterpret_cast<uint4*>(u) = *reinterpret_cast<const uint4*>(hr + n + j);
    if (res) *reinterpret_cast<uint4*>(r) = *reinterpret_cast<const uint4*>(res + m * ldr + j);
  } else {
    g[0] = hr[j];
    if constexpr (GLU) u[0] = hr[n + j];
    if (res) r[0] = res[m * ldr + j];
  }
#pragma unroll
  for (int e = 0; e < VEC; ++e) {
    float v = H::f(g[e]);
    if constexpr (GLU) v = v / (1.f + __expf(-v)) * H::f(u[e]);
    if (res) v += H::f(r[e]);
    o[e] = H::t(v);
  }
  if constexpr (VEC == 8) *reinterpret_cast<uint4*>(y + m * ldy + j) = *reinterpret_cast<const uint4*>(o);
  else y[m * ldy + j] = o[0];
}

template <typename T, bool GLU>
void launch_epilogue(const void* h, void* y, int64_t ldy, const void* res, int64_t ldr, int64_t rows, int n,
                     cudaStream_t stream) {
  const bool vec = n % 8 == 0 && ldy % 8 == 0 && aligned16(y) && (!res || (ldr % 8 == 0 && aligned16(res)));
  const int64_t total = rows * (vec ? n / 8 : n);
  const unsigned blocks = unsigned((total + 255) / 256);
  const T* hp = static_cast<const T*>(h);
  T* yp = static_cast<T*>(y);
  const T* rp = static_cast<const T*>(res);
  if (vec) epilogue_kernel<T, 8, GLU><<<blocks, 256, 0, stream>>>(hp, yp, ldy, rp, ldr, rows, n);
  else epilogue_kernel<T, 1, GLU><<<blocks, 256, 0, stream>>>(hp, yp, ldy, rp, ldr, rows, n);
  LLMC_CUDA_CHECK(cudaGetLastError());
}

void GemmFused(DLTensor* X, tvm::ffi::AnyView g_any, DLTensor* W, tvm::ffi::AnyView bias_any,
               tvm::ffi::AnyView res_any, DLTensor* Y, int64_t glu, double eps) {
  DLTensor* G = optional_tensor(g_any);
  DLTensor* bias = optional_tensor(bias_any);
  DLTensor* R = optional_tensor(res_any);
  check_cuda_tensor(X, "x");
  check_cuda_tensor(W, "W");
  check_cuda_tensor(Y, "y");
  const DT dt = dtype_of(X);
  LLMC_CHECK(dt == DT::kF16 || dt == DT::kBF16) << "x dtype " << dtype_name(dt) << " (float16 or bfloat16)";
  LLMC_CHECK(glu == 0 || glu == 1) << "glu must be 0 or 1, got " << glu;
  Mat2D x = as_matrix(X, "x"), y = as_matrix(Y, "y"), w = as_matrix(W, "W");
  LLMC_CHECK(dtype_of(W) == dt && dtype_of(Y) == dt) << "x, W and y must share a dtype";
  LLMC_CHECK(W->ndim == 2 && w.cols == x.cols) << "W " << shape_str(W) << " must be [N, " << x.cols << "]";
  const int64_t M = x.rows, K = x.cols, N = w.rows, n_out = glu ? N / 2 : N;
  LLMC_CHECK(!glu || N % 2 == 0) << "glu needs an even N, W is " << shape_str(W);
  LLMC_CHECK(y.rows == M && y.cols == n_out) << "y " << shape_str(Y) << " must be [" << M << ", " << n_out << "]";
  for (auto [t, name] : {std::pair<DLTensor*, const char*>{G, "norm_w"}, {bias, "bias"}}) {
    if (t == nullptr) continue;
    check_cuda_tensor(t, name);
    const int64_t want = t == G ? K : N;
    LLMC_CHECK(dtype_of(t) == dt && t->ndim == 1 && t->shape[0] == want && compact(t))
        << name << " must be a contiguous [" << want << "] of x's dtype, got " << shape_str(t);
  }
  Mat2D r{nullptr, 0, 0, 0};
  if (R != nullptr) {
    check_cuda_tensor(R, "residual");
    r = as_matrix(R, "residual");
    LLMC_CHECK(dtype_of(R) == dt && r.rows == M && r.cols == n_out)
        << "residual " << shape_str(R) << " must be [" << M << ", " << n_out << "] of x's dtype";
  }
  if (M == 0 || n_out == 0) return;
  const int dev = X->device.device_id;
  DeviceGuard guard(dev);
  cudaStream_t stream = current_stream(dev);
  GemvArgs a{dt == DT::kF16 ? CUDA_R_16F : CUDA_R_16BF, x.ptr, x.ld, G ? data_of(G) : nullptr, float(eps),
             w.ptr, w.ld, bias ? data_of(bias) : nullptr, r.ptr, r.ld, y.ptr, y.ld, M, n_out, K, glu != 0};
  if (gemv_nt(dev, stream, a)) return;
  const void* normed = nullptr;  // x normalized into scratch, at most once
  if (G != nullptr && M <= kTcRows) {  // small batches whose norm the GEMV left out: the norm first
    GemvArgs b = a;
    b.x = normed = rms_rows_to_scratch(dev, stream, X, x.ptr, M, K, x.ld, G, float(eps), kSlotNormed);
    b.ldx = K, b.norm_w = nullptr;
    if (gemv_nt(dev, stream, b)) return;
  }

  // prefill: the norm into scratch, cuBLASLt, the SwiGLU from scratch
  int64_t shape_a[2], shape_h[2], shape_x[2], x_strides[2] = {x.ld, 1};
  DLTensor xa = matrix_view(x.ptr, X, M, K, shape_x);  // x as [M, K] with its row stride
  xa.strides = x_strides;
  if (G != nullptr && normed == nullptr) normed = rms_rows_to_scratch(dev, stream, X, x.ptr, M, K, x.ld, G, float(eps), kSlotNormed);
  DLTensor a_in = G == nullptr ? xa : matrix_view(const_cast<void*>(normed), X, M, K, shape_a);
  if (!glu) {
    gemm_dense(&a_in, W, bias, R, Y, 1);
    return;
  }
  void* hbuf = scratch(dev, stream, kSlotGlu, size_t(M) * N * 2);
  DLTensor h = matrix_view(hbuf, X, M, N, shape_h);
  gemm_dense(&a_in, W, bias, nullptr, &h, 1);
  gemm_epilogue_rows(a.dtype, hbuf, y.ptr, y.ld, r.ptr, r.ld, M, n_out, true, stream);
}

}  // namespace

void* rms_rows_to_scratch(int dev, cudaStream_t stream, const DLTensor* like, const void* x, int64_t rows, int64_t cols,
                          int64_t ld, const DLTensor* g, float eps, int slot) {
  const size_t bytes = size_t(rows) * cols * 2;
  char* buf = static_cast<char*>(scratch(dev, stream, slot, ld == cols ? bytes : 2 * bytes));
  if (ld != cols) {  // the norm kernel reads compact rows: copy them into the buffer's second half first
    copy_rows_compact(buf + bytes, x, rows, cols, ld, stream);
    x = buf + bytes;
  }
  int64_t shape_x[2], shape_y[2];
  DLTensor xt = matrix_view(const_cast<void*>(x), like, rows, cols, shape_x);
  DLTensor yt = matrix_view(buf, like, rows, cols, shape_y);
  norm_rows(&xt, g, nullptr, &yt, eps, true);
  return buf;
}

void gemm_epilogue_rows(cudaDataType_t dtype, const void* h, void* y, int64_t ldy, const void* res, int64_t ldr,
                        int64_t rows, int64_t n, bool glu, cudaStream_t stream) {
  if (rows == 0 || n == 0) return;
  if (dtype == CUDA_R_16F) {
    if (glu) launch_epilogue<__half, true>(h, y, ldy, res, ldr, rows, int(n), stream);
    else launch_epilogue<__half, false>(h, y, ldy, res, ldr, rows, int(n), stream);
  } else {
    if (glu) launch_epilogue<__nv_bfloat16, true>(h, y, ldy, res, ldr, rows, int(n), stream);
    else launch_epilogue<__nv_bfloat16, false>(h, y, ldy, res, ldr, rows, int(n), stream);
  }
}

bool gemv_nt(int dev, cudaStream_t stream, const GemvArgs& a) {
  if (a.m > std::min<int64_t>(a.max_rows, kMaxRows)) {  // 3-16 rows: tensor cores (llmc_tc_gemv.cu)
    if (a.m < 3 || a.m > kTcRows || (!a.glu && a.n_out > kTcMaxCols)) return false;
    return tc_gemv(dev, stream, a);
  }
  if (a.m < 1 || a.k % 8 != 0 || a.k == 0 || a.n_out <= 0) return false;
  if (a.dtype != CUDA_R_16F && a.dtype != CUDA_R_16BF) return false;
  // 16-byte loads of W rows, x rows and the norm weight
  if (!aligned16(a.w) || !aligned16(a.x) || (a.norm_w && !aligned16(a.norm_w)) || a.ldw % 8 != 0 || a.ldx % 8 != 0)
    return false;
  if (a.dtype == CUDA_R_16F) launch<__half>(a, dev, stream);
  else launch<__nv_bfloat16>(a, dev, stream);
  return true;
}

}  // namespace llmc_shim

TVM_FFI_DLL_EXPORT_TYPED_FUNC(llmc_gemm_fused, llmc_shim::GemmFused);
