#include <cstring>

#include "ops.h"

namespace pearl::ops {

void embedding(const float* table, int dim, const int32_t* tokens, int rows, float* out) {
  const size_t row_bytes = static_cast<size_t>(dim) * sizeof(float);
  for (int r = 0; r < rows; ++r) {
    std::memcpy(out + static_cast<int64_t>(r) * dim, table + static_cast<int64_t>(tokens[r]) * dim, row_bytes);
  }
}

}  // namespace pearl::ops
