#include <cstring>

#include "ops.h"

namespace pearl::ops {

void kv_store(const float* k, const float* v, int64_t stride, int rows, const int32_t* slots, const KvLayerView& kv) {
  const int64_t width = static_cast<int64_t>(kv.num_kv_heads) * kv.head_dim;
  const size_t bytes = static_cast<size_t>(width) * sizeof(float);
  for (int r = 0; r < rows; ++r) {
    const int64_t offset = static_cast<int64_t>(slots[r]) * width;
    std::memcpy(kv.k + offset, k + r * stride, bytes);
    std::memcpy(kv.v + offset, v + r * stride, bytes);
  }
}

}  // namespace pearl::ops
