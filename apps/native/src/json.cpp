#include "json.h"

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <limits>
#include <sstream>
#include <stdexcept>

namespace pf {

std::string read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error("cannot open " + path);
  std::ostringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

class JsonParser {
 public:
  explicit JsonParser(const std::string& t) : t_(t) {}

  Json parse_document() {
    Json v = value();
    ws();
    if (i_ != t_.size()) fail("trailing characters");
    return v;
  }

 private:
  const std::string& t_;
  size_t i_ = 0;

  [[noreturn]] void fail(const std::string& what) const {
    throw std::runtime_error("JSON: " + what + " at byte " + std::to_string(i_));
  }
  void ws() {
    while (i_ < t_.size() && (t_[i_] == ' ' || t_[i_] == '\n' || t_[i_] == '\r' || t_[i_] == '\t')) ++i_;
  }
  bool lit(const char* s) {
    size_t n = std::char_traits<char>::length(s);
    if (t_.compare(i_, n, s) == 0) {
      i_ += n;
      return true;
    }
    return false;
  }

  Json value() {
    ws();
    if (i_ >= t_.size()) fail("unexpected end");
    char c = t_[i_];
    Json v;
    if (c == '{') {
      ++i_;
      v.type_ = Json::Type::Object;
      ws();
      if (i_ < t_.size() && t_[i_] == '}') {
        ++i_;
        return v;
      }
      while (true) {
        ws();
        if (i_ >= t_.size() || t_[i_] != '"') fail("expected a key");
        std::string k = str();
        ws();
        if (i_ >= t_.size() || t_[i_] != ':') fail("expected ':'");
        ++i_;
        v.o_.emplace_back(std::move(k), value());
        ws();
        if (i_ < t_.size() && t_[i_] == ',') {
          ++i_;
          continue;
        }
        if (i_ < t_.size() && t_[i_] == '}') {
          ++i_;
          return v;
        }
        fail("expected ',' or '}'");
      }
    }
    if (c == '[') {
      ++i_;
      v.type_ = Json::Type::Array;
      ws();
      if (i_ < t_.size() && t_[i_] == ']') {
        ++i_;
        return v;
      }
      while (true) {
        v.a_.push_back(value());
        ws();
        if (i_ < t_.size() && t_[i_] == ',') {
          ++i_;
          continue;
        }
        if (i_ < t_.size() && t_[i_] == ']') {
          ++i_;
          return v;
        }
        fail("expected ',' or ']'");
      }
    }
    if (c == '"') {
      v.type_ = Json::Type::String;
      v.s_ = str();
      return v;
    }
    if (lit("true")) return Json::boolean(true);
    if (lit("false")) return Json::boolean(false);
    if (lit("null")) return Json();
    if (lit("NaN")) return Json::number(std::numeric_limits<double>::quiet_NaN());
    if (lit("Infinity")) return Json::number(std::numeric_limits<double>::infinity());
    if (lit("-Infinity")) return Json::number(-std::numeric_limits<double>::infinity());
    const char* start = t_.c_str() + i_;
    char* end = nullptr;
    double d = std::strtod(start, &end);
    if (end == start) fail("unexpected character");
    i_ += static_cast<size_t>(end - start);
    return Json::number(d);
  }


  uint32_t hex4() {
    if (i_ + 4 > t_.size()) fail("short \\u escape");
    uint32_t v = 0;
    for (int k = 0; k < 4; ++k) {
      char h = t_[i_++];
      v <<= 4;
      if (h >= '0' && h <= '9') v |= static_cast<uint32_t>(h - '0');
      else if (h >= 'a' && h <= 'f') v |= static_cast<uint32_t>(h - 'a' + 10);
      else if (h >= 'A' && h <= 'F') v |= static_cast<uint32_t>(h - 'A' + 10);
      else fail("bad \\u escape");
    }
    return v;
  }

