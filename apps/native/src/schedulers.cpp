#include "schedulers.h"

#include <algorithm>
#include <cfenv>
#include <cmath>
#include <limits>

namespace pf {

namespace {

double np_round(double v) { return std::nearbyint(v); }  // round half to even, as numpy

// ------------------------------------------------------------------------------------ the options

const char* kCommon = R"("num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
                         "trained_betas": null)";

struct Options {
  Json o;
  bool has(const std::string& k) const { return o.has(k); }
  double num(const std::string& k) const {
    const Json& v = o[k];
    if (v.is_bool()) return v.as_bool() ? 1 : 0;
    return v.as_number();
  }
  bool flag(const std::string& k) const {
    const Json& v = o[k];
    return v.is_bool() ? v.as_bool() : v.is_number() ? v.as_number() != 0 : false;
  }
  std::string str(const std::string& k) const { return o[k].is_string() ? o[k].as_string() : ""; }
  bool null(const std::string& k) const { return o[k].is_null(); }
};

bool same(const Json& a, const Json& b) {
  if (a.type() != b.type()) {
    if (a.is_number() && b.is_bool()) return a.as_number() == (b.as_bool() ? 1 : 0);
    if (a.is_bool() && b.is_number()) return b.as_number() == (a.as_bool() ? 1 : 0);
    return false;
  }
  switch (a.type()) {
    case Json::Type::Null: return true;
    case Json::Type::Bool: return a.as_bool() == b.as_bool();
    case Json::Type::Number: return a.as_number() == b.as_number();
    case Json::Type::String: return a.as_string() == b.as_string();
    default: return a.dump() == b.dump();
  }
}

std::string repr(const Json& v) {
  if (v.is_string()) return "'" + v.as_string() + "'";
  if (v.is_bool()) return v.as_bool() ? "True" : "False";
  if (v.is_null()) return "None";
  return v.dump();
}

// the name -> (diffusers class, values the name forces, values it assumes) table of pocketfusion.scheduler_names
struct NameInfo {
  const char* name;
  const char* cls;
  const char* forced;
  const char* assumed;
};
const NameInfo kNames[] = {
    {"ddim", "DDIMScheduler", "{}", "{}"},
    {"pndm", "PNDMScheduler", "{}", R"({"skip_prk_steps": true})"},
    {"euler", "EulerDiscreteScheduler", "{}", "{}"},
    {"euler-ancestral", "EulerAncestralDiscreteScheduler", "{}", "{}"},
    {"dpmpp-2m", "DPMSolverMultistepScheduler", R"({"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": false})", "{}"},
    {"dpmpp-2m-karras", "DPMSolverMultistepScheduler", R"({"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": true})", "{}"},
    {"lcm", "LCMScheduler", "{}", "{}"},
};

const NameInfo& info(const std::string& name) {
  for (const NameInfo& n : kNames)
    if (name == n.name) return n;
  std::string all;
  for (const NameInfo& n : kNames) all += std::string(all.empty() ? "" : ", ") + n.name;
  throw UnsupportedConfig("unknown scheduler '" + name + "'; available: " + all);
}

// -------------------------------------------------------------------------------------- schedules

std::vector<float> linspace_f32(double start, double end, int n) {  // torch's float32 linspace, to the bit
  const float s = static_cast<float>(start), e = static_cast<float>(end);
  const double step = static_cast<double>((e - s) / static_cast<float>(std::max(n - 1, 1)));
  std::vector<float> out(static_cast<size_t>(n));
  for (int i = 0; i < n; ++i) out[i] = static_cast<float>(i < n / 2 ? s + step * i : e - step * (n - 1 - i));
  return out;
}

std::vector<float> betas(const Options& o) {
  const int T = static_cast<int>(o.num("num_train_timesteps"));
  if (o.o["trained_betas"].is_array()) {
    std::vector<float> b;
    for (const Json& v : o.o["trained_betas"].as_array()) b.push_back(static_cast<float>(v.as_number()));
    return b;
  }
  const double b0 = o.num("beta_start"), b1 = o.num("beta_end");
  const std::string schedule = o.str("beta_schedule");
  if (schedule == "scaled_linear") {
    std::vector<float> b = linspace_f32(std::sqrt(b0), std::sqrt(b1), T);
    for (float& v : b) v = v * v;
    return b;
  }
  if (schedule == "linear") return linspace_f32(b0, b1, T);
  if (schedule == "squaredcos_cap_v2") {
    auto bar = [](double t) { double c = std::cos((t + 0.008) / 1.008 * M_PI / 2); return c * c; };
    std::vector<float> b(static_cast<size_t>(T));
    for (int i = 0; i < T; ++i) b[i] = static_cast<float>(std::min(1 - bar(double(i + 1) / T) / bar(double(i) / T), 0.999));
    return b;
  }
  throw UnsupportedConfig("beta_schedule '" + schedule + "' is not supported by the runtime pipeline (linear, scaled_linear, squaredcos_cap_v2)");
}

std::vector<float> cumprod_f32(const std::vector<float>& betas) {  // torch.cumprod accumulates in double
  std::vector<float> out(betas.size());
  double acc = 1;
  for (size_t i = 0; i < betas.size(); ++i) {
    acc *= static_cast<double>(1.0f - betas[i]);
    out[i] = static_cast<float>(acc);
  }
  return out;
}

std::vector<float> alphas_cumprod(const Options& o) {
  std::vector<float> b = betas(o);
  if (o.flag("rescale_betas_zero_snr")) {  // zero terminal SNR (arXiv 2305.08891, algorithm 1)
    std::vector<float> s = cumprod_f32(b);
    for (float& v : s) v = std::sqrt(v);
    const float s0 = s.front(), sT = s.back();
    for (float& v : s) v = (v - sT) * (s0 / (s0 - sT));
    std::vector<float> a(s.size());
    for (size_t i = 0; i < s.size(); ++i) a[i] = s[i] * s[i];
    b[0] = 1 - a[0];
    for (size_t i = 1; i < a.size(); ++i) b[i] = 1 - a[i] / a[i - 1];
  }
  return cumprod_f32(b);
}

// numpy's arange(start, stop, step) for floats
std::vector<double> arange(double start, double stop, double step) {
  const double n = std::ceil((stop - start) / step);
  std::vector<double> out;
  for (int64_t i = 0; i < static_cast<int64_t>(n); ++i) out.push_back(start + static_cast<double>(i) * step);
  return out;
}

// numpy's linspace(start, stop, num, endpoint)
std::vector<double> linspace(double start, double stop, int num, bool endpoint = true) {
  std::vector<double> out(static_cast<size_t>(num));
  const int div = endpoint ? num - 1 : num;
  const double step = div > 0 ? (stop - start) / div : 0;
  for (int i = 0; i < num; ++i) out[i] = static_cast<double>(i) * step + start;
  if (endpoint && num > 1) out.back() = stop;
  return out;
}

// descending timesteps of diffusers' timestep_spacing (DDIM, PNDM, Euler)
std::vector<double> spacing(const Options& o, int steps, bool round_linspace = true) {
  const int T = static_cast<int>(o.num("num_train_timesteps"));
  const std::string sp = o.str("timestep_spacing");
  std::vector<double> ts;
  if (sp == "linspace") {
    ts = linspace(0, T - 1, steps);
    if (round_linspace)
      for (double& v : ts) v = np_round(v);
    std::reverse(ts.begin(), ts.end());
  } else if (sp == "leading") {
    for (int i = 0; i < steps; ++i) ts.push_back(np_round(static_cast<double>(i) * (T / steps)));
    std::reverse(ts.begin(), ts.end());
    for (double& v : ts) v += o.num("steps_offset");
  } else if (sp == "trailing") {
    ts = arange(T, 0, -static_cast<double>(T) / steps);
    for (double& v : ts) v = np_round(v) - 1;
  } else {
    throw UnsupportedConfig("timestep_spacing '" + sp + "' is not supported by the runtime pipeline (leading, trailing, linspace)");
  }
  return ts;
}

double interp(double x, const std::vector<float>& fp) {  // np.interp(x, arange(len(fp)), fp)
  if (x <= 0) return fp.front();
  const double last = static_cast<double>(fp.size() - 1);
  if (x >= last) return fp.back();
  const size_t j = static_cast<size_t>(std::floor(x));
  const double slope = (static_cast<double>(fp[j + 1]) - fp[j]);
  return slope * (x - static_cast<double>(j)) + fp[j];
}

double sigma_to_t(double sigma, const std::vector<float>& log_sigmas) {
  const double ls = std::log(std::max(sigma, 1e-10));
  const int n = static_cast<int>(log_sigmas.size());
  int low = 0;
  for (int i = 0; i < n; ++i)
    if (ls - log_sigmas[i] >= 0) low = i;
  low = std::min(low, n - 2);
  double w = (log_sigmas[low] - ls) / (static_cast<double>(log_sigmas[low]) - log_sigmas[low + 1]);
  w = std::min(std::max(w, 0.0), 1.0);
  return (1 - w) * low + w * (low + 1);
}

std::vector<double> karras(double lo, double hi, int steps) {
  std::vector<double> ramp = linspace(0, 1, steps), out;
  for (double r : ramp) out.push_back(std::pow(std::pow(hi, 1 / 7.0) + r * (std::pow(lo, 1 / 7.0) - std::pow(hi, 1 / 7.0)), 7.0));
  return out;
}

// ---------------------------------------------------------------------------------- vector helpers

// a * x + b * y, elementwise
Vec axpby(float a, const Vec& x, float b, const Vec& y) {
  Vec r(x.size());
  for (size_t i = 0; i < x.size(); ++i) r[i] = a * x[i] + b * y[i];
  return r;
}

// ------------------------------------------------------------------------------------------- base

class Base : public Scheduler {
 public:
  Base(const std::string& name, const Json& config, const std::string& defaults, const std::string& refused,
       std::vector<std::string> predictions = {"epsilon", "v_prediction", "sample"}) {
    name_ = name;
    const NameInfo& ni = info(name);
    cls_ = ni.cls;
    Json d = Json::parse("{" + std::string(kCommon) + (defaults.empty() ? "" : ", " + defaults) + "}");
    for (const auto& kv : config.as_object())
      if (d.has(kv.first)) d.set(kv.first, kv.second);
    o_.o = d;
    Json checks = Json::parse(refused.empty() ? "{}" : refused);
    const Json forced = Json::parse(ni.forced);  // named: a range-for over a temporary's member would dangle
    for (const auto& kv : forced.as_object()) {
      Json allowed = Json::array();
      allowed.push(kv.second);
      checks.set(kv.first, allowed);
    }
    for (const auto& kv : checks.as_object()) {
      const Json& have = o_.o[kv.first];
      bool ok = false;
      std::string allowed;
      for (const Json& v : kv.second.as_array()) {
        ok = ok || same(have, v);
        allowed += std::string(allowed.empty() ? "" : ", ") + repr(v);
      }
      if (!ok)
        throw UnsupportedConfig(cls_ + " with " + kv.first + "=" + repr(have) + " is not supported by the runtime pipeline's '" + name +
                                "' scheduler (supported: " + allowed + ")");
    }
    prediction_ = o_.str("prediction_type");
    if (std::find(predictions.begin(), predictions.end(), prediction_) == predictions.end()) {
      std::string all;
      for (const auto& p : predictions) all += std::string(all.empty() ? "" : ", ") + p;
      throw UnsupportedConfig(cls_ + " with prediction_type='" + prediction_ + "' is not supported by the runtime pipeline (supported: " + all + ")");
    }
    T_ = static_cast<int>(o_.num("num_train_timesteps"));
    ac_ = alphas_cumprod(o_);
  }

