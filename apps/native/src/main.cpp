// pf-run: run a pocketfusion export directory with ExecuTorch's C++ runtime.
//
//   pf-run generate EXPORT_DIR --prompt TEXT [--steps N] [--guidance G] [--seed S] [--scheduler NAME]
//                              [--noise FILE.npy] [--threads N] [--save-latents FILE.npy] -o OUT.png
//   pf-run check EXPORT_DIR [--tolerance X] [--threads N] [--json OUT]
//   pf-run bench EXPORT_DIR --json OUT [--runs N] [--warmup N] [--threads N] [--steps N] [--no-end-to-end]
//   pf-run tokenize EXPORT_DIR --prompt TEXT [--max-length N]
//   pf-run randn --seed S --numel N                 (torch.randn's numbers, one per line)
//   pf-run version
//
// Exit status: 0 success, 1 `check` beyond tolerance, 2 bad input (one `error:` line on stderr).
#include <sys/utsname.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <fstream>
#include <functional>
#include <iostream>
#include <map>
#include <string>
#include <thread>
#include <vector>

#include "array.h"
#include "json.h"
#include "pipeline.h"

#ifndef PF_VERSION
#define PF_VERSION "0.0.0"
#endif
#ifndef PF_EXECUTORCH_VERSION
#define PF_EXECUTORCH_VERSION "unknown"
#endif

using namespace pf;

