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
#include <limits>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "cuda/check.h"
#include "cuda/collective.h"
#include "cuda/cublaslt.h"
#include "cuda/device_memory.h"
#include "cuda/device_weights.h"
#include "cuda/step_upload.h"
#include "ops/cuda_ops.cuh"
#include "ops/ops.h"
#include "sampling.h"
#include "tensor_parallel.h"
#include "weights.h"

namespace pearl {

namespace {

using gpu::bf16;
using gpu::DeviceLayer;
using gpu::DeviceLinear;
using gpu::DeviceMemory;
using gpu::PinnedMemory;

constexpr int kChunkRows = 256;    // rows per pass through the layers; bounds the activation scratch
constexpr int kLogitRows = 64;     // rows per lm_head product; bounds the logits buffer
constexpr int kGraphMaxRows = 64;  // steps of up to this many rows replay a captured CUDA graph
constexpr int kDraftEntriesPerRow = 64;  // judged and returned q entries per processed row the load-time staging holds
constexpr std::array<int, 7> kGraphBuckets = {1, 2, 4, 8, 16, 32, 64};
constexpr size_t kCublasWorkspaceBytes = size_t{32} << 20;
constexpr double kDefaultCacheFraction = 0.45;  // of the memory left free after weights and scratch
constexpr int64_t kDefaultCacheSequences = 64;  // full-context sequences the default cache is sized for

using GraphSet = std::array<cudaGraphExec_t, kGraphBuckets.size()>;

bool env_flag(const char* name, bool fallback) {
  const char* value = std::getenv(name);
  if (value == nullptr || *value == '\0') return fallback;
  return std::strcmp(value, "0") != 0 && std::strcmp(value, "false") != 0;
}

// What a begun step holds until finish_forward: its own pinned staging, so that the step begun behind it
// never rewrites what its queued upload (gpu::upload_step) has yet to read, where its chosen tokens land,
// and the events that mark its end (one per stream). Two: a step in flight and one begun behind it.
struct StepSlot {
  PinnedMemory staging;         // rows and block tables (stage_rows), read by every rank
  PinnedMemory choice_staging;  // how each logits row picks its token (stage_choices)
  PinnedMemory landing;         // rank 0's chosen tokens (reserve_chosen_landing)
  size_t landing_capacity = 0;
  std::vector<cudaEvent_t> done;  // per stream
  ops::ChosenToken* chosen = nullptr;  // the caller's outputs
  ops::TokenProb* q_entries = nullptr;
  size_t outputs = 0;
};

// Step metadata, one int32 array per rank in device memory (and a pinned staging copy per step slot), in
// 32-bit words: [tokens | positions | slots | row_table | logit_index | fed_from] (rows each), table stride,
// block tables.
struct MetaLayout {
  int rows = 0;
  size_t tokens() const { return 0; }
  size_t positions() const { return static_cast<size_t>(rows); }
  size_t slots() const { return 2 * static_cast<size_t>(rows); }
  size_t row_table() const { return 3 * static_cast<size_t>(rows); }
  size_t logit_index() const { return 4 * static_cast<size_t>(rows); }
  size_t fed_from() const { return 5 * static_cast<size_t>(rows); }
  size_t stride() const { return 6 * static_cast<size_t>(rows); }
  size_t tables() const { return stride() + 1; }
};

// One tensor-parallel rank: its GPU, its share of the weights and of the KV cache (its KV heads), and the
// activations and step buffers its kernels use. Rank 0 alone draws processed rows and returns the outputs;
// every rank picks the one-pass token of every row from the same gathered logits, so a fed row finds the
// same token on every rank.
struct Rank {
  int index = 0;
  int device = 0;
  int stream_index = 0;  // into CudaBackend::streams_
  cudaStream_t stream = nullptr;

  gpu::DeviceWeights weights;
  std::unique_ptr<gpu::CublasLtGemm> cublas;

  DeviceMemory x;  // the residual stream, float32 [rows, hidden], the same on every rank between layers
  DeviceMemory normed;
  DeviceMemory qkv;
  DeviceMemory attended;
  DeviceMemory gate_up;
  DeviceMemory activated;
  DeviceMemory attention_scratch;
  DeviceMemory local_logits;     // several ranks: this rank's vocabulary columns [kLogitRows, local_vocab]
  DeviceMemory gathered_logits;  // several ranks: every rank's local logits, rank by rank
  DeviceMemory logits;           // [kLogitRows, vocab]
  DeviceMemory tokens;           // per logits row: its gpu::ChosenTokenRow
  DeviceMemory choose_scratch;

  DeviceMemory kv_cache;  // per layer: K then V, each [num_blocks, block_size, local_kv_heads, head_dim]
  DeviceMemory meta;
  DeviceMemory choices;  // per logits row: how it picks its token (stage_choices)

  // Rank 0 only: processed rows (choose_processed_rows).
  DeviceMemory processed_scratch;
  DeviceMemory processed;
  DeviceMemory drafts;
  DeviceMemory returned_q;

