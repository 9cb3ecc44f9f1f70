// Large-M matrix products (prefill chunks, batches of more than 16 rows) through cuBLASLt: bf16 operands,
// float32 accumulation and output, so the residual stream can be accumulated in place (beta = 1).
#pragma once

#include <cublasLt.h>
#include <cuda_bf16.h>

#include <cstdint>
#include <map>
#include <tuple>

namespace pearl::gpu {

class CublasLtGemm {
 public:
  explicit CublasLtGemm(size_t workspace_bytes);
  ~CublasLtGemm();
  CublasLtGemm(const CublasLtGemm&) = delete;
  CublasLtGemm& operator=(const CublasLtGemm&) = delete;

  // y[rows, n] (+)= x[rows, k] W^T with x, W bf16 row-major (W as nn.Linear stores it: [n, k]) and y float32
  // row-major. Graph-capture safe once a shape has run eagerly (plans are made on first use).
  void matmul(const __nv_bfloat16* x, int rows, int k, const __nv_bfloat16* weight, int n, float* y, bool accumulate,
              cudaStream_t stream);

 private:
  struct Plan {
    cublasLtMatmulDesc_t operation = nullptr;
    cublasLtMatrixLayout_t weight_layout = nullptr;
    cublasLtMatrixLayout_t x_layout = nullptr;
    cublasLtMatrixLayout_t y_layout = nullptr;
    cublasLtMatmulAlgo_t algo{};
  };
  const Plan& plan(int rows, int k, int n);

  cublasLtHandle_t handle_ = nullptr;
  void* workspace_ = nullptr;
  size_t workspace_bytes_;
  std::map<std::tuple<int, int, int>, Plan> plans_;
};

}  // namespace pearl::gpu
