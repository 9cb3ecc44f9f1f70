// A small JSON reader for config.json, safetensors headers and model.safetensors.index.json.
// Values are immutable once parsed. Errors carry the byte offset where parsing failed.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

namespace pearl {

class JsonError : public std::runtime_error {
 public:
  JsonError(const std::string& message, size_t offset);
  size_t offset() const { return offset_; }

 private:
  size_t offset_;
};

class Json {
 public:
  enum class Type { Null, Bool, Number, String, Array, Object };

  // Parses a complete document (surrounding whitespace allowed, nothing else after the value).
  static Json parse(std::string_view text);
  // Reads and parses a file; errors are prefixed with the path.
  static Json parse_file(const std::string& path);

  Json() = default;

  Type type() const { return type_; }
  bool is_null() const { return type_ == Type::Null; }
  bool is_bool() const { return type_ == Type::Bool; }
  bool is_number() const { return type_ == Type::Number; }
  // A number written without fraction or exponent that fits in int64.
  bool is_integer() const { return type_ == Type::Number && is_integer_; }
  bool is_string() const { return type_ == Type::String; }
  bool is_array() const { return type_ == Type::Array; }
  bool is_object() const { return type_ == Type::Object; }

  // Accessors throw std::runtime_error when the value has another type.
  bool as_bool() const;
  double as_double() const;
  int64_t as_int64() const;  // integers only; 2.0 and 1e3 are rejected
  const std::string& as_string() const;
  const std::vector<Json>& as_array() const;

  // Objects keep their members in document order; keys are unique (duplicates are a parse error).
  size_t size() const;  // array elements or object members
  const std::vector<std::string>& keys() const;
  const Json& value_at(size_t index) const;  // object member values, in keys() order
  const Json* find(std::string_view key) const;  // nullptr when absent (or not an object)

  static const char* type_name(Type type);

 private:
  friend class JsonParser;

  Type type_ = Type::Null;
  bool bool_ = false;
  bool is_integer_ = false;
  double number_ = 0.0;
  int64_t integer_ = 0;
  std::string string_;
  std::vector<Json> elements_;    // array elements, or object member values
  std::vector<std::string> keys_;  // object member names
};

}  // namespace pearl
