#include "tensor_parallel.h"

#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <string>

#include "half.h"

namespace pearl {

namespace {

int round_up(int value, int multiple) { return (value + multiple - 1) / multiple * multiple; }

// Element i of the tensor as bf16 bits.
uint16_t bf16_at(const TensorInfo& tensor, int64_t i) {
  switch (tensor.dtype) {
    case DType::BF16: {
      uint16_t bits;
      std::memcpy(&bits, tensor.data + i * 2, sizeof(bits));
      return bits;
    }
    case DType::F16: {
      uint16_t bits;
      std::memcpy(&bits, tensor.data + i * 2, sizeof(bits));
      return float_to_bf16_bits(f16_to_float(bits));
    }
    case DType::F32: {
      float value;
      std::memcpy(&value, tensor.data + i * 4, sizeof(value));
      return float_to_bf16_bits(value);
    }
    default:
      throw std::runtime_error("tensor " + tensor.name + ": only F32, F16 and BF16 weights are supported");
  }
}

}  // namespace

ShardPlan plan_shards(const ModelConfig& config, int ranks) {
  if (ranks < 1 || ranks > kMaxTensorParallel) {
    throw std::runtime_error("tensor parallelism over " + std::to_string(ranks) + " devices: between 1 and " +
                             std::to_string(kMaxTensorParallel) + " devices are supported");
  }
  if (ranks > config.num_kv_heads) {
    throw std::runtime_error("tensor parallelism over " + std::to_string(ranks) + " devices needs at least " +
                             std::to_string(ranks) + " KV heads; " + config.architecture + " has " +
                             std::to_string(config.num_kv_heads) + " (num_key_value_heads)");
  }
  ShardPlan plan;
  plan.ranks = ranks;
  if (ranks == 1) {
    plan.kv_heads = config.num_kv_heads;
    plan.heads = config.num_heads;
    plan.intermediate = config.intermediate_size;
    plan.vocab = config.vocab_size;
    return plan;
  }
  const int group = config.num_heads / config.num_kv_heads;
  plan.kv_heads = round_up(config.num_kv_heads, ranks);
  plan.heads = plan.kv_heads * group;
  plan.intermediate = round_up(config.intermediate_size, ranks * kIntermediateAlignment);
  plan.vocab = round_up(config.vocab_size, ranks * kVocabAlignment);
  return plan;
}

TensorSlice rank_slice(const ModelConfig& config, const ShardPlan& plan, int rank, const std::string& name,
                       const std::vector<int64_t>& shape) {
  const auto ends_with = [&name](const char* suffix) {
    const std::string tail(suffix);
    return name.size() >= tail.size() && name.compare(name.size() - tail.size(), tail.size(), tail) == 0;
  };
  TensorSlice whole;
  whole.rows = shape.empty() ? 0 : shape[0];
  whole.cols = shape.size() >= 2 ? shape[1] : 1;
  if (plan.ranks == 1) return whole;
  const int64_t head_dim = config.head_dim;
  const auto by_rows = [&](int64_t per_rank) {
    TensorSlice slice = whole;
    slice.row_begin = rank * per_rank;
    slice.rows = per_rank;
    return slice;
  };
  const auto by_columns = [&](int64_t per_rank) {
    TensorSlice slice = whole;
    slice.col_begin = rank * per_rank;
    slice.cols = per_rank;
    return slice;
  };
  const auto rank_zero_only = [&] {
    TensorSlice slice = whole;
    if (rank != 0) slice.rows = 0;
    return slice;
  };
  const bool weight = ends_with(".weight");
  if (ends_with("self_attn.q_proj.weight") || ends_with("self_attn.q_proj.bias")) {
    return by_rows(plan.local_heads() * head_dim);
  }
  if (ends_with("self_attn.k_proj.weight") || ends_with("self_attn.k_proj.bias") ||
      ends_with("self_attn.v_proj.weight") || ends_with("self_attn.v_proj.bias")) {
    return by_rows(plan.local_kv_heads() * head_dim);
  }
  if (ends_with("self_attn.o_proj.weight")) return by_columns(plan.local_heads() * head_dim);
  if (ends_with("mlp.gate_proj.weight") || ends_with("mlp.gate_proj.bias") || ends_with("mlp.up_proj.weight") ||
      ends_with("mlp.up_proj.bias")) {
    return by_rows(plan.local_intermediate());
  }
  if (ends_with("mlp.down_proj.weight")) return by_columns(plan.local_intermediate());
  if (!weight && (ends_with("self_attn.o_proj.bias") || ends_with("mlp.down_proj.bias"))) return rank_zero_only();
  if (name == "lm_head.weight") return by_rows(plan.local_vocab());
  return whole;
}

void read_bf16_block(const TensorInfo& tensor, int64_t row_begin, int64_t rows, int64_t col_begin, int64_t cols,
                     uint16_t* out) {
  const int64_t tensor_rows = tensor.shape.empty() ? 0 : tensor.shape[0];
  const int64_t tensor_cols = tensor.shape.size() >= 2 ? tensor.shape[1] : 1;
  for (int64_t r = 0; r < rows; ++r) {
    uint16_t* line = out + r * cols;
    const int64_t source_row = row_begin + r;
    int64_t c = 0;
    if (source_row < tensor_rows) {
      const int64_t available = std::max<int64_t>(0, std::min(cols, tensor_cols - col_begin));
      const int64_t first = source_row * tensor_cols + col_begin;
      if (tensor.dtype == DType::BF16) {
        std::memcpy(line, tensor.data + first * 2, static_cast<size_t>(available) * 2);
      } else {
        for (int64_t i = 0; i < available; ++i) line[i] = bf16_at(tensor, first + i);
      }
      c = available;
    }
    std::fill(line + c, line + cols, uint16_t{0});
  }
}

std::vector<float> read_f32_range(const TensorInfo& tensor, int64_t begin, int64_t count) {
  const std::vector<float> all = load_f32(tensor);
  std::vector<float> range(static_cast<size_t>(count), 0.0f);
  for (int64_t i = 0; i < count && begin + i < static_cast<int64_t>(all.size()); ++i) {
    range[static_cast<size_t>(i)] = all[static_cast<size_t>(begin + i)];
  }
  return range;
}

uint16_t float_to_bf16_bits(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  if ((bits & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0;
  bits += 0x7FFFu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

}  // namespace pearl
