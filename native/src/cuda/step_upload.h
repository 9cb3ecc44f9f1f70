// How a CUDA step's inputs reach the device: the backend stages the step's metadata and token choices in
// pinned host memory, and one kernel reads them from there (pinned memory is device-addressable under
// unified addressing). Two asynchronous copies and a kernel took ~17 µs of the device's time between two
// 8B decode graphs; one small kernel takes a few.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "ops/cuda_ops.cuh"

namespace pearl::gpu {

struct StepUpload {
  const int32_t* staged_meta = nullptr;  // pinned host memory
  int32_t* meta = nullptr;
  int meta_words = 0;
  // Rows [0, rows) whose token the step in flight picked: meta[fed_from_offset + r] >= 0 names the row of
  // `chosen` whose token replaces meta[r] (token 0 if it picked none: the engine then fails the step).
  int rows = 0;
  int fed_from_offset = 0;
  const ChosenTokenRow* chosen = nullptr;
  const int32_t* staged_choices = nullptr;  // pinned host memory
  int32_t* choices = nullptr;
  int choice_words = 0;
};

void upload_step(const StepUpload& upload, cudaStream_t stream);

}  // namespace pearl::gpu
