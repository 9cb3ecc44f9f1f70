#include <cmath>

#include "counter_rng.h"
#include "ops.h"

namespace pearl::ops {

int32_t choose_token(const float* logits, int n, const TokenChoice& choice) {
  const bool sample = choice.temperature > 0.0f;
  const double inv_temperature = sample ? 1.0 / static_cast<double>(choice.temperature) : 0.0;
  const CounterRng rng(choice.seed, choice.position, RandomPurpose::Sample);
  int32_t best = -1;
  double best_key = 0.0;
  for (int32_t i = 0; i < n; ++i) {
    if (std::isnan(logits[i]) || (sample && !std::isfinite(logits[i]))) continue;
    const double key = sample ? gumbel_key(logits[i] * inv_temperature, rng, i) : logits[i];
    if (best < 0 || key > best_key) {
      best = i;
      best_key = key;
    }
  }
  return best;
}

}  // namespace pearl::ops