  std::vector<double> timesteps(int steps) override {
    check_steps(steps);
    if (steps != cached_) {
      schedule(steps);
      cached_ = steps;
    }
    return ts_;
  }

 protected:
  Options o_;
  std::string cls_, prediction_;
  int T_ = 1000;
  std::vector<float> ac_;
  std::vector<double> ts_;
  std::vector<float> sigmas_;  // Euler / DPM family
  int cached_ = -1;

  virtual void check_steps(int steps) const {
    if (steps < 1 || steps > T_)
      throw UnsupportedConfig("the " + name_ + " scheduler takes 1.." + std::to_string(T_) + " steps, got " + std::to_string(steps));
  }
  virtual void schedule(int steps) = 0;

  // the predicted clean sample at cumulative alpha a_t
  Vec x0(const Vec& out, const Vec& x, float a_t) const {
    if (prediction_ == "epsilon") {
      const float sa = std::sqrt(a_t), sb = std::sqrt(1 - a_t);
      Vec r(x.size());
      for (size_t i = 0; i < x.size(); ++i) r[i] = (x[i] - sb * out[i]) / sa;
      return r;
    }
    if (prediction_ == "v_prediction") return axpby(std::sqrt(a_t), x, -std::sqrt(1 - a_t), out);
    return out;
  }
};

// -------------------------------------------------------------------------------------------- DDIM

class DDIM : public Base {
 public:
  explicit DDIM(const Json& c)
      : Base("ddim", c,
             R"("clip_sample": true, "set_alpha_to_one": true, "steps_offset": 0, "prediction_type": "epsilon", "thresholding": false,
                "dynamic_thresholding_ratio": 0.995, "clip_sample_range": 1.0, "sample_max_value": 1.0, "timestep_spacing": "leading",
                "rescale_betas_zero_snr": false)",
             R"({"thresholding": [false]})") {
    final_alpha_ = o_.flag("set_alpha_to_one") ? 1.0f : ac_[0];
    clip_ = o_.flag("clip_sample");
    clip_range_ = static_cast<float>(o_.num("clip_sample_range"));
  }

