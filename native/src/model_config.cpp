#include "model_config.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <limits>
#include <stdexcept>

#include "json.h"

namespace pearl {

namespace {

class ConfigReader {
 public:
  ConfigReader(const Json& json, const std::string& source) : json_(json), source_(source) {}

  [[noreturn]] void fail(const std::string& message) const { throw std::runtime_error(source_ + ": " + message); }

  // Absent and null are the same to transformers' config classes.
  const Json* optional(const Json& object, const std::string& field) const {
    const Json* value = object.find(field);
    return value == nullptr || value->is_null() ? nullptr : value;
  }
  const Json* optional(const std::string& field) const { return optional(json_, field); }

  const Json& required(const Json& object, const std::string& field, const std::string& prefix = "") const {
    const Json* value = optional(object, field);
    if (value == nullptr) fail("missing required field \"" + prefix + field + "\"");
    return *value;
  }

  int positive_int(const Json& value, const std::string& field) const {
    if (!value.is_integer() || value.as_int64() <= 0 || value.as_int64() > std::numeric_limits<int32_t>::max()) {
      fail("field \"" + field + "\" must be a positive integer");
    }
    return static_cast<int>(value.as_int64());
  }
  int required_int(const std::string& field) const { return positive_int(required(json_, field), field); }
  int optional_int(const std::string& field, int fallback) const {
    const Json* value = optional(field);
    return value == nullptr ? fallback : positive_int(*value, field);
  }

  double positive_number(const Json& value, const std::string& field) const {
    if (!value.is_number() || !(value.as_double() > 0.0) || !std::isfinite(value.as_double())) {
      fail("field \"" + field + "\" must be a positive number");
    }
    return value.as_double();
  }

  bool optional_bool(const std::string& field, bool fallback) const {
    const Json* value = optional(field);
    if (value == nullptr) return fallback;
    if (!value->is_bool()) fail("field \"" + field + "\" must be true or false");
    return value->as_bool();
  }

  std::vector<int32_t> token_ids(const Json* value, const std::string& field) const {
    std::vector<int32_t> ids;
    if (value == nullptr) return ids;
    auto add = [&](const Json& id) {
      if (!id.is_integer() || id.as_int64() < 0 || id.as_int64() > std::numeric_limits<int32_t>::max()) {
        fail("field \"" + field + "\" must be a token id or a list of token ids");
      }
      ids.push_back(static_cast<int32_t>(id.as_int64()));
    };
    if (value->is_array()) {
      for (const Json& id : value->as_array()) add(id);
    } else {
      add(*value);
    }
    return ids;
  }

  const Json& json() const { return json_; }

