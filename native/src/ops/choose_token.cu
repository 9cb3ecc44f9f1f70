#include "counter_rng.h"
#include "cuda_ops.cuh"

namespace pearl::gpu {

namespace {

constexpr int kThreads = 256;
constexpr int kPerThread = 16;  // independent loads in flight per thread
constexpr int kChunk = kThreads * kPerThread;

// A candidate (key, index); index -1 is "none yet". The order is total (larger key, then lower index),
// so the result does not depend on how the reduction is split.
struct Candidate {
  double key;
  int index;
};

__device__ __forceinline__ Candidate better(Candidate a, Candidate b) {
  if (b.index < 0) return a;
  if (a.index < 0) return b;
  if (a.key != b.key) return a.key > b.key ? a : b;
  return a.index < b.index ? a : b;
}

__device__ __forceinline__ Candidate warp_best(Candidate c) {
  for (int offset = 16; offset > 0; offset /= 2) {
    const Candidate other{__shfl_xor_sync(0xffffffffu, c.key, offset), __shfl_xor_sync(0xffffffffu, c.index, offset)};
    c = better(c, other);
  }
  return c;
}

// One CTA per (chunk of kChunk logits, row): the chunk's best candidate under ops::choose_token's rule.
__global__ void __launch_bounds__(kThreads) choose_token_chunk_kernel(const float* __restrict__ logits, int n,
                                                                     const TokenChoiceRow* __restrict__ choices,
                                                                     double* __restrict__ chunk_key,
                                                                     int* __restrict__ chunk_index) {
  __shared__ Candidate warp_results[kThreads / 32];
  const int row = blockIdx.y;
  const int chunk_start = blockIdx.x * kChunk;
  const float* row_logits = logits + static_cast<int64_t>(row) * n;
  float values[kPerThread];
#pragma unroll
  for (int j = 0; j < kPerThread; ++j) {
    const int i = chunk_start + j * kThreads + static_cast<int>(threadIdx.x);
    values[j] = i < n ? __ldg(row_logits + i) : NAN;
  }
  const TokenChoiceRow choice = choices[row];
  const bool sample = choice.temperature > 0.0f;
  const double inv_temperature = sample ? 1.0 / static_cast<double>(choice.temperature) : 0.0;
  const CounterRng rng(choice.seed, choice.position, RandomPurpose::Sample);
  Candidate best{0.0, -1};
#pragma unroll
  for (int j = 0; j < kPerThread; ++j) {
    const float value = values[j];
    if (isnan(value) || (sample && isinf(value))) continue;
    const int i = chunk_start + j * kThreads + static_cast<int>(threadIdx.x);
    const double key = sample ? gumbel_key(value * inv_temperature, rng, i) : static_cast<double>(value);
    best = better(best, Candidate{key, i});
  }
  best = warp_best(best);
  if (threadIdx.x % 32 == 0) warp_results[threadIdx.x / 32] = best;
  __syncthreads();
  if (threadIdx.x < 32) {
    best = threadIdx.x < kThreads / 32 ? warp_results[threadIdx.x] : Candidate{0.0, -1};
    best = warp_best(best);
    if (threadIdx.x == 0) {
      const int64_t slot = static_cast<int64_t>(row) * gridDim.x + blockIdx.x;
      chunk_key[slot] = best.key;
      chunk_index[slot] = best.index;
    }
  }
}

// One warp per row: the best of its chunks.
__global__ void choose_token_rows_kernel(const double* __restrict__ chunk_key, const int* __restrict__ chunk_index,
                                         int chunks, int32_t* __restrict__ out) {
  const int row = blockIdx.x;
  Candidate best{0.0, -1};
  for (int c = static_cast<int>(threadIdx.x); c < chunks; c += 32) {
    const int64_t slot = static_cast<int64_t>(row) * chunks + c;
    best = better(best, Candidate{chunk_key[slot], chunk_index[slot]});
  }
  best = warp_best(best);
  if (threadIdx.x == 0) out[row] = best.index;
}

}  // namespace

size_t choose_token_scratch_bytes(int rows, int n) {
  const size_t slots = static_cast<size_t>(rows) * ((n + kChunk - 1) / kChunk);
  return slots * (sizeof(double) + sizeof(int));
}

void choose_token(const float* logits, int rows, int n, const TokenChoiceRow* choices, void* scratch, int32_t* out,
                  cudaStream_t stream) {
  if (rows == 0) return;
  const int chunks = (n + kChunk - 1) / kChunk;
  double* chunk_key = static_cast<double*>(scratch);
  int* chunk_index = reinterpret_cast<int*>(chunk_key + static_cast<size_t>(rows) * chunks);
  choose_token_chunk_kernel<<<dim3(chunks, rows), kThreads, 0, stream>>>(logits, n, choices, chunk_key, chunk_index);
  check_launch("choose_token_chunk");
  choose_token_rows_kernel<<<rows, 32, 0, stream>>>(chunk_key, chunk_index, chunks, out);
  check_launch("choose_token_rows");
}

}  // namespace pearl::gpu
