#include "cuda_ops.cuh"

namespace pearl::gpu {

namespace {

constexpr int kWarps = 4;

// One warp per (row, head) over the q, k and v heads; lane i handles the pairs (i, i + head_dim/2),
// (i + 32, ...), ... of a q or k head and the elements i, i + 32, ... of a v head.
__global__ void __launch_bounds__(kWarps * 32)
    rope_store_kv_kernel(const float* __restrict__ qkv, int64_t stride, const float* __restrict__ q_norm,
                         const float* __restrict__ k_norm, float eps, RopeOutputs out) {
  allow_dependent_launch();
  const int row = blockIdx.x;
  const int head = blockIdx.y * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int num_heads = out.num_heads;
  const int num_kv_heads = out.kv.num_kv_heads;
  const int head_dim = out.kv.head_dim;
  if (head >= num_heads + 2 * num_kv_heads) return;  // whole warps only: no shuffle is left waiting
  const int half = head_dim / 2;
  const float* x = qkv + row * stride + static_cast<int64_t>(head) * head_dim;
  wait_for_prerequisites();

  const int v_head = head - num_heads - num_kv_heads;
  if (v_head >= 0) {
    for (int i = lane; i < head_dim; i += 32) store_value(out, row, v_head, i, x[i]);
    return;
  }
  float inv_rms = 1.0f;
  const float* norm_weight = q_norm == nullptr ? nullptr : (head < num_heads ? q_norm : k_norm);
  if (norm_weight != nullptr) {
    float sum = 0.0f;
    for (int i = lane; i < half; i += 32) {
      const float first = x[rope_pair_row(i, head_dim)];
      const float second = x[rope_pair_row(i + half, head_dim)];
      sum += first * first + second * second;
    }
    inv_rms = rsqrtf(warp_sum(sum) / static_cast<float>(head_dim) + eps);
  }
  for (int i = lane; i < half; i += 32) {
    float first = x[rope_pair_row(i, head_dim)];
    float second = x[rope_pair_row(i + half, head_dim)];
    if (norm_weight != nullptr) {
      first = norm_weight[i] * (first * inv_rms);
      second = norm_weight[i + half] * (second * inv_rms);
    }
    store_rotated(out, row, head, i, first, second);
  }
}

}  // namespace

void rope_store_kv(const float* qkv, int64_t stride, int rows, const float* q_norm, const float* k_norm, float eps,
                   const RopeOutputs& out, bool programmatic, cudaStream_t stream) {
  if (rows == 0) return;
  const dim3 grid(rows, (out.num_heads + 2 * out.kv.num_kv_heads + kWarps - 1) / kWarps);
  launch_kernel(rope_store_kv_kernel, grid, dim3(kWarps * 32), 0, programmatic, stream, qkv, stride, q_norm, k_norm,
                eps, out);
  check_launch("rope_store_kv");
}

}  // namespace pearl::gpu
