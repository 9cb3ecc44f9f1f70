// The collectives of a tensor-parallel group: each rank's buffer lives on its device and each operation is
// enqueued on every rank's stream (graph-capturable). Ranks on distinct GPUs talk through NCCL (one process,
// one communicator per GPU, group calls from the engine thread); ranks that all share one GPU (devices
// 0,0,...: the TP code on one card, for tests) add and copy with plain kernels on their one stream.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <memory>
#include <vector>

namespace pearl::gpu {

class Collective {
 public:
  // `streams[r]` is rank r's stream on devices[r]; `max_floats` bounds every call's count. Deterministic: the
  // sum's order is fixed (rank 0 first), whatever the count; NCCL's own all-reduce is used only where it adds
  // in one order anyway (two ranks: a + b == b + a). Throws naming the devices when NCCL cannot start.
  static std::unique_ptr<Collective> create(const std::vector<int>& devices, const std::vector<cudaStream_t>& streams,
                                            bool deterministic, size_t max_floats);
  virtual ~Collective() = default;

  // buffers[r] (count floats on rank r) = the sum over ranks, bit-identical on every rank.
  virtual void all_reduce_sum(const std::vector<float*>& buffers, size_t count) = 0;
  // gathered[r] = send[0] | send[1] | ... (count floats from each rank).
  virtual void all_gather(const std::vector<const float*>& send, const std::vector<float*>& gathered,
                          size_t count) = 0;
  // "nccl" or "shared-device".
  virtual const char* kind() const = 0;
};

// Median microseconds, host to host, of one all_reduce_sum of `count` floats over ranks on `devices` (eager,
// after a warm-up): the collective's share of a tensor-parallel step's floor.
double time_all_reduce(const std::vector<int>& devices, size_t count, bool deterministic, int iterations);

// out[row, c] (vocab columns per row) = logit column c of `row` from an all-gather of vocabulary shards:
// gathered holds one block per rank of [rows, local_vocab], rank s's block holding columns [s * local_vocab, ...);
// columns at or past vocab (the padding) are dropped.
void assemble_vocab_shards(const float* gathered, int rows, int local_vocab, int vocab, float* out,
                           cudaStream_t stream);

}  // namespace pearl::gpu
