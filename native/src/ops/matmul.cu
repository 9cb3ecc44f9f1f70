#include <algorithm>
#include <array>
#include <vector>

#include "cuda/check.h"
#include "cuda_ops.cuh"

namespace pearl::gpu {

namespace {

constexpr int kWarps = 8;
constexpr int kChunk = 32;           // k elements per pair of m16n8k16 products
constexpr int kChunksPerStep = 4;    // a warp step covers 128 k: 256 contiguous bytes of each weight row
constexpr int kStep = kChunk * kChunksPerStep;

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

// The weight fragments of one warp step: 16 bytes of each of the step's chunks, for each tile.
template <int kTiles>
struct WeightFragments {
  uint4 w[kChunksPerStep][kTiles];
};

template <int kTiles>
__device__ __forceinline__ void load_weights(WeightFragments<kTiles>& f, int step, int k, int t,
                                             const bf16* const (&weight_row)[kTiles],
                                             const bool (&column_valid)[kTiles]) {
  const uint4 zero = make_uint4(0, 0, 0, 0);
#pragma unroll
  for (int c = 0; c < kChunksPerStep; ++c) {
    const int kk = step + c * kChunk + t * 8;
    const bool inside = kk < k;  // k is a multiple of 8, so a chunk is either whole or absent
#pragma unroll
    for (int tile = 0; tile < kTiles; ++tile) {
      f.w[c][tile] = inside && column_valid[tile] ? load_streaming(weight_row[tile] + kk) : zero;
    }
  }
}

// acc += the step's products. Activations are loaded here, not ahead: every CTA reads the same few rows,
// so they come from L1/L2 and need no registers across the step.
template <int kTiles>
__device__ __forceinline__ void multiply_step(float (&acc)[kTiles][4], const WeightFragments<kTiles>& f, int step,
                                              int k, int t, const bf16* x_low, const bf16* x_high, bool has_low,
                                              bool has_high) {
  const uint4 zero = make_uint4(0, 0, 0, 0);
#pragma unroll
  for (int c = 0; c < kChunksPerStep; ++c) {
    const int kk = step + c * kChunk + t * 8;
    const bool inside = kk < k;
    const uint4 a_low = inside && has_low ? __ldg(reinterpret_cast<const uint4*>(x_low + kk)) : zero;
    const uint4 a_high = inside && has_high ? __ldg(reinterpret_cast<const uint4*>(x_high + kk)) : zero;
#pragma unroll
    for (int tile = 0; tile < kTiles; ++tile) {
      mma_bf16(acc[tile], a_low.x, a_high.x, a_low.y, a_high.y, f.w[c][tile].x, f.w[c][tile].y);
      mma_bf16(acc[tile], a_low.z, a_high.z, a_low.w, a_high.w, f.w[c][tile].z, f.w[c][tile].w);
    }
  }
}

// A CTA owns 8 * kTiles output columns; its 8 warps split k and combine in warp order. A warp keeps the
// weights of kDepth steps in flight: it loads its first kDepth steps before waiting for the kernel that
// produces the activations (programmatic launch), and replaces each step it multiplies by the load kDepth
// steps ahead. None of the parameters changes which products are summed in which order.
//
// Fragment trick: lane (g = lane / 4, t = lane % 4) loads 8 consecutive k of weight row g of each tile
// (one 16-byte load) and the same 8 k of activation rows g and g + 8. The two m16n8k16 products of a
// 32-k chunk then see the k order permuted identically in A and B (logical k 2t, 2t+1 | 2t+8, 2t+9 ->
// physical 8t, 8t+1 | 8t+2, 8t+3 in the first product, 8t+4 .. 8t+7 in the second), which leaves every
// dot product unchanged and keeps all loads 16 bytes wide.
//
// kGated: the weight interleaves a gate and an up projection (interleave_gate_up: in each 8-column tile,
// columns 0-3 are gate rows and 4-7 the up rows of the same 4 intermediate positions), and the CTA writes
// silu(gate) * up as bf16 into gated [rows, n / 2] instead of y: the MLP's activation without a kernel of
// its own, from the same float sums.
template <int kTiles, int kDepth, int kMinBlocks, bool kGated>
__global__ void __launch_bounds__(kWarps * 32, kMinBlocks)
    skinny_matmul_kernel(const bf16* __restrict__ x, int rows, int k, const bf16* __restrict__ weight,
                         const float* __restrict__ bias, int n, float* __restrict__ y, bool accumulate,
                         bf16* __restrict__ gated) {
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

  constexpr int kStride = kWarps * kStep;
  WeightFragments<kTiles> in_flight[kDepth];
#pragma unroll
  for (int d = 0; d < kDepth; ++d) load_weights(in_flight[d], warp * kStep + d * kStride, k, t, weight_row, column_valid);
  wait_for_prerequisites();
  for (int step = warp * kStep; step < k; step += kDepth * kStride) {
#pragma unroll
    for (int d = 0; d < kDepth; ++d) {
      const int current = step + d * kStride;
      if (current < k) multiply_step(acc, in_flight[d], current, k, t, x_low, x_high, has_low, has_high);
      load_weights(in_flight[d], current + kDepth * kStride, k, t, weight_row, column_valid);
    }
  }

  // Every weight of this CTA has been multiplied: the next kernel may launch (as a programmatic dependent)
  // while the CTAs finish their sums, instead of after them.
  allow_dependent_launch();
#pragma unroll
  for (int tile = 0; tile < kTiles; ++tile) {
#pragma unroll
    for (int i = 0; i < 4; ++i) partial[warp][tile][lane][i] = acc[tile][i];
  }
  __syncthreads();
  // Accumulator i of lane l holds row l/4 (+8 for i >= 2), column 2 * (l % 4) + (i & 1) of its tile.
  const auto output = [&](int tile, int row, int column_in_tile) {
    const int l = (row % 8) * 4 + column_in_tile / 2;
    const int i = (row >= 8 ? 2 : 0) + column_in_tile % 2;
    float sum = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) sum += partial[w][tile][l][i];
    return bias != nullptr ? sum + bias[column_base + tile * 8 + column_in_tile] : sum;
  };
  if constexpr (kGated) {
    for (int index = threadIdx.x; index < kTiles * 16 * 4; index += kWarps * 32) {
      const int tile = index / 64;
      const int row = (index / 4) % 16;
      const int j = index % 4;
      const int column = column_base + tile * 8 + j;
      if (row >= rows || column >= n) continue;
      gated[static_cast<int64_t>(row) * (n / 2) + column / 8 * 4 + j] =
          __float2bfloat16(silu_times(output(tile, row, j), output(tile, row, j + 4)));
    }
  } else {
    for (int index = threadIdx.x; index < kTiles * 16 * 8; index += kWarps * 32) {
      const int tile = index / 128;
      const int row = (index / 8) % 16;
      const int c = index % 8;
      const int column = column_base + tile * 8 + c;
      if (row >= rows || column >= n) continue;
      const float sum = output(tile, row, c);
      float* out = y + static_cast<int64_t>(row) * n + column;
      *out = accumulate ? *out + sum : sum;
    }
  }
}

__global__ void add_bias_kernel(float* __restrict__ y, int n, const float* __restrict__ bias) {
  const int row = blockIdx.y;
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
    y[static_cast<int64_t>(row) * n + i] += bias[i];
  }
}

