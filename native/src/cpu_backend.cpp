#include "cpu_backend.h"

#include <algorithm>
#include <cstring>

#include "ops/ops.h"

namespace pearl {

CpuBackend::CpuBackend(const ModelConfig& config, const Checkpoint& checkpoint, const EngineOptions& options)
    : config_(config),
      weights_(load_weights_f32(config, checkpoint)),
      pool_(options.num_threads),
      inv_freq_(ops::rope_inv_freq(config.rope, config.head_dim)),
      block_size_(options.block_size) {
  num_blocks_ = options.num_blocks > 0
                    ? options.num_blocks
                    : default_num_blocks(config, block_size_, 2 * config.num_layers * floats_per_block() *
                                                                  static_cast<int64_t>(sizeof(float)));
  const size_t layer_floats = static_cast<size_t>(num_blocks_) * static_cast<size_t>(floats_per_block());
  for (int layer = 0; layer < config.num_layers; ++layer) {
    k_cache_.emplace_back(new float[layer_floats]);
    v_cache_.emplace_back(new float[layer_floats]);
  }
}

int64_t CpuBackend::floats_per_block() const {
  return static_cast<int64_t>(block_size_) * config_.num_kv_heads * config_.head_dim;
}

void CpuBackend::copy_block(int32_t source, int32_t destination) {
  const int64_t block_floats = floats_per_block();
  const size_t bytes = static_cast<size_t>(block_floats) * sizeof(float);
  for (int layer = 0; layer < config_.num_layers; ++layer) {
    std::memcpy(k_cache_[static_cast<size_t>(layer)].get() + destination * block_floats,
                k_cache_[static_cast<size_t>(layer)].get() + source * block_floats, bytes);
    std::memcpy(v_cache_[static_cast<size_t>(layer)].get() + destination * block_floats,
                v_cache_[static_cast<size_t>(layer)].get() + source * block_floats, bytes);
  }
}

void CpuBackend::begin_forward(const ForwardBatch& batch, float* logits, ops::ChosenToken* chosen,
                               ops::TokenProb* q_entries) {
  const int rows = static_cast<int>(batch.tokens.size());
  if (rows == 0) return;
  const int hidden = config_.hidden_size;
  const int head_dim = config_.head_dim;
  const int q_dim = config_.num_heads * head_dim;
  const int kv_dim = config_.num_kv_heads * head_dim;
  const int qkv_width = q_dim + 2 * kv_dim;
  const int inter = config_.intermediate_size;
  const float eps = static_cast<float>(config_.rms_norm_eps);
  const auto sized = [rows](int width) { return std::vector<float>(static_cast<size_t>(rows) * width); };

  std::vector<float> x = sized(hidden);
  std::vector<float> normed = sized(hidden);
  std::vector<float> qkv = sized(qkv_width);
  std::vector<float> attended = sized(q_dim);
  std::vector<float> projected = sized(hidden);
  std::vector<float> gate_up = sized(2 * inter);
  std::vector<float> activated = sized(inter);

  ops::AttentionRows attention_rows;
  attention_rows.positions = batch.positions.data();
  attention_rows.row_table = batch.row_table.data();
  attention_rows.block_tables = &batch.block_tables;
  attention_rows.sliding_window = config_.sliding_window;

  ops::embedding(weights_.embed.data(), hidden, batch.tokens.data(), rows, x.data());
  for (int layer = 0; layer < config_.num_layers; ++layer) {
    const LayerWeights& w = weights_.layers[static_cast<size_t>(layer)];
    ops::rmsnorm(x.data(), hidden, rows, hidden, w.input_norm.data(), eps, normed.data(), hidden);
    ops::matmul(normed.data(), rows, hidden, w.qkv.weight.data(), w.qkv.bias.empty() ? nullptr : w.qkv.bias.data(),
                qkv_width, qkv.data(), pool_);
    if (config_.qk_norm) {
      for (int r = 0; r < rows; ++r) {
        float* row = qkv.data() + static_cast<int64_t>(r) * qkv_width;
        ops::rmsnorm(row, head_dim, config_.num_heads, head_dim, w.q_norm.data(), eps, row, head_dim);
        ops::rmsnorm(row + q_dim, head_dim, config_.num_kv_heads, head_dim, w.k_norm.data(), eps, row + q_dim,
                     head_dim);
      }
    }
    // q heads and k heads are adjacent in each row, so one call rotates both.
    ops::rope(qkv.data(), qkv_width, rows, config_.num_heads + config_.num_kv_heads, head_dim, batch.positions.data(),
              inv_freq_.data());

    ops::KvLayerView kv;
    kv.k = k_cache_[static_cast<size_t>(layer)].get();
    kv.v = v_cache_[static_cast<size_t>(layer)].get();
    kv.block_size = block_size_;
    kv.num_kv_heads = config_.num_kv_heads;
    kv.head_dim = head_dim;
    ops::kv_store(qkv.data() + q_dim, qkv.data() + q_dim + kv_dim, qkv_width, rows, batch.slots.data(), kv);
    ops::attention(qkv.data(), qkv_width, rows, config_.num_heads, kv, attention_rows, attended.data(), pool_);

    ops::matmul(attended.data(), rows, q_dim, w.o.weight.data(), w.o.bias.empty() ? nullptr : w.o.bias.data(), hidden,
                projected.data(), pool_);
    ops::residual_add(x.data(), projected.data(), static_cast<int64_t>(rows) * hidden);

    ops::rmsnorm(x.data(), hidden, rows, hidden, w.post_attention_norm.data(), eps, normed.data(), hidden);
    ops::matmul(normed.data(), rows, hidden, w.gate_up.weight.data(),
                w.gate_up.bias.empty() ? nullptr : w.gate_up.bias.data(), 2 * inter, gate_up.data(), pool_);
    ops::silu_mul(gate_up.data(), rows, inter, activated.data());
    ops::matmul(activated.data(), rows, inter, w.down.weight.data(), w.down.bias.empty() ? nullptr : w.down.bias.data(),
                hidden, projected.data(), pool_);
    ops::residual_add(x.data(), projected.data(), static_cast<int64_t>(rows) * hidden);
  }

  const int outputs = static_cast<int>(batch.logit_rows.size());
  if (outputs == 0) return;
  std::vector<float> final_hidden(static_cast<size_t>(outputs) * hidden);
  for (int i = 0; i < outputs; ++i) {
    const float* source = x.data() + static_cast<int64_t>(batch.logit_rows[static_cast<size_t>(i)]) * hidden;
    ops::rmsnorm(source, hidden, 1, hidden, weights_.final_norm.data(), eps,
                 final_hidden.data() + static_cast<int64_t>(i) * hidden, hidden);
  }
  const size_t vocab = static_cast<size_t>(config_.vocab_size);
  std::vector<float> all_logits(static_cast<size_t>(outputs) * vocab);
  ops::matmul(final_hidden.data(), outputs, hidden, weights_.lm_head_weight(), nullptr, config_.vocab_size,
              all_logits.data(), pool_);
  float* next_full = logits;
  ops::TokenProb* next_q = q_entries;
  for (size_t i = 0; i < static_cast<size_t>(outputs); ++i) {
    const float* row = all_logits.data() + i * vocab;
    chosen[i] = ops::choose_row(row, config_.vocab_size, batch.choices[i], next_q);
    next_q += batch.choices[i].return_top_k;
    if (batch.full_logits[i]) next_full = std::copy(row, row + vocab, next_full);
  }
}

}  // namespace pearl
