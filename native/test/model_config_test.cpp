#include "model_config.h"

#include <cmath>

#include "check.h"
#include "json.h"
#include "ops/ops.h"
#include "test_model.h"
#include "weights.h"

using pearl::Json;
using pearl::ModelConfig;
using pearl::RopeType;

namespace {

const char* kLlama = R"({
  "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256, "hidden_size": 2048,
  "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
  "max_position_embeddings": 131072, "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "hidden_act": "silu",
  "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                   "original_max_position_embeddings": 8192, "rope_type": "llama3"},
  "tie_word_embeddings": true, "attention_bias": false, "mlp_bias": false, "bos_token_id": 128000,
  "eos_token_id": [128001, 128008, 128009], "torch_dtype": "bfloat16"})";

ModelConfig parse(const std::string& text) { return ModelConfig::from_json(Json::parse(text), "config.json"); }

// kLlama with one field replaced (or removed when value is empty).
std::string llama_with(const std::string& field, const std::string& value) {
  std::string text = kLlama;
  const std::string key = "\"" + field + "\": ";
  const size_t start = text.find(key);
  if (start == std::string::npos) throw std::runtime_error("no field " + field);
  size_t end = start + key.size();
  int depth = 0;
  while (end < text.size()) {
    const char c = text[end];
    if (c == '{' || c == '[') ++depth;
    if (c == '}' || c == ']') {
      if (depth == 0) break;
      --depth;
    }
    if (c == ',' && depth == 0) break;
    ++end;
  }
  if (value.empty()) {
    if (text[end] == ',') return text.substr(0, start) + text.substr(end + 1);
    return text.substr(0, text.rfind(',', start)) + text.substr(end);  // the last member
  }
  return text.substr(0, start) + key + value + text.substr(end);
}

}  // namespace

TEST(parses_llama_3_2) {
  const ModelConfig c = parse(kLlama);
  CHECK_EQ(c.architecture, std::string("LlamaForCausalLM"));
  CHECK_EQ(c.vocab_size, 128256);
  CHECK_EQ(c.num_kv_heads, 8);
  CHECK_EQ(c.head_dim, 64);
  CHECK_EQ(c.rms_norm_eps, 1e-5);
  CHECK_EQ(c.rope.theta, 500000.0);
  CHECK(c.rope.type == RopeType::Llama3);
  CHECK_EQ(c.rope.factor, 32.0);
  CHECK_EQ(c.rope.original_max_position_embeddings, int64_t{8192});
  CHECK(c.tie_word_embeddings);
  CHECK(!c.qkv_bias && !c.o_bias && !c.mlp_bias && !c.qk_norm);
  CHECK(c.eos_token_ids == (std::vector<int32_t>{128001, 128008, 128009}));
  CHECK_EQ(c.bos_token_id, 128000);
  CHECK_EQ(c.dtype, std::string("bfloat16"));
}

TEST(defaults_and_alternative_spellings) {
  ModelConfig c = parse(llama_with("num_key_value_heads", ""));
  CHECK_EQ(c.num_kv_heads, 32);
  c = parse(llama_with("rope_scaling", "null"));
  CHECK(c.rope.type == RopeType::Default);
  c = parse(llama_with("rope_scaling", R"({"type": "default"})"));
  CHECK(c.rope.type == RopeType::Default);
  c = parse(llama_with("rope_scaling", R"({"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})"));
  CHECK(c.rope.type == RopeType::Llama3);
  CHECK_EQ(c.rope.factor, 8.0);
  c = parse(llama_with("eos_token_id", "2"));
  CHECK(c.eos_token_ids == (std::vector<int32_t>{2}));
  c = parse(llama_with("eos_token_id", "null"));
  CHECK(c.eos_token_ids.empty());
  c = parse(llama_with("torch_dtype", ""));
  CHECK(c.dtype.empty());
  c = parse(llama_with("attention_bias", "true"));
  CHECK(c.qkv_bias && c.o_bias);

  // transformers 5: rope_parameters replaces rope_theta + rope_scaling.
  std::string v5 = llama_with("rope_scaling", "");
  v5 = "{\"rope_parameters\": {\"rope_type\": \"llama3\", \"rope_theta\": 250000.0, \"factor\": 8.0, "
       "\"low_freq_factor\": 1.0, \"high_freq_factor\": 4.0, \"original_max_position_embeddings\": 4096}, " +
       v5.substr(1);
  c = parse(v5);
  CHECK_EQ(c.rope.theta, 250000.0);
  CHECK(c.rope.type == RopeType::Llama3);
  CHECK_EQ(c.rope.original_max_position_embeddings, int64_t{4096});
  c = parse(R"({"architectures": ["Qwen3ForCausalLM"], "vocab_size": 10, "hidden_size": 8, "intermediate_size": 8,
      "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16,
      "max_position_embeddings": 32, "rms_norm_eps": 1e-6, "rope_parameters": {"rope_type": "default",
      "rope_theta": 1000000.0}, "dtype": "bfloat16"})");
  CHECK_EQ(c.rope.theta, 1000000.0);
  CHECK_EQ(c.head_dim, 16);
  CHECK(c.qk_norm && !c.qkv_bias);
  CHECK_EQ(c.dtype, std::string("bfloat16"));
  CHECK_EQ(c.model_type, std::string("qwen3"));
}

