// Unit checks of pf-run's runtime-independent core (no export directory needed); ctest runs them natively
// and, cross-compiled, under qemu-aarch64. Comparisons with the Python pipeline live in tests/apps/.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "array.h"
#include "json.h"
#include "rng.h"
#include "schedulers.h"

using namespace pf;

static int failures = 0;
#define CHECK(cond)                                                    \
  do {                                                                 \
    if (!(cond)) {                                                     \
      std::fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #cond); \
      ++failures;                                                      \
    }                                                                  \
  } while (0)

int main() {
  // JSON as Python writes it
  Json j = Json::parse(R"({"a": [1, 2.5, -Infinity], "b": "\u00e9\n", "c": null, "d": true})");
  CHECK(j["a"][1].as_number() == 2.5);
  CHECK(std::isinf(j["a"][2].as_number()) && j["a"][2].as_number() < 0);
  CHECK(j["b"].as_string() == "\xc3\xa9\n");
  CHECK(j["c"].is_null() && j["d"].as_bool());
  CHECK(Json::parse(j.dump())["b"].as_string() == j["b"].as_string());

  // torch.randn(16 / 20, generator=torch.Generator().manual_seed(0 / 42)), recorded from PyTorch 2.13
  std::vector<float> r0 = TorchGenerator(0).randn(16);
  const float want0[4] = {-1.1258398294448853f, -1.152360200881958f, -0.2505785822868347f, -0.4338788092136383f};
  for (int i = 0; i < 4; ++i) CHECK(std::fabs(r0[i] - want0[i]) < 1e-5f);
  std::vector<float> r42 = TorchGenerator(42).randn(20);
  const float want42[3] = {-0.3957104980945587f, 0.8034093379974365f, -0.6215953826904297f};
  for (int i = 0; i < 3; ++i) CHECK(std::fabs(r42[17 + i] - want42[i]) < 1e-5f);

  // DDIM timesteps of the demo model's config (leading spacing, offset 1)
  Json cfg = Json::parse(R"({"_class_name": "DDIMScheduler", "beta_schedule": "linear", "prediction_type": "v_prediction",
                             "steps_offset": 1, "timestep_spacing": "leading", "clip_sample": false, "set_alpha_to_one": false})");
  auto ddim = make_scheduler(cfg, "");
  std::vector<double> ts = ddim->timesteps(4);
  CHECK(ts.size() == 4 && ts[0] == 751 && ts[3] == 1);
  auto lcm = make_scheduler(cfg, "lcm");
  ts = lcm->timesteps(4);
  CHECK(ts.size() == 4 && ts[0] == 999 && ts[1] == 759 && ts[3] == 259);
  bool refused = false;
  try {
    make_scheduler(Json::parse(R"({"_class_name": "DDIMScheduler", "thresholding": true})"), "");
  } catch (const UnsupportedConfig&) {
    refused = true;
  }
  CHECK(refused);

  // npy round trip, PNG signature
  Array a = Array::f32({2, 3}, 1.5f);
  write_npy("pf-core-tests.npy", a);
  Array b = read_npy("pf-core-tests.npy");
  CHECK(b.shape == a.shape && b.f()[5] == 1.5f);
  std::remove("pf-core-tests.npy");
  std::vector<uint8_t> png = png_bytes(2, 1, {255, 0, 0, 0, 255, 0});
  CHECK(png.size() > 8 && png[1] == 'P' && png[2] == 'N' && png[3] == 'G');

  if (failures) std::fprintf(stderr, "%d check(s) failed\n", failures);
  else std::printf("core: all checks passed\n");
  return failures ? 1 : 0;
}