  ~Rank() { cudaSetDevice(device); }  // the members' device memory is freed on its own device
};

// The ranks' devices: the engine option's list, or device 0.
std::vector<int> rank_devices(const EngineOptions& options) {
  std::vector<int> devices = options.devices.empty() ? std::vector<int>{0} : options.devices;
  const int count = cuda_device_count();
  for (int device : devices) {
    if (device < 0 || device >= count) {
      throw std::runtime_error("backend \"cuda\": device " + std::to_string(device) + " does not exist (" +
                               std::to_string(count) + " CUDA devices visible)");
    }
  }
  return devices;
}

class CudaBackend final : public Backend {
 public:
  CudaBackend(const ModelConfig& config, const Checkpoint& checkpoint, const EngineOptions& options)
      : config_(config),
        plan_(plan_shards(config, static_cast<int>(std::max<size_t>(1, options.devices.size())))),
        block_size_(options.block_size),
        deterministic_(options.deterministic),
        graphs_enabled_(env_flag("PEARL_CUDA_GRAPHS", true)),
        log_tuning_(env_flag("PEARL_CUDA_LOG_TUNING", false)),
        programmatic_launch_(env_flag("PEARL_CUDA_PDL", true)) {
    check_supported();
    create_ranks(rank_devices(options));
    validate_checkpoint(config_, checkpoint);
    for (auto& rank : ranks_) {
      PEARL_CUDA_CHECK(cudaSetDevice(rank->device));
      rank->weights = gpu::upload_rank_weights(config_, checkpoint, plan_, rank->index);
    }
    tune_matmuls();
    allocate_scratch();
    allocate_cache(options);
    if (ranks_.size() > 1) {
      std::vector<int> devices;
      std::vector<cudaStream_t> streams;
      for (const auto& rank : ranks_) {
        devices.push_back(rank->device);
        streams.push_back(rank->stream);
      }
      const size_t max_floats = std::max(static_cast<size_t>(std::max(kChunkRows, kGraphMaxRows)) * config_.hidden_size,
                                         static_cast<size_t>(kLogitRows) * plan_.local_vocab());
      collective_ = gpu::Collective::create(devices, streams, deterministic_, max_floats);
    }
    for (StepSlot& slot : slots_) {
      for (size_t s = 0; s < streams_.size(); ++s) {
        PEARL_CUDA_CHECK(cudaSetDevice(stream_devices_[s]));
        slot.done.push_back(nullptr);
        PEARL_CUDA_CHECK(cudaEventCreateWithFlags(&slot.done.back(), cudaEventDisableTiming));
      }
    }
  }

  ~CudaBackend() override {
    for (size_t s = 0; s < streams_.size(); ++s) {
      cudaSetDevice(stream_devices_[s]);
      cudaStreamSynchronize(streams_[s]);
      for (StepSlot& slot : slots_) {
        if (s < slot.done.size() && slot.done[s] != nullptr) cudaEventDestroy(slot.done[s]);
      }
    }
    clear_graphs();
    collective_.reset();
    ranks_.clear();
    for (size_t s = 0; s < streams_.size(); ++s) {
      cudaSetDevice(stream_devices_[s]);
      cudaStreamDestroy(streams_[s]);
    }
  }

  CudaBackend(const CudaBackend&) = delete;
  CudaBackend& operator=(const CudaBackend&) = delete;

  const char* name() const override { return "cuda"; }
  int num_blocks() const override { return num_blocks_; }

  void copy_block(int32_t source, int32_t destination) override {
    const size_t block_elements = static_cast<size_t>(block_size_) * plan_.local_kv_heads() * config_.head_dim;
    for_each_rank([&](Rank& rank) {
      for (int layer = 0; layer < config_.num_layers; ++layer) {
        const gpu::DeviceKvLayer kv = kv_layer(rank, layer);
        PEARL_CUDA_CHECK(cudaMemcpyAsync(kv.k + destination * block_elements, kv.k + source * block_elements,
                                         block_elements * sizeof(bf16), cudaMemcpyDeviceToDevice, rank.stream));
        PEARL_CUDA_CHECK(cudaMemcpyAsync(kv.v + destination * block_elements, kv.v + source * block_elements,
                                         block_elements * sizeof(bf16), cudaMemcpyDeviceToDevice, rank.stream));
      }
    });
  }

  // Overlappable steps replay a graph, so a fed row's source is the bucket row of its output.
  int max_overlapped_rows() const override { return graphs_enabled_ ? kGraphMaxRows : 0; }

  void begin_forward(const ForwardBatch& batch, float* logits, ops::ChosenToken* chosen,
                     ops::TokenProb* q_entries) override {
    if (begun_.size() == slots_.size()) throw std::logic_error("cuda backend: more steps begun than it can hold");
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
    for (size_t s = 0; s < streams_.size(); ++s) {
      PEARL_CUDA_CHECK(cudaSetDevice(stream_devices_[s]));
      PEARL_CUDA_CHECK(cudaEventRecord(slot.done[s], streams_[s]));
    }
    slot.chosen = chosen;
    slot.q_entries = q_entries;
    slot.outputs = batch.logit_rows.size();
    last_logit_rows_ = batch.logit_rows;
    begun_.push_back(slot_index);
    next_slot_ = (next_slot_ + 1) % slots_.size();
  }

  bool forward_finished() override {
    if (begun_.empty()) return true;
    for (cudaEvent_t done : slots_[begun_.front()].done) {
      if (cudaEventQuery(done) == cudaErrorNotReady) return false;
    }
    return true;
  }

