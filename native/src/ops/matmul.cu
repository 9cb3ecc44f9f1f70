#include "cuda_ops.cuh"

namespace pearl::gpu {

namespace {

constexpr int kWarps = 8;
constexpr int kChunk = 32;           // k elements per pair of m16n8k16 products
constexpr int kChunksPerStep = 4;    // a warp step covers 128 k: 256 contiguous bytes of each weight row
constexpr int kStep = kChunk * kChunksPerStep;
constexpr int kTargetCtas = 264;     // two CTAs of 8 warps per SM on an H100

// Weights are read exactly once: skip L1. A warp step reads 256 contiguous bytes of each of its rows in
// 64-byte pieces, so L2 is asked to fetch the whole 256-byte block at the first touch (longer DRAM bursts).
__device__ __forceinline__ uint4 load_streaming(const bf16* pointer) {
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(pointer));
  return v;
}

__device__ __forceinline__ void mma_bf16(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                         uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// A CTA owns 8 * kTiles output columns; its 8 warps split k and combine in warp order.
//
// Fragment trick: lane (g = lane / 4, t = lane % 4) loads 8 consecutive k of weight row g of each tile
// (one 16-byte load) and the same 8 k of activation rows g and g + 8. The two m16n8k16 products of a
// 32-k chunk then see the k order permuted identically in A and B (logical k 2t, 2t+1 | 2t+8, 2t+9 ->
// physical 8t, 8t+1 | 8t+2, 8t+3 in the first product, 8t+4 .. 8t+7 in the second), which leaves every
// dot product unchanged and keeps all loads 16 bytes wide.
template <int kTiles>
__global__ void __launch_bounds__(kWarps * 32) skinny_matmul_kernel(const bf16* __restrict__ x, int rows, int k,
                                                                    const bf16* __restrict__ weight,
                                                                    const float* __restrict__ bias, int n,
                                                                    float* __restrict__ y, bool accumulate) {
  __shared__ float partial[kWarps][kTiles][32][4];
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int g = lane / 4;
  const int t = lane % 4;
  const int column_base = blockIdx.x * kTiles * 8;

  const bf16* weight_row[kTiles];
  bool column_valid[kTiles];
#pragma unroll
  for (int tile = 0; tile < kTiles; ++tile) {
    const int column = column_base + tile * 8 + g;
    column_valid[tile] = column < n;
    weight_row[tile] = weight + static_cast<int64_t>(column_valid[tile] ? column : 0) * k;
  }
  const bool has_low = g < rows;
  const bool has_high = g + 8 < rows;
  const bf16* x_low = x + static_cast<int64_t>(has_low ? g : 0) * k;
  const bf16* x_high = x + static_cast<int64_t>(has_high ? g + 8 : 0) * k;

  float acc[kTiles][4];
#pragma unroll
  for (int tile = 0; tile < kTiles; ++tile) {
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[tile][i] = 0.0f;
  }

  const uint4 zero = make_uint4(0, 0, 0, 0);
  for (int step = warp * kStep; step < k; step += kWarps * kStep) {
    uint4 w[kChunksPerStep][kTiles];
    uint4 a_low[kChunksPerStep];
    uint4 a_high[kChunksPerStep];
#pragma unroll
    for (int c = 0; c < kChunksPerStep; ++c) {
      const int kk = step + c * kChunk + t * 8;
      const bool inside = kk < k;  // k is a multiple of 8, so a chunk is either whole or absent
#pragma unroll
      for (int tile = 0; tile < kTiles; ++tile) {
        w[c][tile] = inside && column_valid[tile] ? load_streaming(weight_row[tile] + kk) : zero;
      }
      a_low[c] = inside && has_low ? __ldg(reinterpret_cast<const uint4*>(x_low + kk)) : zero;
      a_high[c] = inside && has_high ? __ldg(reinterpret_cast<const uint4*>(x_high + kk)) : zero;
    }
#pragma unroll
    for (int c = 0; c < kChunksPerStep; ++c) {
#pragma unroll
      for (int tile = 0; tile < kTiles; ++tile) {
        mma_bf16(acc[tile], a_low[c].x, a_high[c].x, a_low[c].y, a_high[c].y, w[c][tile].x, w[c][tile].y);
        mma_bf16(acc[tile], a_low[c].z, a_high[c].z, a_low[c].w, a_high[c].w, w[c][tile].z, w[c][tile].w);
      }
    }
  }

#pragma unroll
  for (int tile = 0; tile < kTiles; ++tile) {
#pragma unroll
    for (int i = 0; i < 4; ++i) partial[warp][tile][lane][i] = acc[tile][i];
  }
  __syncthreads();
  // Accumulator i of lane l holds row l/4 (+8 for i >= 2), column 2 * (l % 4) + (i & 1) of its tile.
  for (int index = threadIdx.x; index < kTiles * 32 * 4; index += kWarps * 32) {
    const int tile = index / 128;
    const int l = (index / 4) % 32;
    const int i = index % 4;
    const int row = l / 4 + (i >= 2 ? 8 : 0);
    const int column = column_base + tile * 8 + (l % 4) * 2 + (i & 1);
    if (row >= rows || column >= n) continue;
    float sum = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) sum += partial[w][tile][l][i];
    if (bias != nullptr) sum += bias[column];
    float* out = y + static_cast<int64_t>(row) * n + column;
    *out = accumulate ? *out + sum : sum;
  }
}

__global__ void add_bias_kernel(float* __restrict__ y, int n, const float* __restrict__ bias) {
  const int row = blockIdx.y;
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
    y[static_cast<int64_t>(row) * n + i] += bias[i];
  }
}

template <int kTiles>
void launch_skinny(const bf16* x, int rows, int k, const bf16* weight, const float* bias, int n, float* y,
                   bool accumulate, cudaStream_t stream) {
  const int ctas = (n + kTiles * 8 - 1) / (kTiles * 8);
  skinny_matmul_kernel<kTiles><<<ctas, kWarps * 32, 0, stream>>>(x, rows, k, weight, bias, n, y, accumulate);
}

}  // namespace

void skinny_matmul(const bf16* x, int rows, int k, const bf16* weight, const float* bias, int n, float* y,
                   bool accumulate, cudaStream_t stream) {
  if (rows == 0) return;
  if (rows > kSkinnyMaxRows || k % 8 != 0) {
    throw std::logic_error("skinny_matmul needs at most 16 rows and k a multiple of 8 (got rows " +
                           std::to_string(rows) + ", k " + std::to_string(k) + ")");
  }
  // Wider CTAs once there are enough columns to fill the GPU; the choice never changes a result.
  if ((n + 31) / 32 >= kTargetCtas) {
    launch_skinny<4>(x, rows, k, weight, bias, n, y, accumulate, stream);
  } else if ((n + 15) / 16 >= kTargetCtas) {
    launch_skinny<2>(x, rows, k, weight, bias, n, y, accumulate, stream);
  } else {
    launch_skinny<1>(x, rows, k, weight, bias, n, y, accumulate, stream);
  }
  check_launch("skinny_matmul");
}

void add_bias(float* y, int rows, int n, const float* bias, cudaStream_t stream) {
  if (rows == 0) return;
  constexpr int kThreads = 256;
  const dim3 grid((n + kThreads - 1) / kThreads, rows);
  add_bias_kernel<<<grid, kThreads, 0, stream>>>(y, n, bias);
  check_launch("add_bias");
}

}  // namespace pearl::gpu
