#include "cuda/device_weights.h"

#include <stdexcept>
#include <string>

#include "ops/cuda_ops.cuh"
#include "ops/ops.h"
#include "weights.h"

namespace pearl::gpu {

namespace {

// Copies each tensor's rank slice (rank_slice) to the device: matrices as bf16, norms and biases as float32.
// load_layer drives it, so both backends group a layer's tensors the same way.
class RankUploader {
 public:
  RankUploader(const ModelConfig& config, const Checkpoint& checkpoint, const ShardPlan& plan, int rank,
               std::vector<DeviceMemory>& owned)
      : config_(config), checkpoint_(checkpoint), plan_(plan), rank_(rank), owned_(owned) {}

  const float* floats(const std::string& name) {
    const TensorInfo& info = tensor(name);
    const TensorSlice slice = rank_slice(config_, plan_, rank_, name, info.shape);
    return upload_floats(read_f32_range(info, slice.row_begin, slice.rows));
  }

  // The rank's slice of tensor `source` (by default `name`) as bf16, cut by the rule of tensor `name`.
  const __nv_bfloat16* matrix(const std::string& name, const std::string& source = "") {
    const TensorInfo& info = tensor(source.empty() ? name : source);
    const TensorSlice slice = rank_slice(config_, plan_, rank_, name, info.shape);
    __nv_bfloat16* device = allocate<__nv_bfloat16>(static_cast<size_t>(slice.rows * slice.cols));
    upload_block(info, slice, device);
    return device;
  }

  // The rank's slices of several [rows_i, in] matrices stacked in order, with their biases when present (a
  // row-parallel bias only on the rank that adds it).
  DeviceLinear stacked(const std::vector<std::string>& parts, bool with_bias) {
    DeviceLinear linear;
    std::vector<TensorSlice> slices;
    for (const std::string& part : parts) {
      const TensorInfo& weight = tensor(part + ".weight");
      slices.push_back(rank_slice(config_, plan_, rank_, part + ".weight", weight.shape));
      linear.in = static_cast<int>(slices.back().cols);
      linear.out += static_cast<int>(slices.back().rows);
    }
    __nv_bfloat16* weights = allocate<__nv_bfloat16>(static_cast<size_t>(linear.out) * static_cast<size_t>(linear.in));
    std::vector<float> biases;
    size_t row = 0;
    for (size_t i = 0; i < parts.size(); ++i) {
      upload_block(tensor(parts[i] + ".weight"), slices[i], weights + row * static_cast<size_t>(linear.in));
      row += static_cast<size_t>(slices[i].rows);
      if (!with_bias) continue;
      const std::string bias_name = parts[i] + ".bias";
      const TensorInfo& bias = tensor(bias_name);
      const TensorSlice bias_slice = rank_slice(config_, plan_, rank_, bias_name, bias.shape);
      const std::vector<float> values = read_f32_range(bias, bias_slice.row_begin, bias_slice.rows);
      biases.insert(biases.end(), values.begin(), values.end());
    }
    linear.weight = weights;
    if (!biases.empty()) linear.bias = upload_floats(biases);
    return linear;
  }

  // The gate and up projections interleaved in groups of kGateUpGroup rows (gate_up_row), the layout in which
  // skinny_matmul_silu finds a gate and its up in one CTA and silu_mul reads cuBLASLt's output. Staged as
  // plain stacked rows first, then regrouped on the device.
  DeviceLinear gate_up(const std::string& gate, const std::string& up, bool with_bias) {
    std::vector<DeviceMemory> staging;
    RankUploader stage(config_, checkpoint_, plan_, rank_, staging);
    const DeviceLinear plain = stage.stacked({gate, up}, with_bias);
    DeviceLinear linear = plain;
    const size_t in = static_cast<size_t>(plain.in);
    const size_t half_rows = static_cast<size_t>(plain.out) / 2;
    const size_t groups = half_rows / kGateUpGroup;
    __nv_bfloat16* weights = allocate<__nv_bfloat16>(static_cast<size_t>(plain.out) * in);
    const size_t group_bytes = kGateUpGroup * in * sizeof(__nv_bfloat16);
    for (size_t part = 0; part < 2; ++part) {
      PEARL_CUDA_CHECK(cudaMemcpy2D(weights + part * kGateUpGroup * in, 2 * group_bytes,
                                    plain.weight + part * half_rows * in, group_bytes, group_bytes, groups,
                                    cudaMemcpyDeviceToDevice));
    }
    linear.weight = weights;
    if (plain.bias != nullptr) {
      float* biases = allocate<float>(static_cast<size_t>(plain.out));
      const size_t bias_group_bytes = kGateUpGroup * sizeof(float);
      for (size_t part = 0; part < 2; ++part) {
        PEARL_CUDA_CHECK(cudaMemcpy2D(biases + part * kGateUpGroup, 2 * bias_group_bytes,
                                      plain.bias + part * half_rows, bias_group_bytes, bias_group_bytes, groups,
                                      cudaMemcpyDeviceToDevice));
      }
      linear.bias = biases;
    }
    return linear;
  }

