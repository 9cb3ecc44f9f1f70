#include "json.h"

#include "check.h"

using pearl::Json;
using pearl::JsonError;

TEST(parses_nested_document) {
  const Json json = Json::parse(R"( {"a": [1, -2.5e3, true, false, null], "b": {"c": "d"}, "e": 0} )");
  CHECK(json.is_object());
  CHECK_EQ(json.keys().size(), size_t{3});
  const Json& a = *json.find("a");
  CHECK_EQ(a.size(), size_t{5});
  CHECK_EQ(a.as_array()[0].as_int64(), int64_t{1});
  CHECK_EQ(a.as_array()[1].as_double(), -2500.0);
  CHECK(!a.as_array()[1].is_integer());
  CHECK(a.as_array()[2].as_bool());
  CHECK(!a.as_array()[3].as_bool());
  CHECK(a.as_array()[4].is_null());
  CHECK_EQ(json.find("b")->find("c")->as_string(), std::string("d"));
  CHECK_EQ(json.find("e")->as_int64(), int64_t{0});
  CHECK(json.find("missing") == nullptr);
}

TEST(keeps_member_order) {
  const Json json = Json::parse(R"({"z": 1, "a": 2, "m": 3})");
  CHECK_EQ(json.keys()[0], std::string("z"));
  CHECK_EQ(json.keys()[1], std::string("a"));
  CHECK_EQ(json.value_at(2).as_int64(), int64_t{3});
}

TEST(decodes_string_escapes) {
  const Json json = Json::parse(R"(["\"\\\/\b\f\n\r\t", "\u00e9\u20AC", "\ud83d\ude00", "plain"])");
  CHECK_EQ(json.as_array()[0].as_string(), std::string("\"\\/\b\f\n\r\t"));
  CHECK_EQ(json.as_array()[1].as_string(), std::string("\xC3\xA9\xE2\x82\xAC"));
  CHECK_EQ(json.as_array()[2].as_string(), std::string("\xF0\x9F\x98\x80"));
  CHECK_EQ(json.as_array()[3].as_string(), std::string("plain"));
}

TEST(parses_numbers_exactly) {
  const Json json = Json::parse("[9007199254740993, 1e-6, 0.5, -0, 1E2, 500000.0, -7]");
  CHECK_EQ(json.as_array()[0].as_int64(), int64_t{9007199254740993});
  CHECK_EQ(json.as_array()[1].as_double(), 1e-6);
  CHECK_EQ(json.as_array()[2].as_double(), 0.5);
  CHECK(json.as_array()[3].is_integer());
  CHECK_EQ(json.as_array()[4].as_double(), 100.0);
  CHECK(!json.as_array()[4].is_integer());
  CHECK_EQ(json.as_array()[5].as_double(), 500000.0);
  CHECK_EQ(json.as_array()[6].as_int64(), int64_t{-7});
}

TEST(rejects_invalid_documents_with_offsets) {
  struct Case {
    const char* text;
    size_t offset;
    const char* fragment;
  };
  const Case cases[] = {
      {"", 0, "unexpected end of input"},
      {"{", 1, "expected a string key"},
      {"{\"a\" 1}", 5, "expected ':'"},
      {"{\"a\": 1,}", 8, "expected a string key"},
      {"[1 2]", 3, "expected ',' or ']'"},
      {"[1,]", 3, "unexpected character"},
      {"\"abc", 4, "unterminated string"},
      {"\"a\\x\"", 3, "invalid escape"},
      {"\"\\u12G4\"", 5, "invalid hex digit"},
      {"\"\\ud800\"", 7, "high surrogate"},
      {"\"\\udc00\"", 7, "unpaired low surrogate"},
      {"\"a\nb\"", 2, "control character"},
      {"01", 1, "unexpected character after the value"},
      {"-", 1, "truncated number"},
      {"1.", 2, "expected a digit after the decimal point"},
      {"1e+", 3, "expected a digit in the exponent"},
      {"1e999", 0, "out of range"},
      {"tru", 0, "invalid literal"},
      {"nul", 0, "invalid literal"},
      {"{\"a\": 1, \"a\": 2}", 9, "duplicate key"},
      {"[] []", 3, "after the value"},
      {"'a'", 0, "unexpected character"},
  };
  for (const Case& c : cases) {
    bool threw = false;
    try {
      Json::parse(c.text);
    } catch (const JsonError& error) {
      threw = true;
      CHECK_EQ(error.offset(), c.offset);
      CHECK(std::string(error.what()).find(c.fragment) != std::string::npos);
      CHECK(std::string(error.what()).find("offset " + std::to_string(c.offset)) != std::string::npos);
    }
    if (!threw) check::fail(__FILE__, __LINE__, std::string("accepted invalid JSON: ") + c.text);
  }
}

TEST(rejects_deep_nesting) {
  const std::string deep(100000, '[');
  CHECK_THROWS(Json::parse(deep), "nesting deeper");
}

TEST(typed_accessors_name_the_mismatch) {
  const Json json = Json::parse(R"({"n": 1.5, "s": "x"})");
  CHECK_THROWS(json.find("s")->as_double(), "expected a JSON number, got string");
  CHECK_THROWS(json.find("n")->as_int64(), "expected an integer");
  CHECK_THROWS(json.as_array(), "expected a JSON array, got object");
}

int main() { return check::run_all(); }
