#include "cuda_ops.cuh"

namespace pearl::gpu {

namespace {

constexpr int kThreads = 256;

// One CTA per row. Each thread sums the squares of its strided elements in order, then warps and the CTA
// combine in a fixed tree: the order depends on dim only.
__global__ void __launch_bounds__(kThreads) rmsnorm_kernel(const float* __restrict__ x,
                                                           const int32_t* __restrict__ row_index, int dim,
                                                           const float* __restrict__ weight, float eps,
                                                           bf16* __restrict__ out) {
  __shared__ float warp_sums[kThreads / 32];
  allow_dependent_launch();
  const int row = blockIdx.x;
  const int source_row = row_index != nullptr ? row_index[row] : row;
  const float* in = x + static_cast<int64_t>(source_row) * dim;
  float sum = 0.0f;
  for (int i = threadIdx.x; i < dim; i += kThreads) sum += in[i] * in[i];
  sum = warp_sum(sum);
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = sum;
  __syncthreads();
  float total = 0.0f;
  for (int w = 0; w < kThreads / 32; ++w) total += warp_sums[w];
  const float inv_rms = rsqrtf(total / static_cast<float>(dim) + eps);
  bf16* target = out + static_cast<int64_t>(row) * dim;
  for (int i = threadIdx.x; i < dim; i += kThreads) target[i] = __float2bfloat16(weight[i] * (in[i] * inv_rms));
}

}  // namespace

void rmsnorm(const float* x, const int32_t* row_index, int rows, int dim, const float* weight, float eps, bf16* out,
             cudaStream_t stream) {
  if (rows == 0) return;
  rmsnorm_kernel<<<rows, kThreads, 0, stream>>>(x, row_index, dim, weight, eps, out);
  check_launch("rmsnorm");
}

}  // namespace pearl::gpu
