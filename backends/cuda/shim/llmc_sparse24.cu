// llmc CUDA shim: GEMMs whose weight is 2:4 sparse along K, on the sparse tensor cores through
// cuSPARSELt (dlopen'ed at first use, like cuBLASLt).
//
//   llmc_gemm_sparse24(A [.., K], W, bias [N] or None, residual [.., N] or None, C [.., N], trans_b)
//     C = A @ op(W) + bias + residual; trans_b 1: W [N, K] (op = transpose), 0: W [K, N] (as llmc
//     stores a folded nn.Linear weight); W holds exact zeros in 2 of every 4 consecutive k of each
//     output channel (passes/sparsify.py); A, W, bias, residual, C float16 or bfloat16 alike,
//     float accumulation.
//
// The first call with a weight checks its pattern (cusparseLtSpMMAPruneCheck2: a weight that is
// not 2:4 is an error, never silently wrong) and compresses it once into a device buffer kept for
// the process (half the values plus 2-bit indices); later calls, graph replays included, read
// the compressed copy. Fewer than 1024 rows, or a count that is not a multiple of 16, run the dense
// GEMM (measured faster there), as does float16 (see GemmSparse24). That first call is eager (the runtime runs a shape once before capturing
// it), so the synchronizing compression never lands inside a CUDA graph. The dense weight stays
// allocated: its buffer is the route's input and the key of its compressed copy.
//
// Layout: row-major C = A op(W) is column-major C^T = op(W)^T op_N(A), the structured matrix being
// cuSPARSELt's A := W, as llmc_gemm.cu maps cuBLASLt: W [N, K] is a K x N column-major matrix
// taken transposed, W [K, N] an N x K one taken as is; either way 2:4 runs along K.
#include <dlfcn.h>

#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

#include "cusparselt_decl.h"
#include "llmc_lt.h"
#include "llmc_shim_common.h"

