#include "backend.h"

#include <algorithm>
#include <stdexcept>

#include "cpu_backend.h"
#ifdef PEARL_WITH_CUDA
#include "cuda_backend.h"
#endif

namespace pearl {

int default_num_blocks(const ModelConfig& config, int block_size, int64_t bytes_per_block) {
  constexpr int64_t kSequences = 64;
  constexpr int64_t kMemoryBudget = int64_t{1} << 30;
  const int64_t blocks_per_sequence = (config.max_position_embeddings + block_size - 1) / block_size;
  const int64_t wanted = kSequences * blocks_per_sequence;
  const int64_t affordable = kMemoryBudget / std::max<int64_t>(1, bytes_per_block);
  return static_cast<int>(std::max<int64_t>(1, std::min(wanted, affordable)));
}

std::unique_ptr<Backend> create_backend(const ModelConfig& config, const Checkpoint& checkpoint,
                                        const EngineOptions& options) {
#ifdef PEARL_WITH_CUDA
  if (options.backend == "cuda" || (options.backend == "auto" && cuda_device_count() > 0)) {
    return create_cuda_backend(config, checkpoint, options);
  }
#endif
  if (options.backend == "cpu" || options.backend == "auto") {
    return std::make_unique<CpuBackend>(config, checkpoint, options);
  }
  if (options.backend == "cuda") {
    throw std::runtime_error("backend \"cuda\" is not available: this build of pearl has no CUDA support");
  }
  throw std::runtime_error("unknown backend \"" + options.backend + "\" (expected cpu, cuda or auto)");
}

}  // namespace pearl
