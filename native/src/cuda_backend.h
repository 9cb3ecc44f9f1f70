// The CUDA backend (built with PEARL_CUDA): bf16 weights and a bf16 paged KV cache on one GPU, float32
// accumulation, own kernels for rows <= 16 (decode, verify windows), cuBLASLt for larger row counts, and
// CUDA graphs for steps of up to 64 rows. Declared without CUDA types so the C++ core can include it.
//
// EngineOptions::deterministic makes every matrix product use the batch-invariant kernel (a row's logits
// then never depend on what shares its step, so greedy pearl/sd equals ar bit for bit). Environment:
// PEARL_CUDA_GRAPHS=0 turns graph replay off.
#pragma once

#include <memory>

#include "backend.h"

namespace pearl {

// CUDA devices this process can use; 0 without a driver or a GPU.
int cuda_device_count();

std::unique_ptr<Backend> create_cuda_backend(const ModelConfig& config, const Checkpoint& checkpoint,
                                             const EngineOptions& options);

}  // namespace pearl