TEST(architecture_specific_biases) {
  const std::string base = R"("vocab_size": 10, "hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1,
      "num_attention_heads": 2, "max_position_embeddings": 32, "rms_norm_eps": 1e-6)";
  ModelConfig qwen2 = parse(R"({"architectures": ["Qwen2ForCausalLM"], )" + base + "}");
  CHECK(qwen2.qkv_bias && !qwen2.o_bias);
  ModelConfig mistral = parse(R"({"architectures": ["MistralForCausalLM"], "sliding_window": 4096, )" + base + "}");
  CHECK(!mistral.qkv_bias && !mistral.o_bias);
  CHECK_EQ(mistral.sliding_window, 4096);
  CHECK_EQ(mistral.head_dim, 4);
  ModelConfig mistral_no_window =
      parse(R"({"architectures": ["MistralForCausalLM"], "sliding_window": null, "head_dim": 6, )" + base + "}");
  CHECK_EQ(mistral_no_window.sliding_window, 0);
  CHECK_EQ(mistral_no_window.head_dim, 6);
  CHECK_THROWS(parse(R"({"architectures": ["Qwen2ForCausalLM"], "use_sliding_window": true, )" + base + "}"),
               "use_sliding_window");
  CHECK_THROWS(parse(R"({"architectures": ["Qwen3ForCausalLM"], )" + base + "}"), "missing required field \"head_dim\"");
}

TEST(errors_name_the_field) {
  const char* required[] = {"architectures",     "vocab_size",   "hidden_size", "intermediate_size",
                            "num_hidden_layers", "num_attention_heads",       "max_position_embeddings",
                            "rms_norm_eps"};
  for (const char* field : required) {
    CHECK_THROWS(parse(llama_with(field, "")), std::string("config.json: missing required field \"") + field + "\"");
  }
  CHECK_THROWS(parse(llama_with("architectures", "[\"GPT2LMHeadModel\"]")),
               "unsupported architecture \"GPT2LMHeadModel\"");
  CHECK_THROWS(parse(llama_with("rope_scaling", R"({"rope_type": "yarn", "factor": 4.0})")),
               "unsupported rope type \"yarn\"");
  CHECK_THROWS(parse(llama_with("rope_scaling", R"({"rope_type": "llama3", "factor": 8.0})")),
               "missing required field \"rope_scaling.low_freq_factor\"");
  CHECK_THROWS(parse(llama_with("hidden_size", "-5")), "\"hidden_size\" must be a positive integer");
  CHECK_THROWS(parse(llama_with("hidden_size", "20.5")), "\"hidden_size\" must be a positive integer");
  CHECK_THROWS(parse(llama_with("num_key_value_heads", "5")), "not a multiple of num_key_value_heads");
  CHECK_THROWS(parse(llama_with("hidden_act", "\"gelu\"")), "hidden_act");
  CHECK_THROWS(parse(llama_with("eos_token_id", "\"x\"")), "eos_token_id");
  CHECK_THROWS(parse(llama_with("tie_word_embeddings", "1")), "tie_word_embeddings");
}

TEST(load_reads_config_and_generation_config) {
  testing::TempDir dir;
  CHECK_THROWS(ModelConfig::load(dir.path()), "config.json: file not found");
  testing::write_file(dir.file("config.json"), kLlama);
  testing::write_file(dir.file("generation_config.json"), R"({"eos_token_id": [128009, 7], "do_sample": true})");
  const ModelConfig c = ModelConfig::load(dir.path());
  CHECK(c.eos_token_ids == (std::vector<int32_t>{128001, 128008, 128009, 7}));
  testing::write_file(dir.file("config.json"), "{\"architectures\": ");
  CHECK_THROWS(ModelConfig::load(dir.path()), "config.json: invalid JSON at offset");
}

TEST(parameter_count_matches_llama_3_2_1b) {
  // Llama-3.2-1B reports 1,235,814,400 parameters (tied embeddings counted once).
  CHECK_EQ(pearl::count_parameters(parse(kLlama)), int64_t{1235814400});
  // Untied adds an lm_head of vocab x hidden.
  CHECK_EQ(pearl::count_parameters(parse(llama_with("tie_word_embeddings", "false"))),
           int64_t{1235814400} + int64_t{128256} * 2048);
}

TEST(llama3_inverse_frequencies) {
  const ModelConfig c = parse(llama_with("rope_scaling", R"({"rope_type": "llama3", "factor": 8.0,
      "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})"));
  const std::vector<float> inv_freq = pearl::ops::rope_inv_freq(c.rope, c.head_dim);
  CHECK_EQ(inv_freq.size(), size_t{32});
  // High frequencies (wavelength < 8192 / 4) are unchanged, low ones (> 8192) are divided by the factor,
  // and the band between is interpolated.
  for (int i = 0; i < 32; ++i) {
    const double base = 1.0 / std::pow(500000.0, 2.0 * i / 64.0);
    const double wavelen = 2.0 * M_PI / base;
    double expected = base;
    if (wavelen > 8192.0) {
      expected = base / 8.0;
    } else if (wavelen >= 2048.0) {
      const double smooth = (8192.0 / wavelen - 1.0) / 3.0;
      expected = (1.0 - smooth) * base / 8.0 + smooth * base;
    }
    CHECK_NEAR(inv_freq[static_cast<size_t>(i)], expected, 1e-6 * expected);
  }
  CHECK_EQ(inv_freq[0], 1.0f);
}

int main() { return check::run_all(); }
