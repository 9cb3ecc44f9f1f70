// Counter-based randomness: every draw is a pure function of (seed, position, purpose, index), so a
// request's random choices do not depend on what else shares a batch or on the order of calls.
#pragma once

#include <cmath>
#include <cstdint>

// The same draws on the host and in CUDA kernels (ops/choose_token.cu, ops/choose_processed.cu).
#ifdef __CUDACC__
#define PEARL_HOST_DEVICE __host__ __device__
#else
#define PEARL_HOST_DEVICE
#endif

namespace pearl {

// splitmix64's finalizer: a bijective 64-bit mixer with full avalanche.
PEARL_HOST_DEVICE inline uint64_t mix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// What a draw is for; distinct purposes give independent streams at the same position.
enum class RandomPurpose : uint64_t { Sample = 1, Accept = 2, Residual = 3 };

class CounterRng {
 public:
  PEARL_HOST_DEVICE CounterRng(uint64_t seed, int64_t position, RandomPurpose purpose)
      : key_(mix64(mix64(mix64(seed) ^ static_cast<uint64_t>(position)) ^ static_cast<uint64_t>(purpose))) {}

  // Uniform in the open interval (0, 1), from 53 random bits.
  PEARL_HOST_DEVICE double uniform(uint64_t index) const {
    const uint64_t bits = mix64(key_ ^ mix64(index)) >> 11;
    return (static_cast<double>(bits) + 0.5) * 0x1.0p-53;
  }

  // Exponential(1) noise E = -log U; -log E is standard Gumbel noise.
  PEARL_HOST_DEVICE double exponential(uint64_t index) const { return -::log(uniform(index)); }

 private:
  uint64_t key_;
};

// Gumbel-max key of token `index` whose unnormalized log-probability is `log_weight`: log_weight + G with
// G = -log E standard Gumbel noise. The largest key over a support is a draw from the normalized weights;
// adding a constant to every log_weight (normalizing) does not change which key is largest.
PEARL_HOST_DEVICE inline double gumbel_key(double log_weight, const CounterRng& rng, int32_t index) {
  return log_weight - ::log(rng.exponential(static_cast<uint64_t>(index)));
}

}  // namespace pearl
