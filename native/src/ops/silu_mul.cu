#include "cuda_ops.cuh"

namespace pearl::gpu {

namespace {

__global__ void silu_mul_kernel(const float* __restrict__ gate_up, int inter, bf16* __restrict__ out) {
  allow_dependent_launch();
  const int row = blockIdx.y;
  const float* source = gate_up + static_cast<int64_t>(row) * 2 * inter;
  bf16* target = out + static_cast<int64_t>(row) * inter;
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < inter; i += gridDim.x * blockDim.x) {
    target[i] = __float2bfloat16(silu_times(source[gate_up_row(i, false)], source[gate_up_row(i, true)]));
  }
}

}  // namespace

void silu_mul(const float* gate_up, int rows, int inter, bf16* out, cudaStream_t stream) {
  if (rows == 0) return;
  constexpr int kThreads = 256;
  const dim3 grid((inter + kThreads - 1) / kThreads, rows);
  silu_mul_kernel<<<grid, kThreads, 0, stream>>>(gate_up, inter, out);
  check_launch("silu_mul");
}

}  // namespace pearl::gpu
