// The tensor-parallel shard plan and the slicing that feeds each rank its weights: shapes per rank, padding
// to the rank count, and shards that put the whole tensor back together (padding as zeros).
#include "tensor_parallel.h"

#include <cstdint>
#include <cstring>
#include <vector>

#include "check.h"

namespace {

pearl::ModelConfig llama_like(int heads, int kv_heads, int intermediate, int vocab) {
  pearl::ModelConfig config;
  config.architecture = "LlamaForCausalLM";
  config.num_heads = heads;
  config.num_kv_heads = kv_heads;
  config.head_dim = 128;
  config.hidden_size = heads * 128;
  config.intermediate_size = intermediate;
  config.vocab_size = vocab;
  return config;
}

// A [rows, cols] tensor of the given dtype whose element i is the float i + 1 (exact in bf16 while i < 256).
struct OwnedTensor {
  std::vector<uint8_t> bytes;
  pearl::TensorInfo info;
};

OwnedTensor counting_tensor(pearl::DType dtype, int64_t rows, int64_t cols) {
  OwnedTensor tensor;
  const int64_t count = rows * cols;
  const size_t width = dtype == pearl::DType::F32 ? 4 : 2;
  tensor.bytes.resize(static_cast<size_t>(count) * width);
  for (int64_t i = 0; i < count; ++i) {
    const float value = static_cast<float>(i + 1);
    if (dtype == pearl::DType::F32) {
      std::memcpy(tensor.bytes.data() + i * 4, &value, 4);
    } else {
      const uint16_t bits = pearl::float_to_bf16_bits(value);
      std::memcpy(tensor.bytes.data() + i * 2, &bits, 2);
    }
  }
  tensor.info.name = "counting";
  tensor.info.dtype = dtype;
  tensor.info.shape = cols == 1 ? std::vector<int64_t>{rows} : std::vector<int64_t>{rows, cols};
  tensor.info.num_elements = count;
  tensor.info.data = tensor.bytes.data();
  tensor.info.num_bytes = tensor.bytes.size();
  return tensor;
}

float bf16_value(uint16_t bits) {
  const uint32_t word = static_cast<uint32_t>(bits) << 16;
  float value;
  std::memcpy(&value, &word, sizeof(value));
  return value;
}

}  // namespace

TEST(one_rank_keeps_the_model_shapes) {
  const pearl::ShardPlan plan = pearl::plan_shards(llama_like(32, 8, 14336, 128256), 1);
  CHECK_EQ(plan.heads, 32);
  CHECK_EQ(plan.kv_heads, 8);
  CHECK_EQ(plan.intermediate, 14336);
  CHECK_EQ(plan.vocab, 128256);
  CHECK_EQ(plan.local_heads(), 32);
}

TEST(divisible_sizes_split_without_padding) {
  for (int ranks : {2, 4, 8}) {
    const pearl::ShardPlan plan = pearl::plan_shards(llama_like(64, 8, 28672, 128256), ranks);
    CHECK_EQ(plan.heads, 64);
    CHECK_EQ(plan.kv_heads, 8);
    CHECK_EQ(plan.intermediate, 28672);
    CHECK_EQ(plan.vocab, 128256);
    CHECK_EQ(plan.local_kv_heads() * ranks, 8);
    CHECK_EQ(plan.local_heads(), plan.local_kv_heads() * 8);
  }
}

TEST(three_six_and_seven_ranks_pad_heads_intermediate_and_vocabulary) {
  for (int ranks : {3, 6, 7}) {
    const pearl::ModelConfig config = llama_like(32, 8, 14336, 128256);
    const pearl::ShardPlan plan = pearl::plan_shards(config, ranks);
    CHECK(plan.kv_heads >= 8 && plan.kv_heads % ranks == 0 && plan.kv_heads < 8 + ranks);
    CHECK_EQ(plan.heads, plan.kv_heads * 4);  // the grouping stays the model's
    CHECK(plan.intermediate >= 14336 && plan.local_intermediate() % pearl::kIntermediateAlignment == 0);
    CHECK(plan.vocab >= 128256 && plan.local_vocab() % pearl::kVocabAlignment == 0);
    CHECK(plan.vocab - 128256 < ranks * pearl::kVocabAlignment);
  }
}

TEST(more_ranks_than_kv_heads_or_than_eight_is_refused) {
  CHECK_THROWS(pearl::plan_shards(llama_like(32, 4, 11008, 32000), 5), "at least 5 KV heads");
  CHECK_THROWS(pearl::plan_shards(llama_like(64, 16, 11008, 32000), 9), "between 1 and 8");
  CHECK_THROWS(pearl::plan_shards(llama_like(64, 16, 11008, 32000), 0), "between 1 and 8");
}