 private:
  const Json& json_;
  const std::string& source_;
};

void parse_rope(const ConfigReader& reader, RopeConfig& rope) {
  // transformers 5 writes {"rope_parameters": {"rope_type", "rope_theta", ...}}; 4.x writes rope_theta
  // next to an optional rope_scaling object.
  const Json* parameters = reader.optional("rope_parameters");
  const Json* scaling = nullptr;
  std::string scaling_field;
  if (parameters != nullptr) {
    if (!parameters->is_object()) reader.fail("field \"rope_parameters\" must be an object");
    if (parameters->find("rope_type") == nullptr && parameters->find("type") == nullptr &&
        parameters->find("rope_theta") == nullptr) {
      reader.fail("field \"rope_parameters\" has no rope_type or rope_theta (per-layer-type rope is unsupported)");
    }
    scaling = parameters;
    scaling_field = "rope_parameters";
    const Json* theta = reader.optional(*parameters, "rope_theta");
    if (theta == nullptr) theta = reader.optional("rope_theta");
    if (theta != nullptr) rope.theta = reader.positive_number(*theta, "rope_parameters.rope_theta");
  } else {
    if (const Json* theta = reader.optional("rope_theta")) rope.theta = reader.positive_number(*theta, "rope_theta");
    scaling = reader.optional("rope_scaling");
    scaling_field = "rope_scaling";
    if (scaling != nullptr && !scaling->is_object()) reader.fail("field \"rope_scaling\" must be an object or null");
  }
  if (scaling == nullptr) return;

  const Json* type_json = reader.optional(*scaling, "rope_type");
  if (type_json == nullptr) type_json = reader.optional(*scaling, "type");
  const std::string type = type_json == nullptr ? "default" : (type_json->is_string() ? type_json->as_string() : "");
  if (type == "default") return;
  if (type != "llama3") {
    reader.fail("unsupported rope type \"" + type + "\" in field \"" + scaling_field +
                "\" (supported: default, llama3)");
  }
  rope.type = RopeType::Llama3;
  const std::string prefix = scaling_field + ".";
  rope.factor = reader.positive_number(reader.required(*scaling, "factor", prefix), prefix + "factor");
  rope.low_freq_factor =
      reader.positive_number(reader.required(*scaling, "low_freq_factor", prefix), prefix + "low_freq_factor");
  rope.high_freq_factor =
      reader.positive_number(reader.required(*scaling, "high_freq_factor", prefix), prefix + "high_freq_factor");
  rope.original_max_position_embeddings =
      reader.positive_int(reader.required(*scaling, "original_max_position_embeddings", prefix),
                          prefix + "original_max_position_embeddings");
  if (rope.high_freq_factor <= rope.low_freq_factor) {
    reader.fail("field \"" + prefix + "high_freq_factor\" must be greater than low_freq_factor");
  }
}

}  // namespace

ModelConfig ModelConfig::from_json(const Json& json, const std::string& source) {
  ConfigReader reader(json, source);
  if (!json.is_object()) reader.fail("expected a JSON object");
  ModelConfig config;

  const Json& architectures = reader.required(json, "architectures");
  if (!architectures.is_array() || architectures.size() == 0 || !architectures.as_array()[0].is_string()) {
    reader.fail("field \"architectures\" must be a non-empty list of names");
  }
  config.architecture = architectures.as_array()[0].as_string();
  const bool is_llama = config.architecture == "LlamaForCausalLM";
  const bool is_mistral = config.architecture == "MistralForCausalLM";
  const bool is_qwen2 = config.architecture == "Qwen2ForCausalLM";
  const bool is_qwen3 = config.architecture == "Qwen3ForCausalLM";
  if (!is_llama && !is_mistral && !is_qwen2 && !is_qwen3) {
    reader.fail("unsupported architecture \"" + config.architecture +
                "\" in field \"architectures\" (supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, "
                "Qwen3ForCausalLM)");
  }
  if (const Json* model_type = reader.optional("model_type")) {
    if (!model_type->is_string()) reader.fail("field \"model_type\" must be a string");
    config.model_type = model_type->as_string();
  } else {
    config.model_type = is_llama ? "llama" : is_mistral ? "mistral" : is_qwen2 ? "qwen2" : "qwen3";
  }

  config.vocab_size = reader.required_int("vocab_size");
  config.hidden_size = reader.required_int("hidden_size");
  config.intermediate_size = reader.required_int("intermediate_size");
  config.num_layers = reader.required_int("num_hidden_layers");
  config.num_heads = reader.required_int("num_attention_heads");
  config.num_kv_heads = reader.optional_int("num_key_value_heads", config.num_heads);
  config.max_position_embeddings = reader.required_int("max_position_embeddings");
  config.rms_norm_eps = reader.positive_number(reader.required(json, "rms_norm_eps"), "rms_norm_eps");

  if (is_qwen3) {
    config.head_dim = reader.required_int("head_dim");
  } else {
    if (reader.optional("head_dim") == nullptr && config.hidden_size % config.num_heads != 0) {
      reader.fail("field \"hidden_size\" (" + std::to_string(config.hidden_size) +
                  ") is not divisible by num_attention_heads (" + std::to_string(config.num_heads) + ")");
    }
    config.head_dim = reader.optional_int("head_dim", config.hidden_size / config.num_heads);
  }
  if (config.num_heads % config.num_kv_heads != 0) {
    reader.fail("field \"num_attention_heads\" (" + std::to_string(config.num_heads) +
                ") is not a multiple of num_key_value_heads (" + std::to_string(config.num_kv_heads) + ")");
  }
  if (config.head_dim % 2 != 0) reader.fail("field \"head_dim\" must be even for rotary embeddings");

  if (const Json* act = reader.optional("hidden_act")) {
    if (!act->is_string() || act->as_string() != "silu") {
      reader.fail("unsupported activation in field \"hidden_act\" (only silu is supported)");
    }
  }

  parse_rope(reader, config.rope);
  config.tie_word_embeddings = reader.optional_bool("tie_word_embeddings", false);

  if (is_qwen2) {
    config.qkv_bias = true;
  } else if (!is_mistral) {
    config.qkv_bias = config.o_bias = reader.optional_bool("attention_bias", false);
  }
  if (is_llama) config.mlp_bias = reader.optional_bool("mlp_bias", false);
  config.qk_norm = is_qwen3;

  if (is_mistral) {
    if (const Json* window = reader.optional("sliding_window")) {
      config.sliding_window = reader.positive_int(*window, "sliding_window");
    }
  } else if ((is_qwen2 || is_qwen3) && reader.optional_bool("use_sliding_window", false)) {
    reader.fail("field \"use_sliding_window\" is true: sliding-window attention is unsupported for " +
                config.architecture);
  }

  config.eos_token_ids = reader.token_ids(reader.optional("eos_token_id"), "eos_token_id");
  if (const Json* bos = reader.optional("bos_token_id")) {
    std::vector<int32_t> bos_ids = reader.token_ids(bos, "bos_token_id");
    if (bos_ids.size() != 1) reader.fail("field \"bos_token_id\" must be one token id");
    config.bos_token_id = bos_ids[0];
  }
  const Json* dtype = reader.optional("dtype");
  if (dtype == nullptr) dtype = reader.optional("torch_dtype");
  if (dtype != nullptr && dtype->is_string()) config.dtype = dtype->as_string();
  return config;
}

ModelConfig ModelConfig::load(const std::string& model_dir) {
  namespace fs = std::filesystem;
  const std::string config_path = (fs::path(model_dir) / "config.json").string();
  if (!fs::exists(config_path)) throw std::runtime_error(config_path + ": file not found");
  ModelConfig config = from_json(Json::parse_file(config_path), config_path);

  // generate() stops at the generation config's eos ids (Llama 3 instruct lists several there).
  const std::string generation_path = (fs::path(model_dir) / "generation_config.json").string();
  if (fs::exists(generation_path)) {
    const Json generation = Json::parse_file(generation_path);
    ConfigReader reader(generation, generation_path);
    for (int32_t id : reader.token_ids(reader.optional("eos_token_id"), "eos_token_id")) {
      if (std::find(config.eos_token_ids.begin(), config.eos_token_ids.end(), id) == config.eos_token_ids.end()) {
        config.eos_token_ids.push_back(id);
      }
    }
  }
  return config;
}

}  // namespace pearl