  Vec step(const Vec& out, int i, const Vec& x, int steps, const Vec*) override {
    const int t = static_cast<int>(timesteps(steps)[i]);
    const int prev = t - T_ / steps;
    const float a_t = ac_[t], a_prev = prev >= 0 ? ac_[prev] : final_alpha_;
    Vec p0 = x0(out, x, a_t);
    Vec eps;
    if (prediction_ == "epsilon") eps = out;
    else if (prediction_ == "v_prediction") eps = axpby(std::sqrt(a_t), out, std::sqrt(1 - a_t), x);
    else {
      eps.resize(x.size());
      for (size_t k = 0; k < x.size(); ++k) eps[k] = (x[k] - std::sqrt(a_t) * p0[k]) / std::sqrt(1 - a_t);
    }
    if (clip_)
      for (float& v : p0) v = std::min(std::max(v, -clip_range_), clip_range_);
    return axpby(std::sqrt(a_prev), p0, std::sqrt(1 - a_prev), eps);
  }

 private:
  float final_alpha_ = 1;
  bool clip_ = true;
  float clip_range_ = 1;
  void schedule(int steps) override { ts_ = spacing(o_, steps); }
};

// ---------------------------------------------------------------------------------------- PNDM/PLMS

class PNDM : public Base {
 public:
  explicit PNDM(const Json& c)
      : Base("pndm", c, R"("skip_prk_steps": false, "set_alpha_to_one": false, "prediction_type": "epsilon", "timestep_spacing": "leading",
                           "steps_offset": 0)",
             "", {"epsilon", "v_prediction"}) {
    final_alpha_ = o_.flag("set_alpha_to_one") ? 1.0f : ac_[0];
    skip_prk_ = o_.flag("skip_prk_steps");
  }
  void reset() override {
    ets_.clear();
    cur_model_output_.clear();
    cur_sample_.clear();
  }

  Vec step(const Vec& out_in, int counter, const Vec& x, int steps, const Vec*) override {
    timesteps(steps);
    if (counter == 0) reset();
    Vec out = out_in;
    int t = static_cast<int>(ts_[counter]);
    int prev;
    Vec sample;
    const int n_prk = static_cast<int>(prk_.size());
    if (!skip_prk_ && counter < n_prk) {
      const int diff = counter % 2 ? 0 : T_ / steps / 2;
      prev = t - diff;
      t = static_cast<int>(prk_[static_cast<size_t>(counter / 4 * 4)]);
      if (cur_model_output_.empty()) cur_model_output_.assign(x.size(), 0.f);
      if (counter % 4 == 0) {
        for (size_t k = 0; k < x.size(); ++k) cur_model_output_[k] += static_cast<float>(1.0 / 6) * out[k];
        ets_.push_back(out);
        cur_sample_ = x;
      } else if (counter % 4 == 1 || counter % 4 == 2) {
        for (size_t k = 0; k < x.size(); ++k) cur_model_output_[k] += static_cast<float>(1.0 / 3) * out[k];
      } else {
        for (size_t k = 0; k < x.size(); ++k) out[k] = cur_model_output_[k] + static_cast<float>(1.0 / 6) * out[k];
        cur_model_output_.assign(x.size(), 0.f);
      }
      sample = cur_sample_.empty() ? x : cur_sample_;
    } else {
      prev = t - T_ / steps;
      sample = x;
      if (counter != 1) {
        if (ets_.size() > 3) ets_.erase(ets_.begin(), ets_.end() - 3);
        ets_.push_back(out);
      } else {
        prev = t;
        t = t + T_ / steps;
      }
      const auto& e = ets_;
      const size_t n = e.size();
      if (n == 1 && counter == 0) {
        cur_sample_ = x;
      } else if (n == 1 && counter == 1) {
        for (size_t k = 0; k < x.size(); ++k) out[k] = (out[k] + e[n - 1][k]) / 2;
        sample = cur_sample_;
        cur_sample_.clear();
      } else if (n == 2) {
        for (size_t k = 0; k < x.size(); ++k) out[k] = (3 * e[1][k] - e[0][k]) / 2;
      } else if (n == 3) {
        for (size_t k = 0; k < x.size(); ++k) out[k] = (23 * e[2][k] - 16 * e[1][k] + 5 * e[0][k]) / 12;
      } else {
        for (size_t k = 0; k < x.size(); ++k)
          out[k] = static_cast<float>(1.0 / 24) * (55 * e[n - 1][k] - 59 * e[n - 2][k] + 37 * e[n - 3][k] - 9 * e[n - 4][k]);
      }
    }
    return prev_sample(sample, t, prev, out);
  }

 private:
  float final_alpha_ = 1;
  bool skip_prk_ = false;
  std::vector<double> prk_;
  std::vector<Vec> ets_;
  Vec cur_model_output_, cur_sample_;

  void schedule(int steps) override {
    std::vector<double> base = spacing(o_, steps);
    std::reverse(base.begin(), base.end());  // ascending
    const size_t n = base.size();
    std::vector<double> plms;
    prk_.clear();
    if (skip_prk_) {
      plms.assign(base.begin(), base.end() - 1);
      plms.push_back(base[n - 2]);
      plms.push_back(base[n - 1]);
      std::reverse(plms.begin(), plms.end());
    } else {
      if (steps < 4) throw UnsupportedConfig("PNDMScheduler with skip_prk_steps=false takes at least 4 steps, got " + std::to_string(steps));
      std::vector<double> p;
      for (size_t k = n - 4; k < n; ++k) {
        p.push_back(base[k]);
        p.push_back(base[k] + T_ / steps / 2);
      }
      p.pop_back();
      std::vector<double> rep;
      for (double v : p) {
        rep.push_back(v);
        rep.push_back(v);
      }
      prk_.assign(rep.begin() + 1, rep.end() - 1);
      std::reverse(prk_.begin(), prk_.end());
      plms.assign(base.begin(), base.end() - 3);
      std::reverse(plms.begin(), plms.end());
    }
    ts_ = prk_;
    ts_.insert(ts_.end(), plms.begin(), plms.end());
  }

  Vec prev_sample(const Vec& x, int t, int prev, Vec out) const {
    const float a_t = ac_[t], a_prev = prev >= 0 ? ac_[prev] : final_alpha_;
    const float b_t = 1 - a_t, b_prev = 1 - a_prev;
    if (prediction_ == "v_prediction") out = axpby(std::sqrt(a_t), out, std::sqrt(b_t), x);
    const float denom = a_t * std::sqrt(b_prev) + std::sqrt(a_t * b_t * a_prev);
    const float c = std::sqrt(a_prev / a_t), d = (a_prev - a_t);
    Vec r(x.size());
    for (size_t k = 0; k < x.size(); ++k) r[k] = c * x[k] - d * out[k] / denom;
    return r;
  }
};

