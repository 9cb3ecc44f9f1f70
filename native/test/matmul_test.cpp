// The CPU matmul against ops::dot, the reduction every kernel shares: each output element must carry
// dot()'s exact bits whatever the number of rows, the tile it lands in (full or remainder, in rows and
// in columns), the threads, or the bias. That is the batch invariance the engine's tests rely on, and it
// keeps the register-blocked kernel's results identical to one dot() per element.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "check.h"
#include "ops/ops.h"
#include "thread_pool.h"

namespace {

std::vector<float> random_values(size_t count, std::mt19937& rng) {
  // Magnitudes spread over several binades so that a different summation order changes the bits.
  std::uniform_real_distribution<float> mantissa(-1.0f, 1.0f);
  std::uniform_int_distribution<int> exponent(-6, 6);
  std::vector<float> values(count);
  for (float& value : values) value = std::ldexp(mantissa(rng), exponent(rng));
  return values;
}

uint32_t bits(float value) {
  uint32_t word;
  std::memcpy(&word, &value, sizeof(word));
  return word;
}

// Shortest text that tells two floats apart.
std::string exact(float value) {
  char text[32];
  std::snprintf(text, sizeof(text), "%.9g", static_cast<double>(value));
  return text;
}

}  // namespace

TEST(every_element_is_bit_identical_to_dot_for_any_rows_columns_threads_and_bias) {
  std::mt19937 rng(7);
  pearl::ThreadPool one(1);
  pearl::ThreadPool three(3);
  for (int in : {1, 15, 16, 17, 48, 100, 704}) {
    for (int out : {1, 3, 4, 5, 11, 64, 257}) {
      const int max_rows = 9;
      const std::vector<float> x = random_values(static_cast<size_t>(max_rows) * in, rng);
      const std::vector<float> weight = random_values(static_cast<size_t>(out) * in, rng);
      const std::vector<float> bias = random_values(static_cast<size_t>(out), rng);
      for (int rows = 1; rows <= max_rows; ++rows) {
        for (const float* bias_or_null : {static_cast<const float*>(nullptr), bias.data()}) {
          for (pearl::ThreadPool* pool : {&one, &three}) {
            std::vector<float> y(static_cast<size_t>(rows) * out);
            pearl::ops::matmul(x.data(), rows, in, weight.data(), bias_or_null, out, y.data(), *pool);
            for (int r = 0; r < rows; ++r) {
              for (int j = 0; j < out; ++j) {
                float expected = pearl::ops::dot(x.data() + static_cast<int64_t>(r) * in,
                                                 weight.data() + static_cast<int64_t>(j) * in, in);
                if (bias_or_null != nullptr) expected += bias_or_null[j];
                const float actual = y[static_cast<size_t>(r) * out + static_cast<size_t>(j)];
                if (bits(actual) != bits(expected)) {
                  check::fail(__FILE__, __LINE__,
                              "in " + std::to_string(in) + " out " + std::to_string(out) + " rows " +
                                  std::to_string(rows) + " threads " + std::to_string(pool->size()) + " element (" +
                                  std::to_string(r) + ", " + std::to_string(j) + "): " + exact(actual) +
                                  " != " + exact(expected));
                }
              }
            }
          }
        }
      }
    }
  }
}

int main() { return check::run_all(); }
