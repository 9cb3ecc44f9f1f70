#include "cuda_ops.cuh"

namespace pearl::gpu {

namespace {

constexpr int kWarps = 4;

// One warp per (row, head) over the q, k and v heads; lane i handles the pairs (i, i + head_dim/2),
// (i + 32, ...), ... of a q or k head and the elements i, i + 32, ... of a v head.
__global__ void __launch_bounds__(kWarps * 32) rope_store_kv_kernel(
    float* __restrict__ qkv, int64_t stride, int num_heads, int num_kv_heads, int head_dim,
    const int32_t* __restrict__ positions, const float* __restrict__ inv_freq, const float* __restrict__ q_norm,
    const float* __restrict__ k_norm, float eps, const int32_t* __restrict__ slots, bf16* __restrict__ k_cache,
    bf16* __restrict__ v_cache) {
  allow_dependent_launch();
  const int row = blockIdx.x;
  const int head = blockIdx.y * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (head >= num_heads + 2 * num_kv_heads) return;  // whole warps only: no shuffle is left waiting
  const int half = head_dim / 2;
  float* x = qkv + row * stride + static_cast<int64_t>(head) * head_dim;
  const int slot = slots[row];  // negative: a padding row of a graph bucket, nothing to store
  // The angle is a float32 product, as transformers computes it; sincosf reduces large angles exactly.
  const float position = static_cast<float>(positions[row]);
  wait_for_prerequisites();
  const int64_t cache_width = static_cast<int64_t>(num_kv_heads) * head_dim;
  const int kv_head = head - num_heads;

  if (kv_head >= num_kv_heads) {
    if (slot < 0) return;
    bf16* target = v_cache + slot * cache_width + static_cast<int64_t>(kv_head - num_kv_heads) * head_dim;
    for (int i = lane; i < head_dim; i += 32) target[i] = __float2bfloat16(x[i]);
    return;
  }

  float inv_rms = 1.0f;
  const float* norm_weight = q_norm == nullptr ? nullptr : (kv_head < 0 ? q_norm : k_norm);
  if (norm_weight != nullptr) {
    float sum = 0.0f;
    for (int i = lane; i < half; i += 32) sum += x[i] * x[i] + x[i + half] * x[i + half];
    inv_rms = rsqrtf(warp_sum(sum) / static_cast<float>(head_dim) + eps);
  }
  bf16* k_target =
      kv_head >= 0 && slot >= 0 ? k_cache + slot * cache_width + static_cast<int64_t>(kv_head) * head_dim : nullptr;
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
    const float rotated_first = first * c - second * s;
    const float rotated_second = second * c + first * s;
    x[i] = rotated_first;
    x[i + half] = rotated_second;
    if (k_target != nullptr) {
      k_target[i] = __float2bfloat16(rotated_first);
      k_target[i + half] = __float2bfloat16(rotated_second);
    }
  }
}

}  // namespace

void rope_store_kv(float* qkv, int64_t stride, int rows, int num_heads, int head_dim, const int32_t* positions,
                   const float* inv_freq, const float* q_norm, const float* k_norm, float eps, const int32_t* slots,
                   const DeviceKvLayer& kv, bool programmatic, cudaStream_t stream) {
  if (rows == 0) return;
  const dim3 grid(rows, (num_heads + 2 * kv.num_kv_heads + kWarps - 1) / kWarps);
  launch_kernel(rope_store_kv_kernel, grid, dim3(kWarps * 32), 0, programmatic, stream, qkv, stride, num_heads,
                kv.num_kv_heads, head_dim, positions, inv_freq, q_norm, k_norm, eps, slots, kv.k, kv.v);
  check_launch("rope_store_kv");
}

}  // namespace pearl::gpu