// ------------------------------------------------------------------------------------ Euler family

class Euler : public Base {
 public:
  explicit Euler(const Json& c, const std::string& name = "euler")
      : Base(name, c,
             name == "euler"
                 ? R"("prediction_type": "epsilon", "interpolation_type": "linear", "use_karras_sigmas": false, "use_exponential_sigmas": false,
                      "use_beta_sigmas": false, "sigma_min": null, "sigma_max": null, "timestep_spacing": "linspace",
                      "timestep_type": "discrete", "steps_offset": 0, "rescale_betas_zero_snr": false, "final_sigmas_type": "zero")"
                 : R"("prediction_type": "epsilon", "timestep_spacing": "linspace", "steps_offset": 0, "rescale_betas_zero_snr": false)",
             name == "euler" ? R"({"use_exponential_sigmas": [false], "use_beta_sigmas": [false], "interpolation_type": ["linear"],
                                   "final_sigmas_type": ["zero", "sigma_min"]})"
                             : "",
             name == "euler" ? std::vector<std::string>{"epsilon", "v_prediction", "sample"} : std::vector<std::string>{"epsilon", "v_prediction"}) {
    if (name == "euler" && o_.str("timestep_type") != "discrete" && prediction_ == "v_prediction")
      throw UnsupportedConfig(cls_ + " with timestep_type='" + o_.str("timestep_type") +
                              "' and v_prediction is not supported by the runtime pipeline (supported: 'discrete')");
    if (o_.flag("rescale_betas_zero_snr")) ac_.back() = std::ldexp(1.0f, -24);
  }

  float init_noise_sigma(int steps) override {
    timesteps(steps);
    const float top = *std::max_element(sigmas_.begin(), sigmas_.end());
    const std::string sp = o_.str("timestep_spacing");
    return (sp == "linspace" || sp == "trailing") ? top : std::sqrt(top * top + 1);
  }

  Vec scale_model_input(const Vec& x, int i, int steps) override {
    timesteps(steps);
    const float s = std::sqrt(sigmas_[i] * sigmas_[i] + 1);
    Vec r(x.size());
    for (size_t k = 0; k < x.size(); ++k) r[k] = x[k] / s;
    return r;
  }

  Vec step(const Vec& out, int i, const Vec& x, int steps, const Vec*) override {
    timesteps(steps);
    const float sigma = sigmas_[i], nxt = sigmas_[i + 1];
    Vec p0 = x0_sigma(out, x, sigma);
    Vec r(x.size());
    for (size_t k = 0; k < x.size(); ++k) r[k] = x[k] + (x[k] - p0[k]) / sigma * (nxt - sigma);
    return r;
  }

 protected:
  void schedule(int steps) override {
    std::vector<double> ts = spacing(o_, steps, false);
    std::vector<float> full(ac_.size());
    for (size_t k = 0; k < ac_.size(); ++k) full[k] = std::sqrt((1 - ac_[k]) / ac_[k]);
    std::vector<double> sig;
    for (double& t : ts) {
      t = static_cast<float>(t);
      sig.push_back(interp(t, full));
    }
    if (o_.flag("use_karras_sigmas")) {
      const double lo = o_.null("sigma_min") ? sig.back() : o_.num("sigma_min");
      const double hi = o_.null("sigma_max") ? sig.front() : o_.num("sigma_max");
      sig = karras(lo, hi, steps);
      std::vector<float> log_sigmas(full.size());
      for (size_t k = 0; k < full.size(); ++k) log_sigmas[k] = std::log(full[k]);
      for (size_t k = 0; k < sig.size(); ++k) ts[k] = static_cast<float>(sigma_to_t(sig[k], log_sigmas));
    }
    const float last = o_.str("final_sigmas_type") == "sigma_min" ? std::sqrt((1 - ac_[0]) / ac_[0]) : 0.f;
    ts_ = ts;
    sigmas_.clear();
    for (double s : sig) sigmas_.push_back(static_cast<float>(s));
    sigmas_.push_back(last);
  }

  Vec x0_sigma(const Vec& out, const Vec& x, float sigma) const {
    if (prediction_ == "epsilon") return axpby(1.f, x, -sigma, out);
    if (prediction_ == "v_prediction") return axpby(-sigma / std::sqrt(sigma * sigma + 1), out, 1.f / (sigma * sigma + 1), x);
    return out;
  }
};

