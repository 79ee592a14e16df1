// The sampling loop's schedulers: C++ twins of pocketfusion's runtimes/schedulers.py (themselves numerically
// diffusers' classes), built from a diffusers scheduler_config.json with the defaults of the class it names.
//
//   auto s = make_scheduler(config, "");            // "" : the config's own class; else ddim, pndm, euler,
//   x *= s->init_noise_sigma(steps);                 //      euler-ancestral, dpmpp-2m, dpmpp-2m-karras, lcm
//   for (i, t) in s->timesteps(steps):
//     out = unet(s->scale_model_input(x, i, steps), t)
//     x = s->step(out, i, x, steps, noise)           // noise: standard normal, where stochastic() and i < n - 1
//
// Steps are addressed by their index i in timesteps(steps) (PNDM's timesteps repeat one value).
#pragma once

#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "json.h"

namespace pf {

using Vec = std::vector<float>;

class UnsupportedConfig : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

class Scheduler {
 public:
  virtual ~Scheduler() = default;
  const std::string& name() const { return name_; }
  virtual bool stochastic() const { return false; }
  virtual void reset() {}
  // the U-Net's timestep at each step (float32 values; integers for all but the Euler family)
  virtual std::vector<double> timesteps(int steps) = 0;
  virtual float init_noise_sigma(int steps) { (void)steps; return 1.0f; }
  virtual Vec scale_model_input(const Vec& x, int i, int steps) { (void)i; (void)steps; return x; }
  virtual Vec step(const Vec& out, int i, const Vec& x, int steps, const Vec* noise) = 0;

 protected:
  std::string name_;
};

// throws UnsupportedConfig (an unknown name or class, an option the runtime cannot honour)
std::unique_ptr<Scheduler> make_scheduler(const Json& config, const std::string& name);
std::vector<std::string> scheduler_names();

}  // namespace pf
