// The few cuBLASLt declarations the shim needs, written out here because the build machines
// have no cuBLAS headers. cuBLASLt itself is loaded with dlopen at first use, so an artifact
// that links this shim still loads where cuBLAS is absent.
//
// Every value below is an ABI fact, checked against cublasLt.h / cublas_api.h of the
// nvidia-cublas 13.10.0.20 wheel (CUDA 13) on 2026-11-22 (the static_asserts in
// tests/backends/cuda/cublaslt_decl_check.cu compile against the real headers when present).
// cudaDataType values (CUDA_R_16F = 2, CUDA_R_16BF = 14, CUDA_R_32F = 0) come from
// library_types.h, which ships with cudart.
#pragma once

#include <library_types.h>

#include <cstddef>
#include <cstdint>

extern "C" {

typedef int llmc_cublasStatus_t;  // cublasStatus_t (enum)
typedef struct llmc_cublasLtContext* llmc_cublasLtHandle_t;
typedef struct llmc_cublasLtMatmulDescOpaque* llmc_cublasLtMatmulDesc_t;
typedef struct llmc_cublasLtMatrixLayoutOpaque* llmc_cublasLtMatrixLayout_t;
typedef struct llmc_cublasLtMatmulPreferenceOpaque* llmc_cublasLtMatmulPreference_t;

typedef struct {
  uint64_t data[8];
} llmc_cublasLtMatmulAlgo_t;

typedef struct {
  llmc_cublasLtMatmulAlgo_t algo;
  size_t workspaceSize;
  llmc_cublasStatus_t state;
  float wavesCount;
  int reserved[4];
} llmc_cublasLtMatmulHeuristicResult_t;

}  // extern "C"

namespace llmc_lt {

constexpr int kStatusSuccess = 0;        // CUBLAS_STATUS_SUCCESS
constexpr int kStatusNotSupported = 15;  // CUBLAS_STATUS_NOT_SUPPORTED
constexpr int kOpN = 0;                  // CUBLAS_OP_N
constexpr int kOpT = 1;                  // CUBLAS_OP_T
constexpr int kCompute32F = 68;          // CUBLAS_COMPUTE_32F
constexpr int kCompute32I = 72;          // CUBLAS_COMPUTE_32I (int8 x int8 -> int32)

// cublasLtMatmulDescAttributes_t
constexpr int kDescTransA = 3;           // int32_t
constexpr int kDescTransB = 4;           // int32_t
constexpr int kDescEpilogue = 7;         // uint32_t
constexpr int kDescBiasPointer = 8;      // const void*
constexpr int kDescBiasDataType = 26;    // int32_t (cudaDataType)
constexpr int kDescAScalePointer = 17;   // const void* (float8 inputs: float scales)
constexpr int kDescBScalePointer = 18;
constexpr int kDescAScaleMode = 31;      // int32_t (cublasLtMatmulMatrixScale_t)
constexpr int kDescBScaleMode = 32;

// cublasLtMatmulMatrixScale_t
constexpr int32_t kScaleScalar32F = 0;   // one float for the whole matrix
constexpr int32_t kScaleOuterVec32F = 3; // one float per row of op(A) / per column of op(B)

// cublasLtEpilogue_t
constexpr uint32_t kEpiDefault = 1;
constexpr uint32_t kEpiRelu = 2;
constexpr uint32_t kEpiBias = 4;
constexpr uint32_t kEpiReluBias = 6;     // RELU | BIAS
constexpr uint32_t kEpiGelu = 32;
constexpr uint32_t kEpiGeluBias = 36;    // GELU | BIAS

// cublasLtMatmulPreferenceAttributes_t
constexpr int kPrefMaxWorkspaceBytes = 1;  // uint64_t
constexpr int kPrefMinAlignA = 5;          // uint32_t
constexpr int kPrefMinAlignB = 6;
constexpr int kPrefMinAlignC = 7;
constexpr int kPrefMinAlignD = 8;

// Function pointer types (signatures as in cublasLt.h).
using CreateFn = llmc_cublasStatus_t (*)(llmc_cublasLtHandle_t*);
using GetVersionFn = size_t (*)(void);
using GetStatusStringFn = const char* (*)(llmc_cublasStatus_t);
using MatmulDescCreateFn = llmc_cublasStatus_t (*)(llmc_cublasLtMatmulDesc_t*, int /*computeType*/,
                                                   cudaDataType_t /*scaleType*/);
using MatmulDescDestroyFn = llmc_cublasStatus_t (*)(llmc_cublasLtMatmulDesc_t);
using MatmulDescSetAttributeFn = llmc_cublasStatus_t (*)(llmc_cublasLtMatmulDesc_t, int, const void*, size_t);
using MatrixLayoutCreateFn = llmc_cublasStatus_t (*)(llmc_cublasLtMatrixLayout_t*, cudaDataType_t, uint64_t rows,
                                                     uint64_t cols, int64_t ld);
using MatrixLayoutDestroyFn = llmc_cublasStatus_t (*)(llmc_cublasLtMatrixLayout_t);
using PreferenceCreateFn = llmc_cublasStatus_t (*)(llmc_cublasLtMatmulPreference_t*);
using PreferenceDestroyFn = llmc_cublasStatus_t (*)(llmc_cublasLtMatmulPreference_t);
using PreferenceSetAttributeFn = llmc_cublasStatus_t (*)(llmc_cublasLtMatmulPreference_t, int, const void*, size_t);
using AlgoGetHeuristicFn = llmc_cublasStatus_t (*)(llmc_cublasLtHandle_t, llmc_cublasLtMatmulDesc_t,
                                                   llmc_cublasLtMatrixLayout_t, llmc_cublasLtMatrixLayout_t,
                                                   llmc_cublasLtMatrixLayout_t, llmc_cublasLtMatrixLayout_t,
                                                   llmc_cublasLtMatmulPreference_t, int,
                                                   llmc_cublasLtMatmulHeuristicResult_t*, int*);
using MatmulFn = llmc_cublasStatus_t (*)(llmc_cublasLtHandle_t, llmc_cublasLtMatmulDesc_t, const void* alpha,
                                         const void* A, llmc_cublasLtMatrixLayout_t, const void* B,
                                         llmc_cublasLtMatrixLayout_t, const void* beta, const void* C,
                                         llmc_cublasLtMatrixLayout_t, void* D, llmc_cublasLtMatrixLayout_t,
                                         const llmc_cublasLtMatmulAlgo_t*, void* workspace, size_t workspaceSize,
                                         cudaStream_t stream);

}  // namespace llmc_lt
