#include "cuda_ops.cuh"

namespace pearl::gpu {

namespace {

__global__ void embedding_kernel(const bf16* __restrict__ table, int dim, const int32_t* __restrict__ tokens,
                                 float* __restrict__ out) {
  const int row = blockIdx.y;
  const bf16* source = table + static_cast<int64_t>(tokens[row]) * dim;
  float* target = out + static_cast<int64_t>(row) * dim;
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < dim; i += gridDim.x * blockDim.x) {
    target[i] = __bfloat162float(source[i]);
  }
}

}  // namespace

void embedding(const bf16* table, int dim, const int32_t* tokens, int rows, float* out, cudaStream_t stream) {
  if (rows == 0) return;
  constexpr int kThreads = 256;
  const dim3 grid((dim + kThreads - 1) / kThreads, rows);
  embedding_kernel<<<grid, kThreads, 0, stream>>>(table, dim, tokens, out);
  check_launch("embedding");
}

}  // namespace pearl::gpu
