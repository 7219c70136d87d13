// Compile-time check: backends/cuda/shim/cublaslt_decl.h against the real cuBLASLt headers.
// Used by test_cuda_shim_build.py when LLMC_CUBLAS_INCLUDE points at them.
#include <cstddef>
#include <type_traits>
#include <cuda_runtime.h>
#include "cublaslt_decl.h"
#include <cublasLt.h>
static_assert(llmc_lt::kStatusSuccess == CUBLAS_STATUS_SUCCESS && llmc_lt::kStatusNotSupported == CUBLAS_STATUS_NOT_SUPPORTED, "");
static_assert(llmc_lt::kOpN == CUBLAS_OP_N && llmc_lt::kOpT == CUBLAS_OP_T, "");
static_assert(llmc_lt::kCompute32F == CUBLAS_COMPUTE_32F && llmc_lt::kCompute32I == CUBLAS_COMPUTE_32I, "");
static_assert(llmc_lt::kDescAScalePointer == CUBLASLT_MATMUL_DESC_A_SCALE_POINTER && llmc_lt::kDescBScalePointer == CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, "");
static_assert(llmc_lt::kDescAScaleMode == CUBLASLT_MATMUL_DESC_A_SCALE_MODE && llmc_lt::kDescBScaleMode == CUBLASLT_MATMUL_DESC_B_SCALE_MODE, "");
static_assert(llmc_lt::kScaleScalar32F == CUBLASLT_MATMUL_MATRIX_SCALE_SCALAR_32F && llmc_lt::kScaleOuterVec32F == CUBLASLT_MATMUL_MATRIX_SCALE_OUTER_VEC_32F, "");
static_assert(llmc_lt::kDescTransA == CUBLASLT_MATMUL_DESC_TRANSA && llmc_lt::kDescTransB == CUBLASLT_MATMUL_DESC_TRANSB, "");
static_assert(llmc_lt::kDescEpilogue == CUBLASLT_MATMUL_DESC_EPILOGUE && llmc_lt::kDescBiasPointer == CUBLASLT_MATMUL_DESC_BIAS_POINTER, "");
static_assert(llmc_lt::kDescBiasDataType == CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, "");
static_assert(llmc_lt::kEpiDefault == CUBLASLT_EPILOGUE_DEFAULT && llmc_lt::kEpiRelu == CUBLASLT_EPILOGUE_RELU && llmc_lt::kEpiBias == CUBLASLT_EPILOGUE_BIAS, "");
static_assert(llmc_lt::kEpiReluBias == CUBLASLT_EPILOGUE_RELU_BIAS && llmc_lt::kEpiGelu == CUBLASLT_EPILOGUE_GELU && llmc_lt::kEpiGeluBias == CUBLASLT_EPILOGUE_GELU_BIAS, "");
static_assert(llmc_lt::kPrefMaxWorkspaceBytes == CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, "");
static_assert(llmc_lt::kPrefMinAlignA == CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES && llmc_lt::kPrefMinAlignB == CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, "");
static_assert(llmc_lt::kPrefMinAlignC == CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES && llmc_lt::kPrefMinAlignD == CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, "");
static_assert(sizeof(llmc_cublasLtMatmulHeuristicResult_t) == sizeof(cublasLtMatmulHeuristicResult_t), "");
static_assert(offsetof(llmc_cublasLtMatmulHeuristicResult_t, workspaceSize) == offsetof(cublasLtMatmulHeuristicResult_t, workspaceSize), "");
static_assert(offsetof(llmc_cublasLtMatmulHeuristicResult_t, state) == offsetof(cublasLtMatmulHeuristicResult_t, state), "");
static_assert(sizeof(llmc_cublasLtMatmulAlgo_t) == sizeof(cublasLtMatmulAlgo_t), "");
// signatures
static_assert(std::is_same<decltype(&cublasLtMatrixLayoutCreate), cublasStatus_t(*)(cublasLtMatrixLayout_t*, cudaDataType, uint64_t, uint64_t, int64_t)>::value, "");

