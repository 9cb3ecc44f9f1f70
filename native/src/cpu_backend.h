// The portable backend: float32 weights and math on the CPU, threads over independent outputs.
#pragma once

#include <memory>
#include <vector>

#include "backend.h"
#include "thread_pool.h"
#include "weights.h"

namespace pearl {

class CpuBackend : public Backend {
 public:
  CpuBackend(const ModelConfig& config, const Checkpoint& checkpoint, const EngineOptions& options);

  const char* name() const override { return "cpu"; }
  int num_blocks() const override { return num_blocks_; }
  void begin_forward(const ForwardBatch& batch, float* logits, ops::ChosenToken* chosen,
                     ops::TokenProb* q_entries) override;
  void copy_block(int32_t source, int32_t destination) override;

 private:
  int64_t floats_per_block() const;

  ModelConfig config_;
  ModelWeights weights_;
  ThreadPool pool_;
  std::vector<float> inv_freq_;
  int block_size_;
  int num_blocks_;
  // Per layer [num_blocks, block_size, num_kv_heads, head_dim]; left uninitialized, since a position is
  // always written before it is read, so untouched blocks cost no physical memory.
  std::vector<std::unique_ptr<float[]>> k_cache_;
  std::vector<std::unique_ptr<float[]>> v_cache_;
};

}  // namespace pearl