class EulerAncestral : public Euler {
 public:
  explicit EulerAncestral(const Json& c) : Euler(c, "euler-ancestral") {}
  bool stochastic() const override { return true; }

  Vec step(const Vec& out, int i, const Vec& x, int steps, const Vec* noise) override {
    timesteps(steps);
    const float s_from = sigmas_[i], s_to = sigmas_[i + 1];
    const float up = std::sqrt(s_to * s_to * (s_from * s_from - s_to * s_to) / (s_from * s_from));
    const float down = std::sqrt(s_to * s_to - up * up);
    Vec p0 = x0_sigma(out, x, s_from);
    Vec r(x.size());
    for (size_t k = 0; k < x.size(); ++k) r[k] = x[k] + (x[k] - p0[k]) / s_from * (down - s_from);
    if (up != 0) {
      if (!noise) throw std::runtime_error("euler-ancestral: step needs noise at every step but the last");
      for (size_t k = 0; k < x.size(); ++k) r[k] = r[k] + (*noise)[k] * up;
    }
    return r;
  }
};

// ------------------------------------------------------------------------------- DPM-Solver++ 2M

class DPMPP2M : public Base {
 public:
  DPMPP2M(const Json& c, const std::string& name)
      : Base(name, c,
             R"("solver_order": 2, "prediction_type": "epsilon", "thresholding": false, "dynamic_thresholding_ratio": 0.995,
                "sample_max_value": 1.0, "algorithm_type": "dpmsolver++", "solver_type": "midpoint", "lower_order_final": true,
                "euler_at_final": false, "use_karras_sigmas": false, "use_exponential_sigmas": false, "use_beta_sigmas": false,
                "use_lu_lambdas": false, "use_flow_sigmas": false, "flow_shift": 1.0, "final_sigmas_type": "zero",
                "lambda_min_clipped": -Infinity, "variance_type": null, "timestep_spacing": "linspace", "steps_offset": 0,
                "rescale_betas_zero_snr": false, "use_dynamic_shifting": false, "time_shift_type": "exponential")",
             R"({"use_exponential_sigmas": [false], "use_beta_sigmas": [false], "thresholding": [false], "use_lu_lambdas": [false],
                 "use_flow_sigmas": [false], "use_dynamic_shifting": [false], "variance_type": [null],
                 "final_sigmas_type": ["zero", "sigma_min"], "solver_type": ["midpoint", "heun", "logrho", "bh1", "bh2"]})") {
    if (o_.flag("rescale_betas_zero_snr")) ac_.back() = std::ldexp(1.0f, -24);
    heun_ = o_.str("solver_type") == "heun";
  }
  void reset() override { outputs_.clear(); }

  Vec step(const Vec& out, int i, const Vec& x, int steps, const Vec*) override {
    timesteps(steps);
    if (i == 0) reset();
    const int n = static_cast<int>(ts_.size());
    const bool final_first = i == n - 1 && (o_.flag("euler_at_final") || (o_.flag("lower_order_final") && n < 15) ||
                                            o_.str("final_sigmas_type") == "zero");
    float alpha_s0, sigma_s0, lam_s0, alpha_t, sigma_t, lam_t;
    alpha_sigma(sigmas_[i], alpha_s0, sigma_s0, lam_s0);
    Vec p0;
    if (prediction_ == "epsilon") {
      p0.resize(x.size());
      for (size_t k = 0; k < x.size(); ++k) p0[k] = (x[k] - sigma_s0 * out[k]) / alpha_s0;
    } else if (prediction_ == "v_prediction") {
      p0 = axpby(alpha_s0, x, -sigma_s0, out);
    } else {
      p0 = out;
    }
    if (outputs_.size() >= 2) outputs_.erase(outputs_.begin());
    outputs_.push_back(p0);
    alpha_sigma(sigmas_[i + 1], alpha_t, sigma_t, lam_t);
    const float h = lam_t - lam_s0;
    const float em1 = std::exp(-h) - 1.0f;
    Vec r(x.size());
    if (outputs_.size() < 2 || final_first) {
      for (size_t k = 0; k < x.size(); ++k) r[k] = (sigma_t / sigma_s0) * x[k] - (alpha_t * em1) * p0[k];
    } else {
      float a1, s1, lam_s1;
      alpha_sigma(sigmas_[i - 1], a1, s1, lam_s1);
      const Vec& m0 = outputs_[1];
      const Vec& m1 = outputs_[0];
      const float r0 = (lam_s0 - lam_s1) / h;
      for (size_t k = 0; k < x.size(); ++k) {
        const float d1 = (1.0f / r0) * (m0[k] - m1[k]);
        float v = (sigma_t / sigma_s0) * x[k] - (alpha_t * em1) * m0[k];
        if (heun_) v = v + (alpha_t * (em1 / h + 1.0f)) * d1;
        else v = v - 0.5f * (alpha_t * em1) * d1;
        r[k] = v;
      }
    }
    return r;
  }

 private:
  bool heun_ = false;
  std::vector<Vec> outputs_;

  static void alpha_sigma(float sigma, float& alpha, float& s, float& lam) {
    alpha = 1.0f / std::sqrt(sigma * sigma + 1);
    s = sigma * alpha;
    lam = std::log(alpha) - std::log(s);
  }

  void schedule(int steps) override {
    std::vector<float> lam(ac_.size());
    for (size_t k = 0; k < ac_.size(); ++k) lam[k] = std::log(std::sqrt(ac_[k])) - std::log(std::sqrt(1 - ac_[k]));
    const double clipped = o_.num("lambda_min_clipped");
    int below = 0;  // searchsorted(lam[::-1], clipped): lam[::-1] ascends
    for (auto it = lam.rbegin(); it != lam.rend(); ++it)
      if (*it < clipped) ++below;
    const int last = T_ - below;
    const std::string sp = o_.str("timestep_spacing");
    std::vector<double> ts;
    if (sp == "linspace") {
      ts = linspace(0, last - 1, steps + 1);
      for (double& v : ts) v = np_round(v);
      std::reverse(ts.begin(), ts.end());
      ts.pop_back();
    } else if (sp == "leading") {
      for (int i = 0; i < steps + 1; ++i) ts.push_back(np_round(static_cast<double>(i) * (last / (steps + 1))));
      std::reverse(ts.begin(), ts.end());
      ts.pop_back();
      for (double& v : ts) v += o_.num("steps_offset");
    } else if (sp == "trailing") {
      ts = arange(last, 0, -static_cast<double>(T_) / steps);
      for (double& v : ts) v = np_round(v) - 1;
    } else {
      throw UnsupportedConfig("timestep_spacing '" + sp + "' is not supported by the runtime pipeline (leading, trailing, linspace)");
    }
    for (double& v : ts) v = static_cast<double>(static_cast<int64_t>(v));
    std::vector<float> full(ac_.size());
    for (size_t k = 0; k < ac_.size(); ++k) full[k] = std::sqrt((1 - ac_[k]) / ac_[k]);
    std::vector<double> sig;
    if (o_.flag("use_karras_sigmas")) {
      sig = karras(full.front(), full.back(), steps);
      std::vector<float> log_sigmas(full.size());
      for (size_t k = 0; k < full.size(); ++k) log_sigmas[k] = std::log(full[k]);
      ts.clear();
      for (double s : sig) {
        double t = sigma_to_t(s, log_sigmas);
        if (o_.str("beta_schedule") != "squaredcos_cap_v2") t = np_round(t);
        ts.push_back(static_cast<double>(static_cast<int64_t>(t)));
      }
    } else {
      for (double t : ts) sig.push_back(interp(t, full));
    }
    const float fin = o_.str("final_sigmas_type") == "sigma_min" ? std::sqrt((1 - ac_[0]) / ac_[0]) : 0.f;
    ts_ = ts;
    sigmas_.clear();
    for (double s : sig) sigmas_.push_back(static_cast<float>(s));
    sigmas_.push_back(fin);
  }
};

