// Error checks for CUDA runtime and cuBLASLt calls: a failure becomes a std::runtime_error naming the call.
#pragma once

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

namespace pearl::gpu {

inline void check_cuda(cudaError_t error, const char* call) {
  if (error != cudaSuccess) {
    throw std::runtime_error(std::string("CUDA error in ") + call + ": " + cudaGetErrorName(error) + " (" +
                             cudaGetErrorString(error) + ")");
  }
}

}  // namespace pearl::gpu

#define PEARL_CUDA_CHECK(call) ::pearl::gpu::check_cuda((call), #call)
