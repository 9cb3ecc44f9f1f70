// No CPU twin: a prefetch changes no value, only where the bytes are when the next kernel asks for them.
#include "cuda/check.h"
#include "cuda_ops.cuh"

namespace pearl::gpu {

namespace {

constexpr int kThreads = 128;
constexpr size_t kPiece = 32 << 10;  // bytes per bulk prefetch instruction

// Each thread hands the copy engine one piece to bring into L2 and moves on; nothing waits for the data.
// The kernel then waits for the kernel it was launched after, so that the stream's order stays as if it
// had run after it: a later kernel launched normally still finds that kernel's results complete.
__global__ void __launch_bounds__(kThreads) l2_prefetch_kernel(const char* __restrict__ data, size_t bytes) {
  const size_t offset = (static_cast<size_t>(blockIdx.x) * kThreads + threadIdx.x) * kPiece;
  if (offset < bytes) {
    const auto size = static_cast<uint32_t>(bytes - offset < kPiece ? bytes - offset : kPiece);
    asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(data + offset), "r"(size) : "memory");
  }
  wait_for_prerequisites();
}

}  // namespace

void l2_prefetch(const void* data, size_t bytes, bool programmatic, cudaStream_t stream) {
  bytes &= ~static_cast<size_t>(15);  // the bulk copy moves multiples of 16 bytes
  if (bytes == 0) return;
  cudaLaunchAttribute attribute{};
  attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config{};
  const size_t pieces = (bytes + kPiece - 1) / kPiece;
  config.gridDim = dim3(static_cast<unsigned>((pieces + kThreads - 1) / kThreads));
  config.blockDim = dim3(kThreads);
  config.stream = stream;
  config.attrs = &attribute;
  config.numAttrs = programmatic ? 1 : 0;
  PEARL_CUDA_CHECK(cudaLaunchKernelEx(&config, l2_prefetch_kernel, static_cast<const char*>(data), bytes));
  check_launch("l2_prefetch");
}

}  // namespace pearl::gpu
