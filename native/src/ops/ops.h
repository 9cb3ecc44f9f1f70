// CPU kernels of the forward pass, one per file. Batch invariance is the rule every kernel keeps: a row's
// result is computed by the same instructions in the same order whatever the number of rows, so each
// reduction (dot product, norm, softmax) runs inside one row and threads only split independent outputs.
#pragma once

#include <cstdint>
#include <vector>

#include "engine.h"
#include "model_config.h"
#include "thread_pool.h"

namespace pearl::ops {

// Fixed-order dot product: 16 independent lanes (lane k sums elements i with i % 16 == k in increasing
// i), combined pairwise in a fixed tree, then the tail in order. The lanes let the compiler vectorize
// without reassociating anything.
inline float dot(const float* a, const float* b, int n) {
  constexpr int kLanes = 16;
  float acc[kLanes] = {};
  int i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int k = 0; k < kLanes; ++k) acc[k] += a[i + k] * b[i + k];
  }
  for (int width = kLanes / 2; width > 0; width /= 2) {
    for (int k = 0; k < width; ++k) acc[k] += acc[k + width];
  }
  float sum = acc[0];
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

// out[r] = table[tokens[r]] for rows of width `dim`.
void embedding(const float* table, int dim, const int32_t* tokens, int rows, float* out);

// Hugging Face RMSNorm over each row: w * (x * rsqrt(mean(x^2) + eps)). Rows start `stride` floats
// apart and hold `dim` values; in place is allowed (out == x).
void rmsnorm(const float* x, int64_t stride, int rows, int dim, const float* weight, float eps, float* out,
             int64_t out_stride);

// y[rows, out] = x[rows, in] W^T + b, W row-major [out, in]; bias may be null.
void matmul(const float* x, int rows, int in, const float* weight, const float* bias, int out, float* y,
            ThreadPool& pool);

// Inverse frequencies of the rotary embedding (head_dim / 2 values), as transformers computes them in
// float32, llama3 scaling included.
std::vector<float> rope_inv_freq(const RopeConfig& rope, int head_dim);

// Rotates `heads` consecutive heads of each row in place ("rotate_half" pairing: i with i + head_dim/2).
void rope(float* x, int64_t stride, int rows, int heads, int head_dim, const int32_t* positions,
          const float* inv_freq);

// out[r, i] = silu(gate_up[r, i]) * gate_up[r, inter + i].
void silu_mul(const float* gate_up, int rows, int inter, float* out);

// How a backend picks a row's token. temperature <= 0: the argmax. temperature > 0: a draw by the
// Gumbel-max trick with G = -log E(seed, position, x) (counter_rng.h), in one of two forms:
// - one pass (processed false): the largest logit / temperature + G(x) over the whole row, without
//   normalizing: the draw sample_token makes from softmax(logits / temperature);
// - processed (rows with a top-k or top-p cut, and every row of a window verified against sampled drafts):
//   exactly process_logits + sample_token (sampling.h), log p(x) + G(x) over p's support. A row that judges
//   a sampled draft (draft_token >= 0, q = *draft_dist) also yields p(draft_token) and the residual draw.
// - a drafting row (processed, temperature > 0, return_top_k = k > 0): q = top_k_distribution(p, k), which
//   the row returns, and the token sample_draft_token(q) (sampling.h) instead of a draw from p.
// The first three fields are all a one-pass row needs.
struct TokenChoice {
  float temperature = 0.0f;
  uint64_t seed = 0;
  int64_t position = 0;  // of the token being chosen
  bool processed = false;
  int top_k = 0;       // processed rows: SamplingParams::top_k
  float top_p = 1.0f;  // processed rows: SamplingParams::top_p
  int32_t draft_token = -1;                       // the sampled draft this row judges, or -1
  const DraftDistribution* draft_dist = nullptr;  // its q (when draft_token >= 0)
  int return_top_k = 0;  // drafting rows: the size of the q they return (entries of the q output they fill)
};

// Whether a row is drawn from its processed distribution (a top-k/top-p cut, a sampled-draft window, a
// returned q) rather than by the one-pass choice over the whole softmax; greedy rows are the argmax whatever
// their cut.
inline bool draws_processed(const TokenChoice& choice) { return choice.processed && choice.temperature > 0.0f; }

// What a backend returns per output row: everything verification needs, so the logits can stay with it.
// Laid out as gpu::ChosenTokenRow (cuda_ops.cuh), which the CUDA backend copies into it.
struct ChosenToken {
  int32_t token = -1;           // the row's own draw (or argmax); -1 when nothing can be chosen
  int32_t residual_token = -1;  // draft rows: the draw from norm(max(0, p - q)) (token when that is empty)
  double draft_prob = 0.0;      // draft rows: p(draft_token), the processed target probability
};

// One entry of the q a drafting row returns: top_k_distribution's tokens and probs in its order
// (probability descending, ties to the lowest id), then token -1 (prob 0) past q's size. Laid out as
// gpu::TokenProbRow (cuda_ops.cuh), which the CUDA backend copies into it.
struct TokenProb {
  int32_t token = -1;
  float prob = 0.0f;
};

// The q held by `capacity` returned entries (those before the first token -1).
DraftDistribution returned_q(const TokenProb* entries, int capacity);

// The token a one-pass `choice` picks from n logits: the lowest index among equal keys; NaN never wins
// (nor, when sampling, an infinite logit); -1 when nothing can win.
int32_t choose_token(const float* logits, int n, const TokenChoice& choice);

// Everything `choice` asks of a row: choose_token's one-pass token, or for a processed row the host rule
// (process_logits, then choose_from_distribution in sampling.h). A drafting row writes its q to
// q_entries[0, return_top_k) and returns the token drawn from it. The reference the CUDA kernels follow.
// Throws where process_logits does (no finite maximum; every logit NaN).
ChosenToken choose_row(const float* logits, int n, const TokenChoice& choice, TokenProb* q_entries = nullptr);

// x += delta, elementwise.
void residual_add(float* x, const float* delta, int64_t count);

// Paged KV storage of one layer: [num_blocks, block_size, num_kv_heads, head_dim] for K and for V.
struct KvLayerView {
  float* k = nullptr;
  float* v = nullptr;
  int block_size = 0;
  int num_kv_heads = 0;
  int head_dim = 0;
};

// Writes each row's K and V (read from `stride`-spaced rows) into its slot (block * block_size + offset).
void kv_store(const float* k, const float* v, int64_t stride, int rows, const int32_t* slots, const KvLayerView& kv);

// Rows of a batch as attention sees them: row r is at positions[r] in the sequence whose block table is
// block_tables[row_table[r]], and attends to that sequence's KV positions [start, positions[r]].
struct AttentionRows {
  const int32_t* positions = nullptr;
  const int32_t* row_table = nullptr;
  const std::vector<std::vector<int32_t>>* block_tables = nullptr;
  int sliding_window = 0;  // 0: full causal
};

// Causal grouped-query attention over the paged cache; q rows are `q_stride` apart, out is
// [rows, num_heads * head_dim].
void attention(const float* q, int64_t q_stride, int rows, int num_heads, const KvLayerView& kv,
               const AttentionRows& batch, float* out, ThreadPool& pool);

}  // namespace pearl::ops
