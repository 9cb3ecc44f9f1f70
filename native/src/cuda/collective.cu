#include "cuda/collective.h"

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <stdexcept>
#include <string>

#include "cuda/check.h"
#include "ops/cuda_ops.cuh"
#include "tensor_parallel.h"

#ifdef PEARL_WITH_NCCL
#include <nccl.h>
#endif

namespace pearl::gpu {

namespace {

struct RankPointers {
  const float* source[kMaxTensorParallel];
  float* destination[kMaxTensorParallel];
};

// destination[d][i] = ((source[0][i] + source[1][i]) + ...) for every destination d: one fixed order.
__global__ void sum_in_rank_order(RankPointers pointers, int ranks, int destinations, size_t count) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    float sum = pointers.source[0][i];
    for (int r = 1; r < ranks; ++r) sum += pointers.source[r][i];
    for (int d = 0; d < destinations; ++d) pointers.destination[d][i] = sum;
  }
}

void launch_sum(const RankPointers& pointers, int ranks, int destinations, size_t count, cudaStream_t stream) {
  constexpr int kThreads = 256;
  const size_t blocks = std::min<size_t>((count + kThreads - 1) / kThreads, 1024);
  sum_in_rank_order<<<static_cast<unsigned>(std::max<size_t>(blocks, 1)), kThreads, 0, stream>>>(pointers, ranks,
                                                                                                 destinations, count);
  check_launch("sum_in_rank_order");
}

std::string device_list(const std::vector<int>& devices) {
  std::string list;
  for (int device : devices) list += (list.empty() ? "" : ",") + std::to_string(device);
  return list;
}

// Every rank on one GPU and one stream: the sum is one kernel over all ranks' buffers, the gather plain copies.
class SharedDeviceCollective final : public Collective {
 public:
  explicit SharedDeviceCollective(cudaStream_t stream) : stream_(stream) {}

  void all_reduce_sum(const std::vector<float*>& buffers, size_t count) override {
    RankPointers pointers{};
    for (size_t r = 0; r < buffers.size(); ++r) {
      pointers.source[r] = buffers[r];
      pointers.destination[r] = buffers[r];
    }
    const int ranks = static_cast<int>(buffers.size());
    launch_sum(pointers, ranks, ranks, count, stream_);
  }

  void all_gather(const std::vector<const float*>& send, const std::vector<float*>& gathered, size_t count) override {
    for (float* destination : gathered) {
      for (size_t s = 0; s < send.size(); ++s) {
        PEARL_CUDA_CHECK(cudaMemcpyAsync(destination + s * count, send[s], count * sizeof(float),
                                         cudaMemcpyDeviceToDevice, stream_));
      }
    }
  }

  const char* kind() const override { return "shared-device"; }

 private:
  cudaStream_t stream_;
};

#ifdef PEARL_WITH_NCCL

void check_nccl(ncclResult_t result, const char* call) {
  if (result != ncclSuccess) {
    throw std::runtime_error(std::string("NCCL error in ") + call + ": " + ncclGetErrorString(result));
  }
}
#define PEARL_NCCL_CHECK(call) check_nccl((call), #call)

// One communicator per GPU, driven from the one engine thread with group calls.
class NcclCollective final : public Collective {
 public:
  NcclCollective(const std::vector<int>& devices, const std::vector<cudaStream_t>& streams, bool deterministic,
                 size_t max_floats)
      : devices_(devices), streams_(streams), comms_(devices.size(), nullptr) {
    // NVLink multicast (NVLS) stays off: the machines this runs on forbid it, and decode-sized messages gain
    // nothing from it.
    setenv("NCCL_NVLS_ENABLE", "0", 0);
    const ncclResult_t started = ncclCommInitAll(comms_.data(), static_cast<int>(devices.size()), devices.data());
    if (started != ncclSuccess) {
      throw std::runtime_error("NCCL failed to start on devices " + device_list(devices) + ": " +
                               ncclGetErrorString(started));
    }
    // A fixed order for more than two ranks: gather every rank's partial, then add them rank 0 first.
    ordered_sum_ = deterministic && devices.size() > 2;
    if (ordered_sum_) {
      for (size_t r = 0; r < devices.size(); ++r) {
        PEARL_CUDA_CHECK(cudaSetDevice(devices[r]));
        float* scratch = nullptr;
        PEARL_CUDA_CHECK(cudaMalloc(&scratch, devices.size() * max_floats * sizeof(float)));
        gathered_partials_.push_back(scratch);
      }
    }
  }

  ~NcclCollective() override {
    for (size_t r = 0; r < comms_.size(); ++r) {
      cudaSetDevice(devices_[r]);
      if (comms_[r] != nullptr) ncclCommDestroy(comms_[r]);
      if (r < gathered_partials_.size()) cudaFree(gathered_partials_[r]);
    }
  }

  void all_reduce_sum(const std::vector<float*>& buffers, size_t count) override {
    if (ordered_sum_) {
      all_gather(std::vector<const float*>(buffers.begin(), buffers.end()), gathered_partials_, count);
      for (size_t r = 0; r < buffers.size(); ++r) {
        PEARL_CUDA_CHECK(cudaSetDevice(devices_[r]));
        RankPointers pointers{};
        for (size_t s = 0; s < buffers.size(); ++s) pointers.source[s] = gathered_partials_[r] + s * count;
        pointers.destination[0] = buffers[r];
        launch_sum(pointers, static_cast<int>(buffers.size()), 1, count, streams_[r]);
      }
      return;
    }
    PEARL_NCCL_CHECK(ncclGroupStart());
    for (size_t r = 0; r < buffers.size(); ++r) {
      PEARL_NCCL_CHECK(ncclAllReduce(buffers[r], buffers[r], count, ncclFloat32, ncclSum, comms_[r], streams_[r]));
    }
    PEARL_NCCL_CHECK(ncclGroupEnd());
  }

