#include "cublaslt.h"

#include <stdexcept>
#include <string>

#include "check.h"

namespace pearl::gpu {

namespace {

void check_cublas(cublasStatus_t status, const char* call) {
  if (status != CUBLAS_STATUS_SUCCESS) {
    throw std::runtime_error(std::string("cuBLASLt error in ") + call + ": status " +
                             std::to_string(static_cast<int>(status)));
  }
}

}  // namespace

#define PEARL_CUBLAS_CHECK(call) check_cublas((call), #call)

CublasLtGemm::CublasLtGemm(size_t workspace_bytes) : workspace_bytes_(workspace_bytes) {
  PEARL_CUBLAS_CHECK(cublasLtCreate(&handle_));
  PEARL_CUDA_CHECK(cudaMalloc(&workspace_, workspace_bytes_));
}

CublasLtGemm::~CublasLtGemm() {
  for (auto& entry : plans_) {
    Plan& plan = entry.second;
    cublasLtMatrixLayoutDestroy(plan.y_layout);
    cublasLtMatrixLayoutDestroy(plan.x_layout);
    cublasLtMatrixLayoutDestroy(plan.weight_layout);
    cublasLtMatmulDescDestroy(plan.operation);
  }
  cudaFree(workspace_);
  cublasLtDestroy(handle_);
}

// Column-major view: y^T [n, rows] = W [k, n]^T x^T [k, rows], so row-major y needs no transposition.
const CublasLtGemm::Plan& CublasLtGemm::plan(int rows, int k, int n) {
  const auto key = std::make_tuple(rows, k, n);
  auto found = plans_.find(key);
  if (found != plans_.end()) return found->second;

  Plan plan;
  PEARL_CUBLAS_CHECK(cublasLtMatmulDescCreate(&plan.operation, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  const cublasOperation_t transpose = CUBLAS_OP_T;
  const cublasOperation_t keep = CUBLAS_OP_N;
  PEARL_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(plan.operation, CUBLASLT_MATMUL_DESC_TRANSA, &transpose,
                                                    sizeof(transpose)));
  PEARL_CUBLAS_CHECK(
      cublasLtMatmulDescSetAttribute(plan.operation, CUBLASLT_MATMUL_DESC_TRANSB, &keep, sizeof(keep)));
  PEARL_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&plan.weight_layout, CUDA_R_16BF, k, n, k));
  PEARL_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&plan.x_layout, CUDA_R_16BF, k, rows, k));
  PEARL_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&plan.y_layout, CUDA_R_32F, n, rows, n));

  cublasLtMatmulPreference_t preference = nullptr;
  PEARL_CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&preference));
  const uint64_t workspace_limit = workspace_bytes_;
  cublasLtMatmulHeuristicResult_t result{};
  int found_algos = 0;
  const cublasStatus_t status = [&] {
    cublasStatus_t s = cublasLtMatmulPreferenceSetAttribute(preference, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                                            &workspace_limit, sizeof(workspace_limit));
    if (s != CUBLAS_STATUS_SUCCESS) return s;
    return cublasLtMatmulAlgoGetHeuristic(handle_, plan.operation, plan.weight_layout, plan.x_layout, plan.y_layout,
                                          plan.y_layout, preference, 1, &result, &found_algos);
  }();
  cublasLtMatmulPreferenceDestroy(preference);
  if (status != CUBLAS_STATUS_SUCCESS || found_algos == 0) {
    cublasLtMatrixLayoutDestroy(plan.y_layout);
    cublasLtMatrixLayoutDestroy(plan.x_layout);
    cublasLtMatrixLayoutDestroy(plan.weight_layout);
    cublasLtMatmulDescDestroy(plan.operation);
    throw std::runtime_error("cuBLASLt has no bf16 x bf16 -> f32 algorithm for rows " + std::to_string(rows) +
                             ", k " + std::to_string(k) + ", n " + std::to_string(n) + " (status " +
                             std::to_string(static_cast<int>(status)) + ")");
  }
  plan.algo = result.algo;
  return plans_.emplace(key, plan).first->second;
}

void CublasLtGemm::matmul(const __nv_bfloat16* x, int rows, int k, const __nv_bfloat16* weight, int n, float* y,
                          bool accumulate, cudaStream_t stream) {
  if (rows == 0) return;
  const Plan& p = plan(rows, k, n);
  const float alpha = 1.0f;
  const float beta = accumulate ? 1.0f : 0.0f;
  PEARL_CUBLAS_CHECK(cublasLtMatmul(handle_, p.operation, &alpha, weight, p.weight_layout, x, p.x_layout, &beta, y,
                                    p.y_layout, y, p.y_layout, &p.algo, workspace_, workspace_bytes_, stream));
}

}  // namespace pearl::gpu
