// The CUDA backend (built with PEARL_CUDA): bf16 weights and a bf16 paged KV cache on one GPU, float32
// accumulation, own kernels for rows <= 16 (decode, verify windows), cuBLASLt for larger row counts, and
// CUDA graphs for steps of up to 64 rows. Declared without CUDA types so the C++ core can include it.
//
// EngineOptions::deterministic makes every matrix product use the batch-invariant kernel (a row's logits
// then never depend on what shares its step, so greedy pearl/sd equals ar bit for bit). Environment:
// PEARL_CUDA_GRAPHS=0 turns graph replay off.
#pragma once

#include <cstddef>
#include <memory>
#include <vector>

#include "backend.h"

namespace pearl {

// CUDA devices this process can use; 0 without a driver or a GPU.
int cuda_device_count();

// Median microseconds of one all-reduce of `floats` float32 values over a tensor-parallel group on `devices`
// (deterministic: the fixed-order sum), for the benchmark's floor.
double all_reduce_microseconds(const std::vector<int>& devices, size_t floats, bool deterministic);

std::unique_ptr<Backend> create_cuda_backend(const ModelConfig& config, const Checkpoint& checkpoint,
                                             const EngineOptions& options);

}  // namespace pearl
