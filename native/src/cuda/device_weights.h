// One tensor-parallel rank's share of the model in device memory: bf16 matrices (q/k/v stacked, gate/up
// interleaved for the MLP epilogue), float32 norms and biases. At one rank it is the whole model.
#pragma once

#include <cuda_bf16.h>

#include <vector>

#include "cuda/device_memory.h"
#include "model_config.h"
#include "safetensors.h"
#include "tensor_parallel.h"

namespace pearl::gpu {

struct DeviceLinear {
  const __nv_bfloat16* weight = nullptr;
  const float* bias = nullptr;  // null: no bias (or a row-parallel bias another rank adds)
  int in = 0;
  int out = 0;
  int skinny_variant = 0;  // the skinny GEMM launch shape measured fastest for [out, in]
};

struct DeviceLayer {
  const float* input_norm = nullptr;
  const float* post_attention_norm = nullptr;
  const float* q_norm = nullptr;  // qk_norm models only
  const float* k_norm = nullptr;
  DeviceLinear qkv;  // the rank's q, k, v rows stacked, as on the CPU
  DeviceLinear o;
  DeviceLinear gate_up;  // the rank's gate and up rows interleaved (gpu::gate_up_row)
  DeviceLinear down;
};

struct DeviceWeights {
  std::vector<DeviceMemory> owned;
  const __nv_bfloat16* embed = nullptr;  // whole on every rank
  std::vector<DeviceLayer> layers;
  const float* final_norm = nullptr;
  DeviceLinear lm_head;  // the rank's vocabulary rows (the embedding itself when tied and whole)
  const float* inv_freq = nullptr;
};

// Uploads rank `rank`'s share under `plan` on the current device (the checkpoint has been validated).
DeviceWeights upload_rank_weights(const ModelConfig& config, const Checkpoint& checkpoint, const ShardPlan& plan,
                                  int rank);

}  // namespace pearl::gpu