// --------------------------------------------------------------------------------------------- LCM

class LCM : public Base {
 public:
  explicit LCM(const Json& c)
      : Base("lcm", c,
             R"("beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "original_inference_steps": 50,
                "clip_sample": false, "clip_sample_range": 1.0, "set_alpha_to_one": true, "steps_offset": 0, "prediction_type": "epsilon",
                "thresholding": false, "dynamic_thresholding_ratio": 0.995, "sample_max_value": 1.0, "timestep_spacing": "leading",
                "timestep_scaling": 10.0, "rescale_betas_zero_snr": false)",
             R"({"thresholding": [false]})") {
    original_ = static_cast<int>(o_.num("original_inference_steps"));
    scaling_ = static_cast<float>(o_.num("timestep_scaling"));
    clip_ = o_.flag("clip_sample");
    clip_range_ = static_cast<float>(o_.num("clip_sample_range"));
    if (original_ < 1 || original_ > T_)
      throw UnsupportedConfig("original_inference_steps=" + std::to_string(original_) + " must be in 1.." + std::to_string(T_));
  }
  bool stochastic() const override { return true; }

  Vec step(const Vec& out, int i, const Vec& x, int steps, const Vec* noise) override {
    timesteps(steps);
    const int t = static_cast<int>(ts_[i]);
    Vec p0 = x0(out, x, ac_[t]);
    if (clip_)
      for (float& v : p0) v = std::min(std::max(v, -clip_range_), clip_range_);
    const float s = static_cast<float>(t * static_cast<double>(scaling_));
    const float sd2 = 0.25f;
    const float c_skip = sd2 / (s * s + sd2), c_out = s / std::sqrt(s * s + sd2);
    Vec denoised = axpby(c_out, p0, c_skip, x);
    if (i == static_cast<int>(ts_.size()) - 1) return denoised;
    if (!noise) throw std::runtime_error("lcm: step needs noise at every step but the last");
    const float a_prev = ac_[static_cast<size_t>(ts_[i + 1])];
    return axpby(std::sqrt(a_prev), denoised, std::sqrt(1 - a_prev), *noise);
  }

 private:
  int original_ = 50;
  float scaling_ = 10;
  bool clip_ = false;
  float clip_range_ = 1;

  void check_steps(int steps) const override {
    if (steps < 1 || steps > original_)
      throw UnsupportedConfig("the LCM scheduler takes 1.." + std::to_string(original_) + " steps (original_inference_steps), got " +
                              std::to_string(steps));
  }
  void schedule(int steps) override {
    const int k = T_ / original_;
    std::vector<double> origin;
    for (int j = original_; j >= 1; --j) origin.push_back(static_cast<double>(j * k - 1));
    ts_.clear();
    for (double v : linspace(0, static_cast<double>(origin.size()), steps, false)) ts_.push_back(origin[static_cast<size_t>(std::floor(v))]);
  }
};

}  // namespace

