// No CPU twin: a prefetch changes no value, only where the bytes are when the next kernel asks for them.
#include <cstdlib>
#include <cstring>

#include "cuda/check.h"
#include "cuda_ops.cuh"

namespace pearl::gpu {

namespace {

constexpr int kThreads = 32;
constexpr size_t kBulkPiece = 4 << 10;  // bytes per bulk prefetch instruction: 200 CTAs for 25 MB
constexpr size_t kLine = 128;
constexpr int kLinesPerThread = 16;

// Each thread hands the copy engine one piece to bring into L2 and moves on; nothing waits for the data.
__global__ void __launch_bounds__(kThreads) l2_prefetch_bulk_kernel(const char* __restrict__ data, size_t bytes) {
  const size_t offset = (static_cast<size_t>(blockIdx.x) * kThreads + threadIdx.x) * kBulkPiece;
  if (offset >= bytes) return;
  const auto size = static_cast<uint32_t>(bytes - offset < kBulkPiece ? bytes - offset : kBulkPiece);
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(data + offset), "r"(size) : "memory");
}

// The same with one prefetch instruction per 128-byte line.
__global__ void __launch_bounds__(kThreads) l2_prefetch_lines_kernel(const char* __restrict__ data, size_t bytes) {
  const size_t first = (static_cast<size_t>(blockIdx.x) * kThreads * kLinesPerThread + threadIdx.x) * kLine;
#pragma unroll
  for (int i = 0; i < kLinesPerThread; ++i) {
    const size_t offset = first + static_cast<size_t>(i) * kThreads * kLine;
    if (offset < bytes) asm volatile("prefetch.global.L2 [%0];" ::"l"(data + offset) : "memory");
  }
}

bool use_line_prefetch() {
  const char* mode = std::getenv("PEARL_CUDA_L2_PREFETCH_MODE");
  return mode != nullptr && std::strcmp(mode, "lines") == 0;
}

}  // namespace

void l2_prefetch(const void* data, size_t bytes, cudaStream_t stream) {
  static const bool lines = use_line_prefetch();
  bytes &= ~static_cast<size_t>(15);  // the bulk copy moves multiples of 16 bytes
  if (bytes == 0) return;
  const char* start = static_cast<const char*>(data);
  if (lines) {
    const size_t per_block = kThreads * kLinesPerThread * kLine;
    l2_prefetch_lines_kernel<<<static_cast<unsigned>((bytes + per_block - 1) / per_block), kThreads, 0, stream>>>(
        start, bytes);
  } else {
    const size_t per_block = kThreads * kBulkPiece;
    l2_prefetch_bulk_kernel<<<static_cast<unsigned>((bytes + per_block - 1) / per_block), kThreads, 0, stream>>>(
        start, bytes);
  }
  check_launch("l2_prefetch");
}

}  // namespace pearl::gpu
