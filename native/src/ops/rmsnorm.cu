#include "cuda_ops.cuh"

namespace pearl::gpu {

namespace {

constexpr int kThreads = 256;
constexpr int kHeld = 8;  // float4s of x and of the weight a thread loads up front: rows up to 8192 wide

__device__ __forceinline__ float square_sum(const float4& v) { return v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w; }

__device__ __forceinline__ uint2 normed_bf16x4(const float4& x, const float4& w, float inv_rms) {
  const __nv_bfloat162 low = __floats2bfloat162_rn(w.x * (x.x * inv_rms), w.y * (x.y * inv_rms));
  const __nv_bfloat162 high = __floats2bfloat162_rn(w.z * (x.z * inv_rms), w.w * (x.w * inv_rms));
  return make_uint2(*reinterpret_cast<const uint32_t*>(&low), *reinterpret_cast<const uint32_t*>(&high));
}

// One CTA per row, latency-bound at decode sizes: each thread issues all its 16-byte loads of the weight
// (before waiting for the kernel that writes x) and of x before using any (one memory round trip instead
// of one per strided element), sums its squares
// in a fixed order, and warps and the CTA combine in a fixed tree: the order depends on dim only. Rows
// wider than kHeld * kThreads * 4 stream the rest.
__global__ void __launch_bounds__(kThreads) rmsnorm_kernel(const float* __restrict__ x,
                                                           const int32_t* __restrict__ row_index, int dim,
                                                           const float* __restrict__ weight, float eps,
                                                           bf16* __restrict__ out) {
  __shared__ float warp_sums[kThreads / 32];
  allow_dependent_launch();
  const int row = blockIdx.x;
  const int source_row = row_index != nullptr ? row_index[row] : row;
  const int vectors = dim / 4;
  const float4* in = reinterpret_cast<const float4*>(x + static_cast<int64_t>(source_row) * dim);
  const float4* scale = reinterpret_cast<const float4*>(weight);
  uint2* target = reinterpret_cast<uint2*>(out + static_cast<int64_t>(row) * dim);
  const int t = static_cast<int>(threadIdx.x);

  float4 held_x[kHeld];
  float4 held_w[kHeld];
#pragma unroll
  for (int j = 0; j < kHeld; ++j) {
    const int i = j * kThreads + t;
    held_w[j] = i < vectors ? __ldg(scale + i) : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
  }
  wait_for_prerequisites();
#pragma unroll
  for (int j = 0; j < kHeld; ++j) {
    const int i = j * kThreads + t;
    held_x[j] = i < vectors ? in[i] : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
  }
  float sum = 0.0f;
#pragma unroll
  for (int j = 0; j < kHeld; ++j) sum += square_sum(held_x[j]);
  for (int i = kHeld * kThreads + t; i < vectors; i += kThreads) sum += square_sum(in[i]);
  sum = warp_sum(sum);
  if (t % 32 == 0) warp_sums[t / 32] = sum;
  __syncthreads();
  float total = 0.0f;
  for (int w = 0; w < kThreads / 32; ++w) total += warp_sums[w];
  const float inv_rms = rsqrtf(total / static_cast<float>(dim) + eps);
#pragma unroll
  for (int j = 0; j < kHeld; ++j) {
    const int i = j * kThreads + t;
    if (i < vectors) target[i] = normed_bf16x4(held_x[j], held_w[j], inv_rms);
  }
  for (int i = kHeld * kThreads + t; i < vectors; i += kThreads) target[i] = normed_bf16x4(in[i], __ldg(scale + i), inv_rms);
}

}  // namespace

void rmsnorm(const float* x, const int32_t* row_index, int rows, int dim, const float* weight, float eps, bf16* out,
             bool programmatic, cudaStream_t stream) {
  if (rows == 0) return;
  if (dim % 4 != 0) throw std::logic_error("rmsnorm: dim " + std::to_string(dim) + " is not a multiple of 4");
  launch_kernel(rmsnorm_kernel, dim3(rows), dim3(kThreads), 0, programmatic, stream, x, row_index, dim, weight, eps,
                out);
  check_launch("rmsnorm");
}

}  // namespace pearl::gpu
