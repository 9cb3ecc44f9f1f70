#include "cuda_ops.cuh"

namespace pearl::gpu {

namespace {

__global__ void kv_store_kernel(const float* __restrict__ k, const float* __restrict__ v, int64_t stride,
                                const int32_t* __restrict__ slots, bf16* __restrict__ k_cache,
                                bf16* __restrict__ v_cache, int width) {
  const int row = blockIdx.x;
  const int slot = slots[row];
  if (slot < 0) return;  // a padding row of a graph bucket
  const int64_t source = row * stride;
  const int64_t target = static_cast<int64_t>(slot) * width;
  for (int i = threadIdx.x; i < width; i += blockDim.x) {
    k_cache[target + i] = __float2bfloat16(k[source + i]);
    v_cache[target + i] = __float2bfloat16(v[source + i]);
  }
}

}  // namespace

void kv_store(const float* k, const float* v, int64_t stride, int rows, const int32_t* slots,
              const DeviceKvLayer& kv, cudaStream_t stream) {
  if (rows == 0) return;
  const int width = kv.num_kv_heads * kv.head_dim;
  const int threads = width >= 256 ? 256 : ((width + 31) / 32) * 32;
  kv_store_kernel<<<rows, threads, 0, stream>>>(k, v, stride, slots, kv.k, kv.v, width);
  check_launch("kv_store");
}

}  // namespace pearl::gpu
