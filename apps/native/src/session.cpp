#include "session.h"

#include <executorch/extension/module/module.h>
#include <executorch/extension/tensor/tensor.h>
#include <executorch/runtime/backend/interface.h>
#include <executorch/runtime/platform/platform.h>

#include <cstdio>
#include <cstring>
#include <fstream>
#include <stdexcept>

#include "json.h"

// The wheel ships no threadpool.h; these are the two functions of libexecutorch_threadpool.so that pf-run calls
// (ExecuTorch's extension/threadpool/threadpool.h declares them so).
namespace executorch::extension::threadpool {
class ThreadPool {
 public:
  size_t get_thread_count() const;
  bool _unsafe_reset_threadpool(uint32_t num_threads);
};
ThreadPool* get_threadpool();
}  // namespace executorch::extension::threadpool

#ifndef PF_EXECUTORCH_VERSION
#define PF_EXECUTORCH_VERSION "unknown"
#endif

namespace pf {

using executorch::aten::ScalarType;
using executorch::extension::Module;
using executorch::runtime::Error;
using executorch::runtime::EValue;

struct Session::Impl {
  std::unique_ptr<Module> module;
  std::vector<ScalarType> input_types;
};

static std::string err(Error e) { return "error " + std::to_string(static_cast<int>(e)); }

static ScalarType scalar_type(DType d) {
  switch (d) {
    case DType::F32: return ScalarType::Float;
    case DType::I32: return ScalarType::Int;
    case DType::I64: return ScalarType::Long;
    case DType::F64: return ScalarType::Double;
  }
  return ScalarType::Float;
}

static DType dtype_of(ScalarType t, const std::string& where) {
  switch (t) {
    case ScalarType::Float: return DType::F32;
    case ScalarType::Int: return DType::I32;
    case ScalarType::Long: return DType::I64;
    case ScalarType::Double: return DType::F64;
    default: throw std::runtime_error(where + ": unsupported tensor dtype " + std::to_string(static_cast<int>(t)));
  }
}

Session::Session(const std::string& pte_path) : impl_(std::make_unique<Impl>()), path_(pte_path) {
  if (!std::ifstream(pte_path).good()) throw std::runtime_error("artifact " + pte_path + " does not exist");
  impl_->module = std::make_unique<Module>(pte_path, Module::LoadMode::Mmap);
  Error e = impl_->module->load_forward();
  if (e != Error::Ok) throw std::runtime_error("executorch: cannot load " + pte_path + " (" + err(e) + ")");
  auto meta = impl_->module->method_meta("forward");
  if (!meta.ok()) throw std::runtime_error("executorch: " + pte_path + " has no forward method");
  const size_t n_in = meta->num_inputs(), n_out = meta->num_outputs();
  for (size_t i = 0; i < n_in; ++i) {
    auto info = meta->input_tensor_meta(i);
    impl_->input_types.push_back(info.ok() ? info->scalar_type() : ScalarType::Float);
  }
  std::ifstream names(pte_path + ".io.json");
  if (names.good()) {
    Json io = Json::parse_file(pte_path + ".io.json");
    for (const Json& n : io["inputs"].as_array()) inputs_.push_back(n.as_string());
    for (const Json& n : io["outputs"].as_array()) outputs_.push_back(n.as_string());
  } else {
    for (size_t i = 0; i < n_in; ++i) inputs_.push_back("input_" + std::to_string(i));
    for (size_t i = 0; i < n_out; ++i) outputs_.push_back("output_" + std::to_string(i));
  }
  if (inputs_.size() != n_in)
    throw std::runtime_error("executorch: " + pte_path + ".io.json names " + std::to_string(inputs_.size()) + " inputs, the program takes " +
                             std::to_string(n_in));
}

Session::~Session() = default;

std::map<std::string, Array> Session::run(const std::map<std::string, Array>& feeds) {
  std::vector<executorch::extension::TensorPtr> keep;
  std::vector<Array> converted;
  converted.reserve(inputs_.size());
  std::vector<EValue> args;
  for (size_t i = 0; i < inputs_.size(); ++i) {
    auto it = feeds.find(inputs_[i]);
    if (it == feeds.end()) {
      std::string all;
      for (const auto& n : inputs_) all += (all.empty() ? "" : ", ") + n;
      throw std::runtime_error("executorch: missing input " + inputs_[i] + "; the component takes " + all);
    }
    const ScalarType want = impl_->input_types[i];
    converted.push_back(it->second.as(dtype_of(want, path_)));
    Array& a = converted.back();
    std::vector<executorch::aten::SizesType> sizes(a.shape.begin(), a.shape.end());
    keep.push_back(executorch::extension::from_blob(a.data(), sizes, scalar_type(a.dtype)));
    args.emplace_back(*keep.back());
  }
  auto result = impl_->module->forward(args);
  if (!result.ok()) throw std::runtime_error("executorch: " + path_ + " forward failed (" + err(result.error()) + ")");
  std::map<std::string, Array> out;
  const auto& values = *result;
  for (size_t i = 0; i < values.size() && i < outputs_.size(); ++i) {
    if (!values[i].isTensor()) continue;
    const auto& t = values[i].toTensor();
    std::vector<int64_t> shape(t.sizes().begin(), t.sizes().end());
    Array a(dtype_of(t.scalar_type(), path_), shape);
    std::memcpy(a.data(), t.const_data_ptr(), a.nbytes());
    out.emplace(outputs_[i], std::move(a));
  }
  return out;
}

namespace {
bool g_verbose = false;
void emit_log(et_timestamp_t, et_pal_log_level_t level, const char* filename, const char*, size_t line, const char* message, size_t) {
  if (g_verbose || level == kFatal) std::fprintf(stderr, "executorch %c %s:%zu] %s\n", static_cast<char>(level), filename, line, message);
}
}  // namespace

void Session::set_verbose(bool verbose) {
  g_verbose = verbose;
  executorch::runtime::register_pal(executorch::runtime::PalImpl::create(emit_log, __FILE__));
}

int Session::threads() {
  auto* pool = executorch::extension::threadpool::get_threadpool();
  return pool ? static_cast<int>(pool->get_thread_count()) : 1;
}

void Session::set_threads(int n) {
  if (n > 0) executorch::extension::threadpool::get_threadpool()->_unsafe_reset_threadpool(static_cast<uint32_t>(n));
}

std::string Session::device() {
  const bool xnn = executorch::runtime::get_backend_class("XnnpackBackend") != nullptr;
  return std::string("executorch ") + PF_EXECUTORCH_VERSION + " portable" + (xnn ? "+XNNPACK" : "") + " (CPU, C++ pf-run)";
}

}  // namespace pf
