// The few cuSPARSELt declarations llmc_sparse24.cu needs, written out because the build machines
// have no cuSPARSELt headers; the library is loaded with dlopen at first use, so an artifact
// that links the shim still loads where cuSPARSELt is absent.
//
// Every value is an ABI fact of cusparseLt.h (+ its cusparse stub) in the nvidia-cusparselt-cu13
// 0.10.0 wheel (checked 2026-11-27; tests/backends/cuda/cusparselt_decl_check.cu static_asserts
// them against the real header when LLMC_CUSPARSELT_INCLUDE names it).
#pragma once

#include <cuda_runtime.h>
#include <library_types.h>

#include <cstdint>

extern "C" {
typedef int llmc_cusparseStatus_t;  // cusparseStatus_t (enum)
typedef struct { alignas(16) uint8_t data[512]; } llmc_cusparseLtHandle_t;
typedef struct { alignas(16) uint8_t data[512]; } llmc_cusparseLtMatDescriptor_t;
typedef struct { alignas(16) uint8_t data[512]; } llmc_cusparseLtMatmulDescriptor_t;
typedef struct { alignas(16) uint8_t data[512]; } llmc_cusparseLtMatmulAlgSelection_t;
typedef struct { alignas(16) uint8_t data[512]; } llmc_cusparseLtMatmulPlan_t;
}

namespace llmc_sp {

constexpr int kSuccess = 0;           // CUSPARSE_STATUS_SUCCESS
constexpr int kOpN = 0;               // CUSPARSE_OPERATION_NON_TRANSPOSE
constexpr int kOpT = 1;               // CUSPARSE_OPERATION_TRANSPOSE
constexpr int kOrderCol = 1;          // CUSPARSE_ORDER_COL
constexpr int kSparsity50 = 0;        // CUSPARSELT_SPARSITY_50_PERCENT
constexpr int kCompute32F = 2;        // CUSPARSE_COMPUTE_32F
constexpr int kAlgDefault = 0;        // CUSPARSELT_MATMUL_ALG_DEFAULT
constexpr int kDescBiasPointer = 8;   // CUSPARSELT_MATMUL_BIAS_POINTER (void*)

using InitFn = llmc_cusparseStatus_t (*)(llmc_cusparseLtHandle_t*);
using GetErrorStringFn = const char* (*)(llmc_cusparseStatus_t);
using DenseDescriptorInitFn = llmc_cusparseStatus_t (*)(const llmc_cusparseLtHandle_t*, llmc_cusparseLtMatDescriptor_t*,
                                                        int64_t rows, int64_t cols, int64_t ld, uint32_t alignment,
                                                        cudaDataType valueType, int order);
using StructuredDescriptorInitFn = llmc_cusparseStatus_t (*)(const llmc_cusparseLtHandle_t*,
                                                             llmc_cusparseLtMatDescriptor_t*, int64_t rows,
                                                             int64_t cols, int64_t ld, uint32_t alignment,
                                                             cudaDataType valueType, int order, int sparsity);
using MatmulDescriptorInitFn = llmc_cusparseStatus_t (*)(const llmc_cusparseLtHandle_t*,
                                                         llmc_cusparseLtMatmulDescriptor_t*, int opA, int opB,
                                                         const llmc_cusparseLtMatDescriptor_t* matA,
                                                         const llmc_cusparseLtMatDescriptor_t* matB,
                                                         const llmc_cusparseLtMatDescriptor_t* matC,
                                                         const llmc_cusparseLtMatDescriptor_t* matD, int computeType);
using MatmulDescSetAttributeFn = llmc_cusparseStatus_t (*)(const llmc_cusparseLtHandle_t*,
                                                           llmc_cusparseLtMatmulDescriptor_t*, int attribute,
                                                           const void* data, size_t size);
using MatmulAlgSelectionInitFn = llmc_cusparseStatus_t (*)(const llmc_cusparseLtHandle_t*,
                                                           llmc_cusparseLtMatmulAlgSelection_t*,
                                                           const llmc_cusparseLtMatmulDescriptor_t*, int alg);
using MatmulPlanInitFn = llmc_cusparseStatus_t (*)(const llmc_cusparseLtHandle_t*, llmc_cusparseLtMatmulPlan_t*,
                                                   const llmc_cusparseLtMatmulDescriptor_t*,
                                                   const llmc_cusparseLtMatmulAlgSelection_t*);
using MatmulGetWorkspaceFn = llmc_cusparseStatus_t (*)(const llmc_cusparseLtHandle_t*,
                                                       const llmc_cusparseLtMatmulPlan_t*, size_t*);
using MatmulFn = llmc_cusparseStatus_t (*)(const llmc_cusparseLtHandle_t*, const llmc_cusparseLtMatmulPlan_t*,
                                           const void* alpha, const void* d_A, const void* d_B, const void* beta,
                                           const void* d_C, void* d_D, void* workspace, cudaStream_t* streams,
                                           int32_t numStreams);
using MatmulSearchFn = llmc_cusparseStatus_t (*)(const llmc_cusparseLtHandle_t*, llmc_cusparseLtMatmulPlan_t*,
                                                 const void* alpha, const void* d_A, const void* d_B, const void* beta,
                                                 const void* d_C, void* d_D, void* workspace, cudaStream_t* streams,
                                                 int32_t numStreams);
using PruneCheck2Fn = llmc_cusparseStatus_t (*)(const llmc_cusparseLtHandle_t*, const llmc_cusparseLtMatDescriptor_t*,
                                                int isSparseA, int op, const void* d_in, int* d_valid,
                                                cudaStream_t stream);
using CompressedSize2Fn = llmc_cusparseStatus_t (*)(const llmc_cusparseLtHandle_t*,
                                                    const llmc_cusparseLtMatDescriptor_t*, size_t* compressedSize,
                                                    size_t* compressedBufferSize);
using Compress2Fn = llmc_cusparseStatus_t (*)(const llmc_cusparseLtHandle_t*, const llmc_cusparseLtMatDescriptor_t*,
                                              int isSparseA, int op, const void* d_dense, void* d_compressed,
                                              void* d_compressed_buffer, cudaStream_t stream);

}  // namespace llmc_sp
