// A tiny test harness: TEST(name) registers a function, CHECK* macros abort the current test with a
// message, main() runs every test and exits non-zero when one failed.
#pragma once

#include <cmath>
#include <cstdio>
#include <exception>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace check {

struct TestCase {
  const char* name;
  void (*run)();
};

inline std::vector<TestCase>& registry() {
  static std::vector<TestCase> tests;
  return tests;
}

struct Registrar {
  Registrar(const char* name, void (*run)()) { registry().push_back({name, run}); }
};

// Thrown by a failed CHECK to end the current test.
struct Failure : std::runtime_error {
  using std::runtime_error::runtime_error;
};

[[noreturn]] inline void fail(const char* file, int line, const std::string& message) {
  std::ostringstream out;
  out << file << ":" << line << ": " << message;
  throw Failure(out.str());
}

template <typename T>
std::string show(const T& value) {
  std::ostringstream out;
  out << value;
  return out.str();
}

inline int run_all() {
  int failed = 0;
  for (const TestCase& test : registry()) {
    try {
      test.run();
      std::printf("ok   %s\n", test.name);
    } catch (const Failure& failure) {
      ++failed;
      std::printf("FAIL %s\n     %s\n", test.name, failure.what());
    } catch (const std::exception& error) {
      ++failed;
      std::printf("FAIL %s\n     unexpected exception: %s\n", test.name, error.what());
    }
  }
  std::printf("%zu tests, %d failed\n", registry().size(), failed);
  return failed == 0 ? 0 : 1;
}

}  // namespace check

#define TEST(name)                                                 \
  static void name();                                              \
  static const check::Registrar name##_registrar(#name, &name);   \
  static void name()

#define CHECK(condition)                                                           \
  do {                                                                             \
    if (!(condition)) check::fail(__FILE__, __LINE__, "CHECK(" #condition ") failed"); \
  } while (0)

#define CHECK_EQ(actual, expected)                                                                        \
  do {                                                                                                    \
    const auto check_actual_ = (actual);                                                                 \
    const auto check_expected_ = (expected);                                                             \
    if (!(check_actual_ == check_expected_)) {                                                            \
      check::fail(__FILE__, __LINE__,                                                                     \
                  "CHECK_EQ(" #actual ", " #expected "): " + check::show(check_actual_) + " != " +        \
                      check::show(check_expected_));                                                      \
    }                                                                                                     \
  } while (0)

#define CHECK_NEAR(actual, expected, tolerance)                                                          \
  do {                                                                                                   \
    const double check_actual_ = (actual);                                                               \
    const double check_expected_ = (expected);                                                           \
    if (!(std::fabs(check_actual_ - check_expected_) <= (tolerance))) {                                  \
      check::fail(__FILE__, __LINE__,                                                                    \
                  "CHECK_NEAR(" #actual ", " #expected "): " + check::show(check_actual_) + " vs " +     \
                      check::show(check_expected_) + " (tolerance " + check::show(tolerance) + ")");     \
    }                                                                                                    \
  } while (0)

// The statement must throw a std::exception whose message contains `fragment`.
#define CHECK_THROWS(statement, fragment)                                                                 \
  do {                                                                                                    \
    bool check_threw_ = false;                                                                            \
    try {                                                                                                 \
      statement;                                                                                          \
    } catch (const check::Failure&) {                                                                     \
      throw;                                                                                              \
    } catch (const std::exception& check_error_) {                                                        \
      check_threw_ = true;                                                                                \
      const std::string check_message_ = check_error_.what();                                             \
      if (check_message_.find(fragment) == std::string::npos) {                                           \
        check::fail(__FILE__, __LINE__,                                                                   \
                    "CHECK_THROWS(" #statement "): message \"" + check_message_ + "\" lacks \"" +         \
                        std::string(fragment) + "\"");                                                    \
      }                                                                                                   \
    }                                                                                                     \
    if (!check_threw_) check::fail(__FILE__, __LINE__, "CHECK_THROWS(" #statement "): nothing thrown");   \
  } while (0)
