#include "cuda_ops.cuh"

namespace pearl::gpu {

namespace {

constexpr int kThreads = 256;
constexpr int kPerThread = 16;  // independent loads in flight per thread
constexpr int kChunk = kThreads * kPerThread;

// A candidate (value, index); index -1 is "none yet". The order is total (larger value, then lower
// index), so the result does not depend on how the reduction is split.
struct Candidate {
  float value;
  int index;
};

__device__ __forceinline__ Candidate better(Candidate a, Candidate b) {
  if (b.index < 0) return a;
  if (a.index < 0) return b;
  if (a.value != b.value) return a.value > b.value ? a : b;
  return a.index < b.index ? a : b;
}

__device__ __forceinline__ Candidate warp_best(Candidate c) {
  for (int offset = 16; offset > 0; offset /= 2) {
    const Candidate other{__shfl_xor_sync(0xffffffffu, c.value, offset), __shfl_xor_sync(0xffffffffu, c.index, offset)};
    c = better(c, other);
  }
  return c;
}

// One CTA per (chunk of kChunk logits, row): the chunk's best candidate.
__global__ void __launch_bounds__(kThreads) argmax_chunk_kernel(const float* __restrict__ logits, int n,
                                                               float* __restrict__ chunk_value,
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
  Candidate best{0.0f, -1};
#pragma unroll
  for (int j = 0; j < kPerThread; ++j) {
    if (!isnan(values[j])) best = better(best, Candidate{values[j], chunk_start + j * kThreads + static_cast<int>(threadIdx.x)});
  }
  best = warp_best(best);
  if (threadIdx.x % 32 == 0) warp_results[threadIdx.x / 32] = best;
  __syncthreads();
  if (threadIdx.x < 32) {
    best = threadIdx.x < kThreads / 32 ? warp_results[threadIdx.x] : Candidate{0.0f, -1};
    best = warp_best(best);
    if (threadIdx.x == 0) {
      const int64_t slot = static_cast<int64_t>(row) * gridDim.x + blockIdx.x;
      chunk_value[slot] = best.value;
      chunk_index[slot] = best.index;
    }
  }
}

// One warp per row: the best of its chunks.
__global__ void argmax_rows_kernel(const float* __restrict__ chunk_value, const int* __restrict__ chunk_index,
                                   int chunks, int32_t* __restrict__ out) {
  const int row = blockIdx.x;
  Candidate best{0.0f, -1};
  for (int c = static_cast<int>(threadIdx.x); c < chunks; c += 32) {
    const int64_t slot = static_cast<int64_t>(row) * chunks + c;
    best = better(best, Candidate{chunk_value[slot], chunk_index[slot]});
  }
  best = warp_best(best);
  if (threadIdx.x == 0) out[row] = best.index;
}

}  // namespace

size_t argmax_scratch_floats(int rows, int n) { return 2 * static_cast<size_t>(rows) * ((n + kChunk - 1) / kChunk); }

void argmax(const float* logits, int rows, int n, float* scratch, int32_t* out, cudaStream_t stream) {
  if (rows == 0) return;
  const int chunks = (n + kChunk - 1) / kChunk;
  float* chunk_value = scratch;
  int* chunk_index = reinterpret_cast<int*>(scratch + static_cast<size_t>(rows) * chunks);
  argmax_chunk_kernel<<<dim3(chunks, rows), kThreads, 0, stream>>>(logits, n, chunk_value, chunk_index);
  check_launch("argmax_chunk");
  argmax_rows_kernel<<<rows, 32, 0, stream>>>(chunk_value, chunk_index, chunks, out);
  check_launch("argmax_rows");
}

}  // namespace pearl::gpu
