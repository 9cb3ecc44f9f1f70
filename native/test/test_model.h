// Test helpers: temporary folders, a safetensors writer, tiny random Hugging Face checkpoints of every
// supported architecture, and an independent double-precision reference forward pass written straight
// from the transformers modeling code (no paging, no batching, no shared kernels).
#pragma once

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace testing {

class TempDir {
 public:
  TempDir() {
    const char* base = std::getenv("TMPDIR");
    std::string pattern = std::string(base != nullptr ? base : "/tmp") + "/pearl-test-XXXXXX";
    std::vector<char> buffer(pattern.begin(), pattern.end());
    buffer.push_back('\0');
    if (::mkdtemp(buffer.data()) == nullptr) throw std::runtime_error("mkdtemp failed");
    path_ = buffer.data();
  }
  ~TempDir() {
    std::error_code ignored;
    std::filesystem::remove_all(path_, ignored);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;

  const std::string& path() const { return path_; }
  std::string file(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

inline void write_file(const std::string& path, const std::string& contents) {
  std::ofstream out(path, std::ios::binary);
  out.write(contents.data(), static_cast<std::streamsize>(contents.size()));
  if (!out) throw std::runtime_error("cannot write " + path);
}

inline uint32_t float_bits(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return bits;
}

// Round to nearest even, as torch's .to(torch.bfloat16) does for finite values.
inline uint16_t float_to_bf16(float value) {
  const uint32_t bits = float_bits(value);
  return static_cast<uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}

// IEEE binary16 with round to nearest even, subnormals and overflow to infinity.
inline uint16_t float_to_f16(float value) {
  const uint32_t bits = float_bits(value);
  const uint32_t sign = (bits >> 16) & 0x8000u;
  const int32_t raw_exponent = static_cast<int32_t>((bits >> 23) & 0xFF);
  uint32_t mantissa = bits & 0x7FFFFFu;
  if (raw_exponent == 0xFF) return static_cast<uint16_t>(sign | 0x7C00u | (mantissa != 0 ? 0x200u : 0u));
  const int32_t exponent = raw_exponent - 127 + 15;
  if (exponent >= 31) return static_cast<uint16_t>(sign | 0x7C00u);
  if (exponent <= 0) {
    if (exponent < -10) return static_cast<uint16_t>(sign);
    mantissa |= 0x800000u;
    const int shift = 14 - exponent;
    uint32_t half = mantissa >> shift;
    const uint32_t remainder = mantissa & ((1u << shift) - 1);
    const uint32_t halfway = 1u << (shift - 1);
    if (remainder > halfway || (remainder == halfway && (half & 1u))) ++half;
    return static_cast<uint16_t>(sign | half);
  }
  uint32_t half = sign | (static_cast<uint32_t>(exponent) << 10) | (mantissa >> 13);
  const uint32_t remainder = mantissa & 0x1FFFu;
  if (remainder > 0x1000u || (remainder == 0x1000u && (half & 1u))) ++half;
  return static_cast<uint16_t>(half);
}

inline float bf16_bits_to_float(uint16_t bits) {
  const uint32_t wide = static_cast<uint32_t>(bits) << 16;
  float value;
  std::memcpy(&value, &wide, sizeof(value));
  return value;
}

// Builds safetensors files; add() returns the values as stored (after rounding to the dtype).
class SafetensorsWriter {
 public:
  std::vector<float> add(const std::string& name, const std::string& dtype, const std::vector<int64_t>& shape,
                         const std::vector<float>& values) {
    std::vector<float> stored(values);
    std::string bytes;
    for (float& value : stored) {
      if (dtype == "F32") {
        bytes.append(reinterpret_cast<const char*>(&value), 4);
      } else if (dtype == "BF16") {
        const uint16_t bits = float_to_bf16(value);
        bytes.append(reinterpret_cast<const char*>(&bits), 2);
        value = bf16_bits_to_float(bits);
      } else if (dtype == "F16") {
        const uint16_t bits = float_to_f16(value);
        bytes.append(reinterpret_cast<const char*>(&bits), 2);
        value = decode_f16(bits);
      } else {
        throw std::runtime_error("test writer: unsupported dtype " + dtype);
      }
    }
    add_raw(name, dtype, shape, bytes);
    return stored;
  }

  void add_raw(const std::string& name, const std::string& dtype, const std::vector<int64_t>& shape,
               const std::string& bytes) {
    std::ostringstream entry;
    entry << "\"" << name << "\":{\"dtype\":\"" << dtype << "\",\"shape\":[";
    for (size_t i = 0; i < shape.size(); ++i) entry << (i ? "," : "") << shape[i];
    entry << "],\"data_offsets\":[" << data_.size() << "," << data_.size() + bytes.size() << "]}";
    entries_.push_back(entry.str());
    data_ += bytes;
  }

  std::string header() const {
    std::string json = "{\"__metadata__\":{\"format\":\"pt\"}";
    for (const std::string& entry : entries_) json += "," + entry;
    json += "}";
    while (json.size() % 8 != 0) json += ' ';
    return json;
  }

  static std::string assemble(const std::string& header, const std::string& data) {
    std::string out(8, '\0');
    uint64_t length = header.size();
    for (int i = 0; i < 8; ++i) out[static_cast<size_t>(i)] = static_cast<char>((length >> (8 * i)) & 0xFF);
    return out + header + data;
  }

  std::string bytes() const { return assemble(header(), data_); }
  const std::string& data() const { return data_; }
  void write(const std::string& path) const { write_file(path, bytes()); }

 private:
  static float decode_f16(uint16_t bits) {
    const int exponent = (bits >> 10) & 0x1F;
    const int mantissa = bits & 0x3FF;
    const double sign = (bits & 0x8000) ? -1.0 : 1.0;
    if (exponent == 0) return static_cast<float>(sign * std::ldexp(mantissa, -24));
    return static_cast<float>(sign * std::ldexp(1024 + mantissa, exponent - 25));
  }

  std::vector<std::string> entries_;
  std::string data_;
};

struct TinySpec {
  std::string architecture = "LlamaForCausalLM";
  int vocab = 101;
  int hidden = 48;
  int intermediate = 80;
  int layers = 2;
  int heads = 4;
  int kv_heads = 2;
  int head_dim = 0;  // 0: hidden / heads, and head_dim is not written to config.json
  int max_position = 128;
  double rope_theta = 10000.0;
  bool llama3_rope = false;      // factor 4, low_freq_factor 1, high_freq_factor 4, original context 16
  bool rope_parameters = false;  // write the transformers 5 spelling
  bool tie_embeddings = false;
  bool attention_bias = false;  // Llama / Qwen3 config key (Qwen2 always has q/k/v bias)
  bool mlp_bias = false;
  int sliding_window = 0;  // Mistral
  double rms_norm_eps = 1e-5;
  std::string dtype = "F32";
  int shards = 1;
  uint32_t seed = 7;

  int resolved_head_dim() const { return head_dim > 0 ? head_dim : hidden / heads; }
  bool qkv_bias() const { return architecture == "Qwen2ForCausalLM" || (attention_bias && has_attention_bias_key()); }
  bool o_bias() const { return attention_bias && has_attention_bias_key(); }
  bool qk_norm() const { return architecture == "Qwen3ForCausalLM"; }
  bool has_attention_bias_key() const {
    return architecture == "LlamaForCausalLM" || architecture == "Qwen3ForCausalLM";
  }
};

struct TinyModel {
  TinySpec spec;
  std::map<std::string, std::vector<float>> tensors;  // as stored (rounded to the dtype)
};

inline std::string tiny_config_json(const TinySpec& spec) {
  std::ostringstream json;
  json.precision(17);
  json << "{\n  \"architectures\": [\"" << spec.architecture << "\"],\n";
  json << "  \"vocab_size\": " << spec.vocab << ",\n  \"hidden_size\": " << spec.hidden << ",\n";
  json << "  \"intermediate_size\": " << spec.intermediate << ",\n  \"num_hidden_layers\": " << spec.layers << ",\n";
  json << "  \"num_attention_heads\": " << spec.heads << ",\n  \"num_key_value_heads\": " << spec.kv_heads << ",\n";
  if (spec.head_dim > 0) json << "  \"head_dim\": " << spec.head_dim << ",\n";
  json << "  \"max_position_embeddings\": " << spec.max_position << ",\n";
  json << "  \"rms_norm_eps\": " << spec.rms_norm_eps << ",\n  \"hidden_act\": \"silu\",\n";
  const std::string llama3 =
      "\"rope_type\": \"llama3\", \"factor\": 4.0, \"low_freq_factor\": 1.0, \"high_freq_factor\": 4.0, "
      "\"original_max_position_embeddings\": 16";
  if (spec.rope_parameters) {
    json << "  \"rope_parameters\": {\"rope_theta\": " << spec.rope_theta << ", "
         << (spec.llama3_rope ? llama3 : "\"rope_type\": \"default\"") << "},\n";
  } else {
    json << "  \"rope_theta\": " << spec.rope_theta << ",\n";
    json << "  \"rope_scaling\": " << (spec.llama3_rope ? "{" + llama3 + "}" : "null") << ",\n";
  }
  json << "  \"tie_word_embeddings\": " << (spec.tie_embeddings ? "true" : "false") << ",\n";
  if (spec.has_attention_bias_key()) {
    json << "  \"attention_bias\": " << (spec.attention_bias ? "true" : "false") << ",\n";
  }
  if (spec.architecture == "LlamaForCausalLM") json << "  \"mlp_bias\": " << (spec.mlp_bias ? "true" : "false") << ",\n";
  if (spec.architecture == "MistralForCausalLM") {
    json << "  \"sliding_window\": ";
    if (spec.sliding_window > 0) {
      json << spec.sliding_window;
    } else {
      json << "null";
    }
    json << ",\n";
  }
  if (spec.architecture == "Qwen2ForCausalLM" || spec.architecture == "Qwen3ForCausalLM") {
    json << "  \"use_sliding_window\": false,\n";
  }
  const char* torch_dtype = spec.dtype == "BF16" ? "bfloat16" : spec.dtype == "F16" ? "float16" : "float32";
  json << "  \"torch_dtype\": \"" << torch_dtype << "\",\n";
  json << "  \"bos_token_id\": 1,\n  \"eos_token_id\": [2, 3]\n}\n";
  return json.str();
}

// Writes config.json and the weights (one file, or `shards` files plus model.safetensors.index.json).
// Weight scales keep activations O(1) and logits well spread, so greedy choices are not near-ties.
inline TinyModel write_tiny_model(const std::string& dir, const TinySpec& spec) {
  TinyModel model;
  model.spec = spec;
  std::mt19937 rng(spec.seed);
  std::vector<std::pair<std::string, std::vector<int64_t>>> layout;
  std::map<std::string, std::vector<float>> values;
  auto random = [&](const std::string& name, std::vector<int64_t> shape, float low, float high) {
    int64_t count = 1;
    for (int64_t dim : shape) count *= dim;
    std::uniform_real_distribution<float> uniform(low, high);
    std::vector<float> data(static_cast<size_t>(count));
    for (float& value : data) value = uniform(rng);
    layout.emplace_back(name, std::move(shape));
    values[name] = std::move(data);
  };
  auto linear = [&](const std::string& name, int64_t out, int64_t in, bool bias) {
    const float scale = 1.5f / std::sqrt(static_cast<float>(in));
    random(name + ".weight", {out, in}, -scale, scale);
    if (bias) random(name + ".bias", {out}, -0.3f, 0.3f);
  };
  const int64_t head_dim = spec.resolved_head_dim();
  const int64_t q_dim = spec.heads * head_dim;
  const int64_t kv_dim = spec.kv_heads * head_dim;
  random("model.embed_tokens.weight", {spec.vocab, spec.hidden}, -1.0f, 1.0f);
  for (int layer = 0; layer < spec.layers; ++layer) {
    const std::string p = "model.layers." + std::to_string(layer) + ".";
    random(p + "input_layernorm.weight", {spec.hidden}, 0.6f, 1.4f);
    linear(p + "self_attn.q_proj", q_dim, spec.hidden, spec.qkv_bias());
    linear(p + "self_attn.k_proj", kv_dim, spec.hidden, spec.qkv_bias());
    linear(p + "self_attn.v_proj", kv_dim, spec.hidden, spec.qkv_bias());
    linear(p + "self_attn.o_proj", spec.hidden, q_dim, spec.o_bias());
    if (spec.qk_norm()) {
      random(p + "self_attn.q_norm.weight", {head_dim}, 0.6f, 1.4f);
      random(p + "self_attn.k_norm.weight", {head_dim}, 0.6f, 1.4f);
    }
    random(p + "post_attention_layernorm.weight", {spec.hidden}, 0.6f, 1.4f);
    linear(p + "mlp.gate_proj", spec.intermediate, spec.hidden, spec.mlp_bias);
    linear(p + "mlp.up_proj", spec.intermediate, spec.hidden, spec.mlp_bias);
    linear(p + "mlp.down_proj", spec.hidden, spec.intermediate, spec.mlp_bias);
  }
  random("model.norm.weight", {spec.hidden}, 0.6f, 1.4f);
  if (!spec.tie_embeddings) {
    const float scale = 3.0f / std::sqrt(static_cast<float>(spec.hidden));
    random("lm_head.weight", {spec.vocab, spec.hidden}, -scale, scale);
  }

  const int shards = std::max(1, spec.shards);
  std::vector<SafetensorsWriter> writers(static_cast<size_t>(shards));
  std::ostringstream weight_map;
  for (size_t i = 0; i < layout.size(); ++i) {
    const auto& [name, shape] = layout[i];
    const size_t shard = i * static_cast<size_t>(shards) / layout.size();
    model.tensors[name] = writers[shard].add(name, spec.dtype, shape, values[name]);
    char file[64];
    std::snprintf(file, sizeof(file), "model-%05zu-of-%05d.safetensors", shard + 1, shards);
    weight_map << (i ? ",\n" : "") << "    \"" << name << "\": \"" << file << "\"";
  }
  if (shards == 1) {
    writers[0].write(dir + "/model.safetensors");
  } else {
    for (int shard = 0; shard < shards; ++shard) {
      char file[64];
      std::snprintf(file, sizeof(file), "model-%05d-of-%05d.safetensors", shard + 1, shards);
      writers[static_cast<size_t>(shard)].write(dir + "/" + file);
    }
    write_file(dir + "/model.safetensors.index.json",
               "{\n  \"metadata\": {\"total_size\": 0},\n  \"weight_map\": {\n" + weight_map.str() + "\n  }\n}\n");
  }
  write_file(dir + "/config.json", tiny_config_json(spec));
  return model;
}

// Logits [tokens.size() * vocab] of one sequence, computed in double the way transformers' Llama, Mistral,
// Qwen2 and Qwen3 modules do.
inline std::vector<double> reference_logits(const TinyModel& model, const std::vector<int32_t>& tokens) {
  const TinySpec& s = model.spec;
  const auto& w = model.tensors;
  const auto tensor = [&](const std::string& name) -> const std::vector<float>& { return w.at(name); };
  const int T = static_cast<int>(tokens.size());
  const int H = s.hidden;
  const int D = s.resolved_head_dim();
  const int half = D / 2;
  const int group = s.heads / s.kv_heads;
  using Matrix = std::vector<std::vector<double>>;

  const auto rmsnorm = [&](const std::vector<double>& x, const std::vector<float>& weight) {
    double mean = 0.0;
    for (double v : x) mean += v * v;
    mean /= static_cast<double>(x.size());
    const double inv = 1.0 / std::sqrt(mean + s.rms_norm_eps);
    std::vector<double> out(x.size());
    for (size_t i = 0; i < x.size(); ++i) out[i] = weight[i] * (x[i] * inv);
    return out;
  };
  const auto project = [&](const std::vector<double>& x, const std::string& name, int out, bool bias) {
    const std::vector<float>& weight = tensor(name + ".weight");
    const int in = static_cast<int>(x.size());
    std::vector<double> y(static_cast<size_t>(out));
    for (int o = 0; o < out; ++o) {
      double sum = bias ? tensor(name + ".bias")[static_cast<size_t>(o)] : 0.0;
      for (int i = 0; i < in; ++i) sum += weight[static_cast<size_t>(o) * in + i] * x[static_cast<size_t>(i)];
      y[static_cast<size_t>(o)] = sum;
    }
    return y;
  };

  std::vector<double> inv_freq(static_cast<size_t>(half));
  for (int i = 0; i < half; ++i) {
    double freq = 1.0 / std::pow(s.rope_theta, 2.0 * i / D);
    if (s.llama3_rope) {
      const double factor = 4.0, low = 1.0, high = 4.0, old_context = 16.0;
      const double wavelen = 2.0 * M_PI / freq;
      if (wavelen > old_context / low) {
        freq /= factor;
      } else if (wavelen >= old_context / high) {
        const double smooth = (old_context / wavelen - low) / (high - low);
        freq = (1.0 - smooth) * freq / factor + smooth * freq;
      }
    }
    inv_freq[static_cast<size_t>(i)] = freq;
  }
  const auto rotate = [&](std::vector<double>& head, int position) {
    for (int i = 0; i < half; ++i) {
      const double angle = position * inv_freq[static_cast<size_t>(i)];
      const double a = head[static_cast<size_t>(i)];
      const double b = head[static_cast<size_t>(i + half)];
      head[static_cast<size_t>(i)] = a * std::cos(angle) - b * std::sin(angle);
      head[static_cast<size_t>(i + half)] = b * std::cos(angle) + a * std::sin(angle);
    }
  };

  Matrix x(static_cast<size_t>(T));
  for (int t = 0; t < T; ++t) {
    const auto& embed = tensor("model.embed_tokens.weight");
    x[static_cast<size_t>(t)].assign(embed.begin() + static_cast<int64_t>(tokens[static_cast<size_t>(t)]) * H,
                                     embed.begin() + static_cast<int64_t>(tokens[static_cast<size_t>(t)] + 1) * H);
  }
  for (int layer = 0; layer < s.layers; ++layer) {
    const std::string p = "model.layers." + std::to_string(layer) + ".";
    // Per position, per head: q [heads][D], k and v [kv_heads][D].
    std::vector<Matrix> q(static_cast<size_t>(T)), k(static_cast<size_t>(T)), v(static_cast<size_t>(T));
    for (int t = 0; t < T; ++t) {
      const std::vector<double> h = rmsnorm(x[static_cast<size_t>(t)], tensor(p + "input_layernorm.weight"));
      const auto q_flat = project(h, p + "self_attn.q_proj", s.heads * D, s.qkv_bias());
      const auto k_flat = project(h, p + "self_attn.k_proj", s.kv_heads * D, s.qkv_bias());
      const auto v_flat = project(h, p + "self_attn.v_proj", s.kv_heads * D, s.qkv_bias());
      for (int head = 0; head < s.heads; ++head) {
        std::vector<double> qh(q_flat.begin() + head * D, q_flat.begin() + (head + 1) * D);
        if (s.qk_norm()) qh = rmsnorm(qh, tensor(p + "self_attn.q_norm.weight"));
        rotate(qh, t);
        q[static_cast<size_t>(t)].push_back(qh);
      }
      for (int head = 0; head < s.kv_heads; ++head) {
        std::vector<double> kh(k_flat.begin() + head * D, k_flat.begin() + (head + 1) * D);
        if (s.qk_norm()) kh = rmsnorm(kh, tensor(p + "self_attn.k_norm.weight"));
        rotate(kh, t);
        k[static_cast<size_t>(t)].push_back(kh);
        v[static_cast<size_t>(t)].emplace_back(v_flat.begin() + head * D, v_flat.begin() + (head + 1) * D);
      }
    }
    for (int t = 0; t < T; ++t) {
      std::vector<double> attended;
      for (int head = 0; head < s.heads; ++head) {
        const int kv_head = head / group;
        const int start = s.sliding_window > 0 ? std::max(0, t - s.sliding_window + 1) : 0;
        std::vector<double> scores;
        double max_score = -INFINITY;
        for (int j = start; j <= t; ++j) {
          double dot = 0.0;
          for (int d = 0; d < D; ++d) {
            dot += q[static_cast<size_t>(t)][static_cast<size_t>(head)][static_cast<size_t>(d)] *
                   k[static_cast<size_t>(j)][static_cast<size_t>(kv_head)][static_cast<size_t>(d)];
          }
          scores.push_back(dot / std::sqrt(static_cast<double>(D)));
          max_score = std::max(max_score, scores.back());
        }
        double total = 0.0;
        for (double& score : scores) total += (score = std::exp(score - max_score));
        for (int d = 0; d < D; ++d) {
          double sum = 0.0;
          for (int j = start; j <= t; ++j) {
            sum += scores[static_cast<size_t>(j - start)] *
                   v[static_cast<size_t>(j)][static_cast<size_t>(kv_head)][static_cast<size_t>(d)];
          }
          attended.push_back(sum / total);
        }
      }
      const auto o = project(attended, p + "self_attn.o_proj", H, s.o_bias());
      for (int i = 0; i < H; ++i) x[static_cast<size_t>(t)][static_cast<size_t>(i)] += o[static_cast<size_t>(i)];
      const auto h = rmsnorm(x[static_cast<size_t>(t)], tensor(p + "post_attention_layernorm.weight"));
      const auto gate = project(h, p + "mlp.gate_proj", s.intermediate, s.mlp_bias);
      const auto up = project(h, p + "mlp.up_proj", s.intermediate, s.mlp_bias);
      std::vector<double> act(static_cast<size_t>(s.intermediate));
      for (int i = 0; i < s.intermediate; ++i) {
        const double g = gate[static_cast<size_t>(i)];
        act[static_cast<size_t>(i)] = g / (1.0 + std::exp(-g)) * up[static_cast<size_t>(i)];
      }
      const auto down = project(act, p + "mlp.down_proj", H, s.mlp_bias);
      for (int i = 0; i < H; ++i) x[static_cast<size_t>(t)][static_cast<size_t>(i)] += down[static_cast<size_t>(i)];
    }
  }
  const std::string head_name = s.tie_embeddings ? "model.embed_tokens" : "lm_head";
  std::vector<double> logits;
  for (int t = 0; t < T; ++t) {
    const auto h = rmsnorm(x[static_cast<size_t>(t)], tensor("model.norm.weight"));
    const auto row = project(h, head_name, s.vocab, false);
    logits.insert(logits.end(), row.begin(), row.end());
  }
  return logits;
}

}  // namespace testing
