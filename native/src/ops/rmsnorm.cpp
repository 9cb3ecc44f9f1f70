#include <cmath>

#include "ops.h"

namespace pearl::ops {

void rmsnorm(const float* x, int64_t stride, int rows, int dim, const float* weight, float eps, float* out,
             int64_t out_stride) {
  for (int r = 0; r < rows; ++r) {
    const float* in_row = x + r * stride;
    float* out_row = out + r * out_stride;
    // The mean of squares is accumulated in double (sequentially, so in a fixed order) and then rounded,
    // which keeps it at least as accurate as torch's float32 reduction.
    double sum_squares = 0.0;
    for (int i = 0; i < dim; ++i) sum_squares += static_cast<double>(in_row[i]) * in_row[i];
    const float variance = static_cast<float>(sum_squares / dim);
    const float inv_rms = 1.0f / std::sqrt(variance + eps);
    for (int i = 0; i < dim; ++i) out_row[i] = weight[i] * (in_row[i] * inv_rms);
  }
}

}  // namespace pearl::ops
