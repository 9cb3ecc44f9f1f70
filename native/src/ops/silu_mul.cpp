#include <cmath>

#include "ops.h"

namespace pearl::ops {

void silu_mul(const float* gate_up, int rows, int inter, float* out) {
  for (int r = 0; r < rows; ++r) {
    const float* gate = gate_up + static_cast<int64_t>(r) * 2 * inter;
    const float* up = gate + inter;
    float* out_row = out + static_cast<int64_t>(r) * inter;
    for (int i = 0; i < inter; ++i) {
      const float g = gate[i];
      out_row[i] = g / (1.0f + std::exp(-g)) * up[i];
    }
  }
}

}  // namespace pearl::ops
