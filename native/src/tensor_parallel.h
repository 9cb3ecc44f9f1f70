// How a model is cut across the ranks of a tensor-parallel group (Megatron style): q/k/v and gate/up by
// output rows (heads, intermediate positions), o_proj and down_proj by input columns (their partial sums are
// added across ranks), lm_head by vocabulary. When heads, KV heads, intermediate size or vocabulary do not
// divide by the rank count, they are padded with zero weights at the end (as nano-PEARL does): a zero q/k/v
// head attends to zero values, a zero gate/up row gives silu(0) * 0, zero o/down columns add nothing and
// padded vocabulary columns are dropped before any token is chosen, so padding never changes an output.
// Host-side only, so the plan and the slicing are tested without a GPU (native/test/tensor_parallel_test.cpp).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "model_config.h"
#include "safetensors.h"

namespace pearl {

constexpr int kMaxTensorParallel = 8;
// Each rank's share of the intermediate size is a multiple of this (aligned GEMM tiles, whole gate/up groups).
constexpr int kIntermediateAlignment = 128;
// Each rank's share of the vocabulary is a multiple of this (the skinny GEMM's 8-column tiles).
constexpr int kVocabAlignment = 8;

struct ShardPlan {
  int ranks = 1;
  // Padded totals over all ranks (equal to the model's own at one rank).
  int kv_heads = 0;
  int heads = 0;  // kv_heads * (the model's query heads per KV head)
  int intermediate = 0;
  int vocab = 0;

  int local_kv_heads() const { return kv_heads / ranks; }
  int local_heads() const { return heads / ranks; }
  int local_intermediate() const { return intermediate / ranks; }
  int local_vocab() const { return vocab / ranks; }
};

// The plan for `ranks` ranks; throws naming the limit for more than kMaxTensorParallel ranks or more ranks than
// the model has KV heads (a rank would hold padding only). One rank pads nothing.
ShardPlan plan_shards(const ModelConfig& config, int ranks);

// The part of a checkpoint tensor one rank holds: rows [row_begin, row_begin + rows) by columns
// [col_begin, col_begin + cols) of its [rows, cols] (or [rows]) shape, padding included (rows or columns past
// the tensor's extent are zeros). A row-parallel bias (o_proj, down_proj) is added once, by rank 0: the other
// ranks hold none of it (rows == 0).
struct TensorSlice {
  int64_t row_begin = 0;
  int64_t rows = 0;
  int64_t col_begin = 0;
  int64_t cols = 1;
};

// The slice of tensor `name` (Hugging Face name, `shape` as stored) that `rank` holds under `plan`: q/k/v by
// heads, gate/up by intermediate rows, o_proj and down_proj by input columns, lm_head.weight by vocabulary
// rows; norms and the embedding whole on every rank.
TensorSlice rank_slice(const ModelConfig& config, const ShardPlan& plan, int rank, const std::string& name,
                       const std::vector<int64_t>& shape);

// Rows [row_begin, row_begin + rows) by columns [col_begin, col_begin + cols) of a 1-D ([n], one column) or
// 2-D tensor as bf16 bits, row-major into out (rows * cols entries), rounded to nearest even from F32 and F16;
// entries beyond the tensor's extent are zero (padding).
void read_bf16_block(const TensorInfo& tensor, int64_t row_begin, int64_t rows, int64_t col_begin, int64_t cols,
                     uint16_t* out);

// Entries [begin, begin + count) of a 1-D tensor as float32, zero beyond its extent.
std::vector<float> read_f32_range(const TensorInfo& tensor, int64_t begin, int64_t count);

// float32 to bf16 bits, rounding to nearest even as torch's .to(torch.bfloat16) does; NaN stays NaN.
uint16_t float_to_bf16_bits(float value);

}  // namespace pearl
