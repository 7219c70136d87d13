// Compile-time check: backends/cuda/shim/cusparselt_decl.h against the real cuSPARSELt header.
// Used by test_cuda_shim_build.py when LLMC_CUSPARSELT_INCLUDE points at it.
#include <cstddef>
#include <type_traits>
#include <cuda_runtime.h>
#include "cusparselt_decl.h"
#include <cusparseLt.h>
static_assert(llmc_sp::kSuccess == CUSPARSE_STATUS_SUCCESS, "");
static_assert(llmc_sp::kOpN == CUSPARSE_OPERATION_NON_TRANSPOSE && llmc_sp::kOpT == CUSPARSE_OPERATION_TRANSPOSE, "");
static_assert(llmc_sp::kOrderCol == CUSPARSE_ORDER_COL && llmc_sp::kSparsity50 == CUSPARSELT_SPARSITY_50_PERCENT, "");
static_assert(llmc_sp::kCompute32F == CUSPARSE_COMPUTE_32F && llmc_sp::kAlgDefault == CUSPARSELT_MATMUL_ALG_DEFAULT, "");
static_assert(llmc_sp::kDescBiasPointer == CUSPARSELT_MATMUL_BIAS_POINTER, "");
static_assert(sizeof(llmc_cusparseLtHandle_t) == sizeof(cusparseLtHandle_t), "");
static_assert(sizeof(llmc_cusparseLtMatDescriptor_t) == sizeof(cusparseLtMatDescriptor_t), "");
static_assert(sizeof(llmc_cusparseLtMatmulDescriptor_t) == sizeof(cusparseLtMatmulDescriptor_t), "");
static_assert(sizeof(llmc_cusparseLtMatmulAlgSelection_t) == sizeof(cusparseLtMatmulAlgSelection_t), "");
static_assert(sizeof(llmc_cusparseLtMatmulPlan_t) == sizeof(cusparseLtMatmulPlan_t), "");
static_assert(alignof(llmc_cusparseLtMatmulPlan_t) == alignof(cusparseLtMatmulPlan_t), "");
// signatures (the enum parameters are ints in the declarations: same ABI)
static_assert(sizeof(cusparseOrder_t) == sizeof(int) && sizeof(cusparseOperation_t) == sizeof(int), "");
static_assert(sizeof(cusparseComputeType) == sizeof(int) && sizeof(cusparseLtSparsity_t) == sizeof(int), "");
static_assert(std::is_same<decltype(&cusparseLtMatmul), cusparseStatus_t (*)(const cusparseLtHandle_t*, const cusparseLtMatmulPlan_t*, const void*, const void*, const void*, const void*, const void*, void*, void*, cudaStream_t*, int32_t)>::value, "");
static_assert(std::is_same<decltype(&cusparseLtSpMMACompress2), cusparseStatus_t (*)(const cusparseLtHandle_t*, const cusparseLtMatDescriptor_t*, int, cusparseOperation_t, const void*, void*, void*, cudaStream_t)>::value, "");
static_assert(std::is_same<decltype(&cusparseLtSpMMAPruneCheck2), cusparseStatus_t (*)(const cusparseLtHandle_t*, const cusparseLtMatDescriptor_t*, int, cusparseOperation_t, const void*, int*, cudaStream_t)>::value, "");
static_assert(std::is_same<decltype(&cusparseLtStructuredDescriptorInit), cusparseStatus_t (*)(const cusparseLtHandle_t*, cusparseLtMatDescriptor_t*, int64_t, int64_t, int64_t, uint32_t, cudaDataType, cusparseOrder_t, cusparseLtSparsity_t)>::value, "");
static_assert(std::is_same<decltype(&cusparseLtMatmulSearch), cusparseStatus_t (*)(const cusparseLtHandle_t*, cusparseLtMatmulPlan_t*, const void*, const void*, const void*, const void*, const void*, void*, void*, cudaStream_t*, int32_t)>::value, "");
