#include "json.h"

#include <charconv>
#include <fstream>
#include <sstream>
#include <unordered_set>

namespace pearl {

JsonError::JsonError(const std::string& message, size_t offset)
    : std::runtime_error("invalid JSON at offset " + std::to_string(offset) + ": " + message), offset_(offset) {}

class JsonParser {
 public:
  explicit JsonParser(std::string_view text) : text_(text) {}

  Json parse_document() {
    skip_whitespace();
    Json value = parse_value(0);
    skip_whitespace();
    if (pos_ != text_.size()) fail("unexpected character after the value");
    return value;
  }

 private:
  // Deep nesting would otherwise overflow the stack on hostile input.
  static constexpr int kMaxDepth = 256;

  [[noreturn]] void fail(const std::string& message) const { throw JsonError(message, pos_); }

  bool at_end() const { return pos_ >= text_.size(); }
  char peek() const { return text_[pos_]; }

  void skip_whitespace() {
    while (!at_end() && (peek() == ' ' || peek() == '\t' || peek() == '\n' || peek() == '\r')) ++pos_;
  }

  void expect_literal(std::string_view literal) {
    if (text_.substr(pos_, literal.size()) != literal) fail("invalid literal, expected '" + std::string(literal) + "'");
    pos_ += literal.size();
  }

  Json parse_value(int depth) {
    if (depth > kMaxDepth) fail("nesting deeper than " + std::to_string(kMaxDepth) + " levels");
    if (at_end()) fail("unexpected end of input, expected a value");
    Json value;
    switch (peek()) {
      case '{':
        return parse_object(depth);
      case '[':
        return parse_array(depth);
      case '"':
        value.type_ = Json::Type::String;
        value.string_ = parse_string();
        return value;
      case 't':
        expect_literal("true");
        value.type_ = Json::Type::Bool;
        value.bool_ = true;
        return value;
      case 'f':
        expect_literal("false");
        value.type_ = Json::Type::Bool;
        value.bool_ = false;
        return value;
      case 'n':
        expect_literal("null");
        return value;
      default:
        if (peek() == '-' || (peek() >= '0' && peek() <= '9')) return parse_number();
        fail(std::string("unexpected character '") + peek() + "'");
    }
  }

  Json parse_object(int depth) {
    Json object;
    object.type_ = Json::Type::Object;
    ++pos_;  // '{'
    skip_whitespace();
    if (!at_end() && peek() == '}') {
      ++pos_;
      return object;
    }
    std::unordered_set<std::string> seen;
    while (true) {
      skip_whitespace();
      if (at_end() || peek() != '"') fail("expected a string key in object");
      size_t key_offset = pos_;
      std::string key = parse_string();
      if (!seen.insert(key).second) throw JsonError("duplicate key \"" + key + "\"", key_offset);
      skip_whitespace();
      if (at_end() || peek() != ':') fail("expected ':' after object key");
      ++pos_;
      skip_whitespace();
      object.elements_.push_back(parse_value(depth + 1));
      object.keys_.push_back(std::move(key));
      skip_whitespace();
      if (at_end()) fail("unexpected end of input in object");
      if (peek() == ',') {
        ++pos_;
        continue;
      }
      if (peek() == '}') {
        ++pos_;
        return object;
      }
      fail("expected ',' or '}' in object");
    }
  }

  Json parse_array(int depth) {
    Json array;
    array.type_ = Json::Type::Array;
    ++pos_;  // '['
    skip_whitespace();
    if (!at_end() && peek() == ']') {
      ++pos_;
      return array;
    }
    while (true) {
      skip_whitespace();
      array.elements_.push_back(parse_value(depth + 1));
      skip_whitespace();
      if (at_end()) fail("unexpected end of input in array");
      if (peek() == ',') {
        ++pos_;
        continue;
      }
      if (peek() == ']') {
        ++pos_;
        return array;
      }
      fail("expected ',' or ']' in array");
    }
  }

  unsigned parse_hex4() {
    if (text_.size() - pos_ < 4) fail("truncated \\u escape");
    unsigned code = 0;
    for (int i = 0; i < 4; ++i) {
      char c = text_[pos_];
      code <<= 4;
      if (c >= '0' && c <= '9') {
        code |= static_cast<unsigned>(c - '0');
      } else if (c >= 'a' && c <= 'f') {
        code |= static_cast<unsigned>(c - 'a' + 10);
      } else if (c >= 'A' && c <= 'F') {
        code |= static_cast<unsigned>(c - 'A' + 10);
      } else {
        fail("invalid hex digit in \\u escape");
      }
      ++pos_;
    }
    return code;
  }

