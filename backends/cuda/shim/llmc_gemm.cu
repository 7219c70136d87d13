// llmc CUDA shim: GEMMs offloaded to cuBLASLt (dlopen'ed at first use).
//
// Entry points (TVM-FFI; tensors first: inputs, then outputs, then scalars):
//   llmc_gemm(A, B, C)                         C[M,N]  = A[M,K] @ B[K,N]
//   llmc_gemm_nt(A, W, C)                      C[M,N]  = A[M,K] @ W[N,K]^T   (nn.Linear weight)
//   llmc_gemm_ex(A, B, bias, residual, C, trans_b, act)
//        C = act(A @ op(B) + bias) + residual ; bias [N] or None, residual [M,N] or None,
//        trans_b 0: B is [K,N], 1: B is [N,K]; act 0 none, 1 GELU (cuBLASLt's), 2 ReLU
//        (act together with residual is rejected: cuBLASLt would apply act after the add).
//   llmc_shim_init(device_id)                  loads cuBLASLt, makes the handle and workspace
//   llmc_shim_info()                           -> str (library path and version)
// A and C may have any number of leading dims (flattened into M; rows may be strided as long as
// the leading dims collapse into one row stride); the last dim must be contiguous. A, B, C,
// bias and residual share one dtype: float16 or bfloat16 (float32 also accepted: TF32 is not
// used, plain fp32 compute). Accumulation is fp32. Work goes to TVMFFIEnvGetStream(cuda, dev).
#include <dlfcn.h>

#include <algorithm>
#include <array>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "cublaslt_decl.h"
#include "llmc_lt.h"
#include "llmc_shim_common.h"