TEST(row_and_column_shards_put_the_tensor_back_together_with_zero_padding) {
  for (pearl::DType dtype : {pearl::DType::BF16, pearl::DType::F32}) {
    const int64_t rows = 10;
    const int64_t cols = 14;
    const OwnedTensor tensor = counting_tensor(dtype, rows, cols);
    // Three row shards of 4 (12 rows: 2 of padding) and three column shards of 5 (15 columns: 1 of padding).
    for (int shard = 0; shard < 3; ++shard) {
      std::vector<uint16_t> by_rows(static_cast<size_t>(4 * cols));
      pearl::read_bf16_block(tensor.info, shard * 4, 4, 0, cols, by_rows.data());
      std::vector<uint16_t> by_cols(static_cast<size_t>(rows * 5));
      pearl::read_bf16_block(tensor.info, 0, rows, shard * 5, 5, by_cols.data());
      for (int64_t r = 0; r < 4; ++r) {
        for (int64_t c = 0; c < cols; ++c) {
          const int64_t row = shard * 4 + r;
          const float expected = row < rows ? static_cast<float>(row * cols + c + 1) : 0.0f;
          CHECK_EQ(bf16_value(by_rows[static_cast<size_t>(r * cols + c)]), expected);
        }
      }
      for (int64_t r = 0; r < rows; ++r) {
        for (int64_t c = 0; c < 5; ++c) {
          const int64_t col = shard * 5 + c;
          const float expected = col < cols ? static_cast<float>(r * cols + col + 1) : 0.0f;
          CHECK_EQ(bf16_value(by_cols[static_cast<size_t>(r * 5 + c)]), expected);
        }
      }
    }
  }
}

TEST(vector_ranges_pad_with_zeros) {
  const OwnedTensor bias = counting_tensor(pearl::DType::F32, 6, 1);
  const std::vector<float> tail = pearl::read_f32_range(bias.info, 4, 4);
  CHECK_EQ(tail.size(), size_t{4});
  CHECK_EQ(tail[0], 5.0f);
  CHECK_EQ(tail[1], 6.0f);
  CHECK_EQ(tail[2], 0.0f);
  CHECK_EQ(tail[3], 0.0f);
  std::vector<uint16_t> rows(3);
  pearl::read_bf16_block(bias.info, 5, 3, 0, 1, rows.data());
  CHECK_EQ(bf16_value(rows[0]), 6.0f);
  CHECK_EQ(bf16_value(rows[1]), 0.0f);
}

TEST(rank_slices_cover_every_sharded_tensor_once_and_row_parallel_biases_on_rank_zero) {
  const pearl::ModelConfig config = llama_like(32, 8, 14336, 128256);
  for (int ranks : {1, 2, 3}) {
    const pearl::ShardPlan plan = pearl::plan_shards(config, ranks);
    int64_t q_rows = 0;
    int64_t o_cols = 0;
    int64_t gate_rows = 0;
    int64_t down_cols = 0;
    int64_t vocab_rows = 0;
    int64_t bias_holders = 0;
    for (int rank = 0; rank < ranks; ++rank) {
      const auto slice = [&](const char* name, std::vector<int64_t> shape) {
        return pearl::rank_slice(config, plan, rank, name, shape);
      };
      const pearl::TensorSlice q = slice("model.layers.0.self_attn.q_proj.weight", {4096, 4096});
      CHECK_EQ(q.row_begin, q_rows);
      q_rows += q.rows;
      const pearl::TensorSlice o = slice("model.layers.0.self_attn.o_proj.weight", {4096, 4096});
      CHECK_EQ(o.rows, 4096);
      CHECK_EQ(o.col_begin, o_cols);
      o_cols += o.cols;
      gate_rows += slice("model.layers.3.mlp.gate_proj.weight", {14336, 4096}).rows;
      down_cols += slice("model.layers.3.mlp.down_proj.weight", {4096, 14336}).cols;
      vocab_rows += slice("lm_head.weight", {128256, 4096}).rows;
      bias_holders += slice("model.layers.0.self_attn.o_proj.bias", {4096}).rows > 0 ? 1 : 0;
      const pearl::TensorSlice norm = slice("model.layers.0.input_layernorm.weight", {4096});
      CHECK_EQ(norm.rows, 4096);
      CHECK_EQ(slice("model.embed_tokens.weight", {128256, 4096}).rows, 128256);
      CHECK_EQ(slice("model.layers.0.self_attn.k_proj.weight", {1024, 4096}).rows, plan.local_kv_heads() * 128);
    }
    CHECK_EQ(q_rows, int64_t{plan.heads} * 128);
    CHECK_EQ(o_cols, int64_t{plan.heads} * 128);
    CHECK_EQ(gate_rows, int64_t{plan.intermediate});
    CHECK_EQ(down_cols, int64_t{plan.intermediate});
    CHECK_EQ(vocab_rows, int64_t{plan.vocab});
    CHECK_EQ(bias_holders, int64_t{1});
  }
}

int main() { return check::run_all(); }