  std::string str() {
    ++i_;  // opening quote
    std::string out;
    while (true) {
      if (i_ >= t_.size()) fail("unterminated string");
      char c = t_[i_++];
      if (c == '"') return out;
      if (c != '\\') {
        out += c;
        continue;
      }
      if (i_ >= t_.size()) fail("unterminated escape");
      char e = t_[i_++];
      switch (e) {
        case '"': out += '"'; break;
        case '\\': out += '\\'; break;
        case '/': out += '/'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'n': out += '\n'; break;
        case 'r': out += '\r'; break;
        case 't': out += '\t'; break;
        case 'u': {
          uint32_t cp = hex4();
          if (cp >= 0xD800 && cp < 0xDC00 && i_ + 6 <= t_.size() && t_[i_] == '\\' && t_[i_ + 1] == 'u') {
            i_ += 2;
            uint32_t lo = hex4();
            cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
          }
          append_utf8(out, cp);
          break;
        }
        default: fail("bad escape");
      }
    }
  }
};

Json Json::parse(const std::string& text) { return JsonParser(text).parse_document(); }

Json Json::parse_file(const std::string& path) {
  try {
    return parse(read_file(path));
  } catch (const std::runtime_error& e) {
    throw std::runtime_error(path + ": " + e.what());
  }
}

static const Json kNull;

bool Json::as_bool() const {
  if (type_ != Type::Bool) throw std::runtime_error("JSON: not a boolean");
  return b_;
}
double Json::as_number() const {
  if (type_ != Type::Number) throw std::runtime_error("JSON: not a number");
  return n_;
}
int64_t Json::as_int() const { return static_cast<int64_t>(std::llround(as_number())); }
const std::string& Json::as_string() const {
  if (type_ != Type::String) throw std::runtime_error("JSON: not a string");
  return s_;
}
const std::vector<Json>& Json::as_array() const {
  if (type_ != Type::Array) throw std::runtime_error("JSON: not an array");
  return a_;
}
const std::vector<std::pair<std::string, Json>>& Json::as_object() const {
  if (type_ != Type::Object) throw std::runtime_error("JSON: not an object");
  return o_;
}
bool Json::has(const std::string& key) const {
  if (type_ != Type::Object) return false;
  for (const auto& kv : o_)
    if (kv.first == key) return true;
  return false;
}
const Json& Json::operator[](const std::string& key) const {
  if (type_ == Type::Object)
    for (const auto& kv : o_)
      if (kv.first == key) return kv.second;
  return kNull;
}
const Json& Json::operator[](size_t i) const {
  if (type_ != Type::Array || i >= a_.size()) return kNull;
  return a_[i];
}
size_t Json::size() const { return type_ == Type::Array ? a_.size() : type_ == Type::Object ? o_.size() : 0; }

double Json::number_or(const std::string& key, double fallback) const {
  const Json& v = (*this)[key];
  return v.is_number() ? v.n_ : fallback;
}
std::string Json::string_or(const std::string& key, const std::string& fallback) const {
  const Json& v = (*this)[key];
  return v.is_string() ? v.s_ : fallback;
}
bool Json::bool_or(const std::string& key, bool fallback) const {
  const Json& v = (*this)[key];
  return v.is_bool() ? v.b_ : fallback;
}

Json Json::boolean(bool b) {
  Json j;
  j.type_ = Type::Bool;
  j.b_ = b;
  return j;
}
Json Json::number(double d) {
  Json j;
  j.type_ = Type::Number;
  j.n_ = d;
  return j;
}
Json Json::string(std::string s) {
  Json j;
  j.type_ = Type::String;
  j.s_ = std::move(s);
  return j;
}
Json Json::array() {
  Json j;
  j.type_ = Type::Array;
  return j;
}
Json Json::object() {
  Json j;
  j.type_ = Type::Object;
  return j;
}
Json& Json::push(Json v) {
  type_ = Type::Array;
  a_.push_back(std::move(v));
  return a_.back();
}
Json& Json::set(const std::string& key, Json v) {
  type_ = Type::Object;
  for (auto& kv : o_)
    if (kv.first == key) {
      kv.second = std::move(v);
      return kv.second;
    }
  o_.emplace_back(key, std::move(v));
  return o_.back().second;
}

static void escape(std::string& out, const std::string& s) {
  out += '"';
  for (unsigned char c : s) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      default:
        if (c < 0x20) {
          char buf[8];
          std::snprintf(buf, sizeof buf, "\\u%04x", c);
          out += buf;
        } else {
          out += static_cast<char>(c);
        }
    }
  }
  out += '"';
}

void Json::dump_to(std::string& out, int indent, int depth) const {
  auto nl = [&](int d) {
    if (indent < 0) return;
    out += '\n';
    out.append(static_cast<size_t>(indent * d), ' ');
  };
  switch (type_) {
    case Type::Null: out += "null"; break;
    case Type::Bool: out += b_ ? "true" : "false"; break;
    case Type::Number: {
      if (std::isnan(n_)) {
        out += "NaN";
      } else if (std::isinf(n_)) {
        out += n_ > 0 ? "Infinity" : "-Infinity";
      } else if (n_ == std::floor(n_) && std::fabs(n_) < 9e15) {
        out += std::to_string(static_cast<long long>(n_));
      } else {
        char buf[32];
        std::snprintf(buf, sizeof buf, "%.17g", n_);
        out += buf;
      }
      break;
    }
    case Type::String: escape(out, s_); break;
    case Type::Array: {
      out += '[';
      for (size_t k = 0; k < a_.size(); ++k) {
        if (k) out += indent < 0 ? ", " : ",";
        nl(depth + 1);
        a_[k].dump_to(out, indent, depth + 1);
      }
      if (!a_.empty()) nl(depth);
      out += ']';
      break;
    }
    case Type::Object: {
      out += '{';
      for (size_t k = 0; k < o_.size(); ++k) {
        if (k) out += indent < 0 ? ", " : ",";
        nl(depth + 1);
        escape(out, o_[k].first);
        out += ": ";
        o_[k].second.dump_to(out, indent, depth + 1);
      }
      if (!o_.empty()) nl(depth);
      out += '}';
      break;
    }
  }
}

std::string Json::dump(int indent) const {
  std::string out;
  dump_to(out, indent, 0);
  return out;
}

void append_utf8(std::string& out, uint32_t cp) {
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xC0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += static_cast<char>(0xE0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (cp >> 18));
    out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  }
}

}  // namespace pf
