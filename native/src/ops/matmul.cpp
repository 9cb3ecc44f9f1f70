#include <algorithm>

#include "ops.h"

namespace pearl::ops {

void matmul(const float* x, int rows, int in, const float* weight, const float* bias, int out, float* y,
            ThreadPool& pool) {
  // Columns are processed in blocks small enough to stay in cache while every row streams past them;
  // each output element is one dot() of a row of x with a row of W, whatever the block or thread.
  constexpr int kColumnBlock = 16;
  const int64_t num_blocks = (out + kColumnBlock - 1) / kColumnBlock;
  const int64_t macs_per_block = static_cast<int64_t>(rows) * in * kColumnBlock;
  const int64_t min_blocks_per_thread = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, macs_per_block));
  pool.parallel_for(num_blocks, min_blocks_per_thread, [&](int64_t first_block, int64_t last_block) {
    for (int64_t block = first_block; block < last_block; ++block) {
      const int begin = static_cast<int>(block * kColumnBlock);
      const int end = std::min(out, begin + kColumnBlock);
      for (int r = 0; r < rows; ++r) {
        const float* x_row = x + static_cast<int64_t>(r) * in;
        float* y_row = y + static_cast<int64_t>(r) * out;
        for (int j = begin; j < end; ++j) {
          const float value = dot(x_row, weight + static_cast<int64_t>(j) * in, in);
          y_row[j] = bias != nullptr ? value + bias[j] : value;
        }
      }
    }
  });
}

}  // namespace pearl::ops
