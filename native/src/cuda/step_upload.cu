#include "cuda/step_upload.h"

#include "cuda/check.h"

namespace pearl::gpu {

namespace {

__global__ void upload_step_kernel(StepUpload upload) {
  const int words = max(upload.meta_words, upload.choice_words);
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < words; i += gridDim.x * blockDim.x) {
    if (i < upload.meta_words) {
      int32_t value = upload.staged_meta[i];
      if (i < upload.rows) {
        const int32_t source = upload.staged_meta[upload.fed_from_offset + i];
        if (source >= 0) value = max(upload.chosen[source].token, 0);
      }
      upload.meta[i] = value;
    }
    if (i < upload.choice_words) upload.choices[i] = upload.staged_choices[i];
  }
}

}  // namespace

void upload_step(const StepUpload& upload, cudaStream_t stream) {
  constexpr int kThreads = 256;
  constexpr int kMaxBlocks = 16;
  const int words = upload.meta_words > upload.choice_words ? upload.meta_words : upload.choice_words;
  if (words == 0) return;
  const int blocks = (words + kThreads - 1) / kThreads < kMaxBlocks ? (words + kThreads - 1) / kThreads : kMaxBlocks;
  upload_step_kernel<<<blocks, kThreads, 0, stream>>>(upload);
  check_cuda(cudaGetLastError(), "upload_step");
}

}  // namespace pearl::gpu
