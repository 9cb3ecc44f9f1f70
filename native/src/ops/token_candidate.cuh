// The reduction every token draw on the device shares: a row's logits in chunks of kChooseChunk, one CTA of
// kChooseThreads per (chunk, row) keeping the chunk's best candidate, then the best of the row's chunks.
// choose_token.cu (the argmax and whole-softmax draws inside a step's graph) and choose_processed.cu
// (draws from a processed distribution) both reduce this way.
#pragma once

#include "cuda_ops.cuh"

namespace pearl::gpu {

constexpr int kChooseThreads = 256;
constexpr int kChoosePerThread = 16;  // independent loads in flight per thread
constexpr int kChooseChunk = kChooseThreads * kChoosePerThread;

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

}  // namespace pearl::gpu
