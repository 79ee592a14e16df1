// An export directory (manifest.json, schema version 2, stage "export") and the text -> image loop over its
// ExecuTorch components: the C++ twin of pocketfusion's runtimes/pipeline.py (RuntimePipeline).
#pragma once

#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "array.h"
#include "json.h"
#include "rng.h"
#include "schedulers.h"
#include "session.h"
#include "tokenizer.h"

namespace pf {

class UserError : public std::runtime_error {  // bad input: one `error:` line, exit 2
 public:
  using std::runtime_error::runtime_error;
};

struct TensorSpec {
  std::string name;
  std::vector<int64_t> shape;
  std::string dtype;
};

struct Component {
  std::string name, path, format, target, golden;
  std::vector<TensorSpec> inputs, outputs;
  std::string key() const { return target.empty() ? name : target + "/" + name; }
  const TensorSpec* input(const std::string& n) const;
};

struct Sampler {
  std::string scheduler = "scheduler", tokenizer = "tokenizer", tokenizer_2;
  std::vector<int64_t> latent_shape;
  double scaling_factor = 1;
  int max_length = 77;
  std::string guidance = "cfg";
  int default_steps = 50;
  std::vector<float> time_ids;  // SDXL only
  bool zero_negative = false;
  bool sdxl() const { return !time_ids.empty(); }
};

class ExportDir {
 public:
  // verify: every listed file's size and sha256, as pocketfusion's load_manifest
  static ExportDir open(const std::string& root, bool verify = true);
  std::string root;
  Json manifest;
  std::vector<Component> components;  // the executorch ones
  std::optional<Sampler> sampler;
  const Component* find(const std::string& name) const;
  std::string resolve(const std::string& rel) const;
  double tolerance(const Component& c) const;  // the export's recorded parity tolerance (1e-4 when none)
  int64_t size_bytes(const Component& c) const;
};

// initial and step noise: torch.Generator(seed)'s draws, overridden by the arrays of a --noise file
class NoiseSource {
 public:
  NoiseSource(uint64_t seed, const std::vector<int64_t>& latent_shape, const std::string& npy_path = "");
  Vec next();
  size_t from_file() const { return file_.size(); }

 private:
  TorchGenerator gen_;
  int64_t numel_;
  std::vector<Vec> file_;
  size_t drawn_ = 0;
};

struct Timings {
  double text_ms = 0, unet_ms = 0, vae_ms = 0, total_ms = 0;
  int unet_calls = 0;
};

class Pipeline {
 public:
  Pipeline(const ExportDir& dir, const std::string& scheduler_name = "");
  // one image as (H, W, 3) uint8 bytes; latents_out: the final latents (before scaling)
  std::vector<uint8_t> generate(const std::string& prompt, int steps, float guidance, NoiseSource& noise, int* width, int* height,
                                Timings* timings = nullptr, Vec* latents_out = nullptr);
  Scheduler& scheduler() { return *scheduler_; }
  const Sampler& sampler() const { return sampler_; }

 private:
  const ExportDir& dir_;
  Sampler sampler_;
  std::unique_ptr<ClipTokenizer> tok_, tok2_;
  std::unique_ptr<Scheduler> scheduler_;
  std::map<std::string, std::unique_ptr<Session>> sessions_;
  const Component* unet_ = nullptr;
  int max_length_2_ = 0;
  std::map<std::string, Array> encode(const std::string& prompt);
};

}  // namespace pf
