#include "weights.h"

#include <stdexcept>
#include <unordered_map>

namespace pearl {

namespace {

const TensorInfo& checked_tensor(const Checkpoint& checkpoint, const TensorSpec& spec) {
  const TensorInfo* tensor = checkpoint.find(spec.name);
  if (tensor == nullptr) {
    const std::string where = checkpoint.files().size() == 1 ? checkpoint.files()[0] : "the checkpoint shards";
    throw std::runtime_error("missing tensor " + spec.name + " in " + where);
  }
  if (tensor->shape != spec.shape) {
    throw std::runtime_error(tensor->file + ": tensor " + spec.name + " has shape " + shape_to_string(tensor->shape) +
                             " but the config needs " + shape_to_string(spec.shape));
  }
  if (dtype_torch_name(tensor->dtype)[0] == '\0') {
    throw std::runtime_error(tensor->file + ": tensor " + spec.name + " has dtype " + dtype_name(tensor->dtype) +
                             "; only F32, F16 and BF16 weights are supported");
  }
  return *tensor;
}

int64_t product(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t dim : shape) n *= dim;
  return n;
}

// Loads tensors by name, checking each against the shape the config implies.
class WeightLoader {
 public:
  WeightLoader(const ModelConfig& config, const Checkpoint& checkpoint) : checkpoint_(checkpoint) {
    for (TensorSpec& spec : expected_tensors(config)) {
      std::string name = spec.name;
      specs_.emplace(std::move(name), std::move(spec));
    }
  }

  const TensorSpec& spec(const std::string& name) const {
    auto it = specs_.find(name);
    if (it == specs_.end()) throw std::logic_error("no spec for tensor " + name);
    return it->second;
  }

  std::vector<float> floats(const std::string& name) const {
    return load_f32(checked_tensor(checkpoint_, spec(name)));
  }

  // Loads several [rows_i, in] matrices (and their [rows_i] biases) stacked in order.
  Linear stacked(const std::vector<std::string>& parts, bool with_bias) const {
    Linear linear;
    for (const std::string& part : parts) {
      const TensorSpec& weight_spec = spec(part + ".weight");
      linear.in = static_cast<int>(weight_spec.shape[1]);
      linear.out += static_cast<int>(weight_spec.shape[0]);
    }
    linear.weight.resize(static_cast<size_t>(linear.out) * static_cast<size_t>(linear.in));
    if (with_bias) linear.bias.resize(static_cast<size_t>(linear.out));
    size_t row = 0;
    for (const std::string& part : parts) {
      const TensorInfo& weight = checked_tensor(checkpoint_, spec(part + ".weight"));
      convert_to_f32(weight, linear.weight.data() + row * static_cast<size_t>(linear.in));
      if (with_bias) convert_to_f32(checked_tensor(checkpoint_, spec(part + ".bias")), linear.bias.data() + row);
      row += static_cast<size_t>(weight.shape[0]);
    }
    return linear;
  }

  // Gate rows then up rows (LayerWeights::gate_up).
  Linear gate_up(const std::string& gate, const std::string& up, bool with_bias) const {
    return stacked({gate, up}, with_bias);
  }

 private:
  const Checkpoint& checkpoint_;
  std::unordered_map<std::string, TensorSpec> specs_;
};

}  // namespace

std::vector<TensorSpec> expected_tensors(const ModelConfig& config) {
  const int64_t hidden = config.hidden_size;
  const int64_t q_dim = static_cast<int64_t>(config.num_heads) * config.head_dim;
  const int64_t kv_dim = static_cast<int64_t>(config.num_kv_heads) * config.head_dim;
  const int64_t inter = config.intermediate_size;
  std::vector<TensorSpec> specs;
  specs.push_back({"model.embed_tokens.weight", {config.vocab_size, hidden}});
  for (int layer = 0; layer < config.num_layers; ++layer) {
    const std::string p = layer_prefix(layer);
    specs.push_back({p + "input_layernorm.weight", {hidden}});
    specs.push_back({p + "self_attn.q_proj.weight", {q_dim, hidden}});
    specs.push_back({p + "self_attn.k_proj.weight", {kv_dim, hidden}});
    specs.push_back({p + "self_attn.v_proj.weight", {kv_dim, hidden}});
    if (config.qkv_bias) {
      specs.push_back({p + "self_attn.q_proj.bias", {q_dim}});
      specs.push_back({p + "self_attn.k_proj.bias", {kv_dim}});
      specs.push_back({p + "self_attn.v_proj.bias", {kv_dim}});
    }
    specs.push_back({p + "self_attn.o_proj.weight", {hidden, q_dim}});
    if (config.o_bias) specs.push_back({p + "self_attn.o_proj.bias", {hidden}});
    if (config.qk_norm) {
      specs.push_back({p + "self_attn.q_norm.weight", {config.head_dim}});
      specs.push_back({p + "self_attn.k_norm.weight", {config.head_dim}});
    }
    specs.push_back({p + "post_attention_layernorm.weight", {hidden}});
    specs.push_back({p + "mlp.gate_proj.weight", {inter, hidden}});
    specs.push_back({p + "mlp.up_proj.weight", {inter, hidden}});
    specs.push_back({p + "mlp.down_proj.weight", {hidden, inter}});
    if (config.mlp_bias) {
      specs.push_back({p + "mlp.gate_proj.bias", {inter}});
      specs.push_back({p + "mlp.up_proj.bias", {inter}});
      specs.push_back({p + "mlp.down_proj.bias", {hidden}});
    }
  }
  specs.push_back({"model.norm.weight", {hidden}});
  if (!config.tie_word_embeddings) specs.push_back({"lm_head.weight", {config.vocab_size, hidden}});
  return specs;
}

int64_t count_parameters(const ModelConfig& config) {
  int64_t total = 0;
  for (const TensorSpec& spec : expected_tensors(config)) total += product(spec.shape);
  return total;
}

void validate_checkpoint(const ModelConfig& config, const Checkpoint& checkpoint) {
  for (const TensorSpec& spec : expected_tensors(config)) checked_tensor(checkpoint, spec);
}

ModelWeights load_weights_f32(const ModelConfig& config, const Checkpoint& checkpoint) {
  validate_checkpoint(config, checkpoint);
  WeightLoader loader(config, checkpoint);
  ModelWeights weights;
  weights.stored_dtype = checkpoint.find("model.embed_tokens.weight")->dtype;
  weights.embed = loader.floats("model.embed_tokens.weight");
  weights.layers.resize(static_cast<size_t>(config.num_layers));
  for (int layer = 0; layer < config.num_layers; ++layer) {
    load_layer(config, layer, loader, weights.layers[static_cast<size_t>(layer)]);
  }
  weights.final_norm = loader.floats("model.norm.weight");
  if (!config.tie_word_embeddings) weights.lm_head = loader.stacked({"lm_head"}, false);
  return weights;
}

}  // namespace pearl