  static void append_utf8(std::string& out, unsigned code) {
    if (code < 0x80) {
      out += static_cast<char>(code);
    } else if (code < 0x800) {
      out += static_cast<char>(0xC0 | (code >> 6));
      out += static_cast<char>(0x80 | (code & 0x3F));
    } else if (code < 0x10000) {
      out += static_cast<char>(0xE0 | (code >> 12));
      out += static_cast<char>(0x80 | ((code >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (code & 0x3F));
    } else {
      out += static_cast<char>(0xF0 | (code >> 18));
      out += static_cast<char>(0x80 | ((code >> 12) & 0x3F));
      out += static_cast<char>(0x80 | ((code >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (code & 0x3F));
    }
  }

  std::string parse_string() {
    ++pos_;  // opening quote
    std::string out;
    while (true) {
      if (at_end()) fail("unterminated string");
      char c = text_[pos_];
      if (c == '"') {
        ++pos_;
        return out;
      }
      if (static_cast<unsigned char>(c) < 0x20) fail("unescaped control character in string");
      if (c != '\\') {
        out += c;
        ++pos_;
        continue;
      }
      ++pos_;
      if (at_end()) fail("unterminated escape in string");
      char escape = text_[pos_++];
      switch (escape) {
        case '"': out += '"'; break;
        case '\\': out += '\\'; break;
        case '/': out += '/'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'n': out += '\n'; break;
        case 'r': out += '\r'; break;
        case 't': out += '\t'; break;
        case 'u': {
          unsigned code = parse_hex4();
          if (code >= 0xDC00 && code <= 0xDFFF) fail("unpaired low surrogate in \\u escape");
          if (code >= 0xD800 && code <= 0xDBFF) {
            if (text_.substr(pos_, 2) != "\\u") fail("high surrogate not followed by a low surrogate");
            pos_ += 2;
            unsigned low = parse_hex4();
            if (low < 0xDC00 || low > 0xDFFF) fail("high surrogate not followed by a low surrogate");
            code = 0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00);
          }
          append_utf8(out, code);
          break;
        }
        default:
          --pos_;
          fail(std::string("invalid escape '\\") + escape + "'");
      }
    }
  }

  Json parse_number() {
    size_t start = pos_;
    bool integral = true;
    if (peek() == '-') ++pos_;
    if (at_end()) fail("truncated number");
    if (peek() == '0') {
      ++pos_;
    } else if (peek() >= '1' && peek() <= '9') {
      while (!at_end() && peek() >= '0' && peek() <= '9') ++pos_;
    } else {
      fail("invalid number");
    }
    if (!at_end() && peek() == '.') {
      integral = false;
      ++pos_;
      if (at_end() || peek() < '0' || peek() > '9') fail("expected a digit after the decimal point");
      while (!at_end() && peek() >= '0' && peek() <= '9') ++pos_;
    }
    if (!at_end() && (peek() == 'e' || peek() == 'E')) {
      integral = false;
      ++pos_;
      if (!at_end() && (peek() == '+' || peek() == '-')) ++pos_;
      if (at_end() || peek() < '0' || peek() > '9') fail("expected a digit in the exponent");
      while (!at_end() && peek() >= '0' && peek() <= '9') ++pos_;
    }
    const char* first = text_.data() + start;
    const char* last = text_.data() + pos_;
    Json value;
    value.type_ = Json::Type::Number;
    // from_chars is locale-independent, unlike strtod.
    auto [end, error] = std::from_chars(first, last, value.number_);
    if (end != last || (error != std::errc() && error != std::errc::result_out_of_range)) {
      pos_ = start;
      fail("invalid number");
    }
    if (error == std::errc::result_out_of_range) {
      pos_ = start;
      fail("number out of range");
    }
    if (integral) {
      auto [int_end, int_error] = std::from_chars(first, last, value.integer_);
      value.is_integer_ = int_end == last && int_error == std::errc();
    }
    return value;
  }

  std::string_view text_;
  size_t pos_ = 0;
};

Json Json::parse(std::string_view text) { return JsonParser(text).parse_document(); }

Json Json::parse_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error(path + ": cannot open file");
  std::ostringstream contents;
  contents << in.rdbuf();
  if (in.bad()) throw std::runtime_error(path + ": read error");
  try {
    return parse(contents.str());
  } catch (const JsonError& error) {
    throw std::runtime_error(path + ": " + error.what());
  }
}

const char* Json::type_name(Type type) {
  switch (type) {
    case Type::Null: return "null";
    case Type::Bool: return "boolean";
    case Type::Number: return "number";
    case Type::String: return "string";
    case Type::Array: return "array";
    case Type::Object: return "object";
  }
  return "unknown";
}

namespace {
[[noreturn]] void wrong_type(Json::Type expected, Json::Type actual) {
  throw std::runtime_error(std::string("expected a JSON ") + Json::type_name(expected) + ", got " +
                           Json::type_name(actual));
}
}  // namespace

bool Json::as_bool() const {
  if (type_ != Type::Bool) wrong_type(Type::Bool, type_);
  return bool_;
}

double Json::as_double() const {
  if (type_ != Type::Number) wrong_type(Type::Number, type_);
  return number_;
}

int64_t Json::as_int64() const {
  if (type_ != Type::Number) wrong_type(Type::Number, type_);
  if (!is_integer_) throw std::runtime_error("expected an integer, got " + std::to_string(number_));
  return integer_;
}

const std::string& Json::as_string() const {
  if (type_ != Type::String) wrong_type(Type::String, type_);
  return string_;
}

const std::vector<Json>& Json::as_array() const {
  if (type_ != Type::Array) wrong_type(Type::Array, type_);
  return elements_;
}

size_t Json::size() const {
  if (type_ != Type::Array && type_ != Type::Object) wrong_type(Type::Array, type_);
  return elements_.size();
}

const std::vector<std::string>& Json::keys() const {
  if (type_ != Type::Object) wrong_type(Type::Object, type_);
  return keys_;
}

const Json& Json::value_at(size_t index) const {
  if (type_ != Type::Object) wrong_type(Type::Object, type_);
  if (index >= elements_.size()) throw std::out_of_range("JSON object member index out of range");
  return elements_[index];
}

const Json* Json::find(std::string_view key) const {
  if (type_ != Type::Object) return nullptr;
  for (size_t i = 0; i < keys_.size(); ++i) {
    if (keys_[i] == key) return &elements_[i];
  }
  return nullptr;
}

}  // namespace pearl
