// The tensors a supported checkpoint must hold (Hugging Face names and shapes), and their float32 copy
// for the CPU backend.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "model_config.h"
#include "safetensors.h"

namespace pearl {

struct TensorSpec {
  std::string name;
  std::vector<int64_t> shape;
};

// Every tensor the forward pass reads, in checkpoint order: embeddings, each layer, final norm, and
// lm_head.weight unless the embeddings are tied.
std::vector<TensorSpec> expected_tensors(const ModelConfig& config);

// Parameters the model owns (tied embeddings counted once), as torch's numel() sum reports them.
int64_t count_parameters(const ModelConfig& config);

// Throws naming the first missing tensor or the first one whose shape differs from the config.
void validate_checkpoint(const ModelConfig& config, const Checkpoint& checkpoint);

inline std::string layer_prefix(int layer) { return "model.layers." + std::to_string(layer) + "."; }

// Fills one decoder layer of a backend's weights from the checkpoint, so that every backend groups the
// tensors the same way: `w` has LayerWeights's fields; loader.floats(name) loads a norm and
// loader.stacked(parts, with_bias) the [rows_i, in] weights of `parts` (names without ".weight") stacked
// in order, with their biases when with_bias; loader.gate_up(gate, up, with_bias) the MLP's gate and up
// projections in one matrix, in the row order that backend's MLP reads.
template <typename Loader, typename Layer>
void load_layer(const ModelConfig& config, int layer, Loader& loader, Layer& w) {
  const std::string p = layer_prefix(layer);
  w.input_norm = loader.floats(p + "input_layernorm.weight");
  w.post_attention_norm = loader.floats(p + "post_attention_layernorm.weight");
  if (config.qk_norm) {
    w.q_norm = loader.floats(p + "self_attn.q_norm.weight");
    w.k_norm = loader.floats(p + "self_attn.k_norm.weight");
  }
  w.qkv = loader.stacked({p + "self_attn.q_proj", p + "self_attn.k_proj", p + "self_attn.v_proj"}, config.qkv_bias);
  w.o = loader.stacked({p + "self_attn.o_proj"}, config.o_bias);
  w.gate_up = loader.gate_up(p + "mlp.gate_proj", p + "mlp.up_proj", config.mlp_bias);
  w.down = loader.stacked({p + "mlp.down_proj"}, config.mlp_bias);
}

// y = x W^T + b with W row-major [out, in], as nn.Linear stores it.
struct Linear {
  int in = 0;
  int out = 0;
  std::vector<float> weight;
  std::vector<float> bias;  // empty: no bias
};

struct LayerWeights {
  std::vector<float> input_norm;           // [hidden]
  std::vector<float> post_attention_norm;  // [hidden]
  std::vector<float> q_norm;               // [head_dim], qk_norm models only
  std::vector<float> k_norm;               // [head_dim], qk_norm models only
  // q, k and v projections stacked into one [q_dim + 2 * kv_dim, hidden] matrix (rows q, then k, then v):
  // every output element is still the same dot product, and the activations are read once.
  Linear qkv;
  Linear o;
  Linear gate_up;  // gate rows then up rows: [2 * intermediate, hidden]
  Linear down;
};

struct ModelWeights {
  std::vector<float> embed;  // [vocab, hidden]
  std::vector<LayerWeights> layers;
  std::vector<float> final_norm;  // [hidden]
  Linear lm_head;                 // weight empty when tied: the embedding matrix serves as lm_head
  DType stored_dtype = DType::F32;  // dtype of the embedding tensor in the checkpoint

  const float* lm_head_weight() const { return lm_head.weight.empty() ? embed.data() : lm_head.weight.data(); }
};

ModelWeights load_weights_f32(const ModelConfig& config, const Checkpoint& checkpoint);

}  // namespace pearl
