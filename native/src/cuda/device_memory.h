// Owned CUDA allocations: device memory, and pinned host memory that every GPU of the process can address
// (portable and mapped: a tensor-parallel step's kernels on each GPU read the same staged metadata).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>

#include "cuda/check.h"

namespace pearl::gpu {

inline cudaError_t allocate_device(void** pointer, size_t bytes) { return cudaMalloc(pointer, bytes); }
inline cudaError_t allocate_pinned(void** pointer, size_t bytes) {
  return cudaHostAlloc(pointer, bytes, cudaHostAllocPortable | cudaHostAllocMapped);
}

// Owns one CUDA allocation; Allocate/Free pick device memory or pinned host memory. Device memory belongs to
// the device current when it was made, and must be freed there too (the owner sets it before destruction).
template <cudaError_t (*Allocate)(void**, size_t), cudaError_t (*Free)(void*)>
class CudaAllocation {
 public:
  CudaAllocation() = default;
  explicit CudaAllocation(size_t bytes) {
    if (bytes > 0) PEARL_CUDA_CHECK(Allocate(&pointer_, bytes));
  }
  ~CudaAllocation() { release(); }
  CudaAllocation(CudaAllocation&& other) noexcept : pointer_(other.pointer_) { other.pointer_ = nullptr; }
  CudaAllocation& operator=(CudaAllocation&& other) noexcept {
    if (this != &other) {
      release();
      pointer_ = other.pointer_;
      other.pointer_ = nullptr;
    }
    return *this;
  }
  template <typename T>
  T* as() const {
    return static_cast<T*>(pointer_);
  }

 private:
  void release() {
    if (pointer_ != nullptr) Free(pointer_);
    pointer_ = nullptr;
  }
  void* pointer_ = nullptr;
};

using DeviceMemory = CudaAllocation<allocate_device, cudaFree>;
using PinnedMemory = CudaAllocation<allocate_pinned, cudaFreeHost>;

}  // namespace pearl::gpu
