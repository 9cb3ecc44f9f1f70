#include <cmath>

#include "ops.h"

namespace pearl::ops {

int32_t argmax(const float* logits, int n) {
  int32_t best = -1;
  for (int32_t i = 0; i < n; ++i) {
    if (std::isnan(logits[i])) continue;
    if (best < 0 || logits[i] > logits[best]) best = i;
  }
  return best;
}

}  // namespace pearl::ops
