#include <algorithm>
#include <cmath>
#include <vector>

#include "ops.h"

namespace pearl::ops {

void attention(const float* q, int64_t q_stride, int rows, int num_heads, const KvLayerView& kv,
               const AttentionRows& batch, float* out, ThreadPool& pool) {
  const int head_dim = kv.head_dim;
  const int group = num_heads / kv.num_kv_heads;
  const int64_t kv_width = static_cast<int64_t>(kv.num_kv_heads) * head_dim;
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(head_dim)));
  const int64_t tasks = static_cast<int64_t>(rows) * num_heads;

  pool.parallel_for(tasks, 4, [&](int64_t first_task, int64_t last_task) {
    std::vector<float> scores;
    std::vector<float> accumulator(static_cast<size_t>(head_dim));
    for (int64_t task = first_task; task < last_task; ++task) {
      const int r = static_cast<int>(task / num_heads);
      const int h = static_cast<int>(task % num_heads);
      const int kv_head = h / group;
      const int position = batch.positions[r];
      const int start = batch.sliding_window > 0 ? std::max(0, position - batch.sliding_window + 1) : 0;
      const std::vector<int32_t>& table = (*batch.block_tables)[static_cast<size_t>(batch.row_table[r])];
      const float* q_head = q + r * q_stride + static_cast<int64_t>(h) * head_dim;

      // Softmax over the keys in position order: scores, their max, exp and sum, then the weighted sum
      // of values in the same order, normalized once at the end.
      const int count = position - start + 1;
      scores.resize(static_cast<size_t>(count));
      float max_score = -INFINITY;
      for (int p = start; p <= position; ++p) {
        const int64_t slot = static_cast<int64_t>(table[static_cast<size_t>(p / kv.block_size)]) * kv.block_size +
                             p % kv.block_size;
        const float* k_head = kv.k + slot * kv_width + static_cast<int64_t>(kv_head) * head_dim;
        const float score = dot(q_head, k_head, head_dim) * scale;
        scores[static_cast<size_t>(p - start)] = score;
        max_score = std::max(max_score, score);
      }
      float sum = 0.0f;
      for (float& score : scores) {
        score = std::exp(score - max_score);
        sum += score;
      }
      std::fill(accumulator.begin(), accumulator.end(), 0.0f);
      for (int p = start; p <= position; ++p) {
        const int64_t slot = static_cast<int64_t>(table[static_cast<size_t>(p / kv.block_size)]) * kv.block_size +
                             p % kv.block_size;
        const float* v_head = kv.v + slot * kv_width + static_cast<int64_t>(kv_head) * head_dim;
        const float weight = scores[static_cast<size_t>(p - start)];
        for (int d = 0; d < head_dim; ++d) accumulator[static_cast<size_t>(d)] += weight * v_head[d];
      }
      float* out_head = out + static_cast<int64_t>(r) * num_heads * head_dim + static_cast<int64_t>(h) * head_dim;
      const float inv_sum = 1.0f / sum;
      for (int d = 0; d < head_dim; ++d) out_head[d] = accumulator[static_cast<size_t>(d)] * inv_sum;
    }
  });
}

}  // namespace pearl::ops
