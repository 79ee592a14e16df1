#include "rng.h"

#include <cmath>
#include <stdexcept>

namespace pf {

static void normal_fill_16(float* data) {
  for (int j = 0; j < 8; ++j) {
    const float u1 = 1 - data[j];
    const float u2 = data[j + 8];
    const float radius = std::sqrt(-2 * std::log(u1));
    const float theta = static_cast<float>(2.0f * 3.14159265358979323846 * u2);
    data[j] = radius * std::cos(theta);
    data[j + 8] = radius * std::sin(theta);
  }
}

std::vector<float> TorchGenerator::randn(int64_t numel) {
  if (numel < 16) throw std::runtime_error("TorchGenerator::randn needs at least 16 elements");
  std::vector<float> d(static_cast<size_t>(numel));
  for (auto& v : d) v = uniform();
  for (int64_t i = 0; i + 15 < numel; i += 16) normal_fill_16(d.data() + i);
  if (numel % 16 != 0) {
    float* tail = d.data() + numel - 16;
    for (int k = 0; k < 16; ++k) tail[k] = uniform();
    normal_fill_16(tail);
  }
  return d;
}

}  // namespace pf
