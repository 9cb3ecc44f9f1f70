#include "ops.h"

namespace pearl::ops {

void residual_add(float* x, const float* delta, int64_t count) {
  for (int64_t i = 0; i < count; ++i) x[i] += delta[i];
}

}  // namespace pearl::ops
