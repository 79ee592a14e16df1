// One exported component, loaded with ExecuTorch's runtime (extension::Module: the .pte's `forward`), called
// with named host arrays. Names come from the exporter's <file>.pte.io.json (a .pte keeps none); without it
// inputs and outputs are input_0, input_1, ... as in pocketfusion's Python adapter.
#pragma once

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "array.h"

namespace pf {

class Session {
 public:
  explicit Session(const std::string& pte_path);  // throws std::runtime_error naming the file
  ~Session();
  Session(const Session&) = delete;
  Session& operator=(const Session&) = delete;

  std::map<std::string, Array> run(const std::map<std::string, Array>& feeds);
  const std::vector<std::string>& input_names() const { return inputs_; }
  const std::vector<std::string>& output_names() const { return outputs_; }
  const std::string& path() const { return path_; }

  static void set_threads(int n);        // ExecuTorch's shared thread pool (0: leave as is)
  static int threads();
  // ExecuTorch's own log lines (cpuinfo probing, load errors): shown with --verbose, else only fatal ones
  static void set_verbose(bool verbose);
  static std::string device();           // e.g. "executorch 1.5.1 portable+XNNPACK (CPU, C++)"

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
  std::string path_;
  std::vector<std::string> inputs_, outputs_;
};

}  // namespace pf
