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

__global__ void feed_chosen_tokens_kernel(const ChosenTokenRow* __restrict__ chosen, const int32_t* __restrict__ fed_from,
                                          int rows, int32_t* __restrict__ tokens) {
  const int row = blockIdx.x * blockDim.x + threadIdx.x;
  if (row >= rows || fed_from[row] < 0) return;
  tokens[row] = max(chosen[fed_from[row]].token, 0);
}

}  // namespace

void feed_chosen_tokens(const ChosenTokenRow* chosen, const int32_t* fed_from, int rows, int32_t* tokens,
                        cudaStream_t stream) {
  if (rows == 0) return;
  constexpr int kThreads = 64;
  feed_chosen_tokens_kernel<<<(rows + kThreads - 1) / kThreads, kThreads, 0, stream>>>(chosen, fed_from, rows, tokens);
  check_launch("feed_chosen_tokens");
}

void embedding(const bf16* table, int dim, const int32_t* tokens, int rows, float* out, cudaStream_t stream) {
  if (rows == 0) return;
  constexpr int kThreads = 256;
  const dim3 grid((dim + kThreads - 1) / kThreads, rows);
  embedding_kernel<<<grid, kThreads, 0, stream>>>(table, dim, tokens, out);
  check_launch("embedding");
}

}  // namespace pearl::gpu