namespace llmc_shim_sparse24 {
using namespace llmc_shim;
namespace {

struct SpApi {
  void* lib = nullptr;
  std::string error;
  llmc_sp::InitFn Init = nullptr;
  llmc_sp::GetErrorStringFn GetErrorString = nullptr;
  llmc_sp::DenseDescriptorInitFn DenseDescriptorInit = nullptr;
  llmc_sp::StructuredDescriptorInitFn StructuredDescriptorInit = nullptr;
  llmc_sp::MatmulDescriptorInitFn MatmulDescriptorInit = nullptr;
  llmc_sp::MatmulDescSetAttributeFn MatmulDescSetAttribute = nullptr;
  llmc_sp::MatmulAlgSelectionInitFn MatmulAlgSelectionInit = nullptr;
  llmc_sp::MatmulPlanInitFn MatmulPlanInit = nullptr;
  llmc_sp::MatmulGetWorkspaceFn MatmulGetWorkspace = nullptr;
  llmc_sp::MatmulFn Matmul = nullptr;
  llmc_sp::MatmulSearchFn MatmulSearch = nullptr;
  llmc_sp::PruneCheck2Fn PruneCheck2 = nullptr;
  llmc_sp::CompressedSize2Fn CompressedSize2 = nullptr;
  llmc_sp::Compress2Fn Compress2 = nullptr;
};

std::mutex g_mu;
SpApi g_api;
bool g_tried = false;

template <typename F>
bool sym(void* lib, const char* name, F* out) {
  *out = reinterpret_cast<F>(dlsym(lib, name));
  return *out != nullptr;
}

// LLMC_CUSPARSELT (a path) wins; then the soname (pip's nvidia-cusparselt package is found and
// preloaded by runtime/gpu.py:preload_cuda_libraries).
const SpApi& api_locked() {
  if (!g_tried) {
    g_tried = true;
    std::vector<std::string> names;
    if (const char* env = std::getenv("LLMC_CUSPARSELT")) names.push_back(env);
    names.insert(names.end(), {"libcusparseLt.so.0", "libcusparseLt.so"});
    for (const auto& n : names) {
      void* h = dlopen(n.c_str(), RTLD_NOW | RTLD_GLOBAL);
      if (h == nullptr) {
        const char* e = dlerror();
        g_api.error += n + ": " + (e ? e : "not found") + "; ";
        continue;
      }
      SpApi a;
      a.lib = h;
      bool ok = sym(h, "cusparseLtInit", &a.Init) && sym(h, "cusparseLtGetErrorString", &a.GetErrorString) &&
                sym(h, "cusparseLtDenseDescriptorInit", &a.DenseDescriptorInit) &&
                sym(h, "cusparseLtStructuredDescriptorInit", &a.StructuredDescriptorInit) &&
                sym(h, "cusparseLtMatmulDescriptorInit", &a.MatmulDescriptorInit) &&
                sym(h, "cusparseLtMatmulDescSetAttribute", &a.MatmulDescSetAttribute) &&
                sym(h, "cusparseLtMatmulAlgSelectionInit", &a.MatmulAlgSelectionInit) &&
                sym(h, "cusparseLtMatmulPlanInit", &a.MatmulPlanInit) &&
                sym(h, "cusparseLtMatmulGetWorkspace", &a.MatmulGetWorkspace) &&
                sym(h, "cusparseLtMatmul", &a.Matmul) && sym(h, "cusparseLtMatmulSearch", &a.MatmulSearch) &&
                sym(h, "cusparseLtSpMMAPruneCheck2", &a.PruneCheck2) &&
                sym(h, "cusparseLtSpMMACompressedSize2", &a.CompressedSize2) &&
                sym(h, "cusparseLtSpMMACompress2", &a.Compress2);
      if (ok) {
        g_api = a;
        break;
      }
      g_api.error += n + ": missing symbols (cuSPARSELt older than 0.6?); ";
    }
  }
  if (g_api.lib == nullptr) TVM_FFI_THROW(RuntimeError) << "llmc shim: cuSPARSELt is not available: " << g_api.error;
  return g_api;
}

#define LLMC_SP_CHECK(api, expr)                                                                      \
  do {                                                                                                \
    llmc_cusparseStatus_t st__ = (expr);                                                              \
    if (st__ != llmc_sp::kSuccess) {                                                                  \
      TVM_FFI_THROW(RuntimeError) << "llmc shim: " #expr " failed: status " << st__ << " ("           \
                                  << (api).GetErrorString(st__) << ")";                               \
    }                                                                                                 \
  } while (0)

constexpr int kMaxDevices = 64;
// cuSPARSELt wants the dense operand's dims in multiples of 16 (16-bit types; it refused M = 1 as
// "not supported"): fewer or ragged rows take the dense cuBLASLt GEMM over the same (zero-holding)
// weight, which stays allocated anyway.
constexpr int64_t kMinRows = 16;
// Below this many rows the sparse GEMM measured slower than the dense one on an H100 (0.5-1.3x at
// 16-512 rows, 1.3-1.4x at 4096: benchmarks/RESULTS.md): decode and small prefills stay dense.
constexpr int64_t kSparseFromRows = 1024;
struct DevState {
  bool ready = false;
  llmc_cusparseLtHandle_t handle;
};
DevState g_dev[kMaxDevices];

// The compressed copy of one weight, keyed by (device, its buffer, its shape and dtype).
struct Compressed {
  llmc_cusparseLtMatDescriptor_t desc;
  void* data = nullptr;
};
std::map<std::tuple<int, const void*, int64_t, int64_t, int, int>, Compressed> g_weights;  // + dtype, op

struct Plan {
  llmc_cusparseLtMatDescriptor_t b, c;
  llmc_cusparseLtMatmulDescriptor_t mm;
  llmc_cusparseLtMatmulAlgSelection_t alg;
  llmc_cusparseLtMatmulPlan_t plan;
  size_t workspace = 0;
};
// (device, weight, op, dtype, M, lda, ldc, bias, residual) -> plan
std::map<std::tuple<int, const void*, int, int, int64_t, int64_t, int64_t, const void*, bool>, Plan> g_plans;
std::vector<void*> g_retired;  // compressed copies forgotten while a captured graph may still read them

cudaDataType_t cuda_type(DT d) { return d == DT::kF16 ? CUDA_R_16F : CUDA_R_16BF; }

struct Rows {  // a tensor as [rows, cols] with a row stride (leading dims collapsed, last contiguous)
  char* ptr;
  int64_t rows, cols, ld;
};

Rows rows_of(const DLTensor* t, const char* name) {
  LLMC_CHECK(t->ndim >= 2) << name << " must have at least 2 dims, got " << shape_str(t);
  const int nd = t->ndim;
  LLMC_CHECK(t->shape[nd - 1] <= 1 || stride_of(t, nd - 1) == 1) << name << ": last dim must be contiguous";
  int64_t rows = 1;
  for (int i = 0; i < nd - 1; ++i) rows *= t->shape[i];
  for (int i = 0; i < nd - 2; ++i)  // leading dims collapse into one row stride (size-1 dims do not matter)
    LLMC_CHECK(t->shape[i] == 1 || stride_of(t, i) == stride_of(t, i + 1) * t->shape[i + 1])
        << name << ": leading dims of " << shape_str(t) << " do not collapse into one row stride";
  const int64_t ld = rows <= 1 ? t->shape[nd - 1] : stride_of(t, nd - 2);
  return Rows{data_of(t), rows, t->shape[nd - 1], ld};
}

// A map entry built in place that is dropped again unless the build gets to `keep = true`
// (an exception on the way leaves no half-built entry behind).
template <typename Map>
struct EraseUnlessKept {
  Map& map;
  typename Map::iterator at;
  bool keep = false;
  ~EraseUnlessKept() {
    if (!keep) map.erase(at);
  }
};

Compressed& compressed_locked(const SpApi& api, DevState& ds, int dev, cudaStream_t stream, const DLTensor* W,
                              cudaDataType_t type, int64_t n, int64_t k, int op) {
  const auto key = std::make_tuple(dev, static_cast<const void*>(data_of(W)), n, k, int(type), op);
  auto it = g_weights.find(key);
  if (it != g_weights.end()) return it->second;
  cudaStreamCaptureStatus cap = cudaStreamCaptureStatusNone;
  LLMC_CUDA_CHECK(cudaStreamIsCapturing(stream, &cap));
  LLMC_CHECK(cap == cudaStreamCaptureStatusNone) << "a 2:4 weight met for the first time inside CUDA-graph capture "
                                                    "(run the shape once eagerly first)";
  // Built in place: cuSPARSELt's descriptors and plans refer to one another by address, so they
  // must not be copied once initialized (a copied plan pointed at a dead stack frame: "internal
  // error" at the next matmul). On failure the half-built entry is dropped.
  auto slot = g_weights.try_emplace(key).first;
  Compressed& c = slot->second;
  EraseUnlessKept<decltype(g_weights)> drop{g_weights, slot};
  if (op == llmc_sp::kOpT) {  // W [N, K]: column-major K x N, ld K
    LLMC_SP_CHECK(api, api.StructuredDescriptorInit(&ds.handle, &c.desc, k, n, k, 16, type, llmc_sp::kOrderCol,
                                                    llmc_sp::kSparsity50));
  } else {  // W [K, N]: column-major N x K, ld N
    LLMC_SP_CHECK(api, api.StructuredDescriptorInit(&ds.handle, &c.desc, n, k, n, 16, type, llmc_sp::kOrderCol,
                                                    llmc_sp::kSparsity50));
  }
  int* d_valid = nullptr;
  LLMC_CUDA_CHECK(cudaMalloc(&d_valid, sizeof(int)));
  LLMC_CUDA_CHECK(cudaMemsetAsync(d_valid, 0, sizeof(int), stream));  // the check writes only a failure
  LLMC_SP_CHECK(api, api.PruneCheck2(&ds.handle, &c.desc, 1, op, data_of(W), d_valid, stream));
  int invalid = 1;
  LLMC_CUDA_CHECK(cudaMemcpyAsync(&invalid, d_valid, sizeof(int), cudaMemcpyDeviceToHost, stream));
  LLMC_CUDA_CHECK(cudaStreamSynchronize(stream));
  cudaFree(d_valid);
  LLMC_CHECK(invalid == 0) << "weight " << shape_str(W) << " is not 2:4 sparse along K (cuSPARSELt's check)";
  size_t size = 0, buf_size = 0;
  LLMC_SP_CHECK(api, api.CompressedSize2(&ds.handle, &c.desc, &size, &buf_size));
  void* buf = nullptr;
  LLMC_CUDA_CHECK(cudaMalloc(&c.data, size));
  if (buf_size) LLMC_CUDA_CHECK(cudaMalloc(&buf, buf_size));
  LLMC_SP_CHECK(api, api.Compress2(&ds.handle, &c.desc, 1, op, data_of(W), c.data, buf, stream));
  LLMC_CUDA_CHECK(cudaStreamSynchronize(stream));
  if (buf) cudaFree(buf);
  drop.keep = true;
  return c;
}

void GemmSparse24(DLTensor* A, DLTensor* W, tvm::ffi::AnyView bias_any, tvm::ffi::AnyView res_any, DLTensor* C,
                  int64_t trans_b) {
  const DLTensor* bias = optional_tensor(bias_any);
  const DLTensor* R = optional_tensor(res_any);
  for (auto [t, name] : {std::pair<const DLTensor*, const char*>{A, "A"}, {W, "W"}, {C, "C"}}) check_cuda_tensor(t, name);
  const DT dt = dtype_of(A);
  LLMC_CHECK(dt == DT::kF16 || dt == DT::kBF16) << "A dtype " << dtype_name(dt) << " (float16 or bfloat16)";
  LLMC_CHECK(dtype_of(W) == dt && dtype_of(C) == dt) << "A, W and C must share a dtype";
  LLMC_CHECK(trans_b == 0 || trans_b == 1) << "trans_b must be 0 or 1";
  LLMC_CHECK(W->ndim == 2 && compact(W)) << "W must be a contiguous matrix, got " << shape_str(W);
  const Rows a = rows_of(A, "A"), c = rows_of(C, "C");
  const int64_t M = a.rows, K = a.cols, N = W->shape[trans_b ? 0 : 1];
  LLMC_CHECK(W->shape[trans_b ? 1 : 0] == K) << "W " << shape_str(W) << " does not match A's K = " << K
                                             << (trans_b ? " (W is [N, K])" : " (W is [K, N])");
  const int op = trans_b ? llmc_sp::kOpT : llmc_sp::kOpN;
  LLMC_CHECK(c.rows == M && c.cols == N) << "C " << shape_str(C) << " must be [" << M << ", " << N << "]";
  LLMC_CHECK(K % 32 == 0 && N % 32 == 0 && a.ld % 8 == 0 && c.ld % 8 == 0)
      << "K (" << K << ") and N (" << N << ") must be multiples of 32, row strides of 8";
  Rows r{nullptr, 0, 0, 0};
  if (R != nullptr) {
    check_cuda_tensor(R, "residual");
    LLMC_CHECK(dtype_of(R) == dt) << "residual dtype differs";
    r = rows_of(R, "residual");
    LLMC_CHECK(r.rows == M && r.cols == N && r.ld == c.ld) << "residual " << shape_str(R) << " must be [" << M << ", "
                                                           << N << "] with C's row stride";
  }
  if (bias != nullptr) {
    check_cuda_tensor(bias, "bias");
    LLMC_CHECK(dtype_of(bias) == dt && bias->ndim == 1 && bias->shape[0] == N && compact(bias))
        << "bias must be a contiguous [" << N << "] of A's dtype, got " << shape_str(bias);
  }
  if (M == 0 || N == 0) return;
  // cuSPARSELt takes no such operand, or is slower: dense; float16 too (its plan search failed with
  // "internal error" for float16 on an H100, leaving the context unusable; bfloat16 passed)
  if (M % kMinRows != 0 || M < kSparseFromRows || dt != DT::kBF16) {
    gemm_dense(A, W, const_cast<DLTensor*>(bias), const_cast<DLTensor*>(R), C, trans_b);
    return;
  }
  const int dev = A->device.device_id;
  LLMC_CHECK(dev >= 0 && dev < kMaxDevices) << "device id " << dev;
  DeviceGuard guard(dev);
  cudaStream_t stream = current_stream(dev);
  std::lock_guard<std::mutex> lock(g_mu);
  const SpApi& api = api_locked();
  DevState& ds = g_dev[dev];
  if (!ds.ready) {
    LLMC_SP_CHECK(api, api.Init(&ds.handle));
    ds.ready = true;
  }
  const cudaDataType_t type = cuda_type(dt);
  Compressed& w = compressed_locked(api, ds, dev, stream, W, type, N, K, op);
  const void* bias_ptr = bias ? static_cast<const void*>(data_of(bias)) : nullptr;
  const auto pkey = std::make_tuple(dev, static_cast<const void*>(data_of(W)), op, int(type), M, a.ld, c.ld,
                                    bias_ptr, R != nullptr);
  auto [it, fresh] = g_plans.try_emplace(pkey);
  if (fresh) {  // in place, as for the compressed weight (descriptors refer to one another)
    EraseUnlessKept<decltype(g_plans)> drop{g_plans, it};
    Plan& p = it->second;
    LLMC_SP_CHECK(api, api.DenseDescriptorInit(&ds.handle, &p.b, K, M, a.ld, 16, type, llmc_sp::kOrderCol));
    LLMC_SP_CHECK(api, api.DenseDescriptorInit(&ds.handle, &p.c, N, M, c.ld, 16, type, llmc_sp::kOrderCol));
    LLMC_SP_CHECK(api, api.MatmulDescriptorInit(&ds.handle, &p.mm, op, llmc_sp::kOpN, &w.desc, &p.b, &p.c,
                                                &p.c, llmc_sp::kCompute32F));
    if (bias_ptr)
      LLMC_SP_CHECK(api, api.MatmulDescSetAttribute(&ds.handle, &p.mm, llmc_sp::kDescBiasPointer, &bias_ptr,
                                                    sizeof(bias_ptr)));
    LLMC_SP_CHECK(api, api.MatmulAlgSelectionInit(&ds.handle, &p.alg, &p.mm, llmc_sp::kAlgDefault));
    LLMC_SP_CHECK(api, api.MatmulPlanInit(&ds.handle, &p.plan, &p.mm, &p.alg));
    LLMC_SP_CHECK(api, api.MatmulGetWorkspace(&ds.handle, &p.plan, &p.workspace));
    // The default algorithm ran slower than the dense GEMM on an H100 (benchmarks/RESULTS.md): time
    // the candidates once on this problem (cusparseLtMatmulSearch runs the matmul several times
    // and keeps the fastest in the plan). Not inside graph capture, and not where D would feed C.
    cudaStreamCaptureStatus cap = cudaStreamCaptureStatusNone;
    LLMC_CUDA_CHECK(cudaStreamIsCapturing(stream, &cap));
    if (cap == cudaStreamCaptureStatusNone && !(R != nullptr && r.ptr == c.ptr)) {
      void* ws0 = p.workspace ? scratch(dev, stream, /*slot=*/16, p.workspace) : nullptr;
      const float one = 1.0f, zero = 0.0f;
      cudaStream_t st[1] = {stream};
      LLMC_SP_CHECK(api, api.MatmulSearch(&ds.handle, &p.plan, &one, w.data, a.ptr, R ? &one : &zero, R ? r.ptr : c.ptr,
                                          c.ptr, ws0, st, 1));
      LLMC_SP_CHECK(api, api.MatmulGetWorkspace(&ds.handle, &p.plan, &p.workspace));
    }
    drop.keep = true;
  }
  Plan& p = it->second;
  void* ws = p.workspace ? scratch(dev, stream, /*slot=*/16, p.workspace) : nullptr;
  const float alpha = 1.0f, beta = R ? 1.0f : 0.0f;
  cudaStream_t streams[1] = {stream};
  LLMC_SP_CHECK(api, api.Matmul(&ds.handle, &p.plan, &alpha, w.data, a.ptr, &beta, R ? r.ptr : c.ptr, c.ptr, ws,
                                streams, 1));
}

// Drops what the shim remembers of the weight at W's address (its compressed copies and plans):
// the runtime calls it for each 2:4 weight when it loads an artifact, so a buffer that reuses the
// address of a freed model's weight is compressed afresh, never read through a stale copy. The
// copies are kept allocated (a graph captured by a live executor sharing the weight may read them).
void Forget(DLTensor* W) {
  check_cuda_tensor(W, "W");
  const void* ptr = data_of(W);
  const int dev = W->device.device_id;
  std::lock_guard<std::mutex> lock(g_mu);
  for (auto it = g_weights.begin(); it != g_weights.end();) {
    if (std::get<0>(it->first) == dev && std::get<1>(it->first) == ptr) {
      g_retired.push_back(it->second.data);
      it = g_weights.erase(it);
    } else {
      ++it;
    }
  }
  for (auto it = g_plans.begin(); it != g_plans.end();) {
    if (std::get<0>(it->first) == dev && std::get<1>(it->first) == ptr) it = g_plans.erase(it);
    else ++it;
  }
}

}  // namespace
}  // namespace llmc_shim_sparse24

TVM_FFI_DLL_EXPORT_TYPED_FUNC(llmc_gemm_sparse24, llmc_shim_sparse24::GemmSparse24);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(llmc_sparse24_forget, llmc_shim_sparse24::Forget);