  void all_gather(const std::vector<const float*>& send, const std::vector<float*>& gathered, size_t count) override {
    PEARL_NCCL_CHECK(ncclGroupStart());
    for (size_t r = 0; r < send.size(); ++r) {
      PEARL_NCCL_CHECK(ncclAllGather(send[r], gathered[r], count, ncclFloat32, comms_[r], streams_[r]));
    }
    PEARL_NCCL_CHECK(ncclGroupEnd());
  }

  const char* kind() const override { return "nccl"; }

 private:
  std::vector<int> devices_;
  std::vector<cudaStream_t> streams_;
  std::vector<ncclComm_t> comms_;
  bool ordered_sum_ = false;
  std::vector<float*> gathered_partials_;  // per rank: every rank's partial, max_floats each
};

#endif  // PEARL_WITH_NCCL

__global__ void assemble_vocab_shards_kernel(const float* gathered, int rows, int local_vocab, int vocab,
                                            float* out) {
  const size_t total = static_cast<size_t>(rows) * vocab;
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const size_t row = i / vocab;
    const size_t column = i % vocab;
    const size_t shard = column / local_vocab;
    out[i] = gathered[(shard * rows + row) * local_vocab + column % local_vocab];
  }
}

}  // namespace

double time_all_reduce(const std::vector<int>& devices, size_t count, bool deterministic, int iterations) {
  std::vector<cudaStream_t> streams;
  std::vector<float*> buffers;
  const auto release = [&] {
    for (size_t r = 0; r < devices.size(); ++r) {
      cudaSetDevice(devices[r]);
      if (r < buffers.size()) cudaFree(buffers[r]);
      if (r < streams.size() && (r == 0 || devices[r] != devices[0])) cudaStreamDestroy(streams[r]);
    }
  };
  try {
    for (size_t r = 0; r < devices.size(); ++r) {
      PEARL_CUDA_CHECK(cudaSetDevice(devices[r]));
      cudaStream_t stream = streams.empty() ? nullptr : streams[0];
      if (r == 0 || devices[r] != devices[0]) PEARL_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
      streams.push_back(stream);
      float* buffer = nullptr;
      PEARL_CUDA_CHECK(cudaMalloc(&buffer, count * sizeof(float)));
      PEARL_CUDA_CHECK(cudaMemset(buffer, 0, count * sizeof(float)));
      buffers.push_back(buffer);
    }
    const std::unique_ptr<Collective> collective = Collective::create(devices, streams, deterministic, count);
    const auto synchronize = [&] {
      for (size_t r = 0; r < devices.size(); ++r) {
        PEARL_CUDA_CHECK(cudaSetDevice(devices[r]));
        PEARL_CUDA_CHECK(cudaStreamSynchronize(streams[r]));
      }
    };
    std::vector<double> microseconds;
    for (int i = 0; i < iterations + 5; ++i) {
      synchronize();
      const auto start = std::chrono::steady_clock::now();
      collective->all_reduce_sum(buffers, count);
      synchronize();
      const std::chrono::duration<double, std::micro> elapsed = std::chrono::steady_clock::now() - start;
      if (i >= 5) microseconds.push_back(elapsed.count());
    }
    release();
    std::sort(microseconds.begin(), microseconds.end());
    return microseconds[microseconds.size() / 2];
  } catch (...) {
    release();
    throw;
  }
}

void assemble_vocab_shards(const float* gathered, int rows, int local_vocab, int vocab, float* out,
                           cudaStream_t stream) {
  constexpr int kThreads = 256;
  const size_t total = static_cast<size_t>(rows) * vocab;
  const size_t blocks = std::min<size_t>((total + kThreads - 1) / kThreads, 4096);
  assemble_vocab_shards_kernel<<<static_cast<unsigned>(std::max<size_t>(blocks, 1)), kThreads, 0, stream>>>(
      gathered, rows, local_vocab, vocab, out);
  check_launch("assemble_vocab_shards");
}

std::unique_ptr<Collective> Collective::create(const std::vector<int>& devices,
                                               const std::vector<cudaStream_t>& streams, bool deterministic,
                                               size_t max_floats) {
  bool all_same = true;
  bool all_distinct = true;
  for (size_t i = 0; i < devices.size(); ++i) {
    for (size_t j = 0; j < i; ++j) {
      if (devices[i] == devices[j]) all_distinct = false;
    }
    if (devices[i] != devices[0]) all_same = false;
  }
  if (all_same) return std::make_unique<SharedDeviceCollective>(streams[0]);
  if (!all_distinct) {
    throw std::runtime_error("devices " + device_list(devices) +
                             ": a tensor-parallel group's devices must be all distinct, or all the same GPU");
  }
#ifdef PEARL_WITH_NCCL
  return std::make_unique<NcclCollective>(devices, streams, deterministic, max_floats);
#else
  (void)deterministic;
  (void)max_floats;
  throw std::runtime_error("devices " + device_list(devices) +
                           ": tensor parallelism over several GPUs needs NCCL, which this build of pearl lacks");
#endif
}

}  // namespace pearl::gpu
