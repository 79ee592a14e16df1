#include "pipeline.h"

#include <sys/stat.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>

namespace pf {

namespace {

double now_ms() {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

std::vector<TensorSpec> specs(const Json& j) {
  std::vector<TensorSpec> out;
  if (!j.is_array()) return out;
  for (const Json& s : j.as_array()) {
    TensorSpec t;
    t.name = s["name"].as_string();
    for (const Json& d : s["shape"].as_array()) t.shape.push_back(d.as_int());
    t.dtype = s["dtype"].as_string();
    out.push_back(t);
  }
  return out;
}

// a[b] concatenated along axis 0 (same trailing shape)
Array concat0(const Array& a, const Array& b) {
  std::vector<int64_t> shape = a.shape;
  shape[0] += b.shape[0];
  Array out(a.dtype, shape);
  std::memcpy(out.data(), a.data(), a.nbytes());
  std::memcpy(static_cast<char*>(out.data()) + a.nbytes(), b.data(), b.nbytes());
  return out;
}

// a and b concatenated along the last axis
Array concat_last(const Array& a, const Array& b) {
  std::vector<int64_t> shape = a.shape;
  const int64_t da = a.shape.back(), db = b.shape.back();
  shape.back() = da + db;
  Array out(DType::F32, shape);
  const int64_t rows = a.numel() / da;
  const float *pa = a.f(), *pb = b.f();
  float* po = out.f();
  for (int64_t r = 0; r < rows; ++r) {
    std::memcpy(po + r * (da + db), pa + r * da, sizeof(float) * da);
    std::memcpy(po + r * (da + db) + da, pb + r * db, sizeof(float) * db);
  }
  return out;
}

Array from_vec(const Vec& v, const std::vector<int64_t>& shape) {
  Array a(DType::F32, shape);
  std::memcpy(a.data(), v.data(), v.size() * sizeof(float));
  return a;
}

}  // namespace

const TensorSpec* Component::input(const std::string& n) const {
  for (const auto& s : inputs)
    if (s.name == n) return &s;
  return nullptr;
}

ExportDir ExportDir::open(const std::string& root, bool verify) {
  ExportDir d;
  d.root = root;
  const std::string path = root + "/manifest.json";
  struct stat st;
  if (stat(path.c_str(), &st) != 0) throw UserError(root + " has no manifest.json");
  try {
    d.manifest = Json::parse_file(path);
  } catch (const std::runtime_error& e) {
    throw UserError(path + " is not valid JSON: " + e.what());
  }
  const Json& m = d.manifest;
  if (!m["schema_version"].is_number() || m["schema_version"].as_int() != 2)
    throw UserError("manifest schema_version " + m["schema_version"].dump() + " is not supported; pf-run reads version 2");
  if (m["stage"].is_string() && m["stage"].as_string() != "export")
    throw UserError(root + " is a '" + m["stage"].as_string() + "' artifact; pf-run needs an export directory");
  if (verify && m["files"].is_object()) {
    for (const auto& kv : m["files"].as_object()) {
      const std::string p = root + "/" + kv.first;
      if (stat(p.c_str(), &st) != 0) throw UserError(root + ": file " + kv.first + " listed in the manifest is missing");
      if (static_cast<int64_t>(st.st_size) != kv.second["size"].as_int())
        throw UserError(root + ": " + kv.first + " has " + std::to_string(st.st_size) + " bytes, manifest says " + kv.second["size"].dump());
      if (sha256_file(p) != kv.second["sha256"].as_string()) throw UserError(root + ": checksum mismatch for " + kv.first + " (file changed or corrupt)");
    }
  }
  for (const Json& c : m["components"].as_array()) {
    if (c["target"].is_string() && c["target"].as_string() == "executorch") {
      Component k;
      k.name = c["name"].as_string();
      k.path = c["path"].as_string();
      k.format = c["format"].as_string();
      k.target = "executorch";
      k.golden = c["golden"].is_string() ? c["golden"].as_string() : "";
      k.inputs = specs(c["inputs"]);
      k.outputs = specs(c["outputs"]);
      d.components.push_back(k);
    }
  }
  const Json& s = m["sampler"];
  if (s.is_object()) {
    Sampler sp;
    sp.scheduler = s.string_or("scheduler", "scheduler");
    sp.tokenizer = s.string_or("tokenizer", "tokenizer");
    sp.tokenizer_2 = s.string_or("tokenizer_2", "");
    for (const Json& v : s["latent_shape"].as_array()) sp.latent_shape.push_back(v.as_int());
    sp.scaling_factor = s["scaling_factor"].as_number();
    sp.max_length = static_cast<int>(s["max_length"].as_int());
    sp.guidance = s.string_or("guidance", "cfg");
    sp.default_steps = static_cast<int>(s.number_or("default_steps", 50));
    if (s["time_ids"].is_array())
      for (const Json& v : s["time_ids"].as_array()) sp.time_ids.push_back(static_cast<float>(v.as_number()));
    sp.zero_negative = s.bool_or("zero_negative", false);
    d.sampler = sp;
  }
  return d;
}

const Component* ExportDir::find(const std::string& name) const {
  for (const auto& c : components)
    if (c.name == name) return &c;
  return nullptr;
}

std::string ExportDir::resolve(const std::string& rel) const { return !rel.empty() && rel[0] == '/' ? rel : root + "/" + rel; }

double ExportDir::tolerance(const Component& c) const {
  const Json& p = manifest["metrics"]["components"][c.key()]["parity"];
  return p["tolerance"].is_number() ? p["tolerance"].as_number() : 1e-4;
}

int64_t ExportDir::size_bytes(const Component& c) const {
  const Json& v = manifest["metrics"]["components"][c.key()]["size_bytes"];
  return v.is_number() ? v.as_int() : -1;
}

// ------------------------------------------------------------------------------------------ noise

NoiseSource::NoiseSource(uint64_t seed, const std::vector<int64_t>& latent_shape, const std::string& npy_path) : gen_(seed) {
  numel_ = 1;
  for (int64_t s : latent_shape) numel_ *= s;
  if (npy_path.empty()) return;
  Array a;
  try {
    a = read_npy(npy_path);
  } catch (const std::runtime_error& e) {
    throw UserError(std::string("--noise: ") + e.what());
  }
  if (a.numel() == 0 || a.numel() % numel_ != 0)
    throw UserError("--noise " + npy_path + " holds " + a.shape_str() + ": not the latent shape (or a stack of it), " + std::to_string(numel_) +
                    " values each");
  std::vector<float> v = a.to_float();
  for (int64_t k = 0; k < a.numel() / numel_; ++k) file_.emplace_back(v.begin() + k * numel_, v.begin() + (k + 1) * numel_);
}

Vec NoiseSource::next() {
  Vec v = gen_.randn(numel_);  // drawn in any case: the draws after the file's stay the generator's
  if (drawn_ < file_.size()) v = file_[drawn_];
  ++drawn_;
  return v;
}

// ---------------------------------------------------------------------------------------- pipeline

Pipeline::Pipeline(const ExportDir& dir, const std::string& scheduler_name) : dir_(dir) {
  if (!dir.sampler) throw UserError(dir.root + " records no sampler (export a full pipeline, not a bare component)");
  sampler_ = *dir.sampler;
  std::vector<std::string> nets = {"text_encoder", "unet", "vae_decoder"};
  if (sampler_.sdxl()) nets.insert(nets.begin() + 1, "text_encoder_2");
  std::string missing;
  for (const auto& n : nets)
    if (!dir.find(n)) missing += (missing.empty() ? "" : ", ") + n;
  if (!missing.empty()) throw UserError(dir.root + " has no executorch export of " + missing);
  tok_ = std::make_unique<ClipTokenizer>(dir.resolve(sampler_.tokenizer));
  if (sampler_.sdxl()) {
    tok2_ = std::make_unique<ClipTokenizer>(dir.resolve(sampler_.tokenizer_2.empty() ? "tokenizer" : sampler_.tokenizer_2));
    max_length_2_ = static_cast<int>(dir.find("text_encoder_2")->inputs.at(0).shape.at(1));
  }
  Json config = Json::parse_file(dir.resolve(sampler_.scheduler) + "/scheduler_config.json");
  try {
    scheduler_ = make_scheduler(config, scheduler_name);
  } catch (const UnsupportedConfig& e) {
    throw UserError(e.what());
  }
  unet_ = dir.find("unet");
  for (const auto& n : nets) sessions_[n] = std::make_unique<Session>(dir.resolve(dir.find(n)->path));
}

static Array ids_array(const std::vector<int32_t>& ids) {
  Array a(DType::I32, {1, static_cast<int64_t>(ids.size())});
  std::memcpy(a.data(), ids.data(), ids.size() * sizeof(int32_t));
  return a;
}

std::map<std::string, Array> Pipeline::encode(const std::string& prompt) {
  std::map<std::string, Array> feeds = {{"input_ids", ids_array(tok_->encode(prompt, sampler_.max_length))}};
  if (!tok2_) return {{"encoder_hidden_states", sessions_["text_encoder"]->run(feeds).at("last_hidden_state")}};
  Array h1 = sessions_["text_encoder"]->run(feeds).at("penultimate_hidden_state");
  auto out2 = sessions_["text_encoder_2"]->run({{"input_ids", ids_array(tok2_->encode(prompt, max_length_2_))}});
  return {{"encoder_hidden_states", concat_last(h1, out2.at("penultimate_hidden_state"))}, {"text_embeds", out2.at("text_embeds")}};
}

std::vector<uint8_t> Pipeline::generate(const std::string& prompt, int steps, float guidance, NoiseSource& noise, int* width, int* height,
                                        Timings* timings, Vec* latents_out) {
  const double t_start = now_ms();
  Timings tm;
  steps = steps > 0 ? steps : sampler_.default_steps;
  const bool pair = sampler_.guidance == "cfg";
  std::map<std::string, Array> cond = encode(prompt), uncond;
  if (pair) {
    uncond = encode("");
    if (sampler_.zero_negative)
      for (auto& kv : uncond) std::fill(kv.second.f(), kv.second.f() + kv.second.numel(), 0.f);
  }
  tm.text_ms = now_ms() - t_start;
  Scheduler& sched = *scheduler_;
  sched.reset();
  const std::vector<double> ts = sched.timesteps(steps);
  Vec x = noise.next();
  const float sigma0 = sched.init_noise_sigma(steps);
  for (float& v : x) v *= sigma0;
  const std::vector<int64_t>& shape = sampler_.latent_shape;
  const int64_t b = pair ? 2 : 1;
  std::map<std::string, Array> feeds;
  for (const auto& kv : cond) feeds[kv.first] = pair ? concat0(uncond.at(kv.first), kv.second) : kv.second;
  if (sampler_.sdxl()) {
    Array ids(DType::F32, {b, 6});
    for (int64_t r = 0; r < b; ++r) std::copy(sampler_.time_ids.begin(), sampler_.time_ids.end(), ids.f() + r * 6);
    feeds["time_ids"] = ids;
  }
  if (!pair && unet_->input("guidance")) feeds["guidance"] = Array::f32({1}, guidance);
  Session& unet = *sessions_["unet"];
  for (size_t i = 0; i < ts.size(); ++i) {
    Vec xin = sched.scale_model_input(x, static_cast<int>(i), steps);
    Array sample = from_vec(xin, shape);
    feeds["sample"] = pair ? concat0(sample, sample) : sample;
    feeds["timestep"] = Array::f32({b}, static_cast<float>(ts[i]));
    const double t0 = now_ms();
    Array out = unet.run(feeds).at("noise_pred");
    tm.unet_ms += now_ms() - t0;
    ++tm.unet_calls;
    Vec eps(static_cast<size_t>(x.size()));
    const float* o = out.f();
    if (pair) {
      const size_t n = x.size();
      for (size_t k = 0; k < n; ++k) eps[k] = o[k] + guidance * (o[n + k] - o[k]);
    } else {
      std::copy(o, o + x.size(), eps.begin());
    }
    Vec step_noise;
    const bool draw = sched.stochastic() && i + 1 < ts.size();
    if (draw) step_noise = noise.next();
    x = sched.step(eps, static_cast<int>(i), x, steps, draw ? &step_noise : nullptr);
  }
  if (latents_out) *latents_out = x;
  Array latent = from_vec(x, shape);
  const float inv = static_cast<float>(sampler_.scaling_factor);
  for (int64_t k = 0; k < latent.numel(); ++k) latent.f()[k] = latent.f()[k] / inv;
  const double t1 = now_ms();
  Array img = sessions_["vae_decoder"]->run({{"latent", latent}}).at("image");
  tm.vae_ms = now_ms() - t1;
  const int64_t C = img.shape.at(1), H = img.shape.at(2), W = img.shape.at(3);
  std::vector<uint8_t> rgb(static_cast<size_t>(H * W * 3));
  const float* p = img.f();
  for (int64_t y = 0; y < H; ++y)
    for (int64_t xx = 0; xx < W; ++xx)
      for (int64_t c = 0; c < 3; ++c) {
        float v = p[(std::min<int64_t>(c, C - 1) * H + y) * W + xx] / 2 + 0.5f;
        v = std::min(std::max(v, 0.0f), 1.0f);
        rgb[static_cast<size_t>((y * W + xx) * 3 + c)] = static_cast<uint8_t>(v * 255.0f + 0.5f);
      }
  *width = static_cast<int>(W);
  *height = static_cast<int>(H);
  tm.total_ms = now_ms() - t_start;
  if (timings) *timings = tm;
  return rgb;
}

}  // namespace pf
