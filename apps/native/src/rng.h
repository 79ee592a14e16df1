// torch.randn(shape, generator=torch.Generator().manual_seed(seed)) for float32 tensors of >= 16 elements, in
// standard C++: PyTorch's CPU generator is MT19937 seeded with the seed, uniforms are the top-24-bit floats of
// its 32-bit draws, and normal_fill turns each block of 16 uniforms into 16 normals by Box-Muller (the last
// block of a size that is not a multiple of 16 is redrawn). PyTorch's AVX2 kernel computes the same numbers
// with vectorised log/sin/cos, so values agree to a few float32 ulps, not always to the bit.
#pragma once

#include <cstdint>
#include <random>
#include <vector>

namespace pf {

class TorchGenerator {
 public:
  explicit TorchGenerator(uint64_t seed) : mt_(static_cast<uint32_t>(seed & 0xFFFFFFFFu)) {}
  std::vector<float> randn(int64_t numel);  // numel >= 16

 private:
  std::mt19937 mt_;
  float uniform() { return static_cast<float>(mt_() & ((1u << 24) - 1)) * (1.0f / (1u << 24)); }
};

}  // namespace pf
