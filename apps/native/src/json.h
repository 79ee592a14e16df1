// Minimal JSON reader/writer for manifests, tokenizer and scheduler configs (no third-party code).
// Accepts what Python's json module writes, including Infinity, -Infinity and NaN.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace pf {

class Json {
 public:
  enum class Type { Null, Bool, Number, String, Array, Object };

  Json() = default;
  static Json parse(const std::string& text);  // throws std::runtime_error with the byte offset
  static Json parse_file(const std::string& path);

  Type type() const { return type_; }
  bool is_null() const { return type_ == Type::Null; }
  bool is_bool() const { return type_ == Type::Bool; }
  bool is_number() const { return type_ == Type::Number; }
  bool is_string() const { return type_ == Type::String; }
  bool is_array() const { return type_ == Type::Array; }
  bool is_object() const { return type_ == Type::Object; }

  bool as_bool() const;
  double as_number() const;
  int64_t as_int() const;
  const std::string& as_string() const;
  const std::vector<Json>& as_array() const;
  const std::vector<std::pair<std::string, Json>>& as_object() const;  // in file order

  bool has(const std::string& key) const;
  const Json& operator[](const std::string& key) const;  // Null when absent (or not an object)
  const Json& operator[](size_t i) const;
  size_t size() const;

  // conveniences: the value, or `fallback` when absent / null
  double number_or(const std::string& key, double fallback) const;
  std::string string_or(const std::string& key, const std::string& fallback) const;
  bool bool_or(const std::string& key, bool fallback) const;

  // building (for writing results)
  static Json null() { return Json(); }
  static Json boolean(bool b);
  static Json number(double d);
  static Json string(std::string s);
  static Json array();
  static Json object();
  Json& push(Json v);                    // array append
  Json& set(const std::string& key, Json v);  // object insert / replace
  std::string dump(int indent = -1) const;

 private:
  Type type_ = Type::Null;
  bool b_ = false;
  double n_ = 0;
  std::string s_;
  std::vector<Json> a_;
  std::vector<std::pair<std::string, Json>> o_;
  friend class JsonParser;
  void dump_to(std::string& out, int indent, int depth) const;
};

std::string read_file(const std::string& path);  // throws std::runtime_error naming the path
void append_utf8(std::string& out, uint32_t cp);  // one code point as UTF-8 (JSON \u escapes, the BPE byte table)

}  // namespace pf
