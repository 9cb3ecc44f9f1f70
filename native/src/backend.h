// The compute side of the engine: a backend owns the model weights and the K/V storage and runs the
// forward pass of a batch of rows, and picks each output row's token next to its logits. The engine keeps
// everything else (block bookkeeping, validation, the acceptance test of verification).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "engine.h"
#include "model_config.h"
#include "ops/ops.h"
#include "safetensors.h"

namespace pearl {

// The rows of one step, all sequences concatenated. Row r holds token tokens[r] at position
// positions[r] of the sequence whose block table is block_tables[row_table[r]]; its K/V go to KV slot
// slots[r] (block * block_size + offset). A row attends to its sequence's positions up to its own,
// which the engine has placed in the table (earlier steps, cached prefix blocks, or rows of this batch).
struct ForwardBatch {
  std::vector<int32_t> tokens;
  std::vector<int32_t> positions;
  std::vector<int32_t> slots;
  std::vector<int32_t> row_table;
  std::vector<std::vector<int32_t>> block_tables;
  std::vector<int32_t> logit_rows;          // rows with an output, in output order
  std::vector<ops::TokenChoice> choices;    // per output: how to pick its token (draft q's owned by the step)
  std::vector<uint8_t> full_logits;         // per output: 1 when the caller needs its logits too
  // Empty, or per row: -1, or the output of the step in flight (begin_forward) whose token, picked on the
  // device, the row takes instead of tokens[r].
  std::vector<int32_t> fed_outputs;
};

class Backend {
 public:
  virtual ~Backend() = default;

  virtual const char* name() const = 0;
  // KV blocks the storage holds (fixed at creation).
  virtual int num_blocks() const = 0;
  // Runs every row through the model. For output i (row logit_rows[i]) writes what choices[i] asks
  // (ops::choose_row's rule: the token, and for a row judging a sampled draft p(draft) and the residual
  // draw) to chosen[i] and, when full_logits[i], its logits to the next row of `logits`, which holds one row
  // of vocab_size floats per such output, in output order. A drafting row (choices[i].return_top_k = k > 0)
  // writes its q to the next k entries of `q_entries`, which holds return_top_k entries per output, in output
  // order, and its token is the draw from that q. Sampling, verification and drafting thus need no logits on
  // the host. A row's results must not depend on the other rows. A row that cannot be chosen from gets token
  // -1 and an empty q (the CPU backend throws process_logits' error instead).
  //
  // The outputs are complete once finish_forward has returned for this step: begin_forward may return as soon
  // as the work is queued on the device, and finish_forward waits for the oldest begun step. While one step is
  // in flight, a second may begin if both are overlappable: at most max_overlapped_rows() rows, every output
  // a one-pass choice (no processed draw, no logits, no q), and then its rows may take the first step's
  // tokens on the device (fed_outputs). A backend whose work is done on the calling thread completes the
  // outputs in begin_forward and overlaps nothing (0).
  virtual void begin_forward(const ForwardBatch& batch, float* logits, ops::ChosenToken* chosen,
                             ops::TokenProb* q_entries) = 0;
  // Copy-on-write: block `destination` gets all of `source`'s K/V.
  virtual void copy_block(int32_t source, int32_t destination) = 0;

  virtual int max_overlapped_rows() const { return 0; }
  // Whether the oldest begun step has finished on the device (finish_forward would not wait).
  virtual bool forward_finished() { return true; }
  virtual void finish_forward() {}
};

// The default capacity when EngineOptions::num_blocks is 0: room for 64 sequences of
// max_position_embeddings tokens, capped by a 1 GiB budget, and at least one block.
int default_num_blocks(const ModelConfig& config, int block_size, int64_t bytes_per_block);

// "cpu", "cuda" or "auto" (the best backend this build and machine offer). Throws for an unknown name or
// a backend this build lacks.
std::unique_ptr<Backend> create_backend(const ModelConfig& config, const Checkpoint& checkpoint,
                                        const EngineOptions& options);

}  // namespace pearl
