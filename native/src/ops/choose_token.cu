#include <cmath>

#include "counter_rng.h"
#include "token_candidate.cuh"

namespace pearl::gpu {

namespace {

// One CTA per (chunk of kChooseChunk logits, row): the chunk's best candidate under ops::choose_token's rule.
__global__ void __launch_bounds__(kChooseThreads)
    choose_token_chunk_kernel(const float* __restrict__ logits, int n, const TokenChoiceRow* __restrict__ choices,
                              double* __restrict__ chunk_key, int* __restrict__ chunk_index) {
  __shared__ Candidate warp_results[kChooseThreads / 32];
  const int row = blockIdx.y;
  const int chunk_start = blockIdx.x * kChooseChunk;
  const float* row_logits = logits + static_cast<int64_t>(row) * n;
  float values[kChoosePerThread];
#pragma unroll
  for (int j = 0; j < kChoosePerThread; ++j) {
    const int i = chunk_start + j * kChooseThreads + static_cast<int>(threadIdx.x);
    values[j] = i < n ? __ldg(row_logits + i) : NAN;
  }
  const TokenChoiceRow choice = choices[row];
  const bool sample = choice.temperature > 0.0f;
  const double inv_temperature = sample ? 1.0 / static_cast<double>(choice.temperature) : 0.0;
  const CounterRng rng(choice.seed, choice.position, RandomPurpose::Sample);
  Candidate best{0.0, -1};
#pragma unroll
  for (int j = 0; j < kChoosePerThread; ++j) {
    const float value = values[j];
    if (isnan(value) || (sample && isinf(value))) continue;
    const int i = chunk_start + j * kChooseThreads + static_cast<int>(threadIdx.x);
    const double key = sample ? gumbel_key(value * inv_temperature, rng, i) : static_cast<double>(value);
    best = better(best, Candidate{key, i});
  }
  best = warp_best(best);
  if (threadIdx.x % 32 == 0) warp_results[threadIdx.x / 32] = best;
  __syncthreads();
  if (threadIdx.x < 32) {
    best = threadIdx.x < kChooseThreads / 32 ? warp_results[threadIdx.x] : Candidate{0.0, -1};
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
                                         int chunks, const TokenChoiceRow* __restrict__ choices,
                                         ChosenTokenRow* __restrict__ out) {
  const int row = blockIdx.x;
  Candidate best{0.0, -1};
  for (int c = static_cast<int>(threadIdx.x); c < chunks; c += 32) {
    const int64_t slot = static_cast<int64_t>(row) * chunks + c;
    best = better(best, Candidate{chunk_key[slot], chunk_index[slot]});
  }
  best = warp_best(best);
  if (threadIdx.x == 0) {
    // Only greedy rows judge a draft here (sampled ones are processed rows, redrawn by choose_processed):
    // their p is one-hot on the argmax, so the residual norm(max(0, p - q)) is the argmax too, or empty,
    // when p's own draw (the argmax again) stands in.
    const int32_t draft = choices[row].draft_token;
    const bool judges = draft >= 0;
    out[row] = ChosenTokenRow{best.index, judges ? best.index : -1, judges && draft == best.index ? 1.0 : 0.0};
  }
}

}  // namespace

size_t choose_token_scratch_bytes(int rows, int n) {
  const size_t slots = static_cast<size_t>(rows) * ((n + kChooseChunk - 1) / kChooseChunk);
  return slots * (sizeof(double) + sizeof(int));
}

void choose_token(const float* logits, int rows, int n, const TokenChoiceRow* choices, void* scratch,
                  ChosenTokenRow* out, cudaStream_t stream) {
  if (rows == 0) return;
  const int chunks = (n + kChooseChunk - 1) / kChooseChunk;
  double* chunk_key = static_cast<double*>(scratch);
  int* chunk_index = reinterpret_cast<int*>(chunk_key + static_cast<size_t>(rows) * chunks);
  choose_token_chunk_kernel<<<dim3(chunks, rows), kChooseThreads, 0, stream>>>(logits, n, choices, chunk_key,
                                                                               chunk_index);
  check_launch("choose_token_chunk");
  choose_token_rows_kernel<<<rows, 32, 0, stream>>>(chunk_key, chunk_index, chunks, choices, out);
  check_launch("choose_token_rows");
}

}  // namespace pearl::gpu