std::vector<std::string> scheduler_names() {
  std::vector<std::string> out;
  for (const NameInfo& n : kNames) out.push_back(n.name);
  return out;
}

std::unique_ptr<Scheduler> make_scheduler(const Json& config, const std::string& requested) {
  std::string name = requested;
  Json values = Json::object();
  if (name.empty()) {
    const std::string cls = config.string_or("_class_name", "DDIMScheduler");
    for (const NameInfo& n : kNames)
      if (cls == n.cls && name.empty()) name = n.name;
    if (name.empty()) {
      std::string all;
      for (const NameInfo& n : kNames) all += std::string(all.empty() ? "" : ", ") + n.name;
      throw UnsupportedConfig("no scheduler for '" + cls + "'; pass --scheduler with one of: " + all);
    }
    if (name == "dpmpp-2m" && config.bool_or("use_karras_sigmas", false)) name = "dpmpp-2m-karras";
    values = config;
  } else {
    const NameInfo& ni = info(name);
    const Json assumed = Json::parse(ni.assumed), forced = Json::parse(ni.forced);
    for (const auto& kv : assumed.as_object()) values.set(kv.first, kv.second);
    for (const auto& kv : config.as_object()) values.set(kv.first, kv.second);
    for (const auto& kv : forced.as_object()) values.set(kv.first, kv.second);
  }
  if (name == "ddim") return std::make_unique<DDIM>(values);
  if (name == "pndm") return std::make_unique<PNDM>(values);
  if (name == "euler") return std::make_unique<Euler>(values);
  if (name == "euler-ancestral") return std::make_unique<EulerAncestral>(values);
  if (name == "dpmpp-2m" || name == "dpmpp-2m-karras") return std::make_unique<DPMPP2M>(values, name);
  return std::make_unique<LCM>(values);
}

}  // namespace pf
