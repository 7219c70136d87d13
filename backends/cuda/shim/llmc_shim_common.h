// llmc CUDA shim: helpers shared by the GEMM and attention entry points.
//
// Every entry point is a TVM-FFI function exported with TVM_FFI_DLL_EXPORT_TYPED_FUNC, so
// `tvm.runtime.load_module("libllmc_shim.so")["llmc_gemm"]` finds it. Tensors arrive as
// DLTensor* (a tvm.runtime.Tensor, a tvm_ffi.Tensor or a DLPack-imported torch tensor all
// convert); work is enqueued on TVMFFIEnvGetStream(kDLCUDA, device_id), the stream TVM's own
// kernels use, so the calls can be captured in a CUDA graph together with TVM kernels.
#pragma once

#include <cuda_runtime.h>
#include <dlpack/dlpack.h>
#include <tvm/ffi/any.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/c_env_api.h>
#include <tvm/ffi/function.h>

#include <algorithm>
#include <cstdint>
#include <sstream>
#include <string>

namespace llmc_shim {

#define LLMC_CUDA_CHECK(expr)                                                              \
  do {                                                                                     \
    cudaError_t err__ = (expr);                                                            \
    if (err__ != cudaSuccess) {                                                            \
      TVM_FFI_THROW(RuntimeError) << "llmc shim: " #expr " failed: " << cudaGetErrorName(err__) \
                                  << " (" << cudaGetErrorString(err__) << ")";             \
    }                                                                                      \
  } while (0)

#define LLMC_CHECK(cond) \
  if (!(cond)) TVM_FFI_THROW(ValueError) << "llmc shim: check failed: " #cond ": "

enum class DT { kF16, kBF16, kF32, kOther };

inline DT dtype_of(const DLTensor* t) {
  const DLDataType d = t->dtype;
  if (d.lanes != 1) return DT::kOther;
  if (d.code == kDLFloat && d.bits == 16) return DT::kF16;
  if (d.code == kDLBfloat && d.bits == 16) return DT::kBF16;
  if (d.code == kDLFloat && d.bits == 32) return DT::kF32;
  return DT::kOther;
}

inline const char* dtype_name(DT d) {
  switch (d) {
    case DT::kF16: return "float16";
    case DT::kBF16: return "bfloat16";
    case DT::kF32: return "float32";
    default: return "unsupported";
  }
}

// Element stride of dimension `i` (compact row-major when the tensor carries no strides).
inline int64_t stride_of(const DLTensor* t, int i) {
  if (t->strides != nullptr) return t->strides[i];
  int64_t s = 1;
  for (int j = t->ndim - 1; j > i; --j) s *= t->shape[j];
  return s;
}

// Row-major with no gaps (size-1 dims may carry any stride).
inline bool compact(const DLTensor* t) {
  if (t->strides == nullptr) return true;
  int64_t s = 1;
  for (int i = t->ndim - 1; i >= 0; --i) {
    if (t->shape[i] != 1 && t->strides[i] != s) return false;
    s *= t->shape[i];
  }
  return true;
}

inline char* data_of(const DLTensor* t) { return static_cast<char*>(t->data) + t->byte_offset; }

inline std::string shape_str(const DLTensor* t) {
  std::ostringstream os;
  os << "[";
  for (int i = 0; i < t->ndim; ++i) os << (i ? ", " : "") << t->shape[i];
  os << "]";
  return os.str();
}

inline void check_cuda_tensor(const DLTensor* t, const char* name) {
  if (t == nullptr) TVM_FFI_THROW(ValueError) << "llmc shim: " << name << " is null";
  if (t->device.device_type != kDLCUDA) {
    TVM_FFI_THROW(ValueError) << "llmc shim: " << name << " must be a CUDA tensor (device_type "
                              << int(t->device.device_type) << ")";
  }
}

// Make the tensor's device current for the duration of a call; restores the previous one.
class DeviceGuard {
 public:
  explicit DeviceGuard(int dev) {
    LLMC_CUDA_CHECK(cudaGetDevice(&prev_));
    if (prev_ != dev) LLMC_CUDA_CHECK(cudaSetDevice(dev));
    dev_ = dev;
  }
  ~DeviceGuard() {
    if (prev_ != dev_) cudaSetDevice(prev_);
  }

 private:
  int prev_ = 0, dev_ = 0;
};

inline cudaStream_t current_stream(int device_id) {
  return static_cast<cudaStream_t>(TVMFFIEnvGetStream(kDLCUDA, device_id));
}

// A tensor as a row-major matrix: leading dims flattened into rows, the last contiguous.
struct Mat2D {
  char* ptr;
  int64_t rows, cols, ld;  // ld: element stride between rows
};

inline Mat2D as_matrix(const DLTensor* t, const char* name) {
  LLMC_CHECK(t->ndim >= 1) << name << " must have at least one dimension";
  const int nd = t->ndim;
  const int64_t cols = t->shape[nd - 1];
  LLMC_CHECK(cols <= 1 || stride_of(t, nd - 1) == 1) << name << ": last dim must be contiguous";
  int64_t rows = 1;
  for (int i = 0; i < nd - 1; ++i) rows *= t->shape[i];
  int64_t ld = nd >= 2 ? stride_of(t, nd - 2) : cols;
  // the leading dims must collapse into one row stride (size-1 dims do not matter)
  for (int i = 0; i < nd - 2; ++i) {
    if (t->shape[i] == 1) continue;
    int64_t inner = 1;  // rows spanned by one step of dim i
    for (int j = i + 1; j < nd - 1; ++j) inner *= t->shape[j];
    LLMC_CHECK(stride_of(t, i) == inner * ld || inner == 0)
        << name << ": leading dims of " << shape_str(t) << " do not collapse into one row stride";
  }
  if (rows <= 1) ld = std::max<int64_t>(cols, 1);
  LLMC_CHECK(ld >= cols) << name << ": rows overlap (row stride " << ld << " < " << cols << ")";
  return Mat2D{data_of(t), rows, cols, ld};
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Copies `rows` rows of `cols` 16-bit elements, row stride `ld`, from src into compact rows at dst (on `stream`).
inline void copy_rows_compact(void* dst, const void* src, int64_t rows, int64_t cols, int64_t ld, cudaStream_t stream) {
  LLMC_CUDA_CHECK(cudaMemcpy2DAsync(dst, size_t(cols) * 2, src, size_t(ld) * 2, size_t(cols) * 2, size_t(rows),
                                    cudaMemcpyDeviceToDevice, stream));
}

// A compact [rows, cols] DLTensor over `data` with `like`'s device and dtype; `shape` (2 entries,
// the caller's) must outlive it.
inline DLTensor matrix_view(void* data, const DLTensor* like, int64_t rows, int64_t cols, int64_t* shape) {
  shape[0] = rows;
  shape[1] = cols;
  DLTensor t{};
  t.data = data;
  t.device = like->device;
  t.ndim = 2;
  t.dtype = like->dtype;
  t.shape = shape;
  t.strides = nullptr;
  t.byte_offset = 0;
  return t;
}

// An optional tensor argument: Python None (or a missing value) -> nullptr.
inline DLTensor* optional_tensor(const tvm::ffi::AnyView& v) {
  if (v == nullptr) return nullptr;
  return v.cast<DLTensor*>();
}

}  // namespace llmc_shim
