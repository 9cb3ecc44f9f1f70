// The compute side of the engine: a backend owns the model weights and the K/V storage and runs the
// forward pass of a batch of rows. The engine keeps everything else (block bookkeeping, validation,
// sampling, verification), so a CUDA backend only has to provide these operations.
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
  std::vector<ops::TokenChoice> choices;    // per output: how to pick its token
  std::vector<uint8_t> full_logits;         // per output: 1 when the caller needs its logits too
};

class Backend {
 public:
  virtual ~Backend() = default;

  virtual const char* name() const = 0;
  // KV blocks the storage holds (fixed at creation).
  virtual int num_blocks() const = 0;
  // Runs every row through the model. For output i (row logit_rows[i]) writes the token choices[i] picks
  // (ops::choose_token's rule) to tokens[i] and, when full_logits[i], its logits to the next row of
  // `logits`, which holds one row of vocab_size floats per such output, in output order. Outputs that need
  // only a token thus never leave the device as logits. A row's results must not depend on the other rows.
  virtual void forward(const ForwardBatch& batch, float* logits, int32_t* tokens) = 0;
  // Copy-on-write: block `destination` gets all of `source`'s K/V.
  virtual void copy_block(int32_t source, int32_t destination) = 0;
};

// The default capacity when EngineOptions::num_blocks is 0: room for 64 sequences of
// max_position_embeddings tokens, capped by a 1 GiB budget, and at least one block.
int default_num_blocks(const ModelConfig& config, int block_size, int64_t bytes_per_block);

// "cpu", "cuda" or "auto" (the best backend this build and machine offer). Throws for an unknown name or
// a backend this build lacks.
std::unique_ptr<Backend> create_backend(const ModelConfig& config, const Checkpoint& checkpoint,
                                        const EngineOptions& options);

}  // namespace pearl