  const float* upload_floats(const std::vector<float>& values) {
    float* device = allocate<float>(values.size());
    PEARL_CUDA_CHECK(cudaMemcpy(device, values.data(), values.size() * sizeof(float), cudaMemcpyHostToDevice));
    return device;
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

  // A bf16 slice of whole rows inside the tensor goes straight from the mapping; any other (columns, padding,
  // another dtype) is assembled on the host first.
  static void upload_block(const TensorInfo& info, const TensorSlice& slice, __nv_bfloat16* device) {
    const int64_t tensor_rows = info.shape.empty() ? 0 : info.shape[0];
    const int64_t tensor_cols = info.shape.size() >= 2 ? info.shape[1] : 1;
    const size_t bytes = static_cast<size_t>(slice.rows * slice.cols) * sizeof(__nv_bfloat16);
    if (info.dtype == DType::BF16 && slice.col_begin == 0 && slice.cols == tensor_cols &&
        slice.row_begin + slice.rows <= tensor_rows) {
      const uint8_t* first = info.data + static_cast<size_t>(slice.row_begin * tensor_cols) * sizeof(__nv_bfloat16);
      PEARL_CUDA_CHECK(cudaMemcpy(device, first, bytes, cudaMemcpyHostToDevice));
      return;
    }
    std::vector<uint16_t> block(static_cast<size_t>(slice.rows * slice.cols));
    read_bf16_block(info, slice.row_begin, slice.rows, slice.col_begin, slice.cols, block.data());
    PEARL_CUDA_CHECK(cudaMemcpy(device, block.data(), bytes, cudaMemcpyHostToDevice));
  }

  const ModelConfig& config_;
  const Checkpoint& checkpoint_;
  const ShardPlan& plan_;
  int rank_;
  std::vector<DeviceMemory>& owned_;
};

}  // namespace

DeviceWeights upload_rank_weights(const ModelConfig& config, const Checkpoint& checkpoint, const ShardPlan& plan,
                                  int rank) {
  DeviceWeights weights;
  RankUploader upload(config, checkpoint, plan, rank, weights.owned);
  weights.embed = upload.matrix("model.embed_tokens.weight");
  weights.layers.resize(static_cast<size_t>(config.num_layers));
  for (int layer = 0; layer < config.num_layers; ++layer) {
    load_layer(config, layer, upload, weights.layers[static_cast<size_t>(layer)]);
  }
  weights.final_norm = upload.floats("model.norm.weight");
  weights.lm_head.in = config.hidden_size;
  weights.lm_head.out = plan.local_vocab();
  if (!config.tie_word_embeddings) {
    weights.lm_head.weight = upload.matrix("lm_head.weight");
  } else if (plan.ranks == 1) {
    weights.lm_head.weight = weights.embed;
  } else {
    // Tied and split: the rank's vocabulary rows of the embedding, sliced as lm_head.weight would be.
    weights.lm_head.weight = upload.matrix("lm_head.weight", "model.embed_tokens.weight");
  }
  weights.inv_freq = upload.upload_floats(ops::rope_inv_freq(config.rope, config.head_dim));
  return weights;
}

}  // namespace pearl::gpu
