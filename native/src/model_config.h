// The parts of a Hugging Face config.json that define the forward pass of the supported decoder-only
// architectures. Anything the runtime cannot honour (an unknown architecture, rope type or activation)
// is an error naming the field, never silently ignored.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace pearl {

class Json;

enum class RopeType { Default, Llama3 };

struct RopeConfig {
  double theta = 10000.0;
  RopeType type = RopeType::Default;
  // llama3 only (transformers' _compute_llama3_parameters).
  double factor = 1.0;
  double low_freq_factor = 1.0;
  double high_freq_factor = 4.0;
  int64_t original_max_position_embeddings = 0;
};

struct ModelConfig {
  std::string architecture;  // architectures[0]
  std::string model_type;
  int vocab_size = 0;
  int hidden_size = 0;
  int intermediate_size = 0;
  int num_layers = 0;
  int num_heads = 0;
  int num_kv_heads = 0;
  int head_dim = 0;
  int max_position_embeddings = 0;
  double rms_norm_eps = 1e-6;
  RopeConfig rope;
  bool tie_word_embeddings = false;
  bool qkv_bias = false;   // q_proj, k_proj, v_proj carry a bias
  bool o_bias = false;     // o_proj carries a bias
  bool mlp_bias = false;   // gate_proj, up_proj, down_proj carry a bias
  bool qk_norm = false;    // Qwen3: per-head RMSNorm of q and k before RoPE
  int sliding_window = 0;  // Mistral: a query at p sees keys (p - window, p]; 0 = full causal attention
  std::vector<int32_t> eos_token_ids;
  int32_t bos_token_id = -1;
  std::string dtype;  // torch_dtype / dtype as written; informational

  // `source` names the file in error messages.
  static ModelConfig from_json(const Json& json, const std::string& source);
  static ModelConfig load(const std::string& model_dir);  // <model_dir>/config.json
};

}  // namespace pearl
