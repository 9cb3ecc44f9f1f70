#include "cuda_ops.cuh"

namespace pearl::gpu {

namespace {

constexpr int kWarps = 4;

// One warp per (row, head); lane i handles the pairs (i, i + head_dim/2), (i + 32, ...), ...
__global__ void __launch_bounds__(kWarps * 32) rope_kernel(float* __restrict__ qkv, int64_t stride, int num_heads,
                                                           int num_kv_heads, int head_dim,
                                                           const int32_t* __restrict__ positions,
                                                           const float* __restrict__ inv_freq,
                                                           const float* __restrict__ q_norm,
                                                           const float* __restrict__ k_norm, float eps) {
  const int row = blockIdx.x;
  const int head = blockIdx.y * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (head >= num_heads + num_kv_heads) return;  // whole warps only: no shuffle is left waiting
  const int half = head_dim / 2;
  float* x = qkv + row * stride + static_cast<int64_t>(head) * head_dim;

  float inv_rms = 1.0f;
  const float* norm_weight = q_norm == nullptr ? nullptr : (head < num_heads ? q_norm : k_norm);
  if (norm_weight != nullptr) {
    float sum = 0.0f;
    for (int i = lane; i < half; i += 32) sum += x[i] * x[i] + x[i + half] * x[i + half];
    inv_rms = rsqrtf(warp_sum(sum) / static_cast<float>(head_dim) + eps);
  }
  // The angle is a float32 product, as transformers computes it; sincosf reduces large angles exactly.
  const float position = static_cast<float>(positions[row]);
  for (int i = lane; i < half; i += 32) {
    float first = x[i];
    float second = x[i + half];
    if (norm_weight != nullptr) {
      first = norm_weight[i] * (first * inv_rms);
      second = norm_weight[i + half] * (second * inv_rms);
    }
    float s;
    float c;
    sincosf(inv_freq[i] * position, &s, &c);
    x[i] = first * c - second * s;
    x[i + half] = second * c + first * s;
  }
}

}  // namespace

void rope(float* qkv, int64_t stride, int rows, int num_heads, int num_kv_heads, int head_dim,
          const int32_t* positions, const float* inv_freq, const float* q_norm, const float* k_norm, float eps,
          cudaStream_t stream) {
  if (rows == 0) return;
  const dim3 grid(rows, (num_heads + num_kv_heads + kWarps - 1) / kWarps);
  rope_kernel<<<grid, kWarps * 32, 0, stream>>>(qkv, stride, num_heads, num_kv_heads, head_dim, positions, inv_freq,
                                                q_norm, k_norm, eps);
  check_launch("rope");
}

}  // namespace pearl::gpu