// Where a launch writes: y (float, overwritten or accumulated into), or for a gated product the bf16
// activation `gated`.
struct SkinnyOutput {
  float* y = nullptr;
  bool accumulate = false;
  bf16* gated = nullptr;
};

template <int kTiles, int kDepth, int kMinBlocks>
void launch_skinny(const bf16* x, int rows, int k, const bf16* weight, const float* bias, int n,
                   const SkinnyOutput& output, bool programmatic, cudaStream_t stream) {
  const dim3 grid((n + kTiles * 8 - 1) / (kTiles * 8));
  const auto kernel = output.gated != nullptr ? skinny_matmul_kernel<kTiles, kDepth, kMinBlocks, true>
                                              : skinny_matmul_kernel<kTiles, kDepth, kMinBlocks, false>;
  launch_kernel(kernel, grid, dim3(kWarps * 32), 0, programmatic, stream, x, rows, k, weight, bias, n, output.y,
                output.accumulate, output.gated);
}

using SkinnyLauncher = void (*)(const bf16*, int, int, const bf16*, const float*, int, const SkinnyOutput&, bool,
                                cudaStream_t);

struct SkinnyVariant {
  const char* name;
  SkinnyLauncher launch;
};

// Wider CTAs read more weight rows per activation load but cut the grid into coarser pieces, and a second
// step in flight costs registers, so fewer CTAs fit on an SM; which wins depends on the shape and the card,
// so the backend measures (tune_skinny_matmul). The third template argument is the CTAs per SM the
// registers must allow. Measured and dropped on the H100: 4 CTAs per SM at depth 2, depth 3 at 3 CTAs per
// SM, depth 4 (each slower on every Llama shape, performance.md).
constexpr std::array<SkinnyVariant, 5> kSkinnyVariants = {{
    {"tiles1", launch_skinny<1, 1, 4>},
    {"tiles2", launch_skinny<2, 1, 3>},
    {"tiles4", launch_skinny<4, 1, 1>},
    {"tiles1-prefetch", launch_skinny<1, 2, 2>},
    {"tiles2-prefetch", launch_skinny<2, 2, 2>},
}};

void check_skinny(int rows, int k, int variant) {
  if (rows > kSkinnyMaxRows || k % 8 != 0) {
    throw std::logic_error("skinny_matmul needs at most 16 rows and k a multiple of 8 (got rows " +
                           std::to_string(rows) + ", k " + std::to_string(k) + ")");
  }
  if (variant < 0 || variant >= static_cast<int>(kSkinnyVariants.size())) {
    throw std::logic_error("skinny_matmul: no variant " + std::to_string(variant));
  }
}

__global__ void fill_pattern_kernel(bf16* x, int count) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < count; i += gridDim.x * blockDim.x) {
    x[i] = __float2bfloat16(static_cast<float>((i * 37) % 17 - 8) * 0.0625f);
  }
}

}  // namespace

