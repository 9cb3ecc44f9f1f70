#include "cuda_backend.h"

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

#include "cuda/check.h"
#include "cuda/cublaslt.h"
#include "cuda/step_upload.h"
#include "ops/cuda_ops.cuh"
#include "ops/ops.h"
#include "sampling.h"
#include "weights.h"

namespace pearl {

namespace {

using gpu::bf16;

constexpr int kChunkRows = 256;    // rows per pass through the layers; bounds the activation scratch
constexpr int kLogitRows = 64;     // rows per lm_head product; bounds the logits buffer
constexpr int kGraphMaxRows = 64;  // steps of up to this many rows replay a captured CUDA graph
constexpr int kDraftEntriesPerRow = 64;  // judged and returned q entries per processed row the load-time staging holds
constexpr std::array<int, 7> kGraphBuckets = {1, 2, 4, 8, 16, 32, 64};
constexpr size_t kCublasWorkspaceBytes = size_t{32} << 20;
constexpr double kDefaultCacheFraction = 0.45;  // of the memory left free after weights and scratch
constexpr int64_t kDefaultCacheSequences = 64;  // full-context sequences the default cache is sized for

bool env_flag(const char* name, bool fallback) {
  const char* value = std::getenv(name);
  if (value == nullptr || *value == '\0') return fallback;
  return std::strcmp(value, "0") != 0 && std::strcmp(value, "false") != 0;
}

cudaError_t allocate_device(void** pointer, size_t bytes) { return cudaMalloc(pointer, bytes); }
cudaError_t allocate_pinned(void** pointer, size_t bytes) { return cudaMallocHost(pointer, bytes); }

// Owns one CUDA allocation; Allocate/Free pick device memory or pinned host memory.
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

// What a begun step holds until finish_forward: its own pinned staging, so that the step begun behind it
// never rewrites what its queued upload (gpu::upload_step) has yet to read, where its chosen tokens land,
// and the event that marks its end. Two: a step in flight and one begun behind it.
struct StepSlot {
  PinnedMemory staging;         // rows and block tables (stage_rows)
  PinnedMemory choice_staging;  // how each logits row picks its token (stage_choices)
  PinnedMemory landing;         // the chosen tokens (reserve_chosen_landing)
  size_t landing_capacity = 0;
  cudaEvent_t done = nullptr;
  ops::ChosenToken* chosen = nullptr;  // the caller's outputs
  ops::TokenProb* q_entries = nullptr;
  size_t outputs = 0;
};

// Round to nearest even, as torch's .to(torch.bfloat16) does; NaN stays NaN.
uint16_t float_to_bf16_bits(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  if ((bits & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0;
  bits += 0x7FFFu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

struct DeviceLinear {
  const bf16* weight = nullptr;
  const float* bias = nullptr;  // null: no bias
  int in = 0;
  int out = 0;
  int skinny_variant = 0;  // the skinny GEMM launch shape measured fastest for [out, in]
};

struct DeviceLayer {
  const float* input_norm = nullptr;
  const float* post_attention_norm = nullptr;
  const float* q_norm = nullptr;  // qk_norm models only
  const float* k_norm = nullptr;
  DeviceLinear qkv;  // q, k, v rows stacked, as on the CPU
  DeviceLinear o;
  DeviceLinear gate_up;  // gate and up rows interleaved (WeightUploader::gate_up)
  DeviceLinear down;
};

// Copies checkpoint tensors to the GPU: matrices as bf16 (bf16 checkpoints straight from the mapping),
// norms and biases as float32.
class WeightUploader {
 public:
  WeightUploader(const Checkpoint& checkpoint, std::vector<DeviceMemory>& owned)
      : checkpoint_(checkpoint), owned_(owned) {}

  const float* floats(const std::string& name) {
    const std::vector<float> values = load_f32(tensor(name));
    float* device = allocate<float>(values.size());
    PEARL_CUDA_CHECK(cudaMemcpy(device, values.data(), values.size() * sizeof(float), cudaMemcpyHostToDevice));
    return device;
  }

  const bf16* matrix(const std::string& name) {
    const TensorInfo& info = tensor(name);
    bf16* device = allocate<bf16>(static_cast<size_t>(info.num_elements));
    upload_bf16(info, device);
    return device;
  }

  // Several [rows_i, in] matrices stacked in order, with their biases when present.
  DeviceLinear stacked(const std::vector<std::string>& parts, bool with_bias) {
    DeviceLinear linear;
    for (const std::string& part : parts) {
      const TensorInfo& weight = tensor(part + ".weight");
      linear.in = static_cast<int>(weight.shape[1]);
      linear.out += static_cast<int>(weight.shape[0]);
    }
    bf16* weights = allocate<bf16>(static_cast<size_t>(linear.out) * static_cast<size_t>(linear.in));
    float* biases = with_bias ? allocate<float>(static_cast<size_t>(linear.out)) : nullptr;
    size_t row = 0;
    for (const std::string& part : parts) {
      const TensorInfo& weight = tensor(part + ".weight");
      upload_bf16(weight, weights + row * static_cast<size_t>(linear.in));
      if (with_bias) {
        const std::vector<float> bias = load_f32(tensor(part + ".bias"));
        PEARL_CUDA_CHECK(
            cudaMemcpy(biases + row, bias.data(), bias.size() * sizeof(float), cudaMemcpyHostToDevice));
      }
      row += static_cast<size_t>(weight.shape[0]);
    }
    linear.weight = weights;
    linear.bias = biases;
    return linear;
  }

  // The gate and up projections interleaved in groups of gpu::kGateUpGroup rows (gpu::gate_up_row), the
  // layout in which skinny_matmul_silu finds a gate and its up in one CTA and silu_mul reads cuBLASLt's
  // output. Staged as plain stacked rows first, then regrouped on the device.
  DeviceLinear gate_up(const std::string& gate, const std::string& up, bool with_bias) {
    std::vector<DeviceMemory> staging;
    WeightUploader stage(checkpoint_, staging);
    const DeviceLinear plain = stage.stacked({gate, up}, with_bias);
    DeviceLinear linear = plain;
    const size_t in = static_cast<size_t>(plain.in);
    const size_t half_rows = static_cast<size_t>(plain.out) / 2;
    const size_t groups = half_rows / gpu::kGateUpGroup;
    bf16* weights = allocate<bf16>(static_cast<size_t>(plain.out) * in);
    const size_t group_bytes = gpu::kGateUpGroup * in * sizeof(bf16);
    for (size_t part = 0; part < 2; ++part) {
      PEARL_CUDA_CHECK(cudaMemcpy2D(weights + part * gpu::kGateUpGroup * in, 2 * group_bytes,
                                    plain.weight + part * half_rows * in, group_bytes, group_bytes, groups,
                                    cudaMemcpyDeviceToDevice));
    }
    linear.weight = weights;
    if (with_bias) {
      float* biases = allocate<float>(static_cast<size_t>(plain.out));
      const size_t bias_group_bytes = gpu::kGateUpGroup * sizeof(float);
      for (size_t part = 0; part < 2; ++part) {
        PEARL_CUDA_CHECK(cudaMemcpy2D(biases + part * gpu::kGateUpGroup, 2 * bias_group_bytes,
                                      plain.bias + part * half_rows, bias_group_bytes, bias_group_bytes, groups,
                                      cudaMemcpyDeviceToDevice));
      }
      linear.bias = biases;
    }
    return linear;
  }

 private:
  const TensorInfo& tensor(const std::string& name) const {
    const TensorInfo* info = checkpoint_.find(name);
    if (info == nullptr) throw std::runtime_error("missing tensor " + name);  // validate_checkpoint ran first
    return *info;
  }

  template <typename T>
  T* allocate(size_t count) {
    owned_.emplace_back(count * sizeof(T));
    return owned_.back().as<T>();
  }

  static void upload_bf16(const TensorInfo& info, bf16* device) {
    if (info.dtype == DType::BF16) {
      PEARL_CUDA_CHECK(cudaMemcpy(device, info.data, info.num_bytes, cudaMemcpyHostToDevice));
      return;
    }
    const std::vector<float> values = load_f32(info);
    std::vector<uint16_t> rounded(values.size());
    for (size_t i = 0; i < values.size(); ++i) rounded[i] = float_to_bf16_bits(values[i]);
    PEARL_CUDA_CHECK(cudaMemcpy(device, rounded.data(), rounded.size() * sizeof(uint16_t), cudaMemcpyHostToDevice));
  }

  const Checkpoint& checkpoint_;
  std::vector<DeviceMemory>& owned_;
};

int select_device(const EngineOptions& options) {
  if (options.devices.size() > 1) {
    throw std::runtime_error("backend \"cuda\" runs on one GPU; tensor parallelism over " +
                             std::to_string(options.devices.size()) + " devices is not implemented");
  }
  const int device = options.devices.empty() ? 0 : options.devices[0];
  const int count = cuda_device_count();
  if (device < 0 || device >= count) {
    throw std::runtime_error("backend \"cuda\": device " + std::to_string(device) + " does not exist (" +
                             std::to_string(count) + " CUDA devices visible)");
  }
  return device;
}

class CudaBackend final : public Backend {
 public:
  CudaBackend(const ModelConfig& config, const Checkpoint& checkpoint, const EngineOptions& options)
      : config_(config),
        device_(select_device(options)),
        block_size_(options.block_size),
        deterministic_(options.deterministic),
        graphs_enabled_(env_flag("PEARL_CUDA_GRAPHS", true)),
        log_tuning_(env_flag("PEARL_CUDA_LOG_TUNING", false)),
        programmatic_launch_(env_flag("PEARL_CUDA_PDL", true)) {
    check_supported();
    PEARL_CUDA_CHECK(cudaSetDevice(device_));
    PEARL_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    load_weights(checkpoint);
    tune_matmuls();
    allocate_scratch();
    allocate_cache(options);
    for (StepSlot& slot : slots_) PEARL_CUDA_CHECK(cudaEventCreateWithFlags(&slot.done, cudaEventDisableTiming));
  }

  ~CudaBackend() override {
    cudaSetDevice(device_);
    if (stream_ != nullptr) cudaStreamSynchronize(stream_);
    for (StepSlot& slot : slots_) {
      if (slot.done != nullptr) cudaEventDestroy(slot.done);
    }
    clear_graphs();
    cublas_.reset();
    if (stream_ != nullptr) cudaStreamDestroy(stream_);
  }

  CudaBackend(const CudaBackend&) = delete;
  CudaBackend& operator=(const CudaBackend&) = delete;

  const char* name() const override { return "cuda"; }
  int num_blocks() const override { return num_blocks_; }

  void copy_block(int32_t source, int32_t destination) override {
    PEARL_CUDA_CHECK(cudaSetDevice(device_));
    const size_t block_elements = static_cast<size_t>(block_size_) * config_.num_kv_heads * config_.head_dim;
    for (int layer = 0; layer < config_.num_layers; ++layer) {
      const gpu::DeviceKvLayer kv = kv_layer(layer);
      PEARL_CUDA_CHECK(cudaMemcpyAsync(kv.k + destination * block_elements, kv.k + source * block_elements,
                                       block_elements * sizeof(bf16), cudaMemcpyDeviceToDevice, stream_));
      PEARL_CUDA_CHECK(cudaMemcpyAsync(kv.v + destination * block_elements, kv.v + source * block_elements,
                                       block_elements * sizeof(bf16), cudaMemcpyDeviceToDevice, stream_));
    }
  }

  // Overlappable steps replay a graph, so a fed row's source is the bucket row of its output.
  int max_overlapped_rows() const override { return graphs_enabled_ ? kGraphMaxRows : 0; }

  void begin_forward(const ForwardBatch& batch, float* logits, ops::ChosenToken* chosen,
                     ops::TokenProb* q_entries) override {
    if (begun_.size() == slots_.size()) throw std::logic_error("cuda backend: more steps begun than it can hold");
    PEARL_CUDA_CHECK(cudaSetDevice(device_));
    const size_t slot_index = next_slot_;
    StepSlot& slot = slots_[slot_index];
    const int rows = static_cast<int>(batch.tokens.size());
    if (rows > 0) {
      const int bucket = graph_bucket(rows);
      upload(batch, bucket, slot);
      ops::ChosenToken* landing = reserve_chosen_landing(slot, batch.logit_rows.size());
      if (bucket > 0) {
        forward_graph(batch, bucket, logits, landing, q_entries);
      } else {
        forward_eager(batch, logits, landing, q_entries);
      }
    }
    PEARL_CUDA_CHECK(cudaEventRecord(slot.done, stream_));
    slot.chosen = chosen;
    slot.q_entries = q_entries;
    slot.outputs = batch.logit_rows.size();
    last_logit_rows_ = batch.logit_rows;
    begun_.push_back(slot_index);
    next_slot_ = (next_slot_ + 1) % slots_.size();
  }

  // Stages the step's rows and token choices in the slot and queues the kernel that brings them to the
  // device (with the tokens a step in flight hands over).
  void upload(const ForwardBatch& batch, int bucket, const StepSlot& slot) {
    const int padded_rows = bucket > 0 ? bucket : static_cast<int>(batch.tokens.size());
    static_assert(sizeof(gpu::TokenChoiceRow) % sizeof(int32_t) == 0, "choices travel as 32-bit words");
    gpu::StepUpload step;
    step.meta_words = stage_rows(batch, padded_rows, slot);
    step.staged_meta = slot.staging.as<int32_t>();
    step.meta = meta_tokens();
    step.rows = padded_rows;
    step.fed_from_offset = static_cast<int>(meta_fed_from() - meta_tokens());
    step.chosen = device_tokens_.as<gpu::ChosenTokenRow>();
    step.choice_words = stage_choices(batch, bucket, slot) * static_cast<int>(sizeof(gpu::TokenChoiceRow) / 4);
    step.staged_choices = slot.choice_staging.as<int32_t>();
    step.choices = reinterpret_cast<int32_t*>(device_choices_.as<gpu::TokenChoiceRow>());
    gpu::upload_step(step, stream_);
  }

  bool forward_finished() override {
    return begun_.empty() || cudaEventQuery(slots_[begun_.front()].done) != cudaErrorNotReady;
  }

  void finish_forward() override {
    if (begun_.empty()) throw std::logic_error("cuda backend: no step to finish");
    StepSlot& slot = slots_[begun_.front()];
    begun_.pop_front();
    PEARL_CUDA_CHECK(cudaEventSynchronize(slot.done));
    const ops::ChosenToken* landing = slot.landing.as<ops::ChosenToken>();
    std::copy(landing, landing + slot.outputs, slot.chosen);
    // Only a step nothing began behind can have drafting rows, so the step's choices are still the last staged.
    draw_drafted_tokens(slot.chosen, slot.q_entries);
  }

 private:
  void check_supported() const {
    const auto fail = [this](const std::string& what) {
      throw std::runtime_error("backend \"cuda\" cannot run " + config_.architecture + ": " + what);
    };
    if (config_.num_kv_heads <= 0 || config_.num_heads % config_.num_kv_heads != 0) {
      fail("num_attention_heads must be a multiple of num_key_value_heads");
    }
    if (!gpu::attention_supports(config_.head_dim, config_.num_heads / config_.num_kv_heads)) {
      fail("head_dim " + std::to_string(config_.head_dim) + " with " +
           std::to_string(config_.num_heads / config_.num_kv_heads) +
           " query heads per KV head is not supported (head_dim 16, 32, 64, 128 or 256; at most 8 per KV head)");
    }
    for (const auto& [field, value] : {std::pair<const char*, int>{"hidden_size", config_.hidden_size},
                                       {"intermediate_size", config_.intermediate_size},
                                       {"num_attention_heads * head_dim", config_.num_heads * config_.head_dim}}) {
      if (value % 8 != 0) fail(std::string(field) + " = " + std::to_string(value) + " is not a multiple of 8");
    }
    if (block_size_ <= 0) fail("block_size must be positive");
  }

  void load_weights(const Checkpoint& checkpoint) {
    validate_checkpoint(config_, checkpoint);
    WeightUploader upload(checkpoint, weights_);
    embed_ = upload.matrix("model.embed_tokens.weight");
    layers_.resize(static_cast<size_t>(config_.num_layers));
    for (int layer = 0; layer < config_.num_layers; ++layer) {
      load_layer(config_, layer, upload, layers_[static_cast<size_t>(layer)]);
    }
    final_norm_ = upload.floats("model.norm.weight");
    lm_head_.in = config_.hidden_size;
    lm_head_.out = config_.vocab_size;
    lm_head_.weight = config_.tie_word_embeddings ? embed_ : upload.matrix("lm_head.weight");

    const std::vector<float> inv_freq = ops::rope_inv_freq(config_.rope, config_.head_dim);
    weights_.emplace_back(inv_freq.size() * sizeof(float));
    inv_freq_ = weights_.back().as<float>();
    PEARL_CUDA_CHECK(
        cudaMemcpy(inv_freq_, inv_freq.data(), inv_freq.size() * sizeof(float), cudaMemcpyHostToDevice));
  }

  // Every weight shape gets the skinny GEMM variant that streams it fastest on this card (they all give
  // bit-identical results, so the choice cannot change an output).
  void tune_matmuls() {
    std::vector<DeviceLinear*> linears;
    for (DeviceLayer& layer : layers_) {
      for (DeviceLinear* linear : {&layer.qkv, &layer.o, &layer.gate_up, &layer.down}) linears.push_back(linear);
    }
    linears.push_back(&lm_head_);
    // PEARL_CUDA_SKINNY_VARIANT pins one variant everywhere (tests compare them; benchmarks isolate one).
    const char* pinned = std::getenv("PEARL_CUDA_SKINNY_VARIANT");
    if (pinned != nullptr && *pinned != '\0') {
      const int variant = gpu::skinny_variant_index(pinned);
      for (DeviceLinear* linear : linears) linear->skinny_variant = variant;
      return;
    }
    std::map<std::pair<int, int>, std::vector<DeviceLinear*>> by_shape;
    for (DeviceLinear* linear : linears) by_shape[{linear->in, linear->out}].push_back(linear);
    for (const auto& [shape, group] : by_shape) {
      std::vector<const bf16*> weights;
      for (const DeviceLinear* linear : group) weights.push_back(linear->weight);
      const gpu::SkinnyTuning tuning = gpu::tune_skinny_matmul(weights, shape.first, shape.second, stream_);
      for (DeviceLinear* linear : group) linear->skinny_variant = tuning.variant;
      if (log_tuning_) {
        std::string line = "pearl cuda: skinny GEMM [" + std::to_string(shape.second) + " x " +
                           std::to_string(shape.first) + "], one row, median us:";
        for (size_t v = 0; v < tuning.names.size(); ++v) {
          line += " " + tuning.names[v] + " " + std::to_string(tuning.microseconds[v]).substr(0, 6);
        }
        std::fprintf(stderr, "%s -> %s\n", line.c_str(), tuning.names[static_cast<size_t>(tuning.variant)].c_str());
      }
    }
  }

  void allocate_scratch() {
    const size_t rows = static_cast<size_t>(std::max(kChunkRows, kGraphMaxRows));
    const size_t hidden = static_cast<size_t>(config_.hidden_size);
    const size_t inter = static_cast<size_t>(config_.intermediate_size);
    x_ = DeviceMemory(rows * hidden * sizeof(float));
    normed_ = DeviceMemory(rows * hidden * sizeof(bf16));
    qkv_ = DeviceMemory(rows * static_cast<size_t>(qkv_width()) * sizeof(float));
    attended_ = DeviceMemory(rows * static_cast<size_t>(q_dim()) * sizeof(bf16));
    gate_up_ = DeviceMemory(rows * 2 * inter * sizeof(float));
    activated_ = DeviceMemory(rows * inter * sizeof(bf16));
    attention_scratch_ = DeviceMemory(
        gpu::attention_scratch_floats(static_cast<int>(rows), config_.num_heads, config_.head_dim) * sizeof(float));
    device_logits_ = DeviceMemory(static_cast<size_t>(kLogitRows) * config_.vocab_size * sizeof(float));
    device_tokens_ = DeviceMemory(static_cast<size_t>(kLogitRows) * sizeof(gpu::ChosenTokenRow));
    choose_scratch_ = DeviceMemory(gpu::choose_token_scratch_bytes(kLogitRows, config_.vocab_size));
    processed_scratch_ = DeviceMemory(gpu::processed_scratch_bytes(kLogitRows, config_.vocab_size));
    reserve_processed(kLogitRows, kLogitRows * kDraftEntriesPerRow, kLogitRows * kDraftEntriesPerRow);
    cublas_ = std::make_unique<gpu::CublasLtGemm>(kCublasWorkspaceBytes);
  }

  void allocate_cache(const EngineOptions& options) {
    const int64_t layer_block_elements =
        static_cast<int64_t>(block_size_) * config_.num_kv_heads * config_.head_dim;
    const int64_t bytes_per_block = 2 * config_.num_layers * layer_block_elements * static_cast<int64_t>(sizeof(bf16));
    if (options.num_blocks > 0) {
      num_blocks_ = options.num_blocks;
    } else {
      size_t free_bytes = 0;
      size_t total_bytes = 0;
      PEARL_CUDA_CHECK(cudaMemGetInfo(&free_bytes, &total_bytes));
      const int64_t affordable =
          static_cast<int64_t>(static_cast<double>(free_bytes) * kDefaultCacheFraction) / bytes_per_block;
      const int64_t wanted =
          kDefaultCacheSequences * ((config_.max_position_embeddings + block_size_ - 1) / block_size_);
      num_blocks_ = static_cast<int>(std::max<int64_t>(1, std::min(wanted, affordable)));
    }
    layer_elements_ = static_cast<size_t>(num_blocks_) * static_cast<size_t>(layer_block_elements);
    const size_t bytes = 2 * static_cast<size_t>(config_.num_layers) * layer_elements_ * sizeof(bf16);
    try {
      kv_cache_ = DeviceMemory(bytes);
    } catch (const std::exception& error) {
      throw std::runtime_error("backend \"cuda\": a KV cache of " + std::to_string(num_blocks_) + " blocks (" +
                               std::to_string(bytes >> 20) + " MiB) does not fit on device " +
                               std::to_string(device_) + ": " + error.what());
    }
  }

  int q_dim() const { return config_.num_heads * config_.head_dim; }
  int kv_dim() const { return config_.num_kv_heads * config_.head_dim; }
  int qkv_width() const { return q_dim() + 2 * kv_dim(); }

  gpu::DeviceKvLayer kv_layer(int layer) const {
    gpu::DeviceKvLayer kv;
    kv.k = kv_cache_.as<bf16>() + (2 * static_cast<size_t>(layer)) * layer_elements_;
    kv.v = kv.k + layer_elements_;
    kv.block_size = block_size_;
    kv.num_kv_heads = config_.num_kv_heads;
    kv.head_dim = config_.head_dim;
    return kv;
  }

  // 0 when the step runs eagerly, else the graph bucket (row count it is padded to).
  int graph_bucket(int rows) const {
    if (!graphs_enabled_ || rows > kGraphMaxRows) return 0;
    for (int bucket : kGraphBuckets) {
      if (rows <= bucket) return bucket;
    }
    return 0;
  }

  // Step metadata, one int32 array in device memory (and a pinned staging copy per step slot):
  // [tokens | positions | slots | row_table | logit_index | fed_from] (row_capacity_ each), table stride,
  // block tables.
  int32_t* meta_tokens() const { return meta_.as<int32_t>(); }
  int32_t* meta_positions() const { return meta_tokens() + row_capacity_; }
  int32_t* meta_slots() const { return meta_tokens() + 2 * row_capacity_; }
  int32_t* meta_row_table() const { return meta_tokens() + 3 * row_capacity_; }
  int32_t* meta_logit_index() const { return meta_tokens() + 4 * row_capacity_; }
  int32_t* meta_fed_from() const { return meta_tokens() + 5 * row_capacity_; }
  int32_t* meta_stride() const { return meta_tokens() + 6 * row_capacity_; }
  int32_t* meta_tables() const { return meta_stride() + 1; }

  gpu::DeviceRows device_rows(int first_row) const {
    gpu::DeviceRows rows;
    rows.tokens = meta_tokens() + first_row;
    rows.positions = meta_positions() + first_row;
    rows.slots = meta_slots() + first_row;
    rows.row_table = meta_row_table() + first_row;
    rows.block_tables = meta_tables();
    rows.table_stride = meta_stride();
    return rows;
  }

  // Grows the metadata arrays; graphs captured with the old addresses are dropped.
  void reserve_meta(int rows, int64_t table_ints) {
    if (rows <= row_capacity_ && table_ints <= table_capacity_) return;
    row_capacity_ = std::max({rows, kGraphMaxRows, 2 * row_capacity_});
    table_capacity_ = std::max<int64_t>({table_ints, int64_t{1024}, 2 * table_capacity_});
    const size_t bytes = (6 * static_cast<size_t>(row_capacity_) + 1 + static_cast<size_t>(table_capacity_)) *
                         sizeof(int32_t);
    PEARL_CUDA_CHECK(cudaStreamSynchronize(stream_));
    clear_graphs();
    meta_ = DeviceMemory(bytes);
    const size_t choice_bytes = static_cast<size_t>(row_capacity_) * sizeof(gpu::TokenChoiceRow);
    device_choices_ = DeviceMemory(choice_bytes);
    for (StepSlot& slot : slots_) {
      slot.staging = PinnedMemory(bytes);
      slot.choice_staging = PinnedMemory(choice_bytes);
    }
  }

  // The chosen tokens come back through pinned memory: a copy into the caller's pageable memory would hold
  // the engine thread inside cudaMemcpyAsync until the step ends and then stage through a driver buffer,
  // later than the step's event.
  ops::ChosenToken* reserve_chosen_landing(StepSlot& slot, size_t outputs) {
    if (outputs > slot.landing_capacity) {
      PEARL_CUDA_CHECK(cudaStreamSynchronize(stream_));
      slot.landing_capacity = std::max({outputs, static_cast<size_t>(kGraphMaxRows), 2 * slot.landing_capacity});
      slot.landing = PinnedMemory(slot.landing_capacity * sizeof(ops::ChosenToken));
    }
    return slot.landing.as<ops::ChosenToken>();
  }

  // How each logits row picks its token, in the order compute_logits sees the rows: by row of the bucket
  // for a graph step (rows without an output take the argmax), by output in chunk order for an eager one.
  // Processed rows are redrawn after compute_logits (choose_processed_rows): their staging is sized here, and
  // drafting rows get their q's place (the same offset on the device as in the caller's q_entries).
  // Returns the rows it staged.
  int stage_choices(const ForwardBatch& batch, int bucket, const StepSlot& slot) {
    gpu::TokenChoiceRow* host = slot.choice_staging.as<gpu::TokenChoiceRow>();
    const auto device_form = [&](size_t output) {
      const ops::TokenChoice& choice = batch.choices[output];
      return gpu::TokenChoiceRow{choice.temperature, static_cast<int32_t>(choice.position), choice.seed,
                                 choice.draft_token};
    };
    step_choices_ = batch.choices;
    size_t processed_rows = 0;
    size_t draft_entries = 0;
    returned_q_offset_.assign(batch.choices.size(), 0);
    size_t returned_entries = 0;
    for (size_t i = 0; i < batch.choices.size(); ++i) {
      const ops::TokenChoice& choice = batch.choices[i];
      if (choice.return_top_k > 0) {
        if (!ops::draws_processed(choice)) {
          throw std::invalid_argument("cuda backend: a row returning q must be processed, with temperature > 0");
        }
        returned_q_offset_[i] = returned_entries;
        returned_entries += static_cast<size_t>(choice.return_top_k);
      }
      if (!ops::draws_processed(choice)) continue;
      ++processed_rows;
      if (choice.draft_token >= 0) draft_entries += choice.draft_dist->tokens.size();
    }
    reserve_processed(processed_rows, draft_entries, returned_entries);
    processed_used_ = 0;
    draft_entries_used_ = 0;
    size_t count = 0;
    if (bucket > 0) {
      count = static_cast<size_t>(bucket);
      std::fill(host, host + count, gpu::TokenChoiceRow{});
      for (size_t i = 0; i < batch.logit_rows.size(); ++i) host[batch.logit_rows[i]] = device_form(i);
    } else {
      for (const auto& group : logit_groups_) {
        for (int32_t output : group) host[count++] = device_form(static_cast<size_t>(output));
      }
    }
    return static_cast<int>(count);
  }

  // Room for a step's processed rows, their drafts' q entries and the entries of the q's drafting rows
  // return. Each call of choose_processed_rows stages its rows in a fresh part of the pinned buffers, so no
  // copy still in flight reads a rewritten entry; the step's final synchronize frees them all. Grows (rarely:
  // the load-time size covers kLogitRows rows of kDraftEntriesPerRow entries) before any work of the step is
  // enqueued, never inside a capture.
  void reserve_processed(size_t rows, size_t draft_entries, size_t returned_entries) {
    if (rows <= processed_capacity_ && draft_entries <= draft_entry_capacity_ &&
        returned_entries <= returned_entry_capacity_) {
      return;
    }
    PEARL_CUDA_CHECK(cudaStreamSynchronize(stream_));
    processed_capacity_ = std::max(rows, 2 * processed_capacity_);
    draft_entry_capacity_ = std::max(draft_entries, 2 * draft_entry_capacity_);
    returned_entry_capacity_ = std::max(returned_entries, 2 * returned_entry_capacity_);
    const size_t row_bytes = processed_capacity_ * sizeof(gpu::ProcessedRow);
    processed_staging_ = PinnedMemory(row_bytes);
    device_processed_ = DeviceMemory(row_bytes);
    const size_t entry_bytes = draft_entry_capacity_ * (sizeof(int32_t) + sizeof(float));
    draft_staging_ = PinnedMemory(entry_bytes);
    device_drafts_ = DeviceMemory(entry_bytes);
    device_returned_q_ = DeviceMemory(returned_entry_capacity_ * sizeof(gpu::TokenProbRow));
  }

  // Stages the rows (padded to padded_rows with rows that touch nothing) and block tables in the slot's
  // staging, in the layout of meta_; returns the 32-bit words staged (gpu::upload_step copies them).
  int stage_rows(const ForwardBatch& batch, int padded_rows, const StepSlot& slot) {
    const int rows = static_cast<int>(batch.tokens.size());
    size_t stride = 1;
    for (const auto& table : batch.block_tables) stride = std::max(stride, table.size());
    const int64_t table_ints = static_cast<int64_t>(batch.block_tables.size()) * static_cast<int64_t>(stride);
    reserve_meta(padded_rows, table_ints);

    int32_t* host = slot.staging.as<int32_t>();
    const auto offset = [this](int32_t* device_pointer) { return device_pointer - meta_tokens(); };
    for (int r = 0; r < padded_rows; ++r) {
      const bool real = r < rows;
      host[offset(meta_tokens()) + r] = real ? batch.tokens[static_cast<size_t>(r)] : 0;
      host[offset(meta_positions()) + r] = real ? batch.positions[static_cast<size_t>(r)] : -1;
      host[offset(meta_slots()) + r] = real ? batch.slots[static_cast<size_t>(r)] : -1;
      host[offset(meta_row_table()) + r] = real ? batch.row_table[static_cast<size_t>(r)] : 0;
      const int32_t fed_output = real && !batch.fed_outputs.empty() ? batch.fed_outputs[static_cast<size_t>(r)] : -1;
      host[offset(meta_fed_from()) + r] = fed_output < 0 ? -1 : last_logit_rows_.at(static_cast<size_t>(fed_output));
    }
    // Eager steps gather their logit rows chunk by chunk: the chunk-local row of every logit output,
    // grouped by chunk in output order.
    logit_groups_.assign((static_cast<size_t>(rows) + kChunkRows - 1) / kChunkRows, {});
    for (size_t i = 0; i < batch.logit_rows.size(); ++i) {
      logit_groups_[static_cast<size_t>(batch.logit_rows[i] / kChunkRows)].push_back(static_cast<int32_t>(i));
    }
    int32_t* logit_index = host + offset(meta_logit_index());
    for (const auto& group : logit_groups_) {
      for (int32_t output : group) *logit_index++ = batch.logit_rows[static_cast<size_t>(output)] % kChunkRows;
    }
    full_logits_row_.assign(batch.logit_rows.size(), -1);
    int32_t full_rows = 0;
    for (size_t i = 0; i < batch.logit_rows.size(); ++i) {
      if (batch.full_logits[i]) full_logits_row_[i] = full_rows++;
    }
    host[offset(meta_stride())] = static_cast<int32_t>(stride);
    int32_t* tables = host + offset(meta_tables());
    for (const auto& table : batch.block_tables) {
      std::copy(table.begin(), table.end(), tables);
      std::fill(tables + table.size(), tables + stride, 0);
      tables += stride;
    }
    return static_cast<int>(offset(meta_tables()) + table_ints);
  }

  // Up to 16 rows, and always in deterministic mode, a product takes the batch-invariant skinny kernel, 16
  // rows at a time (launch(first, count) per chunk); otherwise cuBLASLt. Returns whether it took the kernel.
  template <typename Launch>
  bool skinny_chunks(int rows, Launch launch) const {
    if (rows > gpu::kSkinnyMaxRows && !deterministic_) return false;
    for (int first = 0; first < rows; first += gpu::kSkinnyMaxRows) {
      launch(static_cast<size_t>(first), std::min(gpu::kSkinnyMaxRows, rows - first));
    }
    return true;
  }

  // y (+)= x W^T (+ b).
  void matmul(const bf16* x, int rows, const DeviceLinear& linear, float* y, bool accumulate) {
    const bool skinny = skinny_chunks(rows, [&](size_t first, int count) {
      gpu::skinny_matmul(x + first * linear.in, count, linear.in, linear.weight, linear.bias, linear.out,
                         y + first * linear.out, accumulate, linear.skinny_variant, programmatic_launch_, stream_);
    });
    if (skinny) return;
    cublas_->matmul(x, rows, linear.in, linear.weight, linear.out, y, accumulate, stream_);
    if (linear.bias != nullptr) gpu::add_bias(y, rows, linear.out, linear.bias, stream_);
  }

  // out = bf16(silu(x W_gate^T) * (x W_up^T)) for the interleaved gate_up weight: in the skinny GEMM's
  // epilogue wherever matmul would take that kernel, else cuBLASLt's float product and silu_mul.
  void mlp_activation(const bf16* x, int rows, const DeviceLinear& gate_up, bf16* out) {
    const size_t inter = static_cast<size_t>(gate_up.out) / 2;
    const bool skinny = skinny_chunks(rows, [&](size_t first, int count) {
      gpu::skinny_matmul_silu(x + first * gate_up.in, count, gate_up.in, gate_up.weight, gate_up.bias, gate_up.out,
                              out + first * inter, gate_up.skinny_variant, programmatic_launch_, stream_);
    });
    if (skinny) return;
    matmul(x, rows, gate_up, gate_up_.as<float>(), false);
    gpu::silu_mul(gate_up_.as<float>(), rows, gate_up.out / 2, out, stream_);
  }

  // Every layer over `count` rows; leaves the final hidden states (before the last norm) in x_.
  void run_layers(const gpu::DeviceRows& rows, int count) {
    const int hidden = config_.hidden_size;
    const float eps = static_cast<float>(config_.rms_norm_eps);
    float* x = x_.as<float>();
    bf16* normed = normed_.as<bf16>();
    float* qkv = qkv_.as<float>();
    gpu::embedding(embed_, hidden, rows.tokens, count, x, stream_);
    for (int layer = 0; layer < config_.num_layers; ++layer) {
      const DeviceLayer& w = layers_[static_cast<size_t>(layer)];
      gpu::rmsnorm(x, nullptr, count, hidden, w.input_norm, eps, normed, programmatic_launch_, stream_);
      matmul(normed, count, w.qkv, qkv, false);
      const gpu::DeviceKvLayer kv = kv_layer(layer);
      gpu::rope_store_kv(qkv, qkv_width(), count, config_.num_heads, config_.head_dim, rows.positions, inv_freq_,
                         w.q_norm, w.k_norm, eps, rows.slots, kv, programmatic_launch_, stream_);
      gpu::attention(qkv, qkv_width(), count, config_.num_heads, kv, rows, config_.sliding_window,
                     attention_scratch_.as<float>(), attended_.as<bf16>(), programmatic_launch_, stream_);
      matmul(attended_.as<bf16>(), count, w.o, x, true);
      gpu::rmsnorm(x, nullptr, count, hidden, w.post_attention_norm, eps, normed, programmatic_launch_, stream_);
      mlp_activation(normed, count, w.gate_up, activated_.as<bf16>());
      matmul(activated_.as<bf16>(), count, w.down, x, true);
    }
  }

  // Final norm of x_ rows (row_index, or the first `count` rows when null), lm_head into device_logits_,
  // and the token each of those rows picks (choices, one per row) into device_tokens_.
  void compute_logits(const int32_t* row_index, int count, const gpu::TokenChoiceRow* choices) {
    gpu::rmsnorm(x_.as<float>(), row_index, count, config_.hidden_size, final_norm_,
                 static_cast<float>(config_.rms_norm_eps), normed_.as<bf16>(), programmatic_launch_, stream_);
    matmul(normed_.as<bf16>(), count, lm_head_, device_logits_.as<float>(), false);
    gpu::choose_token(device_logits_.as<float>(), count, config_.vocab_size, choices, choose_scratch_.as<void>(),
                      device_tokens_.as<gpu::ChosenTokenRow>(), stream_);
  }

  // Copies device rows source_rows[i] (`width` elements each) to host rows destinations[i], merging runs.
  template <typename T>
  void copy_rows(const T* device, size_t width, const std::vector<int32_t>& source_rows,
                 const std::vector<int32_t>& destinations, T* host) {
    size_t i = 0;
    while (i < destinations.size()) {
      size_t run = 1;
      while (i + run < destinations.size() && source_rows[i + run] == source_rows[i] + static_cast<int32_t>(run) &&
             destinations[i + run] == destinations[i] + static_cast<int32_t>(run)) {
        ++run;
      }
      PEARL_CUDA_CHECK(cudaMemcpyAsync(host + static_cast<size_t>(destinations[i]) * width,
                                       device + static_cast<size_t>(source_rows[i]) * width,
                                       run * width * sizeof(T), cudaMemcpyDeviceToHost, stream_));
      i += run;
    }
  }

  // Outputs `outputs` sit in rows source_rows of device_logits_ / device_tokens_: processed rows are redrawn,
  // then every choice comes back, logits only for the outputs that asked for them, and the q of drafting rows
  // (return_top_k entries each, no vocabulary-sized row).
  void copy_outputs(const std::vector<int32_t>& source_rows, const std::vector<int32_t>& outputs, float* logits,
                    ops::ChosenToken* chosen, ops::TokenProb* q_entries) {
    choose_processed_rows(source_rows, outputs);
    static_assert(sizeof(ops::ChosenToken) == sizeof(gpu::ChosenTokenRow) &&
                      offsetof(ops::ChosenToken, token) == offsetof(gpu::ChosenTokenRow, token) &&
                      offsetof(ops::ChosenToken, residual_token) == offsetof(gpu::ChosenTokenRow, residual_token) &&
                      offsetof(ops::ChosenToken, draft_prob) == offsetof(gpu::ChosenTokenRow, draft_prob),
                  "ops::ChosenToken and gpu::ChosenTokenRow must share one layout");
    copy_rows(device_tokens_.as<gpu::ChosenTokenRow>(), 1, source_rows, outputs,
              reinterpret_cast<gpu::ChosenTokenRow*>(chosen));
    std::vector<int32_t> full_sources;
    std::vector<int32_t> full_destinations;
    for (size_t i = 0; i < outputs.size(); ++i) {
      const int32_t full_row = full_logits_row_[static_cast<size_t>(outputs[i])];
      if (full_row < 0) continue;
      full_sources.push_back(source_rows[i]);
      full_destinations.push_back(full_row);
    }
    copy_rows(device_logits_.as<float>(), static_cast<size_t>(config_.vocab_size), full_sources, full_destinations,
              logits);
    copy_returned_q(outputs, q_entries);
  }

  // The returned q of the drafting rows among `outputs`; device and host share offsets, so q's of
  // consecutive drafting outputs travel in one copy.
  void copy_returned_q(const std::vector<int32_t>& outputs, ops::TokenProb* q_entries) {
    static_assert(sizeof(ops::TokenProb) == sizeof(gpu::TokenProbRow) &&
                      offsetof(ops::TokenProb, token) == offsetof(gpu::TokenProbRow, token) &&
                      offsetof(ops::TokenProb, prob) == offsetof(gpu::TokenProbRow, prob),
                  "ops::TokenProb and gpu::TokenProbRow must share one layout");
    const gpu::TokenProbRow* device = device_returned_q_.as<gpu::TokenProbRow>();
    size_t begin = 0;
    size_t end = 0;
    const auto flush = [&] {
      if (end == begin) return;
      PEARL_CUDA_CHECK(cudaMemcpyAsync(q_entries + begin, device + begin, (end - begin) * sizeof(gpu::TokenProbRow),
                                       cudaMemcpyDeviceToHost, stream_));
    };
    for (int32_t output : outputs) {
      const size_t k = static_cast<size_t>(step_choices_[static_cast<size_t>(output)].return_top_k);
      if (k == 0) continue;
      const size_t offset = returned_q_offset_[static_cast<size_t>(output)];
      if (offset != end) {
        flush();
        begin = offset;
      }
      end = offset + k;
    }
    flush();
  }

  // After the step's synchronize: each drafting row's token, drawn on the host from the q it returned exactly
  // as the CPU backend draws it (the device leaves token -1 there); an empty q keeps token -1.
  void draw_drafted_tokens(ops::ChosenToken* chosen, const ops::TokenProb* q_entries) const {
    for (size_t i = 0; i < step_choices_.size(); ++i) {
      const ops::TokenChoice& choice = step_choices_[i];
      if (choice.return_top_k == 0) continue;
      const DraftDistribution q = ops::returned_q(q_entries + returned_q_offset_[i], choice.return_top_k);
      chosen[i].token = sample_draft_token(q, choice.seed, choice.position);
    }
  }

  // Redraws the processed outputs among `outputs` (logits in rows source_rows of device_logits_) by
  // ops::choose_row's rule, over the tokens compute_logits's one-pass kernel wrote for them. It runs here,
  // after the step's graph or eager work and outside any capture, and only when the step has such rows: the
  // sort and the extra passes then cost nothing to greedy and whole-softmax steps, and the per-bucket graphs
  // stay what they were (a graph per (bucket, has-cut-rows) would capture a sort of every bucket row, most
  // of them not cut).
  void choose_processed_rows(const std::vector<int32_t>& source_rows, const std::vector<int32_t>& outputs) {
    gpu::ProcessedRow* rows = processed_staging_.as<gpu::ProcessedRow>() + processed_used_;
    int32_t* draft_tokens = draft_staging_.as<int32_t>();
    float* draft_probs = reinterpret_cast<float*>(draft_tokens + draft_entry_capacity_);
    const size_t first_entry = draft_entries_used_;
    int count = 0;
    int sorted_rows = 0;
    int nucleus_rows = 0;
    int selected_rows = 0;
    // choose_processed takes its rows grouped by processed_path: sorted, nucleus, selected, then whole.
    for (const gpu::ProcessedPath path : {gpu::ProcessedPath::Sorted, gpu::ProcessedPath::Nucleus,
                                          gpu::ProcessedPath::Selected, gpu::ProcessedPath::Whole}) {
      for (size_t i = 0; i < outputs.size(); ++i) {
        const ops::TokenChoice& choice = step_choices_[static_cast<size_t>(outputs[i])];
        if (!ops::draws_processed(choice)) continue;
        gpu::ProcessedRow row;
        row.logits_row = source_rows[i];
        row.temperature = choice.temperature;
        row.seed = choice.seed;
        row.position = static_cast<int32_t>(choice.position);
        row.top_k = choice.top_k;
        row.top_p = choice.top_p;
        row.draft_token = choice.draft_token;
        row.return_top_k = choice.return_top_k;
        row.returned_begin = static_cast<int32_t>(returned_q_offset_[static_cast<size_t>(outputs[i])]);
        if (gpu::processed_path(row) != path) continue;
        if (choice.draft_token >= 0) {
          const DraftDistribution& q = *choice.draft_dist;
          std::vector<size_t> by_token(q.tokens.size());
          for (size_t j = 0; j < by_token.size(); ++j) by_token[j] = j;
          std::sort(by_token.begin(), by_token.end(), [&](size_t a, size_t b) { return q.tokens[a] < q.tokens[b]; });
          row.q_begin = static_cast<int32_t>(draft_entries_used_);
          row.q_count = static_cast<int32_t>(by_token.size());
          for (size_t j : by_token) {
            draft_tokens[draft_entries_used_] = q.tokens[j];
            draft_probs[draft_entries_used_] = q.probs[j];
            ++draft_entries_used_;
          }
        }
        rows[count++] = row;
        if (path == gpu::ProcessedPath::Sorted) ++sorted_rows;
        if (path == gpu::ProcessedPath::Nucleus) ++nucleus_rows;
        if (path == gpu::ProcessedPath::Selected) ++selected_rows;
      }
    }
    if (count == 0) return;
    gpu::ProcessedRow* device_rows = device_processed_.as<gpu::ProcessedRow>() + processed_used_;
    PEARL_CUDA_CHECK(cudaMemcpyAsync(device_rows, rows, static_cast<size_t>(count) * sizeof(gpu::ProcessedRow),
                                     cudaMemcpyHostToDevice, stream_));
    processed_used_ += static_cast<size_t>(count);
    int32_t* device_draft_tokens = device_drafts_.as<int32_t>();
    float* device_draft_probs = reinterpret_cast<float*>(device_draft_tokens + draft_entry_capacity_);
    const size_t entries = draft_entries_used_ - first_entry;
    if (entries > 0) {
      PEARL_CUDA_CHECK(cudaMemcpyAsync(device_draft_tokens + first_entry, draft_tokens + first_entry,
                                       entries * sizeof(int32_t), cudaMemcpyHostToDevice, stream_));
      PEARL_CUDA_CHECK(cudaMemcpyAsync(device_draft_probs + first_entry, draft_probs + first_entry,
                                       entries * sizeof(float), cudaMemcpyHostToDevice, stream_));
    }
    gpu::choose_processed(device_logits_.as<float>(), config_.vocab_size, device_rows, count, sorted_rows,
                          nucleus_rows, selected_rows, device_draft_tokens, device_draft_probs,
                          processed_scratch_.as<void>(), kLogitRows, device_tokens_.as<gpu::ChosenTokenRow>(),
                          device_returned_q_.as<gpu::TokenProbRow>(), stream_);
  }

  void forward_eager(const ForwardBatch& batch, float* logits, ops::ChosenToken* chosen, ops::TokenProb* q_entries) {
    const int rows = static_cast<int>(batch.tokens.size());
    int32_t logit_offset = 0;
    for (int first = 0; first < rows; first += kChunkRows) {
      const int count = std::min(kChunkRows, rows - first);
      run_layers(device_rows(first), count);
      const std::vector<int32_t>& group = logit_groups_[static_cast<size_t>(first / kChunkRows)];
      for (size_t begin = 0; begin < group.size(); begin += kLogitRows) {
        const int n = static_cast<int>(std::min<size_t>(kLogitRows, group.size() - begin));
        compute_logits(meta_logit_index() + logit_offset + begin, n,
                       device_choices_.as<gpu::TokenChoiceRow>() + logit_offset + begin);
        std::vector<int32_t> source_rows(static_cast<size_t>(n));
        for (int i = 0; i < n; ++i) source_rows[static_cast<size_t>(i)] = i;
        copy_outputs(source_rows,
                     std::vector<int32_t>(group.begin() + static_cast<std::ptrdiff_t>(begin),
                                          group.begin() + static_cast<std::ptrdiff_t>(begin) + n),
                     logits, chosen, q_entries);
      }
      logit_offset += static_cast<int32_t>(group.size());
    }
  }

  // The whole step over `bucket` rows, logits of every row included (the row count is fixed per graph).
  void enqueue_bucket(int bucket) {
    run_layers(device_rows(0), bucket);
    compute_logits(nullptr, bucket, device_choices_.as<gpu::TokenChoiceRow>());
  }

  void forward_graph(const ForwardBatch& batch, int bucket, float* logits, ops::ChosenToken* chosen,
                     ops::TokenProb* q_entries) {
    const size_t index = static_cast<size_t>(
        std::find(kGraphBuckets.begin(), kGraphBuckets.end(), bucket) - kGraphBuckets.begin());
    if (graphs_[index] == nullptr) {
      // The first step of a bucket runs eagerly (cuBLASLt plans and lazy module loads happen outside any
      // capture), then the same work is captured for later steps.
      enqueue_bucket(bucket);
      capture(bucket, index);
    } else {
      PEARL_CUDA_CHECK(cudaGraphLaunch(graphs_[index], stream_));
    }
    std::vector<int32_t> outputs(batch.logit_rows.size());
    for (size_t i = 0; i < outputs.size(); ++i) outputs[i] = static_cast<int32_t>(i);
    copy_outputs(batch.logit_rows, outputs, logits, chosen, q_entries);
  }

  void capture(int bucket, size_t index) {
    cudaGraph_t graph = nullptr;
    PEARL_CUDA_CHECK(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal));
    try {
      enqueue_bucket(bucket);
    } catch (...) {
      cudaStreamEndCapture(stream_, &graph);
      if (graph != nullptr) cudaGraphDestroy(graph);
      throw;
    }
    PEARL_CUDA_CHECK(cudaStreamEndCapture(stream_, &graph));
    const cudaError_t instantiated = cudaGraphInstantiate(&graphs_[index], graph, 0);
    cudaGraphDestroy(graph);
    PEARL_CUDA_CHECK(instantiated);
  }

  void clear_graphs() {
    for (cudaGraphExec_t& graph : graphs_) {
      if (graph != nullptr) cudaGraphExecDestroy(graph);
      graph = nullptr;
    }
  }

  ModelConfig config_;
  int device_;
  int block_size_;
  bool deterministic_;
  bool graphs_enabled_;
  bool log_tuning_;
  bool programmatic_launch_;  // the layers' kernels overlap the kernel before them (PEARL_CUDA_PDL=0 turns it off)
  cudaStream_t stream_ = nullptr;

  std::vector<DeviceMemory> weights_;
  const bf16* embed_ = nullptr;
  std::vector<DeviceLayer> layers_;
  const float* final_norm_ = nullptr;
  DeviceLinear lm_head_;
  float* inv_freq_ = nullptr;

  DeviceMemory x_;
  DeviceMemory normed_;
  DeviceMemory qkv_;
  DeviceMemory attended_;
  DeviceMemory gate_up_;
  DeviceMemory activated_;
  DeviceMemory attention_scratch_;
  DeviceMemory device_logits_;
  DeviceMemory device_tokens_;  // per logits row: its gpu::ChosenTokenRow
  DeviceMemory choose_scratch_;
  DeviceMemory processed_scratch_;
  std::unique_ptr<gpu::CublasLtGemm> cublas_;

  int num_blocks_ = 0;
  size_t layer_elements_ = 0;
  DeviceMemory kv_cache_;  // per layer: K then V, each [num_blocks, block_size, kv_heads, head_dim]

  int row_capacity_ = 0;
  int64_t table_capacity_ = 0;
  DeviceMemory meta_;
  DeviceMemory device_choices_;  // per logits row: how it picks its token (stage_choices)
  std::array<StepSlot, 2> slots_;
  std::deque<size_t> begun_;  // slots of the steps in flight, oldest first
  size_t next_slot_ = 0;
  std::vector<int32_t> last_logit_rows_;  // the last begun step's device_tokens_ row of each output
  std::vector<std::vector<int32_t>> logit_groups_;  // eager steps: logit outputs per chunk
  std::vector<int32_t> full_logits_row_;            // per output: its row in the host logits, or -1
  std::vector<ops::TokenChoice> step_choices_;      // per output (their q's live in the step's items)
  size_t processed_capacity_ = 0;                   // processed rows the staging below holds
  size_t draft_entry_capacity_ = 0;                 // q entries it holds: tokens, then as many probs
  size_t processed_used_ = 0;                       // of this step
  size_t draft_entries_used_ = 0;
  size_t returned_entry_capacity_ = 0;              // returned q entries device_returned_q_ holds
  std::vector<size_t> returned_q_offset_;           // per output: where a drafting row's q goes (device and host)
  PinnedMemory processed_staging_;
  DeviceMemory device_processed_;
  PinnedMemory draft_staging_;
  DeviceMemory device_drafts_;
  DeviceMemory device_returned_q_;

  std::array<cudaGraphExec_t, kGraphBuckets.size()> graphs_{};
};

}  // namespace

int cuda_device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // no driver or no device: not an error for "auto"
    return 0;
  }
  return count;
}

std::unique_ptr<Backend> create_cuda_backend(const ModelConfig& config, const Checkpoint& checkpoint,
                                             const EngineOptions& options) {
  return std::make_unique<CudaBackend>(config, checkpoint, options);
}

}  // namespace pearl