  void finish_forward() override {
    if (begun_.empty()) throw std::logic_error("cuda backend: no step to finish");
    StepSlot& slot = slots_[begun_.front()];
    begun_.pop_front();
    for (cudaEvent_t done : slot.done) PEARL_CUDA_CHECK(cudaEventSynchronize(done));
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

  // One rank per listed device. Ranks that share a GPU share its stream (their collectives are plain kernels
  // in stream order); ranks on distinct GPUs each get a stream of their own.
  void create_ranks(const std::vector<int>& devices) {
    for (size_t r = 0; r < devices.size(); ++r) {
      auto rank = std::make_unique<Rank>();
      rank->index = static_cast<int>(r);
      rank->device = devices[r];
      const auto shared = std::find(stream_devices_.begin(), stream_devices_.end(), devices[r]);
      if (shared != stream_devices_.end()) {
        rank->stream_index = static_cast<int>(shared - stream_devices_.begin());
      } else {
        PEARL_CUDA_CHECK(cudaSetDevice(devices[r]));
        cudaStream_t stream = nullptr;
        PEARL_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
        rank->stream_index = static_cast<int>(streams_.size());
        streams_.push_back(stream);
        stream_devices_.push_back(devices[r]);
        graphs_.push_back(GraphSet{});
      }
      rank->stream = streams_[static_cast<size_t>(rank->stream_index)];
      ranks_.push_back(std::move(rank));
    }
  }

  Rank& lead() const { return *ranks_.front(); }

  template <typename Work>
  void for_each_rank(Work work) {
    for (auto& rank : ranks_) {
      PEARL_CUDA_CHECK(cudaSetDevice(rank->device));
      work(*rank);
    }
  }

  void synchronize_streams() {
    for (size_t s = 0; s < streams_.size(); ++s) {
      PEARL_CUDA_CHECK(cudaSetDevice(stream_devices_[s]));
      PEARL_CUDA_CHECK(cudaStreamSynchronize(streams_[s]));
    }
  }

  // Every weight shape gets the skinny GEMM variant that streams it fastest on this card (they all give
  // bit-identical results, so the choice cannot change an output). Ranks hold the same shapes: rank 0 is timed.
  void tune_matmuls() {
    std::map<std::pair<int, int>, std::vector<DeviceLinear*>> by_shape;
    std::map<std::pair<int, int>, std::vector<const bf16*>> lead_weights;
    for (auto& rank : ranks_) {
      std::vector<DeviceLinear*> linears;
      for (DeviceLayer& layer : rank->weights.layers) {
        for (DeviceLinear* linear : {&layer.qkv, &layer.o, &layer.gate_up, &layer.down}) linears.push_back(linear);
      }
      linears.push_back(&rank->weights.lm_head);
      for (DeviceLinear* linear : linears) {
        by_shape[{linear->in, linear->out}].push_back(linear);
        if (rank->index == 0) lead_weights[{linear->in, linear->out}].push_back(linear->weight);
      }
    }
    // PEARL_CUDA_SKINNY_VARIANT pins one variant everywhere (tests compare them; benchmarks isolate one).
    const char* pinned = std::getenv("PEARL_CUDA_SKINNY_VARIANT");
    if (pinned != nullptr && *pinned != '\0') {
      const int variant = gpu::skinny_variant_index(pinned);
      for (auto& [shape, group] : by_shape) {
        for (DeviceLinear* linear : group) linear->skinny_variant = variant;
      }
      return;
    }
    PEARL_CUDA_CHECK(cudaSetDevice(lead().device));
    for (const auto& [shape, group] : by_shape) {
      const gpu::SkinnyTuning tuning = gpu::tune_skinny_matmul(lead_weights[shape], shape.first, shape.second,
                                                               lead().stream);
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
    const size_t inter = static_cast<size_t>(plan_.local_intermediate());
    const size_t vocab = static_cast<size_t>(config_.vocab_size);
    const size_t local_vocab = static_cast<size_t>(plan_.local_vocab());
    for_each_rank([&](Rank& rank) {
      rank.x = DeviceMemory(rows * hidden * sizeof(float));
      rank.normed = DeviceMemory(rows * hidden * sizeof(bf16));
      rank.qkv = DeviceMemory(rows * static_cast<size_t>(qkv_width()) * sizeof(float));
      rank.attended = DeviceMemory(rows * static_cast<size_t>(q_dim()) * sizeof(bf16));
      rank.gate_up = DeviceMemory(rows * 2 * inter * sizeof(float));
      rank.activated = DeviceMemory(rows * inter * sizeof(bf16));
      rank.attention_scratch = DeviceMemory(
          gpu::attention_scratch_floats(static_cast<int>(rows), plan_.local_heads(), config_.head_dim) * sizeof(float));
      if (ranks_.size() > 1) {
        rank.local_logits = DeviceMemory(static_cast<size_t>(kLogitRows) * local_vocab * sizeof(float));
        rank.gathered_logits =
            DeviceMemory(ranks_.size() * static_cast<size_t>(kLogitRows) * local_vocab * sizeof(float));
      }
      rank.logits = DeviceMemory(static_cast<size_t>(kLogitRows) * vocab * sizeof(float));
      rank.tokens = DeviceMemory(static_cast<size_t>(kLogitRows) * sizeof(gpu::ChosenTokenRow));
      rank.choose_scratch = DeviceMemory(gpu::choose_token_scratch_bytes(kLogitRows, config_.vocab_size));
      if (rank.index == 0) {
        rank.processed_scratch = DeviceMemory(gpu::processed_scratch_bytes(kLogitRows, config_.vocab_size));
      }
      rank.cublas = std::make_unique<gpu::CublasLtGemm>(kCublasWorkspaceBytes);
    });
    reserve_processed(kLogitRows, kLogitRows * kDraftEntriesPerRow, kLogitRows * kDraftEntriesPerRow);
  }

  // The same block count on every rank (one block table serves them all): what the fullest GPU affords,
  // shared among the ranks on it.
  void allocate_cache(const EngineOptions& options) {
    const int64_t layer_block_elements =
        static_cast<int64_t>(block_size_) * plan_.local_kv_heads() * config_.head_dim;
    const int64_t bytes_per_block = 2 * config_.num_layers * layer_block_elements * static_cast<int64_t>(sizeof(bf16));
    if (options.num_blocks > 0) {
      num_blocks_ = options.num_blocks;
    } else {
      int64_t affordable = std::numeric_limits<int64_t>::max();
      for (size_t s = 0; s < streams_.size(); ++s) {
        PEARL_CUDA_CHECK(cudaSetDevice(stream_devices_[s]));
        size_t free_bytes = 0;
        size_t total_bytes = 0;
        PEARL_CUDA_CHECK(cudaMemGetInfo(&free_bytes, &total_bytes));
        const int64_t sharing = std::count_if(ranks_.begin(), ranks_.end(), [s](const auto& rank) {
          return rank->stream_index == static_cast<int>(s);
        });
        affordable = std::min(affordable, static_cast<int64_t>(static_cast<double>(free_bytes) * kDefaultCacheFraction) /
                                              (bytes_per_block * sharing));
      }
      const int64_t wanted =
          kDefaultCacheSequences * ((config_.max_position_embeddings + block_size_ - 1) / block_size_);
      num_blocks_ = static_cast<int>(std::max<int64_t>(1, std::min(wanted, affordable)));
    }
    layer_elements_ = static_cast<size_t>(num_blocks_) * static_cast<size_t>(layer_block_elements);
    const size_t bytes = 2 * static_cast<size_t>(config_.num_layers) * layer_elements_ * sizeof(bf16);
    for_each_rank([&](Rank& rank) {
      try {
        rank.kv_cache = DeviceMemory(bytes);
      } catch (const std::exception& error) {
        throw std::runtime_error("backend \"cuda\": a KV cache of " + std::to_string(num_blocks_) + " blocks (" +
                                 std::to_string(bytes >> 20) + " MiB) does not fit on device " +
                                 std::to_string(rank.device) + ": " + error.what());
      }
    });
  }

  // A rank's widths: its query and KV heads.
  int q_dim() const { return plan_.local_heads() * config_.head_dim; }
  int kv_dim() const { return plan_.local_kv_heads() * config_.head_dim; }
  int qkv_width() const { return q_dim() + 2 * kv_dim(); }

  gpu::DeviceKvLayer kv_layer(const Rank& rank, int layer) const {
    gpu::DeviceKvLayer kv;
    kv.k = rank.kv_cache.as<bf16>() + (2 * static_cast<size_t>(layer)) * layer_elements_;
    kv.v = kv.k + layer_elements_;
    kv.block_size = block_size_;
    kv.num_kv_heads = plan_.local_kv_heads();
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

  int32_t* meta(const Rank& rank, size_t offset) const { return rank.meta.as<int32_t>() + offset; }

  gpu::DeviceRows device_rows(const Rank& rank, int first_row) const {
    gpu::DeviceRows rows;
    rows.tokens = meta(rank, meta_layout_.tokens()) + first_row;
    rows.positions = meta(rank, meta_layout_.positions()) + first_row;
    rows.slots = meta(rank, meta_layout_.slots()) + first_row;
    rows.row_table = meta(rank, meta_layout_.row_table()) + first_row;
    rows.block_tables = meta(rank, meta_layout_.tables());
    rows.table_stride = meta(rank, meta_layout_.stride());
    return rows;
  }

  // Stages the step's rows and token choices in the slot and queues, on every rank, the kernel that brings them
  // to its device (with the tokens a step in flight hands over).
  void upload(const ForwardBatch& batch, int bucket, const StepSlot& slot) {
    const int padded_rows = bucket > 0 ? bucket : static_cast<int>(batch.tokens.size());
    static_assert(sizeof(gpu::TokenChoiceRow) % sizeof(int32_t) == 0, "choices travel as 32-bit words");
    const int meta_words = stage_rows(batch, padded_rows, slot);
    const int choice_words =
        stage_choices(batch, bucket, slot) * static_cast<int>(sizeof(gpu::TokenChoiceRow) / 4);
    for_each_rank([&](Rank& rank) {
      gpu::StepUpload step;
      step.meta_words = meta_words;
      step.staged_meta = slot.staging.as<int32_t>();
      step.meta = meta(rank, 0);
      step.rows = padded_rows;
      step.fed_from_offset = static_cast<int>(meta_layout_.fed_from());
      step.chosen = rank.tokens.as<gpu::ChosenTokenRow>();
      step.choice_words = choice_words;
      step.staged_choices = slot.choice_staging.as<int32_t>();
      step.choices = reinterpret_cast<int32_t*>(rank.choices.as<gpu::TokenChoiceRow>());
      gpu::upload_step(step, rank.stream);
    });
  }

  // Grows the metadata arrays; graphs captured with the old addresses are dropped.
  void reserve_meta(int rows, int64_t table_ints) {
    if (rows <= meta_layout_.rows && table_ints <= table_capacity_) return;
    meta_layout_.rows = std::max({rows, kGraphMaxRows, 2 * meta_layout_.rows});
    table_capacity_ = std::max<int64_t>({table_ints, int64_t{1024}, 2 * table_capacity_});
    const size_t bytes = (meta_layout_.tables() + static_cast<size_t>(table_capacity_)) * sizeof(int32_t);
    synchronize_streams();
    clear_graphs();
    const size_t choice_bytes = static_cast<size_t>(meta_layout_.rows) * sizeof(gpu::TokenChoiceRow);
    for_each_rank([&](Rank& rank) {
      rank.meta = DeviceMemory(bytes);
      rank.choices = DeviceMemory(choice_bytes);
    });
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
      synchronize_streams();
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
  // return (rank 0's buffers). Each call of choose_processed_rows stages its rows in a fresh part of the
  // pinned buffers, so no copy still in flight reads a rewritten entry; the step's final synchronize frees
  // them all. Grows (rarely: the load-time size covers kLogitRows rows of kDraftEntriesPerRow entries) before
  // any work of the step is enqueued, never inside a capture.
  void reserve_processed(size_t rows, size_t draft_entries, size_t returned_entries) {
    if (rows <= processed_capacity_ && draft_entries <= draft_entry_capacity_ &&
        returned_entries <= returned_entry_capacity_) {
      return;
    }
    synchronize_streams();
    processed_capacity_ = std::max(rows, 2 * processed_capacity_);
    draft_entry_capacity_ = std::max(draft_entries, 2 * draft_entry_capacity_);
    returned_entry_capacity_ = std::max(returned_entries, 2 * returned_entry_capacity_);
    const size_t row_bytes = processed_capacity_ * sizeof(gpu::ProcessedRow);
    const size_t entry_bytes = draft_entry_capacity_ * (sizeof(int32_t) + sizeof(float));
    processed_staging_ = PinnedMemory(row_bytes);
    draft_staging_ = PinnedMemory(entry_bytes);
    Rank& rank = lead();
    PEARL_CUDA_CHECK(cudaSetDevice(rank.device));
    rank.processed = DeviceMemory(row_bytes);
    rank.drafts = DeviceMemory(entry_bytes);
    rank.returned_q = DeviceMemory(returned_entry_capacity_ * sizeof(gpu::TokenProbRow));
  }

  // Stages the rows (padded to padded_rows with rows that touch nothing) and block tables in the slot's
  // staging, in meta_layout_; returns the 32-bit words staged (gpu::upload_step copies them).
  int stage_rows(const ForwardBatch& batch, int padded_rows, const StepSlot& slot) {
    const int rows = static_cast<int>(batch.tokens.size());
    size_t stride = 1;
    for (const auto& table : batch.block_tables) stride = std::max(stride, table.size());
    const int64_t table_ints = static_cast<int64_t>(batch.block_tables.size()) * static_cast<int64_t>(stride);
    reserve_meta(padded_rows, table_ints);

    int32_t* host = slot.staging.as<int32_t>();
    const MetaLayout& at = meta_layout_;
    for (int r = 0; r < padded_rows; ++r) {
      const bool real = r < rows;
      host[at.tokens() + r] = real ? batch.tokens[static_cast<size_t>(r)] : 0;
      host[at.positions() + r] = real ? batch.positions[static_cast<size_t>(r)] : -1;
      host[at.slots() + r] = real ? batch.slots[static_cast<size_t>(r)] : -1;
      host[at.row_table() + r] = real ? batch.row_table[static_cast<size_t>(r)] : 0;
      const int32_t fed_output = real && !batch.fed_outputs.empty() ? batch.fed_outputs[static_cast<size_t>(r)] : -1;
      host[at.fed_from() + r] = fed_output < 0 ? -1 : last_logit_rows_.at(static_cast<size_t>(fed_output));
    }
    // Eager steps gather their logit rows chunk by chunk: the chunk-local row of every logit output,
    // grouped by chunk in output order.
    logit_groups_.assign((static_cast<size_t>(rows) + kChunkRows - 1) / kChunkRows, {});
    for (size_t i = 0; i < batch.logit_rows.size(); ++i) {
      logit_groups_[static_cast<size_t>(batch.logit_rows[i] / kChunkRows)].push_back(static_cast<int32_t>(i));
    }
    int32_t* logit_index = host + at.logit_index();
    for (const auto& group : logit_groups_) {
      for (int32_t output : group) *logit_index++ = batch.logit_rows[static_cast<size_t>(output)] % kChunkRows;
    }
    full_logits_row_.assign(batch.logit_rows.size(), -1);
    int32_t full_rows = 0;
    for (size_t i = 0; i < batch.logit_rows.size(); ++i) {
      if (batch.full_logits[i]) full_logits_row_[i] = full_rows++;
    }
    host[at.stride()] = static_cast<int32_t>(stride);
    int32_t* tables = host + at.tables();
    for (const auto& table : batch.block_tables) {
      std::copy(table.begin(), table.end(), tables);
      std::fill(tables + table.size(), tables + stride, 0);
      tables += stride;
    }
    return static_cast<int>(at.tables() + static_cast<size_t>(table_ints));
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

  // y (+)= x W^T (+ b) on the rank's stream.
  void matmul(Rank& rank, const bf16* x, int rows, const DeviceLinear& linear, float* y, bool accumulate) {
    const bool skinny = skinny_chunks(rows, [&](size_t first, int count) {
      gpu::skinny_matmul(x + first * linear.in, count, linear.in, linear.weight, linear.bias, linear.out,
                         y + first * linear.out, accumulate, linear.skinny_variant, programmatic_launch_, rank.stream);
    });
    if (skinny) return;
    rank.cublas->matmul(x, rows, linear.in, linear.weight, linear.out, y, accumulate, rank.stream);
    if (linear.bias != nullptr) gpu::add_bias(y, rows, linear.out, linear.bias, rank.stream);
  }

  // out = bf16(silu(x W_gate^T) * (x W_up^T)) for the interleaved gate_up weight: in the skinny GEMM's
  // epilogue wherever matmul would take that kernel, else cuBLASLt's float product and silu_mul.
  void mlp_activation(Rank& rank, const bf16* x, int rows, const DeviceLinear& gate_up, bf16* out) {
    const size_t inter = static_cast<size_t>(gate_up.out) / 2;
    const bool skinny = skinny_chunks(rows, [&](size_t first, int count) {
      gpu::skinny_matmul_silu(x + first * gate_up.in, count, gate_up.in, gate_up.weight, gate_up.bias, gate_up.out,
                              out + first * inter, gate_up.skinny_variant, programmatic_launch_, rank.stream);
    });
    if (skinny) return;
    matmul(rank, x, rows, gate_up, rank.gate_up.as<float>(), false);
    gpu::silu_mul(rank.gate_up.as<float>(), rows, gate_up.out / 2, out, rank.stream);
  }

  // A row-parallel product's output joins the residual stream: alone, a rank adds it in place; in a group,
  // rank 0 adds its partial to x and the others write theirs over their copy of x, and the all-reduce then
  // leaves x + the sum of every partial on every rank.
  void row_parallel(Rank& rank, const bf16* x, int rows, const DeviceLinear& linear) {
    matmul(rank, x, rows, linear, rank.x.as<float>(), rank.index == 0);
  }

  void reduce_residual(int rows) {
    if (!collective_) return;
    std::vector<float*> buffers;
    for (const auto& rank : ranks_) buffers.push_back(rank->x.as<float>());
    collective_->all_reduce_sum(buffers, static_cast<size_t>(rows) * config_.hidden_size);
  }

  // Every layer over `count` rows on every rank; leaves the final hidden states (before the last norm) in x.
  // Each phase is queued on all ranks before the collective that joins them.
  void run_layers(int first_row, int count) {
    const int hidden = config_.hidden_size;
    const float eps = static_cast<float>(config_.rms_norm_eps);
    for_each_rank([&](Rank& rank) {
      gpu::embedding(rank.weights.embed, hidden, device_rows(rank, first_row).tokens, count, rank.x.as<float>(),
                     rank.stream);
    });
    for (int layer = 0; layer < config_.num_layers; ++layer) {
      for_each_rank([&](Rank& rank) {
        const DeviceLayer& w = rank.weights.layers[static_cast<size_t>(layer)];
        const gpu::DeviceRows rows = device_rows(rank, first_row);
        bf16* normed = rank.normed.as<bf16>();
        float* qkv = rank.qkv.as<float>();
        gpu::rmsnorm(rank.x.as<float>(), nullptr, count, hidden, w.input_norm, eps, normed, programmatic_launch_,
                     rank.stream);
        matmul(rank, normed, count, w.qkv, qkv, false);
        const gpu::DeviceKvLayer kv = kv_layer(rank, layer);
        gpu::rope_store_kv(qkv, qkv_width(), count, plan_.local_heads(), config_.head_dim, rows.positions,
                           rank.weights.inv_freq, w.q_norm, w.k_norm, eps, rows.slots, kv, programmatic_launch_,
                           rank.stream);
        gpu::attention(qkv, qkv_width(), count, plan_.local_heads(), kv, rows, config_.sliding_window,
                       rank.attention_scratch.as<float>(), rank.attended.as<bf16>(), programmatic_launch_,
                       rank.stream);
        row_parallel(rank, rank.attended.as<bf16>(), count, w.o);
      });
      reduce_residual(count);
      for_each_rank([&](Rank& rank) {
        const DeviceLayer& w = rank.weights.layers[static_cast<size_t>(layer)];
        bf16* normed = rank.normed.as<bf16>();
        gpu::rmsnorm(rank.x.as<float>(), nullptr, count, hidden, w.post_attention_norm, eps, normed,
                     programmatic_launch_, rank.stream);
        mlp_activation(rank, normed, count, w.gate_up, rank.activated.as<bf16>());
        row_parallel(rank, rank.activated.as<bf16>(), count, w.down);
      });
      reduce_residual(count);
    }
  }

  // Final norm of the x rows (logit_index from `logit_offset` of the step's metadata, or the first `count`
  // rows when negative), lm_head into each rank's logits (in a group: each rank's vocabulary columns,
  // gathered and put in vocabulary order on every rank), and the token each of those rows picks (choices
  // from `choice_offset`, one per row) into each rank's tokens.
  void compute_logits(int logit_offset, int count, int choice_offset) {
    const bool split = collective_ != nullptr;
    for_each_rank([&](Rank& rank) {
      const int32_t* row_index = logit_offset < 0 ? nullptr : meta(rank, meta_layout_.logit_index()) + logit_offset;
      gpu::rmsnorm(rank.x.as<float>(), row_index, count, config_.hidden_size, rank.weights.final_norm,
                   static_cast<float>(config_.rms_norm_eps), rank.normed.as<bf16>(), programmatic_launch_,
                   rank.stream);
      matmul(rank, rank.normed.as<bf16>(), count, rank.weights.lm_head,
             split ? rank.local_logits.as<float>() : rank.logits.as<float>(), false);
    });
    if (split) {
      std::vector<const float*> send;
      std::vector<float*> gathered;
      for (const auto& rank : ranks_) {
        send.push_back(rank->local_logits.as<float>());
        gathered.push_back(rank->gathered_logits.as<float>());
      }
      collective_->all_gather(send, gathered, static_cast<size_t>(count) * plan_.local_vocab());
      for_each_rank([&](Rank& rank) {
        gpu::assemble_vocab_shards(rank.gathered_logits.as<float>(), count,
                                   plan_.local_vocab(), config_.vocab_size, rank.logits.as<float>(), rank.stream);
      });
    }
    for_each_rank([&](Rank& rank) {
      gpu::choose_token(rank.logits.as<float>(), count, config_.vocab_size,
                        rank.choices.as<gpu::TokenChoiceRow>() + choice_offset, rank.choose_scratch.as<void>(),
                        rank.tokens.as<gpu::ChosenTokenRow>(), rank.stream);
    });
  }

  // Copies rank 0's device rows source_rows[i] (`width` elements each) to host rows destinations[i], merging
  // runs.
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
                                       run * width * sizeof(T), cudaMemcpyDeviceToHost, lead().stream));
      i += run;
    }
  }

  // Outputs `outputs` sit in rows source_rows of rank 0's logits / tokens: processed rows are redrawn, then
  // every choice comes back, logits only for the outputs that asked for them, and the q of drafting rows
  // (return_top_k entries each, no vocabulary-sized row).
  void copy_outputs(const std::vector<int32_t>& source_rows, const std::vector<int32_t>& outputs, float* logits,
                    ops::ChosenToken* chosen, ops::TokenProb* q_entries) {
    PEARL_CUDA_CHECK(cudaSetDevice(lead().device));
    choose_processed_rows(source_rows, outputs);
    static_assert(sizeof(ops::ChosenToken) == sizeof(gpu::ChosenTokenRow) &&
                      offsetof(ops::ChosenToken, token) == offsetof(gpu::ChosenTokenRow, token) &&
                      offsetof(ops::ChosenToken, residual_token) == offsetof(gpu::ChosenTokenRow, residual_token) &&
                      offsetof(ops::ChosenToken, draft_prob) == offsetof(gpu::ChosenTokenRow, draft_prob),
                  "ops::ChosenToken and gpu::ChosenTokenRow must share one layout");
    copy_rows(lead().tokens.as<gpu::ChosenTokenRow>(), 1, source_rows, outputs,
              reinterpret_cast<gpu::ChosenTokenRow*>(chosen));
    std::vector<int32_t> full_sources;
    std::vector<int32_t> full_destinations;
    for (size_t i = 0; i < outputs.size(); ++i) {
      const int32_t full_row = full_logits_row_[static_cast<size_t>(outputs[i])];
      if (full_row < 0) continue;
      full_sources.push_back(source_rows[i]);
      full_destinations.push_back(full_row);
    }
    copy_rows(lead().logits.as<float>(), static_cast<size_t>(config_.vocab_size), full_sources, full_destinations,
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
    const gpu::TokenProbRow* device = lead().returned_q.as<gpu::TokenProbRow>();
    size_t begin = 0;
    size_t end = 0;
    const auto flush = [&] {
      if (end == begin) return;
      PEARL_CUDA_CHECK(cudaMemcpyAsync(q_entries + begin, device + begin, (end - begin) * sizeof(gpu::TokenProbRow),
                                       cudaMemcpyDeviceToHost, lead().stream));
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

  // Redraws the processed outputs among `outputs` (logits in rows source_rows of rank 0's logits) by
  // ops::choose_row's rule, over the tokens compute_logits's one-pass kernel wrote for them. It runs on rank 0
  // only (a step with such rows feeds no step behind it), after the step's graph or eager work and outside
  // any capture, and only when the step has such rows: the sort and the extra passes then cost nothing to
  // greedy and whole-softmax steps, and the per-bucket graphs stay what they were (a graph per (bucket,
  // has-cut-rows) would capture a sort of every bucket row, most of them not cut).
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
    Rank& rank = lead();
    gpu::ProcessedRow* device_rows = rank.processed.as<gpu::ProcessedRow>() + processed_used_;
    PEARL_CUDA_CHECK(cudaMemcpyAsync(device_rows, rows, static_cast<size_t>(count) * sizeof(gpu::ProcessedRow),
                                     cudaMemcpyHostToDevice, rank.stream));
    processed_used_ += static_cast<size_t>(count);
    int32_t* device_draft_tokens = rank.drafts.as<int32_t>();
    float* device_draft_probs = reinterpret_cast<float*>(device_draft_tokens + draft_entry_capacity_);
    const size_t entries = draft_entries_used_ - first_entry;
    if (entries > 0) {
      PEARL_CUDA_CHECK(cudaMemcpyAsync(device_draft_tokens + first_entry, draft_tokens + first_entry,
                                       entries * sizeof(int32_t), cudaMemcpyHostToDevice, rank.stream));
      PEARL_CUDA_CHECK(cudaMemcpyAsync(device_draft_probs + first_entry, draft_probs + first_entry,
                                       entries * sizeof(float), cudaMemcpyHostToDevice, rank.stream));
    }
    gpu::choose_processed(rank.logits.as<float>(), config_.vocab_size, device_rows, count, sorted_rows,
                          nucleus_rows, selected_rows, device_draft_tokens, device_draft_probs,
                          rank.processed_scratch.as<void>(), kLogitRows, rank.tokens.as<gpu::ChosenTokenRow>(),
                          rank.returned_q.as<gpu::TokenProbRow>(), rank.stream);
  }

  void forward_eager(const ForwardBatch& batch, float* logits, ops::ChosenToken* chosen, ops::TokenProb* q_entries) {
    const int rows = static_cast<int>(batch.tokens.size());
    int32_t logit_offset = 0;
    for (int first = 0; first < rows; first += kChunkRows) {
      const int count = std::min(kChunkRows, rows - first);
      run_layers(first, count);
      const std::vector<int32_t>& group = logit_groups_[static_cast<size_t>(first / kChunkRows)];
      for (size_t begin = 0; begin < group.size(); begin += kLogitRows) {
        const int n = static_cast<int>(std::min<size_t>(kLogitRows, group.size() - begin));
        compute_logits(logit_offset + static_cast<int>(begin), n, logit_offset + static_cast<int>(begin));
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
    run_layers(0, bucket);
    compute_logits(-1, bucket, 0);
  }

  void forward_graph(const ForwardBatch& batch, int bucket, float* logits, ops::ChosenToken* chosen,
                     ops::TokenProb* q_entries) {
    const size_t index = static_cast<size_t>(
        std::find(kGraphBuckets.begin(), kGraphBuckets.end(), bucket) - kGraphBuckets.begin());
    if (graphs_.front()[index] == nullptr) {
      // The first step of a bucket runs eagerly (cuBLASLt plans, lazy module loads and NCCL's first use of a
      // size happen outside any capture), then the same work is captured for later steps.
      enqueue_bucket(bucket);
      capture(bucket, index);
    } else {
      for (size_t s = 0; s < streams_.size(); ++s) {
        PEARL_CUDA_CHECK(cudaSetDevice(stream_devices_[s]));
        PEARL_CUDA_CHECK(cudaGraphLaunch(graphs_[s][index], streams_[s]));
      }
    }
    std::vector<int32_t> outputs(batch.logit_rows.size());
    for (size_t i = 0; i < outputs.size(); ++i) outputs[i] = static_cast<int32_t>(i);
    copy_outputs(batch.logit_rows, outputs, logits, chosen, q_entries);
  }

  // One graph per stream, captured together: the collectives between the ranks' kernels are in them.
  void capture(int bucket, size_t index) {
    std::vector<cudaGraph_t> captured(streams_.size(), nullptr);
    const auto end_all = [&] {
      for (size_t s = 0; s < streams_.size(); ++s) {
        cudaSetDevice(stream_devices_[s]);
        cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
        cudaStreamIsCapturing(streams_[s], &status);
        if (status != cudaStreamCaptureStatusNone) cudaStreamEndCapture(streams_[s], &captured[s]);
      }
    };
    try {
      for (size_t s = 0; s < streams_.size(); ++s) {
        PEARL_CUDA_CHECK(cudaSetDevice(stream_devices_[s]));
        PEARL_CUDA_CHECK(cudaStreamBeginCapture(streams_[s], cudaStreamCaptureModeThreadLocal));
      }
      enqueue_bucket(bucket);
      for (size_t s = 0; s < streams_.size(); ++s) {
        PEARL_CUDA_CHECK(cudaSetDevice(stream_devices_[s]));
        PEARL_CUDA_CHECK(cudaStreamEndCapture(streams_[s], &captured[s]));
      }
      for (size_t s = 0; s < streams_.size(); ++s) {
        PEARL_CUDA_CHECK(cudaSetDevice(stream_devices_[s]));
        PEARL_CUDA_CHECK(cudaGraphInstantiate(&graphs_[s][index], captured[s], 0));
      }
    } catch (...) {
      end_all();
      for (cudaGraph_t graph : captured) {
        if (graph != nullptr) cudaGraphDestroy(graph);
      }
      throw;
    }
    for (cudaGraph_t graph : captured) cudaGraphDestroy(graph);
  }

  void clear_graphs() {
    for (size_t s = 0; s < graphs_.size(); ++s) {
      cudaSetDevice(stream_devices_[s]);
      for (cudaGraphExec_t& graph : graphs_[s]) {
        if (graph != nullptr) cudaGraphExecDestroy(graph);
        graph = nullptr;
      }
    }
  }

  ModelConfig config_;
  ShardPlan plan_;
  int block_size_;
  bool deterministic_;
  bool graphs_enabled_;
  bool log_tuning_;
  bool programmatic_launch_;  // the layers' kernels overlap the kernel before them (PEARL_CUDA_PDL=0 turns it off)

  std::vector<std::unique_ptr<Rank>> ranks_;
  std::vector<cudaStream_t> streams_;  // one per distinct device of the ranks
  std::vector<int> stream_devices_;
  std::vector<GraphSet> graphs_;  // per stream
  std::unique_ptr<gpu::Collective> collective_;  // several ranks only

  int num_blocks_ = 0;
  size_t layer_elements_ = 0;

  MetaLayout meta_layout_;
  int64_t table_capacity_ = 0;
  std::array<StepSlot, 2> slots_;
  std::deque<size_t> begun_;  // slots of the steps in flight, oldest first
  size_t next_slot_ = 0;
  std::vector<int32_t> last_logit_rows_;  // the last begun step's tokens row of each output
  std::vector<std::vector<int32_t>> logit_groups_;  // eager steps: logit outputs per chunk
  std::vector<int32_t> full_logits_row_;            // per output: its row in the host logits, or -1
  std::vector<ops::TokenChoice> step_choices_;      // per output (their q's live in the step's items)
  size_t processed_capacity_ = 0;                   // processed rows the staging below holds
  size_t draft_entry_capacity_ = 0;                 // q entries it holds: tokens, then as many probs
  size_t processed_used_ = 0;                       // of this step
  size_t draft_entries_used_ = 0;
  size_t returned_entry_capacity_ = 0;              // returned q entries rank 0's returned_q holds
  std::vector<size_t> returned_q_offset_;           // per output: where a drafting row's q goes (device and host)
  PinnedMemory processed_staging_;
  PinnedMemory draft_staging_;
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

double all_reduce_microseconds(const std::vector<int>& devices, size_t floats, bool deterministic) {
  constexpr int kIterations = 50;
  return gpu::time_all_reduce(devices, floats, deterministic, kIterations);
}

std::unique_ptr<Backend> create_cuda_backend(const ModelConfig& config, const Checkpoint& checkpoint,
                                             const EngineOptions& options) {
  return std::make_unique<CudaBackend>(config, checkpoint, options);
}

}  // namespace pearl