void skinny_matmul(const bf16* x, int rows, int k, const bf16* weight, const float* bias, int n, float* y,
                   bool accumulate, int variant, bool programmatic, cudaStream_t stream) {
  if (rows == 0) return;
  check_skinny(rows, k, variant);
  kSkinnyVariants[static_cast<size_t>(variant)].launch(x, rows, k, weight, bias, n, SkinnyOutput{y, accumulate, nullptr},
                                                       programmatic, stream);
  check_launch("skinny_matmul");
}

void skinny_matmul_silu(const bf16* x, int rows, int k, const bf16* weight, const float* bias, int n, bf16* out,
                        int variant, bool programmatic, cudaStream_t stream) {
  if (rows == 0) return;
  check_skinny(rows, k, variant);
  if (n % 8 != 0) throw std::logic_error("skinny_matmul_silu needs n a multiple of 8 (got " + std::to_string(n) + ")");
  kSkinnyVariants[static_cast<size_t>(variant)].launch(x, rows, k, weight, bias, n, SkinnyOutput{nullptr, false, out},
                                                       programmatic, stream);
  check_launch("skinny_matmul_silu");
}

int skinny_variant_index(const std::string& name) {
  std::string known;
  for (size_t v = 0; v < kSkinnyVariants.size(); ++v) {
    if (name == kSkinnyVariants[v].name) return static_cast<int>(v);
    known += std::string(v == 0 ? "" : ", ") + kSkinnyVariants[v].name;
  }
  throw std::runtime_error("unknown skinny GEMM variant \"" + name + "\" (known: " + known + ")");
}

SkinnyTuning tune_skinny_matmul(const std::vector<const bf16*>& weights, int k, int n, cudaStream_t stream) {
  constexpr int kRepeats = 7;
  const int variants = static_cast<int>(kSkinnyVariants.size());
  bf16* x = nullptr;
  float* y = nullptr;
  std::vector<cudaEvent_t> events(2 * static_cast<size_t>(variants * kRepeats), nullptr);
  const auto release = [&] {
    for (cudaEvent_t event : events) {
      if (event != nullptr) cudaEventDestroy(event);
    }
    cudaFree(x);
    cudaFree(y);
  };
  try {
    PEARL_CUDA_CHECK(cudaMalloc(&x, static_cast<size_t>(k) * sizeof(bf16)));
    PEARL_CUDA_CHECK(cudaMalloc(&y, static_cast<size_t>(n) * sizeof(float)));
    fill_pattern_kernel<<<64, 256, 0, stream>>>(x, k);
    check_launch("fill_pattern");
    for (cudaEvent_t& event : events) PEARL_CUDA_CHECK(cudaEventCreate(&event));
    for (int v = 0; v < variants; ++v) skinny_matmul(x, 1, k, weights[0], nullptr, n, y, false, v, false, stream);
    // Repeats interleave the variants and walk through the matrices, so no variant finds its weights in L2
    // and drift in the card's clocks touches every variant alike.
    size_t next_weight = 1;
    for (int r = 0; r < kRepeats; ++r) {
      for (int v = 0; v < variants; ++v) {
        const size_t e = 2 * static_cast<size_t>(r * variants + v);
        const bf16* weight = weights[next_weight++ % weights.size()];
        PEARL_CUDA_CHECK(cudaEventRecord(events[e], stream));
        skinny_matmul(x, 1, k, weight, nullptr, n, y, false, v, false, stream);
        PEARL_CUDA_CHECK(cudaEventRecord(events[e + 1], stream));
      }
    }
    PEARL_CUDA_CHECK(cudaStreamSynchronize(stream));
    SkinnyTuning tuning;
    for (int v = 0; v < variants; ++v) {
      std::vector<float> times;
      for (int r = 0; r < kRepeats; ++r) {
        const size_t e = 2 * static_cast<size_t>(r * variants + v);
        float ms = 0.0f;
        PEARL_CUDA_CHECK(cudaEventElapsedTime(&ms, events[e], events[e + 1]));
        times.push_back(ms * 1000.0f);
      }
      std::nth_element(times.begin(), times.begin() + kRepeats / 2, times.end());
      tuning.microseconds.push_back(times[kRepeats / 2]);
      tuning.names.emplace_back(kSkinnyVariants[static_cast<size_t>(v)].name);
      if (tuning.microseconds[static_cast<size_t>(v)] < tuning.microseconds[static_cast<size_t>(tuning.variant)]) {
        tuning.variant = v;
      }
    }
    release();
    return tuning;
  } catch (...) {
    release();
    throw;
  }
}

void add_bias(float* y, int rows, int n, const float* bias, cudaStream_t stream) {
  if (rows == 0) return;
  constexpr int kThreads = 256;
  const dim3 grid((n + kThreads - 1) / kThreads, rows);
  add_bias_kernel<<<grid, kThreads, 0, stream>>>(y, n, bias);
  check_launch("add_bias");
}

}  // namespace pearl::gpu
