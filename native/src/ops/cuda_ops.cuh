// CUDA kernels of the forward pass, one per file beside its CPU twin (ops/<op>.cu next to ops/<op>.cpp).
// Activations that feed a matrix product are bf16, the residual stream and every reduction are float32.
//
// Batch invariance (docs/design.md §4, exactness) is kept the same way as on the CPU: a row's result is
// computed by the same instructions in the same order whatever the number of rows in the launch. Every kernel here keeps that
// rule; only the cuBLASLt path for more than 16 rows (cuda/cublaslt.cu) does not, which is why the
// deterministic mode avoids it.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "cuda/check.h"

namespace pearl::gpu {

using bf16 = __nv_bfloat16;

// One step's rows as the kernels see them, all arrays in device memory. Row r holds token tokens[r] at
// position positions[r] (-1 marks a padding row of a CUDA-graph bucket: it writes no KV and attends to
// nothing) of the sequence whose block table is block_tables[row_table[r] * *table_stride ...]; its K/V
// go to slot slots[r] (skipped when negative). The stride lives in device memory so a captured graph
// replays with tables of any length.
struct DeviceRows {
  const int32_t* tokens = nullptr;
  const int32_t* positions = nullptr;
  const int32_t* slots = nullptr;
  const int32_t* row_table = nullptr;
  const int32_t* block_tables = nullptr;
  const int32_t* table_stride = nullptr;
};

// Paged KV storage of one layer, bf16: [num_blocks, block_size, num_kv_heads, head_dim] for K and V.
struct DeviceKvLayer {
  bf16* k = nullptr;
  bf16* v = nullptr;
  int block_size = 0;
  int num_kv_heads = 0;
  int head_dim = 0;
};

// out[r, :] = float(table[tokens[r], :]).
void embedding(const bf16* table, int dim, const int32_t* tokens, int rows, float* out, cudaStream_t stream);


// out[i, :] = bf16(weight * (x[j] * rsqrt(mean(x[j]^2) + eps))) with j = row_index[i] (or i when row_index
// is null); x rows are `dim` floats apart.
void rmsnorm(const float* x, const int32_t* row_index, int rows, int dim, const float* weight, float eps, bf16* out,
             bool programmatic, cudaStream_t stream);

// Qwen3's per-head RMSNorm of q and k (when q_norm is not null) and the rotary embedding ("rotate_half"
// pairing) of the q and k heads of each qkv row, in place; then each row's K (rotated) and V go as bf16 into
// its slot of kv (skipped for negative slots). On the CPU these are two ops (ops::rope, ops::kv_store); one
// kernel here spares a launch per layer, and the bf16 values stored are the same.
void rope_store_kv(float* qkv, int64_t stride, int rows, int num_heads, int head_dim, const int32_t* positions,
                   const float* inv_freq, const float* q_norm, const float* k_norm, float eps, const int32_t* slots,
                   const DeviceKvLayer& kv, bool programmatic, cudaStream_t stream);

// Scratch of the split-KV attention: per (row, head) kAttentionSlots partial states.
constexpr int kAttentionSlots = 16;
constexpr int kAttentionSplit = 64;  // keys per split; fixed, so a row's reduction order depends on its context only
size_t attention_scratch_floats(int rows, int num_heads, int head_dim);

// Causal grouped-query attention over the paged cache (decode rows, verify windows and prefill alike):
// q rows are `q_stride` floats apart, out is bf16 [rows, num_heads * head_dim]. Split-KV: the context is cut
// into kAttentionSplit-key splits spread over kAttentionSlots CTAs per (row, KV head), whose partial
// softmax states are merged by log-sum-exp. The grid depends on the row count only (graph safe).
void attention(const float* q, int64_t q_stride, int rows, int num_heads, const DeviceKvLayer& kv,
               const DeviceRows& batch, int sliding_window, float* scratch, bf16* out, bool programmatic,
               cudaStream_t stream);

// Whether attention supports this head size and grouping (the kernels are instantiated per head size).
bool attention_supports(int head_dim, int group);

// The MLP's gate and up projections share one matrix on the GPU, interleaved in groups of kGateUpGroup rows
// (gate rows 4g..4g+3, then up rows 4g..4g+3), so that a skinny GEMM CTA of 8 columns holds a gate and its
// up (skinny_matmul_silu). gate_up_row(i, up) is the row of intermediate position i's gate or up.
constexpr int kGateUpGroup = 4;
__host__ __device__ constexpr int gate_up_row(int i, bool up) {
  return 2 * kGateUpGroup * (i / kGateUpGroup) + i % kGateUpGroup + (up ? kGateUpGroup : 0);
}

// silu(gate) * up, as every backend computes the MLP's activation before rounding it to bf16.
__device__ __forceinline__ float silu_times(float gate, float up) { return gate / (1.0f + expf(-gate)) * up; }

// out[r, i] = bf16(silu(gate) * up) with gate and up at columns gate_up_row(i, false / true) of the
// interleaved gate_up[r, 2 * inter] (the CPU twin, ops::silu_mul, reads the plain gate-then-up layout).
void silu_mul(const float* gate_up, int rows, int inter, bf16* out, cudaStream_t stream);

// How choose_token picks row r's token: the one-pass part of ops::TokenChoice in device form.
struct TokenChoiceRow {
  float temperature = 0.0f;
  int32_t position = 0;
  uint64_t seed = 0;
  int32_t draft_token = -1;  // the sampled draft the row judges, or -1
};

// ops::ChosenToken in device form (the same layout; the CUDA backend copies one into the other).
struct ChosenTokenRow {
  int32_t token;
  int32_t residual_token;
  double draft_prob;
};


// out[r] = what choices[r] picks from logits row r (n floats) by ops::choose_token's one-pass rule: the
// argmax, or at temperature > 0 the Gumbel-max draw with the same counter-based noise; -1 when nothing can
// win. A greedy row judging a sampled draft also gets p(draft) (1 or 0: p is one-hot) and the residual draw
// (the argmax), as ops::choose_row gives them. scratch holds choose_token_scratch_bytes(rows, n) bytes.
size_t choose_token_scratch_bytes(int rows, int n);
void choose_token(const float* logits, int rows, int n, const TokenChoiceRow* choices, void* scratch,
                  ChosenTokenRow* out, cudaStream_t stream);

// ops::TokenProb in device form (the same layout): one entry of a drafting row's returned q.
struct TokenProbRow {
  int32_t token;
  float prob;
};

// A row sampled from its processed distribution (ops::TokenChoice::processed at temperature > 0).
struct ProcessedRow {
  int32_t logits_row = 0;  // its row of logits and of out
  float temperature = 0.0f;
  uint64_t seed = 0;
  int32_t position = 0;
  int32_t top_k = 0;
  float top_p = 1.0f;
  int32_t draft_token = -1;  // the sampled draft the row judges, or -1
  int32_t q_begin = 0;       // its q: entries [q_begin, q_begin + q_count) of the q arrays, ascending token ids
  int32_t q_count = 0;
  int32_t return_top_k = 0;  // a drafting row: its q goes to returned_q[returned_begin, + return_top_k)
  int32_t returned_begin = 0;
};

// How choose_processed finds a processed row's support. Selected, by an exact top-k selection of the first k
// of p's order without a sort: rows with a cut top_k <= kMaxSelectedTopK, alone or with top_p (sampling
// rows, sampled-draft verify rows and drafting rows alike; their support is that selection, or the nucleus
// within it, which a top-k cut always holds), and drafting rows without a cut (return_top_k > 0, no draft
// judged, return_top_k <= kMaxSelectedTopK; their q is the selection of the whole support). Nucleus: rows
// whose only cut is top_p; they take the selection with k = kMaxSelectedTopK and keep the nucleus when it
// ends within those k (or the k are the whole support), else they are sorted in the same call (a per-row flag
// the sort pass reads). Sorted, their row sorted: rows with a larger top_k, and the other rows that return q.
// Whole: rows without a cut or a q (sampled-draft windows), whose support is the whole row.
enum class ProcessedPath { Sorted, Nucleus, Selected, Whole };
constexpr int kMaxSelectedTopK = 256;

inline ProcessedPath processed_path(const ProcessedRow& row) {
  if (row.top_k > 0) return row.top_k <= kMaxSelectedTopK ? ProcessedPath::Selected : ProcessedPath::Sorted;
  if (row.top_p < 1.0f) return ProcessedPath::Nucleus;
  if (row.return_top_k == 0) return ProcessedPath::Whole;
  const bool selectable = row.draft_token < 0 && row.return_top_k <= kMaxSelectedTopK;
  return selectable ? ProcessedPath::Selected : ProcessedPath::Sorted;
}

// out[rows[j].logits_row] = ops::choose_row's result for processed rows j < num_rows (device array), ordered
// by processed_path: rows [0, num_sorted_rows) Sorted, the next num_nucleus_rows Nucleus, the next
// num_selected_rows Selected, the rest Whole.
// That is process_logits' support and sample_token's draw, plus p(draft) and the residual draw for draft
// rows; token -1 where process_logits finds no finite maximum. A drafting row instead gets token -1 and
// writes its q = top_k_distribution(p, return_top_k) to returned_q (then token -1 entries; all of them when
// there is no finite maximum): the caller draws the token from q on the host (sample_draft_token), exactly.
// Sorted rows are ordered (logit descending, id ascending: a stable CUB segmented radix sort)
// kProcessedSortRows at a time, which is p's order; Selected and Nucleus rows find the first k of that order
// without a sort, and all compute the support (RowSupport), the nucleus and q by the same code; Nucleus rows
// whose nucleus does not end within their k join the sort; every draw is a Gumbel-max over the
// unsorted row. Equal to the host rule except where double rounding decides (exp, and sums taken in another
// order than the host's: ulp-level; for q, p's total, before its entries are rounded to float). Sums: a
// cut row's total (Sorted, Selected with a top-k cut, or Nucleus) is added in p's order by a block tree, the
// host adds a top-k support in id order and a nucleus in p's order sequentially; the device paths give the
// same support a bit-identical total. The weight a nucleus is a share of (kept: the top k's, or the whole
// support's without a top-k cut): the top k's is the support total's sum on every path; the whole support's
// is added in p's order by a block tree on the Sorted path but in id order by a block tree on the Nucleus
// path (the host: id order, sequentially), so the two paths can differ in its last bits, and through it in
// where a nucleus ends when a cumulative share lies within ulps of top_p. An uncut drafting row's total is
// added in id order by a block tree (the host: id order, sequentially); q's own sum (kept) is p's order,
// sequentially, as on the host.
// scratch holds processed_scratch_bytes(max_rows, n) bytes, max_rows >= num_rows.
constexpr int kProcessedSortRows = 16;
size_t processed_scratch_bytes(int max_rows, int n);
void choose_processed(const float* logits, int n, const ProcessedRow* rows, int num_rows, int num_sorted_rows,
                      int num_nucleus_rows, int num_selected_rows, const int32_t* q_tokens, const float* q_probs,
                      void* scratch, int max_rows, ChosenTokenRow* out, TokenProbRow* returned_q, cudaStream_t stream);

// y[rows, n] (+)= x[rows, k] W^T (+ bias) for rows <= 16, W bf16 row-major [n, k], k a multiple of 8.
// Streams W once with 16-byte loads through the tensor cores; each output is reduced in a fixed order
// that depends on (n, k) only, so a row's result does not depend on the other rows. `variant` picks a
// launch shape (tune_skinny_matmul); every variant computes bit-identical results.
constexpr int kSkinnyMaxRows = 16;
// `programmatic` launches it as a programmatic dependent of the previous kernel in the stream (see
// allow_dependent_launch).
void skinny_matmul(const bf16* x, int rows, int k, const bf16* weight, const float* bias, int n, float* y,
                   bool accumulate, int variant, bool programmatic, cudaStream_t stream);

// out[rows, n / 2] = bf16(silu(gate) * up) of y = x W^T (+ bias) for an interleaved gate_up weight W
// [n, k] (gate_up_row), computed in the GEMM's epilogue from the float sums skinny_matmul would write: the
// same values silu_mul gives from them. n a multiple of 8.
void skinny_matmul_silu(const bf16* x, int rows, int k, const bf16* weight, const float* bias, int n, bf16* out,
                        int variant, bool programmatic, cudaStream_t stream);

// The fastest skinny_matmul variant for one row of a [n, k] product, timed on `weights` (matrices of that
// shape, used in turn so that none is read from L2), with each variant's median time.
struct SkinnyTuning {
  int variant = 0;
  std::vector<std::string> names;
  std::vector<float> microseconds;
};
SkinnyTuning tune_skinny_matmul(const std::vector<const bf16*>& weights, int k, int n, cudaStream_t stream);

// The variant called `name` (as SkinnyTuning::names spells it); throws for an unknown name.
int skinny_variant_index(const std::string& name);

// y[rows, n] += bias (the cuBLASLt path adds biases separately).
void add_bias(float* y, int rows, int n, const float* bias, cudaStream_t stream);

// Sum over the 32 lanes of a warp in a fixed butterfly order (every lane gets the result).
__device__ __forceinline__ float warp_sum(float value) {
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_xor_sync(0xffffffffu, value, offset);
  return value;
}

__device__ __forceinline__ float warp_max(float value) {
  for (int offset = 16; offset > 0; offset /= 2) value = fmaxf(value, __shfl_xor_sync(0xffffffffu, value, offset));
  return value;
}

// Programmatic dependent launch (sm_90). A kernel launched as a programmatic dependent of the kernel before
// it in the stream may start while that kernel still runs: it does what depends on nothing that kernel
// writes (a GEMM's first weight loads, attention's block-table lookups), then waits for it to finish
// (wait_for_prerequisites: the whole chain before it has finished then, since every kernel waits before it
// finishes). The small kernels between the GEMMs let their dependents launch as soon as they start, so a
// chain of them (RoPE, attention split, merge) and the GEMM after it are launched together and each one's
// launch and independent loads overlap the kernels before it; a GEMM lets its dependent launch when its
// CTAs have multiplied their last weights (letting it launch earlier measured slower: performance.md).
// Both instructions are no-ops when the launch did not ask for programmatic serialization.
__device__ __forceinline__ void allow_dependent_launch() { asm volatile("griddepcontrol.launch_dependents;" ::: "memory"); }
__device__ __forceinline__ void wait_for_prerequisites() { asm volatile("griddepcontrol.wait;" ::: "memory"); }

// kernel<<<grid, block, shared_bytes, stream>>>(args...), as a programmatic dependent of the kernel before
// it when `programmatic`.
template <typename... Params, typename... Args>
void launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared_bytes, bool programmatic,
                   cudaStream_t stream, Args&&... args) {
  cudaLaunchAttribute attribute{};
  attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = shared_bytes;
  config.stream = stream;
  config.attrs = &attribute;
  config.numAttrs = programmatic ? 1 : 0;
  PEARL_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...));
}

// Throws std::runtime_error naming `what` when the last launch failed.
inline void check_launch(const char* what) {
  const cudaError_t error = cudaGetLastError();
  if (error != cudaSuccess) {
    throw std::runtime_error(std::string("CUDA kernel ") + what + " failed to launch: " + cudaGetErrorString(error));
  }
}

}  // namespace pearl::gpu