namespace {

const char* kUsage =
    "usage: pf-run generate EXPORT_DIR --prompt TEXT [--steps N] [--guidance G] [--seed S] [--scheduler NAME]\n"
    "                       [--noise FILE.npy] [--threads N] [--save-latents FILE.npy] [--no-verify] -o OUT.png\n"
    "       pf-run check EXPORT_DIR [--tolerance X] [--threads N] [--json OUT] [--no-verify]\n"
    "       pf-run bench EXPORT_DIR --json OUT [--runs N] [--warmup N] [--threads N] [--steps N] [--no-end-to-end]\n"
    "       pf-run tokenize EXPORT_DIR --prompt TEXT [--max-length N]\n"
    "       pf-run randn --seed S --numel N\n"
    "       pf-run version\n"
    "--verbose shows ExecuTorch's own log lines.\n";

struct Args {
  std::string command, dir;
  std::map<std::string, std::string> opts;
  std::vector<std::string> flags;
  bool flag(const std::string& f) const { return std::find(flags.begin(), flags.end(), f) != flags.end(); }
  bool has(const std::string& k) const { return opts.count(k) > 0; }
  std::string get(const std::string& k, const std::string& d = "") const { return has(k) ? opts.at(k) : d; }
  double num(const std::string& k, double d) const {
    if (!has(k)) return d;
    try {
      size_t used = 0;
      double v = std::stod(opts.at(k), &used);
      if (used != opts.at(k).size()) throw std::invalid_argument("");
      return v;
    } catch (const std::exception&) {
      throw UserError(k + " needs a number, got '" + opts.at(k) + "'");
    }
  }
};

Args parse(int argc, char** argv) {
  static const std::vector<std::string> kFlags = {"--no-end-to-end", "--no-verify", "--verbose", "--help", "-h"};
  static const std::vector<std::string> kOpts = {"--prompt", "--steps", "--guidance", "--seed", "--scheduler", "--noise", "--threads",
                                                 "-o", "--output", "--tolerance", "--json", "--runs", "--warmup", "--max-length",
                                                 "--save-latents", "--numel"};
  Args a;
  if (argc < 2) throw UserError("no command given\n" + std::string(kUsage));
  a.command = argv[1];
  for (int i = 2; i < argc; ++i) {
    std::string s = argv[i];
    if (std::find(kFlags.begin(), kFlags.end(), s) != kFlags.end()) {
      a.flags.push_back(s);
    } else if (std::find(kOpts.begin(), kOpts.end(), s) != kOpts.end()) {
      if (i + 1 >= argc) throw UserError(s + " needs a value");
      a.opts[s == "--output" ? "-o" : s] = argv[++i];
    } else if (!s.empty() && s[0] == '-') {
      throw UserError("unknown option " + s + "\n" + kUsage);
    } else if (a.dir.empty()) {
      a.dir = s;
    } else {
      throw UserError("unexpected argument " + s);
    }
  }
  return a;
}

double now_ms() {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

std::string iso_now() {
  std::time_t t = std::time(nullptr);
  char buf[40];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%S+00:00", std::gmtime(&t));
  return buf;
}

long status_kib(const char* field) {
  std::ifstream f("/proc/self/status");
  std::string line;
  const std::string key = std::string(field) + ":";
  while (std::getline(f, line))
    if (line.rfind(key, 0) == 0) return std::stol(line.substr(key.size()));
  return -1;
}

std::string cpu_name() {
  std::ifstream f("/proc/cpuinfo");
  std::string line;
  while (std::getline(f, line))
    if (line.rfind("model name", 0) == 0 || line.rfind("Model", 0) == 0) {
      size_t p = line.find(':');
      if (p != std::string::npos) return line.substr(line.find_first_not_of(' ', p + 1));
    }
  struct utsname u;
  return uname(&u) == 0 ? u.machine : "unknown";
}

Json host_info() {
  struct utsname u;
  uname(&u);
  Json h = Json::object();
  h.set("machine", Json::string(u.machine));
  h.set("processor", Json::string(cpu_name()));
  h.set("cpus", Json::number(std::thread::hardware_concurrency()));
  h.set("os", Json::string(std::string(u.sysname) + " " + u.release));
  h.set("python", Json::null());
  h.set("peak_gflops_fp32", Json::null());
  return h;
}

Json versions() {
  Json v = Json::object();
  v.set("pf-run", Json::string(PF_VERSION));
  v.set("executorch", Json::string(PF_EXECUTORCH_VERSION));
  return v;
}

Json summary(std::vector<double> lat) {
  std::sort(lat.begin(), lat.end());
  auto pct = [&](double q) {  // numpy's linear interpolation
    const double pos = q * (lat.size() - 1);
    const size_t lo = static_cast<size_t>(std::floor(pos));
    const size_t hi = std::min(lo + 1, lat.size() - 1);
    return lat[lo] + (lat[hi] - lat[lo]) * (pos - lo);
  };
  Json s = Json::object();
  s.set("median", Json::number(pct(0.5)));
  s.set("p90", Json::number(pct(0.9)));
  s.set("min", Json::number(lat.front()));
  s.set("max", Json::number(lat.back()));
  s.set("runs", Json::number(static_cast<double>(lat.size())));
  return s;
}

void write_text(const std::string& path, const std::string& text) {
  const std::string tmp = path + ".partial";
  {
    std::ofstream f(tmp);
    if (!f) throw UserError("cannot write " + path);
    f << text;
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) throw UserError("cannot write " + path);
}

// ---------------------------------------------------------------------------------------- generate

int cmd_generate(const Args& a) {
  if (a.dir.empty()) throw UserError("generate needs EXPORT_DIR");
  if (!a.has("--prompt")) throw UserError("generate needs --prompt TEXT");
  if (!a.has("-o")) throw UserError("generate needs -o OUT.png");
  Session::set_threads(static_cast<int>(a.num("--threads", 0)));
  ExportDir dir = ExportDir::open(a.dir, !a.flag("--no-verify"));
  Pipeline pipe(dir, a.get("--scheduler"));
  const int steps = static_cast<int>(a.num("--steps", 0));
  if (a.has("--steps") && steps < 1) throw UserError("--steps must be >= 1");
  const double seed = a.num("--seed", 0);
  NoiseSource noise(static_cast<uint64_t>(seed), pipe.sampler().latent_shape, a.get("--noise"));
  int w = 0, h = 0;
  Timings tm;
  Vec latents;
  std::vector<uint8_t> rgb;
  try {
    rgb = pipe.generate(a.get("--prompt"), steps, static_cast<float>(a.num("--guidance", 4.0)), noise, &w, &h, &tm, &latents);
  } catch (const UnsupportedConfig& e) {
    throw UserError(e.what());
  }
  write_png(a.get("-o"), w, h, rgb);
  if (a.has("--save-latents")) {
    Array l(DType::F32, pipe.sampler().latent_shape);
    std::memcpy(l.data(), latents.data(), latents.size() * sizeof(float));
    write_npy(a.get("--save-latents"), l);
  }
  std::fprintf(stderr, "%s: %dx%d, %s %d steps, %d U-Net calls; text %.1f ms, U-Net %.1f ms, VAE %.1f ms, total %.1f ms\n",
               a.get("-o").c_str(), w, h, pipe.scheduler().name().c_str(), steps > 0 ? steps : pipe.sampler().default_steps,
               tm.unet_calls, tm.text_ms, tm.unet_ms, tm.vae_ms, tm.total_ms);
  return 0;
}

// ------------------------------------------------------------------------------------------- check

int cmd_check(const Args& a) {
  if (a.dir.empty()) throw UserError("check needs EXPORT_DIR");
  Session::set_threads(static_cast<int>(a.num("--threads", 0)));
  ExportDir dir = ExportDir::open(a.dir, !a.flag("--no-verify"));
  if (dir.components.empty()) throw UserError(a.dir + " has no executorch components");
  bool all_ok = true;
  Json results = Json::array();
  std::printf("%-16s %5s %12s %12s %10s  %s\n", "component", "feeds", "rel_max", "max_abs", "tolerance", "status");
  for (const Component& c : dir.components) {
    if (c.golden.empty()) {
      std::printf("%-16s %5s %12s %12s %10s  %s\n", c.name.c_str(), "-", "-", "-", "-", "no golden data");
      continue;
    }
    auto golden = read_safetensors(dir.resolve(c.golden));
    Session s(dir.resolve(c.path));
    double max_abs = 0, peak = 0;
    int feeds = 0;
    for (int i = 0;; ++i) {
      const std::string pre = std::to_string(i) + ".";
      std::map<std::string, Array> in, ref;
      for (const auto& kv : golden) {
        if (kv.first.rfind(pre + "in.", 0) == 0) in[kv.first.substr(pre.size() + 3)] = kv.second;
        if (kv.first.rfind(pre + "out.", 0) == 0) ref[kv.first.substr(pre.size() + 4)] = kv.second;
      }
      if (in.empty()) break;
      ++feeds;
      auto got = s.run(in);
      for (const auto& kv : ref) {
        auto it = got.find(kv.first);
        if (it == got.end()) throw UserError(c.key() + ": the program gives no output " + kv.first);
        std::vector<float> g = it->second.to_float(), r = kv.second.to_float();
        if (g.size() != r.size()) throw UserError(c.key() + ": output " + kv.first + " has " + std::to_string(g.size()) + " values, the golden " + std::to_string(r.size()));
        for (size_t k = 0; k < r.size(); ++k) {
          max_abs = std::max(max_abs, std::fabs(static_cast<double>(g[k]) - r[k]));
          peak = std::max(peak, std::fabs(static_cast<double>(r[k])));
        }
      }
    }
    const double rel = max_abs / std::max(peak, 1e-12);
    const double tol = a.has("--tolerance") ? a.num("--tolerance", 1e-4) : dir.tolerance(c);
    const bool ok = rel <= tol;
    all_ok = all_ok && ok;
    std::printf("%-16s %5d %12.3e %12.3e %10.0e  %s\n", c.name.c_str(), feeds, rel, max_abs, tol, ok ? "pass" : "FAIL");
    Json r = Json::object();
    r.set("component", Json::string(c.name));
    r.set("feeds", Json::number(feeds));
    r.set("rel_max", Json::number(rel));
    r.set("max_abs", Json::number(max_abs));
    r.set("ref_max_abs", Json::number(peak));
    r.set("tolerance", Json::number(tol));
    r.set("status", Json::string(ok ? "pass" : "fail"));
    results.push(r);
  }
  if (a.has("--json")) {
    Json out = Json::object();
    out.set("schema", Json::string("pocketfusion.native-check"));
    out.set("device", Json::string(Session::device()));
    out.set("host", host_info());
    out.set("artifact", Json::string(a.dir));
    out.set("results", results);
    write_text(a.get("--json"), out.dump(2) + "\n");
  }
  if (!all_ok) std::fprintf(stderr, "error: %s: a component's relative error exceeds its tolerance\n", a.dir.c_str());
  return all_ok ? 0 : 1;
}

// ------------------------------------------------------------------------------------------- bench

const char* kBenchPrompt = "a large red circle on a blue background, center";

// one measurement; in a forked child so that each component's peak RSS is its own
Json measure(const ExportDir& dir, const std::string& component, int runs, int warmup, int steps) {
  {
    std::ofstream clear("/proc/self/clear_refs");  // "5": reset the peak RSS to the current RSS (Linux >= 4.0)
    if (clear) clear << "5";
  }
  const long base = status_kib("VmRSS");
  const double t0 = now_ms();
  std::vector<double> lat;
  std::function<void()> call;
  std::unique_ptr<Session> session;
  std::unique_ptr<Pipeline> pipe;
  std::map<std::string, Array> feeds;
  std::unique_ptr<NoiseSource> noise;
  if (component == "end_to_end") {
    pipe = std::make_unique<Pipeline>(dir);
    call = [&] {
      NoiseSource n(0, pipe->sampler().latent_shape);
      int w, h;
      pipe->generate(kBenchPrompt, steps, 4.0f, n, &w, &h);
    };
  } else {
    const Component* c = dir.find(component);
    session = std::make_unique<Session>(dir.resolve(c->path));
    auto golden = read_safetensors(dir.resolve(c->golden));
    for (const auto& kv : golden)
      if (kv.first.rfind("0.in.", 0) == 0) feeds[kv.first.substr(5)] = kv.second;
    call = [&] { session->run(feeds); };
  }
  const double load_ms = now_ms() - t0;
  for (int i = 0; i < warmup; ++i) call();
  for (int i = 0; i < runs; ++i) {
    const double t = now_ms();
    call();
    lat.push_back(now_ms() - t);
  }
  const long peak = status_kib("VmHWM");
  Json r = Json::object();
  r.set("load_ms", Json::number(load_ms));
  Json l = Json::array();
  for (double v : lat) l.push(Json::number(v));
  r.set("latencies_ms", l);
  r.set("peak_rss_mib", Json::number(peak / 1024.0));
  r.set("baseline_rss_mib", Json::number(base / 1024.0));
  r.set("rss_growth_mib", Json::number((peak - base) / 1024.0));
  return r;
}

Json measure_in_child(const ExportDir& dir, const std::string& component, int runs, int warmup, int steps) {
  int fds[2];
  if (pipe(fds) != 0) return measure(dir, component, runs, warmup, steps);
  std::fflush(nullptr);
  pid_t pid = fork();
  if (pid < 0) {
    close(fds[0]);
    close(fds[1]);
    return measure(dir, component, runs, warmup, steps);
  }
  if (pid == 0) {
    close(fds[0]);
    int rc = 0;
    std::string text;
    try {
      text = measure(dir, component, runs, warmup, steps).dump();
    } catch (const std::exception& e) {
      Json err = Json::object();
      err.set("error", Json::string(e.what()));
      text = err.dump();
      rc = 3;
    }
    size_t off = 0;
    while (off < text.size()) {
      ssize_t n = write(fds[1], text.data() + off, text.size() - off);
      if (n <= 0) break;
      off += static_cast<size_t>(n);
    }
    close(fds[1]);
    _exit(rc);
  }
  close(fds[1]);
  std::string text;
  char buf[4096];
  ssize_t n;
  while ((n = read(fds[0], buf, sizeof buf)) > 0) text.append(buf, static_cast<size_t>(n));
  close(fds[0]);
  int status = 0;
  waitpid(pid, &status, 0);
  if (text.empty()) throw std::runtime_error("measurement of executorch/" + component + " died (status " + std::to_string(status) + ")");
  Json r = Json::parse(text);
  if (r.has("error")) throw std::runtime_error("measurement of executorch/" + component + " failed: " + r["error"].as_string());
  return r;
}

int cmd_bench(const Args& a) {
  if (a.dir.empty()) throw UserError("bench needs EXPORT_DIR");
  if (!a.has("--json")) throw UserError("bench needs --json OUT");
  const int runs = static_cast<int>(a.num("--runs", 20)), warmup = static_cast<int>(a.num("--warmup", 3));
  if (runs < 1 || warmup < 0) throw UserError("--runs must be >= 1, --warmup >= 0");
  const int threads = static_cast<int>(a.num("--threads", 0));
  Session::set_threads(threads);
  ExportDir dir = ExportDir::open(a.dir, !a.flag("--no-verify"));
  std::vector<std::string> jobs;
  for (const Component& c : dir.components)
    if (!c.golden.empty()) jobs.push_back(c.name);
  const bool e2e = !a.flag("--no-end-to-end") && dir.sampler && dir.find("text_encoder") && dir.find("unet") && dir.find("vae_decoder");
  const int steps = a.has("--steps") ? static_cast<int>(a.num("--steps", 1)) : (dir.sampler ? dir.sampler->default_steps : 1);
  if (e2e) jobs.push_back("end_to_end");
  if (jobs.empty()) throw UserError(a.dir + ": nothing to benchmark (no executorch components with golden inputs)");
  Json results = Json::array();
  char real[4096];
  const std::string abs = realpath(a.dir.c_str(), real) ? real : a.dir;
  std::string label = abs.substr(abs.find_last_of('/') + 1);
  for (const std::string& job : jobs) {
    const bool whole = job == "end_to_end";
    Json m = measure_in_child(dir, job, whole ? std::max(1, std::min(runs, 3)) : runs, whole ? std::min(warmup, 1) : warmup, steps);
    std::vector<double> lat;
    for (const Json& v : m["latencies_ms"].as_array()) lat.push_back(v.as_number());
    Json r = Json::object();
    r.set("artifact", Json::string(label));
    r.set("runtime", Json::string("executorch"));
    r.set("runner", Json::string("pf-run"));
    r.set("component", Json::string(job));
    r.set("device", Json::string(Session::device()));
    r.set("load_ms", m["load_ms"]);
    r.set("latency_ms", summary(lat));
    r.set("latencies_ms", m["latencies_ms"]);
    r.set("peak_rss_mib", m["peak_rss_mib"]);
    r.set("rss_growth_mib", m["rss_growth_mib"]);
    const Component* c = dir.find(job);
    r.set("size_bytes", c && dir.size_bytes(*c) >= 0 ? Json::number(static_cast<double>(dir.size_bytes(*c))) : Json::null());
    if (whole) {
      r.set("steps", Json::number(steps));
      r.set("guidance_mode", Json::string(dir.sampler->guidance));
    }
    const Json& lm = r["latency_ms"];
    std::fprintf(stderr, "%-13s median %9.3f ms  p90 %9.3f ms  load %7.1f ms  peak %7.1f MiB\n", job.c_str(), lm["median"].as_number(),
                 lm["p90"].as_number(), m["load_ms"].as_number(), m["peak_rss_mib"].as_number());
    results.push(r);
  }
  Json out = Json::object();
  out.set("schema", Json::string("pocketfusion.bench"));
  out.set("schema_version", Json::number(1));
  out.set("created", Json::string(iso_now()));
  out.set("host", host_info());
  out.set("versions", versions());
  Json settings = Json::object();
  settings.set("threads", threads > 0 ? Json::number(threads) : Json::null());
  settings.set("runs", Json::number(runs));
  settings.set("warmup", Json::number(warmup));
  settings.set("rounds", Json::number(1));
  settings.set("steps", Json::number(steps));
  settings.set("end_to_end", Json::boolean(e2e));
  out.set("settings", settings);
  Json art = Json::object();
  art.set("label", Json::string(label));
  art.set("path", Json::string(abs));
  art.set("manifest_sha256", Json::string(sha256_file(a.dir + "/manifest.json")));
  Json arts = Json::array();
  arts.push(art);
  out.set("artifacts", arts);
  out.set("results", results);
  out.set("estimates", Json::array());
  Json notes = Json::array();
  notes.push(Json::string("measured by pf-run (ExecuTorch C++ runtime), each component in its own forked process"));
  out.set("notes", notes);
  write_text(a.get("--json"), out.dump(2) + "\n");
  return 0;
}

// ------------------------------------------------------------------------------------ small tools

int cmd_tokenize(const Args& a) {
  if (a.dir.empty() || !a.has("--prompt")) throw UserError("tokenize needs EXPORT_DIR and --prompt TEXT");
  ExportDir dir = ExportDir::open(a.dir, false);
  const std::string folder = dir.resolve(dir.sampler ? dir.sampler->tokenizer : "tokenizer");
  ClipTokenizer tok(folder);
  const int n = static_cast<int>(a.num("--max-length", dir.sampler ? dir.sampler->max_length : tok.model_max_length()));
  std::vector<int32_t> ids = tok.encode(a.get("--prompt"), n);
  for (size_t i = 0; i < ids.size(); ++i) std::printf("%s%d", i ? " " : "", ids[i]);
  std::printf("\n");
  return 0;
}

int cmd_randn(const Args& a) {
  TorchGenerator g(static_cast<uint64_t>(a.num("--seed", 0)));
  const int64_t n = static_cast<int64_t>(a.num("--numel", 16));
  for (float v : g.randn(n)) std::printf("%.9g\n", v);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    Args a = parse(argc, argv);
    Session::set_verbose(a.flag("--verbose"));
    if (a.flag("--help") || a.flag("-h") || a.command == "help" || a.command == "--help" || a.command == "-h") {
      std::fputs(kUsage, stdout);
      return 0;
    }
    if (a.command == "generate") return cmd_generate(a);
    if (a.command == "check") return cmd_check(a);
    if (a.command == "bench") return cmd_bench(a);
    if (a.command == "tokenize") return cmd_tokenize(a);
    if (a.command == "randn") return cmd_randn(a);
    if (a.command == "version") {
      std::printf("pf-run %s (%s)\n", PF_VERSION, Session::device().c_str());
      return 0;
    }
    throw UserError("unknown command '" + a.command + "'\n" + kUsage);
  } catch (const UserError& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 3;
  }
}