namespace llmc_shim {
namespace {

constexpr size_t kWorkspaceBytes = size_t(32) << 20;  // cuBLAS' advice for Hopper
constexpr int kMaxDevices = 64;

struct LtApi {
  void* lib = nullptr;
  std::string path;
  std::string error;
  llmc_lt::CreateFn Create = nullptr;
  llmc_lt::GetVersionFn GetVersion = nullptr;
  llmc_lt::GetStatusStringFn GetStatusString = nullptr;
  llmc_lt::MatmulDescCreateFn MatmulDescCreate = nullptr;
  llmc_lt::MatmulDescDestroyFn MatmulDescDestroy = nullptr;
  llmc_lt::MatmulDescSetAttributeFn MatmulDescSetAttribute = nullptr;
  llmc_lt::MatrixLayoutCreateFn MatrixLayoutCreate = nullptr;
  llmc_lt::MatrixLayoutDestroyFn MatrixLayoutDestroy = nullptr;
  llmc_lt::PreferenceCreateFn PreferenceCreate = nullptr;
  llmc_lt::PreferenceDestroyFn PreferenceDestroy = nullptr;
  llmc_lt::PreferenceSetAttributeFn PreferenceSetAttribute = nullptr;
  llmc_lt::AlgoGetHeuristicFn AlgoGetHeuristic = nullptr;
  llmc_lt::MatmulFn Matmul = nullptr;
};

std::mutex g_mu;  // guards everything below (calls are host-side and short)
LtApi g_lt;
bool g_lt_tried = false;

template <typename F>
bool load_sym(void* lib, const char* name, F* out) {
  *out = reinterpret_cast<F>(dlsym(lib, name));
  return *out != nullptr;
}

// Loads libcublasLt on first use. LLMC_CUBLASLT (a path) wins; then the sonames for CUDA 13,
// 12 and the unversioned name. A copy already loaded in the process (e.g. by torch, or
// preloaded by backends/cuda/build_shim.py:preload_cublaslt) is found by its soname.
const LtApi& lt_api_locked() {
  if (g_lt_tried) {
    if (g_lt.lib == nullptr) TVM_FFI_THROW(RuntimeError) << "llmc shim: cuBLASLt is not available: " << g_lt.error;
    return g_lt;
  }
  g_lt_tried = true;
  std::vector<std::string> names;
  if (const char* env = std::getenv("LLMC_CUBLASLT")) names.push_back(env);
  names.insert(names.end(), {"libcublasLt.so.13", "libcublasLt.so.12", "libcublasLt.so"});
  std::string errors;
  for (const auto& n : names) {
    void* h = dlopen(n.c_str(), RTLD_NOW | RTLD_GLOBAL);
    if (h != nullptr) {
      g_lt.lib = h;
      g_lt.path = n;
      break;
    }
    const char* e = dlerror();
    errors += "\n  " + n + ": " + (e ? e : "?");
  }
  if (g_lt.lib == nullptr) {
    g_lt.error = "dlopen failed (set LLMC_CUBLASLT=/path/to/libcublasLt.so.13):" + errors;
    TVM_FFI_THROW(RuntimeError) << "llmc shim: cuBLASLt is not available: " << g_lt.error;
  }
  bool ok = load_sym(g_lt.lib, "cublasLtCreate", &g_lt.Create) &&
            load_sym(g_lt.lib, "cublasLtGetVersion", &g_lt.GetVersion) &&
            load_sym(g_lt.lib, "cublasLtGetStatusString", &g_lt.GetStatusString) &&
            load_sym(g_lt.lib, "cublasLtMatmulDescCreate", &g_lt.MatmulDescCreate) &&
            load_sym(g_lt.lib, "cublasLtMatmulDescDestroy", &g_lt.MatmulDescDestroy) &&
            load_sym(g_lt.lib, "cublasLtMatmulDescSetAttribute", &g_lt.MatmulDescSetAttribute) &&
            load_sym(g_lt.lib, "cublasLtMatrixLayoutCreate", &g_lt.MatrixLayoutCreate) &&
            load_sym(g_lt.lib, "cublasLtMatrixLayoutDestroy", &g_lt.MatrixLayoutDestroy) &&
            load_sym(g_lt.lib, "cublasLtMatmulPreferenceCreate", &g_lt.PreferenceCreate) &&
            load_sym(g_lt.lib, "cublasLtMatmulPreferenceDestroy", &g_lt.PreferenceDestroy) &&
            load_sym(g_lt.lib, "cublasLtMatmulPreferenceSetAttribute", &g_lt.PreferenceSetAttribute) &&
            load_sym(g_lt.lib, "cublasLtMatmulAlgoGetHeuristic", &g_lt.AlgoGetHeuristic) &&
            load_sym(g_lt.lib, "cublasLtMatmul", &g_lt.Matmul);
  if (!ok) {
    g_lt.error = "a cublasLt symbol is missing in " + g_lt.path;
    g_lt.lib = nullptr;
    TVM_FFI_THROW(RuntimeError) << "llmc shim: " << g_lt.error;
  }
  return g_lt;
}

#define LLMC_LT_CHECK(api, expr)                                                                  \
  do {                                                                                            \
    llmc_cublasStatus_t st__ = (expr);                                                            \
    if (st__ != llmc_lt::kStatusSuccess) {                                                        \
      TVM_FFI_THROW(RuntimeError) << "llmc shim: " #expr " failed: status " << st__ << " ("       \
                                  << (api).GetStatusString(st__) << ")";                          \
    }                                                                                             \
  } while (0)

struct DeviceState {
  llmc_cublasLtHandle_t handle = nullptr;
  void* workspace = nullptr;
};
std::array<DeviceState, kMaxDevices> g_dev;

DeviceState& device_state_locked(int dev) {
  LLMC_CHECK(dev >= 0 && dev < kMaxDevices) << "device id " << dev;
  const LtApi& api = lt_api_locked();
  DeviceState& s = g_dev[dev];
  if (s.handle == nullptr) {
    DeviceGuard guard(dev);
    LLMC_LT_CHECK(api, api.Create(&s.handle));
    LLMC_CUDA_CHECK(cudaMalloc(&s.workspace, kWorkspaceBytes));
  }
  return s;
}

// One planned matmul: descriptors and the algorithm the heuristic chose, reused for every
// call of the same problem (M is part of the key, so a dynamic M costs one plan per value).
struct PlanKey {
  int dev, dtype, trans_b, epilogue, has_residual;
  int64_t m, n, k, lda, ldb, ldc, ldr;
  uint32_t align_a, align_b, align_c, align_d, align_bias;
  bool operator==(const PlanKey& o) const { return std::memcmp(this, &o, sizeof(PlanKey)) == 0; }
};
struct PlanKeyHash {  // FNV-1a over the key's bytes (keys are memset before filling: no padding garbage)
  template <typename Key>
  size_t operator()(const Key& k) const {
    const unsigned char* p = reinterpret_cast<const unsigned char*>(&k);
    size_t h = 1469598103934665603ull;
    for (size_t i = 0; i < sizeof(Key); ++i) h = (h ^ p[i]) * 1099511628211ull;
    return h;
  }
};
struct Plan {
  llmc_cublasLtMatmulDesc_t desc = nullptr;
  llmc_cublasLtMatrixLayout_t la = nullptr, lb = nullptr, lc = nullptr, ld = nullptr;
  llmc_cublasLtMatmulAlgo_t algo;
};
std::unordered_map<PlanKey, Plan, PlanKeyHash> g_plans;

uint32_t alignment_of(const void* p) {
  uintptr_t a = reinterpret_cast<uintptr_t>(p);
  uint32_t al = 256;
  while (al > 1 && (a % al) != 0) al >>= 1;
  return al;
}

cudaDataType_t cuda_dtype(DT d) {
  switch (d) {
    case DT::kF16: return CUDA_R_16F;
    case DT::kBF16: return CUDA_R_16BF;
    default: return CUDA_R_32F;
  }
}

// A 2-D row-major view of a tensor with >= 2 dims: rows = prod(leading dims), cols = last.
// The heuristic's first algorithm for plan p's descriptors, under the workspace and the
// operands' alignments (A, B, C, D in cuBLASLt's naming) into p.algo; false (the status in *st)
// when it offers none.
bool choose_algo(const LtApi& api, DeviceState& ds, Plan& p, const std::array<uint32_t, 4>& al,
                 llmc_cublasStatus_t* st) {
  llmc_cublasLtMatmulPreference_t pref = nullptr;
  LLMC_LT_CHECK(api, api.PreferenceCreate(&pref));
  uint64_t ws = kWorkspaceBytes;
  LLMC_LT_CHECK(api, api.PreferenceSetAttribute(pref, llmc_lt::kPrefMaxWorkspaceBytes, &ws, sizeof(ws)));
  const int al_attr[4] = {llmc_lt::kPrefMinAlignA, llmc_lt::kPrefMinAlignB, llmc_lt::kPrefMinAlignC,
                          llmc_lt::kPrefMinAlignD};
  for (int i = 0; i < 4; ++i)
    LLMC_LT_CHECK(api, api.PreferenceSetAttribute(pref, al_attr[i], &al[i], sizeof(uint32_t)));
  llmc_cublasLtMatmulHeuristicResult_t res[1];
  std::memset(res, 0, sizeof(res));
  int found = 0;
  *st = api.AlgoGetHeuristic(ds.handle, p.desc, p.la, p.lb, p.lc, p.ld, pref, 1, res, &found);
  api.PreferenceDestroy(pref);
  if (*st != llmc_lt::kStatusSuccess || found == 0) return false;
  p.algo = res[0].algo;
  return true;
}

void gemm_impl(DLTensor* A, DLTensor* B, DLTensor* bias, DLTensor* R, DLTensor* C, int64_t trans_b,
               int64_t act) {
  check_cuda_tensor(A, "A");
  check_cuda_tensor(B, "B");
  check_cuda_tensor(C, "C");
  const DT dt = dtype_of(A);
  LLMC_CHECK(dt == DT::kF16 || dt == DT::kBF16 || dt == DT::kF32) << "A dtype must be float16/bfloat16/float32";
  LLMC_CHECK(dtype_of(B) == dt && dtype_of(C) == dt) << "A, B and C must share one dtype";
  LLMC_CHECK(B->ndim == 2) << "B must be 2-D, got " << shape_str(B);
  LLMC_CHECK(trans_b == 0 || trans_b == 1) << "trans_b must be 0 or 1";
  LLMC_CHECK(act >= 0 && act <= 2) << "act must be 0 (none), 1 (gelu) or 2 (relu)";
  LLMC_CHECK(!(act != 0 && R != nullptr)) << "an activation together with a residual is not supported";
  const int dev = A->device.device_id;
  LLMC_CHECK(B->device.device_id == dev && C->device.device_id == dev) << "tensors on different devices";

  Mat2D a = as_matrix(A, "A"), c = as_matrix(C, "C");
  Mat2D b = as_matrix(B, "B");
  const int64_t M = a.rows, K = a.cols;
  const int64_t N = trans_b ? b.rows : b.cols;
  const int64_t Kb = trans_b ? b.cols : b.rows;
  LLMC_CHECK(Kb == K) << "inner dims differ: A " << shape_str(A) << ", B " << shape_str(B)
                      << (trans_b ? " (transposed)" : "");
  LLMC_CHECK(c.rows == M && c.cols == N) << "C " << shape_str(C) << " must be [" << M << ", " << N << "]";
  Mat2D r{nullptr, 0, 0, 0};
  if (R != nullptr) {
    check_cuda_tensor(R, "residual");
    LLMC_CHECK(dtype_of(R) == dt) << "residual dtype differs";
    r = as_matrix(R, "residual");
    LLMC_CHECK(r.rows == M && r.cols == N) << "residual " << shape_str(R) << " must be [" << M << ", " << N << "]";
  }
  const char* bias_ptr = nullptr;
  if (bias != nullptr) {
    check_cuda_tensor(bias, "bias");
    LLMC_CHECK(dtype_of(bias) == dt) << "bias dtype differs";
    LLMC_CHECK(bias->ndim == 1 && bias->shape[0] == N) << "bias must be [" << N << "], got " << shape_str(bias);
    LLMC_CHECK(bias->ndim == 1 && stride_of(bias, 0) == 1) << "bias must be contiguous";
    bias_ptr = data_of(bias);
  }
  if (M == 0 || N == 0) return;
  if (trans_b && act == 0 && dt != DT::kF32) {  // decode-sized: the weight-streaming GEMV (llmc_gemv.cu)
    GemvArgs g{cuda_dtype(dt), a.ptr, a.ld, nullptr, 0.f, b.ptr, b.ld, bias_ptr, R ? r.ptr : nullptr, r.ld,
               c.ptr, c.ld, M, N, K, false, 1};
    DeviceGuard guard(dev);
    if (gemv_nt(dev, current_stream(dev), g)) return;
  }

  uint32_t epi = llmc_lt::kEpiDefault;
  if (bias_ptr) epi = act == 1 ? llmc_lt::kEpiGeluBias : act == 2 ? llmc_lt::kEpiReluBias : llmc_lt::kEpiBias;
  else epi = act == 1 ? llmc_lt::kEpiGelu : act == 2 ? llmc_lt::kEpiRelu : llmc_lt::kEpiDefault;

  // Row-major C = A op(B)  <=>  column-major C^T = op(B)^T A^T.
  // cuBLASLt "A" := the B buffer, "B" := the A buffer, D := C (N x M, ld = c.ld).
  const void* c_in = R ? static_cast<const void*>(r.ptr) : static_cast<const void*>(c.ptr);
  PlanKey key;
  std::memset(&key, 0, sizeof(key));
  key.dev = dev;
  key.dtype = int(dt);
  key.trans_b = int(trans_b);
  key.epilogue = int(epi);
  key.has_residual = R != nullptr;
  key.m = M; key.n = N; key.k = K;
  key.lda = a.ld; key.ldb = b.ld; key.ldc = c.ld; key.ldr = R ? r.ld : c.ld;
  key.align_a = alignment_of(b.ptr);  // cuBLASLt's A is our B
  key.align_b = alignment_of(a.ptr);
  key.align_c = alignment_of(c_in);
  key.align_d = alignment_of(c.ptr);
  key.align_bias = bias_ptr ? alignment_of(bias_ptr) : 0;

  DeviceGuard guard(dev);
  cudaStream_t stream = current_stream(dev);
  std::lock_guard<std::mutex> lock(g_mu);
  const LtApi& api = lt_api_locked();
  DeviceState& ds = device_state_locked(dev);
  const cudaDataType_t cdt = cuda_dtype(dt);
  auto it = g_plans.find(key);
  if (it == g_plans.end()) {
    Plan p;
    LLMC_LT_CHECK(api, api.MatmulDescCreate(&p.desc, llmc_lt::kCompute32F, CUDA_R_32F));
    int32_t ta = trans_b ? llmc_lt::kOpT : llmc_lt::kOpN, tb = llmc_lt::kOpN;
    LLMC_LT_CHECK(api, api.MatmulDescSetAttribute(p.desc, llmc_lt::kDescTransA, &ta, sizeof(ta)));
    LLMC_LT_CHECK(api, api.MatmulDescSetAttribute(p.desc, llmc_lt::kDescTransB, &tb, sizeof(tb)));
    LLMC_LT_CHECK(api, api.MatmulDescSetAttribute(p.desc, llmc_lt::kDescEpilogue, &epi, sizeof(epi)));
    if (bias_ptr) {
      int32_t bdt = cdt;
      LLMC_LT_CHECK(api, api.MatmulDescSetAttribute(p.desc, llmc_lt::kDescBiasDataType, &bdt, sizeof(bdt)));
      LLMC_LT_CHECK(api, api.MatmulDescSetAttribute(p.desc, llmc_lt::kDescBiasPointer, &bias_ptr, sizeof(bias_ptr)));
    }
    // stored (column-major) shapes: B buffer is N x K (trans_b: K x N stored), A buffer is K x M
    if (trans_b) LLMC_LT_CHECK(api, api.MatrixLayoutCreate(&p.la, cdt, K, N, b.ld));
    else LLMC_LT_CHECK(api, api.MatrixLayoutCreate(&p.la, cdt, N, K, b.ld));
    LLMC_LT_CHECK(api, api.MatrixLayoutCreate(&p.lb, cdt, K, M, a.ld));
    LLMC_LT_CHECK(api, api.MatrixLayoutCreate(&p.lc, cdt, N, M, key.ldr));
    LLMC_LT_CHECK(api, api.MatrixLayoutCreate(&p.ld, cdt, N, M, c.ld));
    llmc_cublasStatus_t st = llmc_lt::kStatusSuccess;
    if (!choose_algo(api, ds, p, {key.align_a, key.align_b, key.align_c, key.align_d}, &st)) {
      api.MatmulDescDestroy(p.desc);
      api.MatrixLayoutDestroy(p.la); api.MatrixLayoutDestroy(p.lb);
      api.MatrixLayoutDestroy(p.lc); api.MatrixLayoutDestroy(p.ld);
      TVM_FFI_THROW(RuntimeError) << "llmc shim: cuBLASLt found no algorithm for M=" << M << " N=" << N << " K=" << K
                                  << " dtype=" << dtype_name(dt) << " trans_b=" << trans_b << " epilogue=" << epi
                                  << " (status " << st << ": " << api.GetStatusString(st) << ")";
    }
    it = g_plans.emplace(key, p).first;
  }
  Plan& p = it->second;
  if (bias_ptr)  // the pointer may change between calls with the same plan (same alignment)
    LLMC_LT_CHECK(api, api.MatmulDescSetAttribute(p.desc, llmc_lt::kDescBiasPointer, &bias_ptr, sizeof(bias_ptr)));
  const float alpha = 1.0f, beta = R ? 1.0f : 0.0f;
  LLMC_LT_CHECK(api, api.Matmul(ds.handle, p.desc, &alpha, b.ptr, p.la, a.ptr, p.lb, &beta, c_in, p.lc, c.ptr, p.ld,
                                &p.algo, ds.workspace, kWorkspaceBytes, stream));
}

// ---- the internal NT matmul of the quantized routes (llmc_lt.h) ------------------------------
struct NTKey {
  int dev, a_type, w_type, d_type, scaled;
  int64_t m, n, k, lda, ldw, ldd;
  uint32_t align_a, align_w, align_d;
  bool operator==(const NTKey& o) const { return std::memcmp(this, &o, sizeof(NTKey)) == 0; }
};
struct NTPlan {
  bool found = false;  // cuBLASLt had an algorithm (remembered either way: no repeated queries)
  Plan p;
};
std::unordered_map<NTKey, NTPlan, PlanKeyHash> g_nt_plans;

}  // namespace

bool lt_matmul_nt(int dev, cudaStream_t stream, const LtNT& q) {
  const bool integer = q.a_type == CUDA_R_8I;
  const bool scaled = q.a_scale != nullptr || q.w_scale != nullptr;
  LLMC_CHECK(q.a_type == q.w_type) << "lt_matmul_nt: A and W types differ";
  LLMC_CHECK(!(integer && scaled)) << "lt_matmul_nt: int8 takes no outer-vector scales";
  LLMC_CHECK(!scaled || (q.a_scale != nullptr && q.w_scale != nullptr)) << "lt_matmul_nt: both scales or none";
  if (q.m == 0 || q.n == 0) return true;
  NTKey key;
  std::memset(&key, 0, sizeof(key));
  key.dev = dev;
  key.a_type = int(q.a_type); key.w_type = int(q.w_type); key.d_type = int(q.d_type);
  key.scaled = scaled;
  key.m = q.m; key.n = q.n; key.k = q.k; key.lda = q.lda; key.ldw = q.ldw; key.ldd = q.ldd;
  key.align_a = alignment_of(q.a); key.align_w = alignment_of(q.w);
  key.align_d = std::min(alignment_of(q.d), q.c ? alignment_of(q.c) : 256u);

  std::lock_guard<std::mutex> lock(g_mu);
  const LtApi& api = lt_api_locked();
  DeviceState& ds = device_state_locked(dev);
  auto it = g_nt_plans.find(key);
  if (it == g_nt_plans.end()) {
    NTPlan np;
    Plan& p = np.p;
    const cudaDataType_t scale_t = integer ? CUDA_R_32I : CUDA_R_32F;
    LLMC_LT_CHECK(api, api.MatmulDescCreate(&p.desc, integer ? llmc_lt::kCompute32I : llmc_lt::kCompute32F, scale_t));
    int32_t ta = llmc_lt::kOpT, tb = llmc_lt::kOpN;  // cuBLASLt's A := W (K x N stored), B := A (K x M stored)
    LLMC_LT_CHECK(api, api.MatmulDescSetAttribute(p.desc, llmc_lt::kDescTransA, &ta, sizeof(ta)));
    LLMC_LT_CHECK(api, api.MatmulDescSetAttribute(p.desc, llmc_lt::kDescTransB, &tb, sizeof(tb)));
    if (scaled) {
      const int32_t mode = llmc_lt::kScaleOuterVec32F;
      LLMC_LT_CHECK(api, api.MatmulDescSetAttribute(p.desc, llmc_lt::kDescAScaleMode, &mode, sizeof(mode)));
      LLMC_LT_CHECK(api, api.MatmulDescSetAttribute(p.desc, llmc_lt::kDescBScaleMode, &mode, sizeof(mode)));
      LLMC_LT_CHECK(api, api.MatmulDescSetAttribute(p.desc, llmc_lt::kDescAScalePointer, &q.w_scale, sizeof(void*)));
      LLMC_LT_CHECK(api, api.MatmulDescSetAttribute(p.desc, llmc_lt::kDescBScalePointer, &q.a_scale, sizeof(void*)));
    }
    LLMC_LT_CHECK(api, api.MatrixLayoutCreate(&p.la, q.w_type, q.k, q.n, q.ldw));
    LLMC_LT_CHECK(api, api.MatrixLayoutCreate(&p.lb, q.a_type, q.k, q.m, q.lda));
    LLMC_LT_CHECK(api, api.MatrixLayoutCreate(&p.lc, q.d_type, q.n, q.m, q.ldd));
    LLMC_LT_CHECK(api, api.MatrixLayoutCreate(&p.ld, q.d_type, q.n, q.m, q.ldd));
    llmc_cublasStatus_t st = llmc_lt::kStatusSuccess;
    np.found = choose_algo(api, ds, p, {key.align_w, key.align_a, key.align_d, key.align_d}, &st);
    it = g_nt_plans.emplace(key, np).first;
  }
  Plan& p = it->second.p;
  if (!it->second.found) return false;
  if (scaled) {  // the pointers may differ between calls of one plan
    LLMC_LT_CHECK(api, api.MatmulDescSetAttribute(p.desc, llmc_lt::kDescAScalePointer, &q.w_scale, sizeof(void*)));
    LLMC_LT_CHECK(api, api.MatmulDescSetAttribute(p.desc, llmc_lt::kDescBScalePointer, &q.a_scale, sizeof(void*)));
  }
  DeviceGuard guard(dev);
  const float alpha_f = 1.0f, beta_f = q.c ? 1.0f : 0.0f;
  const int32_t alpha_i = 1, beta_i = q.c ? 1 : 0;
  const void* alpha = integer ? static_cast<const void*>(&alpha_i) : static_cast<const void*>(&alpha_f);
  const void* beta = integer ? static_cast<const void*>(&beta_i) : static_cast<const void*>(&beta_f);
  const llmc_cublasStatus_t st = api.Matmul(ds.handle, p.desc, alpha, q.w, p.la, q.a, p.lb, beta, q.c ? q.c : q.d,
                                            p.lc, q.d, p.ld,
                                            &p.algo, ds.workspace, kWorkspaceBytes, stream);
  if (st == llmc_lt::kStatusNotSupported && scaled) {  // an algorithm the heuristic offered but Matmul refuses
    it->second.found = false;
    return false;
  }
  LLMC_LT_CHECK(api, st);
  return true;
}

namespace {

}  // namespace

void gemm_dense(DLTensor* A, DLTensor* B, DLTensor* bias, DLTensor* R, DLTensor* C, int64_t trans_b) {
  gemm_impl(A, B, bias, R, C, trans_b, 0);
}

namespace {

void Gemm(DLTensor* A, DLTensor* B, DLTensor* C) { gemm_impl(A, B, nullptr, nullptr, C, 0, 0); }
void GemmNT(DLTensor* A, DLTensor* W, DLTensor* C) { gemm_impl(A, W, nullptr, nullptr, C, 1, 0); }
void GemmEx(DLTensor* A, DLTensor* B, tvm::ffi::AnyView bias, tvm::ffi::AnyView residual, DLTensor* C,
            int64_t trans_b, int64_t act) {
  gemm_impl(A, B, optional_tensor(bias), optional_tensor(residual), C, trans_b, act);
}

void ShimInit(int64_t device_id) {
  std::lock_guard<std::mutex> lock(g_mu);
  device_state_locked(int(device_id));
}

tvm::ffi::String ShimInfo() {
  std::lock_guard<std::mutex> lock(g_mu);
  std::ostringstream os;
  os << "llmc_shim; cublasLt: ";
  try {
    const LtApi& api = lt_api_locked();
    os << api.path << " version " << api.GetVersion();
  } catch (const std::exception& e) {
    os << "unavailable (" << g_lt.error << ")";
  }
  return tvm::ffi::String(os.str());
}

}  // namespace
}  // namespace llmc_shim

TVM_FFI_DLL_EXPORT_TYPED_FUNC(llmc_gemm, llmc_shim::Gemm);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(llmc_gemm_nt, llmc_shim::GemmNT);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(llmc_gemm_ex, llmc_shim::GemmEx);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(llmc_shim_init, llmc_shim::ShimInit);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(llmc_shim_info, llmc_shim::ShimInfo);
