#include <cmath>
#include <vector>

#include "ops.h"

namespace pearl::ops {

namespace {
constexpr double kPi = 3.14159265358979323846;
}  // namespace

std::vector<float> rope_inv_freq(const RopeConfig& rope, int head_dim) {
  // Mirrors transformers' float32 arithmetic: inv_freq = 1 / base ** (arange(0, dim, 2) / dim), then for
  // llama3 the wavelength-dependent scaling of _compute_llama3_parameters, with Python scalars rounded to
  // float32 as torch does when they meet a float32 tensor.
  const int half = head_dim / 2;
  std::vector<float> inv_freq(static_cast<size_t>(half));
  const float base = static_cast<float>(rope.theta);
  for (int i = 0; i < half; ++i) {
    const float exponent = static_cast<float>(2 * i) / static_cast<float>(head_dim);
    inv_freq[static_cast<size_t>(i)] = 1.0f / std::pow(base, exponent);
  }
  if (rope.type != RopeType::Llama3) return inv_freq;

  const double old_context = static_cast<double>(rope.original_max_position_embeddings);
  const float low_freq_wavelen = static_cast<float>(old_context / rope.low_freq_factor);
  const float high_freq_wavelen = static_cast<float>(old_context / rope.high_freq_factor);
  const float factor = static_cast<float>(rope.factor);
  const float low = static_cast<float>(rope.low_freq_factor);
  const float high = static_cast<float>(rope.high_freq_factor);
  const float two_pi = static_cast<float>(2.0 * kPi);
  for (float& freq : inv_freq) {
    const float wavelen = two_pi / freq;
    float scaled = wavelen > low_freq_wavelen ? freq / factor : freq;
    const bool medium = !(wavelen < high_freq_wavelen) && !(wavelen > low_freq_wavelen);
    if (medium) {
      const float smooth = (static_cast<float>(old_context) / wavelen - low) / (high - low);
      scaled = (1.0f - smooth) * scaled / factor + smooth * scaled;
    }
    freq = scaled;
  }
  return inv_freq;
}

void rope(float* x, int64_t stride, int rows, int heads, int head_dim, const int32_t* positions,
          const float* inv_freq) {
  const int half = head_dim / 2;
  std::vector<float> cos_table(static_cast<size_t>(half));
  std::vector<float> sin_table(static_cast<size_t>(half));
  for (int r = 0; r < rows; ++r) {
    const float position = static_cast<float>(positions[r]);
    for (int i = 0; i < half; ++i) {
      // The angle is a float32 product (as in transformers); its cos/sin are evaluated in double and
      // rounded once.
      const double angle = static_cast<double>(inv_freq[i] * position);
      cos_table[static_cast<size_t>(i)] = static_cast<float>(std::cos(angle));
      sin_table[static_cast<size_t>(i)] = static_cast<float>(std::sin(angle));
    }
    float* row = x + r * stride;
    for (int h = 0; h < heads; ++h) {
      float* head = row + static_cast<int64_t>(h) * head_dim;
      for (int i = 0; i < half; ++i) {
        const float first = head[i];
        const float second = head[i + half];
        const float c = cos_table[static_cast<size_t>(i)];
        const float s = sin_table[static_cast<size_t>(i)];
        head[i] = first * c - second * s;
        head[i + half] = second * c + first * s;
      }
    }
  }
}

}  // namespace pearl::ops
