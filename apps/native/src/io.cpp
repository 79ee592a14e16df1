#include <array>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <stdexcept>

#include "array.h"
#include "json.h"

namespace pf {

const char* dtype_name(DType d) {
  switch (d) {
    case DType::F32: return "float32";
    case DType::I32: return "int32";
    case DType::I64: return "int64";
    case DType::F64: return "float64";
  }
  return "?";
}

size_t dtype_size(DType d) { return (d == DType::I64 || d == DType::F64) ? 8 : 4; }

Array::Array(DType d, std::vector<int64_t> s) : dtype(d), shape(std::move(s)) {
  storage.assign((nbytes() + 7) / 8, 0);
}

Array Array::f32(std::vector<int64_t> s, float fill) {
  Array a(DType::F32, std::move(s));
  float* p = a.f();
  for (int64_t i = 0; i < a.numel(); ++i) p[i] = fill;
  return a;
}

int64_t Array::numel() const {
  int64_t n = 1;
  for (int64_t s : shape) n *= s;
  return n;
}

std::vector<float> Array::to_float() const {
  std::vector<float> out(static_cast<size_t>(numel()));
  const void* p = data();
  for (size_t i = 0; i < out.size(); ++i) {
    switch (dtype) {
      case DType::F32: out[i] = static_cast<const float*>(p)[i]; break;
      case DType::F64: out[i] = static_cast<float>(static_cast<const double*>(p)[i]); break;
      case DType::I32: out[i] = static_cast<float>(static_cast<const int32_t*>(p)[i]); break;
      case DType::I64: out[i] = static_cast<float>(static_cast<const int64_t*>(p)[i]); break;
    }
  }
  return out;
}

Array Array::as(DType d) const {
  if (d == dtype) return *this;
  Array out(d, shape);
  const int64_t n = numel();
  for (int64_t i = 0; i < n; ++i) {
    double v = 0;
    switch (dtype) {
      case DType::F32: v = static_cast<const float*>(data())[i]; break;
      case DType::F64: v = static_cast<const double*>(data())[i]; break;
      case DType::I32: v = static_cast<const int32_t*>(data())[i]; break;
      case DType::I64: v = static_cast<double>(static_cast<const int64_t*>(data())[i]); break;
    }
    switch (d) {
      case DType::F32: static_cast<float*>(out.data())[i] = static_cast<float>(v); break;
      case DType::F64: static_cast<double*>(out.data())[i] = v; break;
      case DType::I32: static_cast<int32_t*>(out.data())[i] = static_cast<int32_t>(v); break;
      case DType::I64: static_cast<int64_t*>(out.data())[i] = static_cast<int64_t>(v); break;
    }
  }
  return out;
}

std::string Array::shape_str() const {
  std::string s = "(";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + (shape.size() == 1 ? ",)" : ")");
}

// ---------------------------------------------------------------------------------------------- npy

static DType npy_dtype(const std::string& descr, const std::string& path) {
  if (descr == "<f4" || descr == "|f4") return DType::F32;
  if (descr == "<f8") return DType::F64;
  if (descr == "<i4") return DType::I32;
  if (descr == "<i8") return DType::I64;
  throw std::runtime_error(path + ": unsupported .npy dtype " + descr + " (float32, float64, int32, int64)");
}

Array read_npy(const std::string& path) {
  std::string raw = read_file(path);
  if (raw.size() < 10 || raw.compare(0, 6, "\x93NUMPY") != 0) throw std::runtime_error(path + " is not a .npy file");
  const int major = static_cast<unsigned char>(raw[6]);
  size_t hlen, off;
  if (major == 1) {
    hlen = static_cast<unsigned char>(raw[8]) | (static_cast<size_t>(static_cast<unsigned char>(raw[9])) << 8);
    off = 10;
  } else {
    hlen = 0;
    for (int k = 0; k < 4; ++k) hlen |= static_cast<size_t>(static_cast<unsigned char>(raw[8 + k])) << (8 * k);
    off = 12;
  }
  std::string header = raw.substr(off, hlen);
  auto field = [&](const std::string& key) -> std::string {
    size_t p = header.find("'" + key + "'");
    if (p == std::string::npos) throw std::runtime_error(path + ": .npy header lacks " + key);
    p = header.find(':', p) + 1;
    while (header[p] == ' ') ++p;
    if (header[p] == '\'') {
      size_t e = header.find('\'', p + 1);
      return header.substr(p + 1, e - p - 1);
    }
    if (header[p] == '(') return header.substr(p + 1, header.find(')', p) - p - 1);
    size_t e = header.find_first_of(",}", p);
    return header.substr(p, e - p);
  };
  DType d = npy_dtype(field("descr"), path);
  if (field("fortran_order").find("True") != std::string::npos) throw std::runtime_error(path + ": Fortran-ordered .npy is not supported");
  std::vector<int64_t> shape;
  std::string dims = field("shape");
  size_t p = 0;
  while (p < dims.size()) {
    while (p < dims.size() && (dims[p] == ' ' || dims[p] == ',')) ++p;
    if (p >= dims.size()) break;
    size_t e = dims.find(',', p);
    shape.push_back(std::stoll(dims.substr(p, e == std::string::npos ? std::string::npos : e - p)));
    p = e == std::string::npos ? dims.size() : e;
  }
  Array a(d, shape);
  if (raw.size() < off + hlen + a.nbytes()) throw std::runtime_error(path + ": .npy data is truncated");
  std::memcpy(a.data(), raw.data() + off + hlen, a.nbytes());
  return a;
}

void write_npy(const std::string& path, const Array& a) {
  const char* descr = a.dtype == DType::F32 ? "<f4" : a.dtype == DType::F64 ? "<f8" : a.dtype == DType::I32 ? "<i4" : "<i8";
  std::string shape;
  for (size_t i = 0; i < a.shape.size(); ++i) shape += std::to_string(a.shape[i]) + (a.shape.size() == 1 || i + 1 < a.shape.size() ? "," : "");
  std::string header = std::string("{'descr': '") + descr + "', 'fortran_order': False, 'shape': (" + shape + "), }";
  while ((10 + header.size() + 1) % 64) header += ' ';
  header += '\n';
  std::ofstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error("cannot write " + path);
  f.write("\x93NUMPY\x01\x00", 8);
  const uint16_t n = static_cast<uint16_t>(header.size());
  const char len[2] = {static_cast<char>(n & 0xFF), static_cast<char>(n >> 8)};
  f.write(len, 2);
  f.write(header.data(), static_cast<std::streamsize>(header.size()));
  f.write(static_cast<const char*>(a.data()), static_cast<std::streamsize>(a.nbytes()));
}

// ------------------------------------------------------------------------------------- safetensors

std::map<std::string, Array> read_safetensors(const std::string& path) {
  std::string raw = read_file(path);
  if (raw.size() < 8) throw std::runtime_error(path + " is not a safetensors file");
  uint64_t n = 0;
  for (int k = 0; k < 8; ++k) n |= static_cast<uint64_t>(static_cast<unsigned char>(raw[k])) << (8 * k);
  if (8 + n > raw.size()) throw std::runtime_error(path + ": safetensors header is truncated");
  Json header = Json::parse(raw.substr(8, n));
  std::map<std::string, Array> out;
  for (const auto& kv : header.as_object()) {
    if (kv.first == "__metadata__") continue;
    const std::string& dt = kv.second["dtype"].as_string();
    DType d = dt == "F32" ? DType::F32 : dt == "F64" ? DType::F64 : dt == "I32" ? DType::I32 : dt == "I64" ? DType::I64
            : throw std::runtime_error(path + ": tensor " + kv.first + " has unsupported dtype " + dt);
    std::vector<int64_t> shape;
    for (const Json& s : kv.second["shape"].as_array()) shape.push_back(s.as_int());
    Array a(d, shape);
    const uint64_t b = static_cast<uint64_t>(kv.second["data_offsets"][0].as_int());
    const uint64_t e = static_cast<uint64_t>(kv.second["data_offsets"][1].as_int());
    if (e - b != a.nbytes() || 8 + n + e > raw.size()) throw std::runtime_error(path + ": tensor " + kv.first + " has a bad extent");
    std::memcpy(a.data(), raw.data() + 8 + n + b, a.nbytes());
    out.emplace(kv.first, std::move(a));
  }
  return out;
}

// --------------------------------------------------------------------------------------------- PNG

static uint32_t crc32(const uint8_t* p, size_t n, uint32_t crc = 0) {
  static std::array<uint32_t, 256> table = [] {
    std::array<uint32_t, 256> t{};
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
      t[i] = c;
    }
    return t;
  }();
  crc = ~crc;
  for (size_t i = 0; i < n; ++i) crc = table[(crc ^ p[i]) & 0xFF] ^ (crc >> 8);
  return ~crc;
}

static void be32(std::vector<uint8_t>& out, uint32_t v) {
  for (int s = 24; s >= 0; s -= 8) out.push_back(static_cast<uint8_t>(v >> s));
}

static void chunk(std::vector<uint8_t>& out, const char* type, const std::vector<uint8_t>& body) {
  be32(out, static_cast<uint32_t>(body.size()));
  std::vector<uint8_t> tb(type, type + 4);
  tb.insert(tb.end(), body.begin(), body.end());
  out.insert(out.end(), tb.begin(), tb.end());
  be32(out, crc32(tb.data(), tb.size()));
}

std::vector<uint8_t> png_bytes(int width, int height, const std::vector<uint8_t>& rgb) {
  if (rgb.size() != static_cast<size_t>(width) * height * 3) throw std::runtime_error("png: pixel buffer does not match the size");
  std::vector<uint8_t> raw;  // one filter byte (0: none) per scanline
  raw.reserve(static_cast<size_t>(height) * (1 + width * 3));
  for (int y = 0; y < height; ++y) {
    raw.push_back(0);
    raw.insert(raw.end(), rgb.begin() + static_cast<long>(y) * width * 3, rgb.begin() + static_cast<long>(y + 1) * width * 3);
  }
  std::vector<uint8_t> z = {0x78, 0x01};  // zlib: deflate, 32 KiB window, stored blocks follow
  size_t pos = 0;
  do {
    const size_t n = std::min<size_t>(65535, raw.size() - pos);
    z.push_back(pos + n == raw.size() ? 1 : 0);  // BFINAL, BTYPE=00 (stored)
    z.push_back(static_cast<uint8_t>(n & 0xFF));
    z.push_back(static_cast<uint8_t>(n >> 8));
    z.push_back(static_cast<uint8_t>(~n & 0xFF));
    z.push_back(static_cast<uint8_t>((~n >> 8) & 0xFF));
    z.insert(z.end(), raw.begin() + static_cast<long>(pos), raw.begin() + static_cast<long>(pos + n));
    pos += n;
  } while (pos < raw.size());
  uint32_t a = 1, b = 0;  // Adler-32
  for (uint8_t c : raw) {
    a = (a + c) % 65521;
    b = (b + a) % 65521;
  }
  be32(z, (b << 16) | a);
  std::vector<uint8_t> out = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1A, '\n'};
  std::vector<uint8_t> ihdr;
  be32(ihdr, static_cast<uint32_t>(width));
  be32(ihdr, static_cast<uint32_t>(height));
  ihdr.insert(ihdr.end(), {8, 2, 0, 0, 0});  // 8 bits, RGB, deflate, adaptive filters, no interlace
  chunk(out, "IHDR", ihdr);
  chunk(out, "IDAT", z);
  chunk(out, "IEND", {});
  return out;
}

void write_png(const std::string& path, int width, int height, const std::vector<uint8_t>& rgb) {
  std::vector<uint8_t> bytes = png_bytes(width, height, rgb);
  const std::string tmp = path + ".partial";
  {
    std::ofstream f(tmp, std::ios::binary);
    if (!f) throw std::runtime_error("cannot write " + path);
    f.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
    if (!f) throw std::runtime_error("cannot write " + path);
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) throw std::runtime_error("cannot write " + path);
}

// ------------------------------------------------------------------------------------------ SHA-256

namespace {
struct Sha256 {
  uint32_t h[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
  uint8_t buf[64];
  size_t fill = 0;
  uint64_t bits = 0;
  static uint32_t rotr(uint32_t x, int n) { return (x >> n) | (x << (32 - n)); }
  void block(const uint8_t* p) {
    static const uint32_t k[64] = {
        0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5, 0xd807aa98, 0x12835b01,
        0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc,
        0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147,
        0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
        0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116, 0x1e376c08,
        0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3, 0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208,
        0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2};
    uint32_t w[64];
    for (int i = 0; i < 16; ++i) w[i] = (uint32_t(p[4 * i]) << 24) | (uint32_t(p[4 * i + 1]) << 16) | (uint32_t(p[4 * i + 2]) << 8) | p[4 * i + 3];
    for (int i = 16; i < 64; ++i) {
      uint32_t s0 = rotr(w[i - 15], 7) ^ rotr(w[i - 15], 18) ^ (w[i - 15] >> 3);
      uint32_t s1 = rotr(w[i - 2], 17) ^ rotr(w[i - 2], 19) ^ (w[i - 2] >> 10);
      w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    uint32_t a = h[0], b = h[1], c = h[2], d = h[3], e = h[4], f = h[5], g = h[6], hh = h[7];
    for (int i = 0; i < 64; ++i) {
      uint32_t t1 = hh + (rotr(e, 6) ^ rotr(e, 11) ^ rotr(e, 25)) + ((e & f) ^ (~e & g)) + k[i] + w[i];
      uint32_t t2 = (rotr(a, 2) ^ rotr(a, 13) ^ rotr(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
      hh = g; g = f; f = e; e = d + t1; d = c; c = b; b = a; a = t1 + t2;
    }
    h[0] += a; h[1] += b; h[2] += c; h[3] += d; h[4] += e; h[5] += f; h[6] += g; h[7] += hh;
  }
  void update(const uint8_t* p, size_t n) {
    bits += uint64_t(n) * 8;
    while (n) {
      size_t take = std::min(n, 64 - fill);
      std::memcpy(buf + fill, p, take);
      fill += take; p += take; n -= take;
      if (fill == 64) { block(buf); fill = 0; }
    }
  }
  std::string hex() {
    uint64_t total = bits;
    uint8_t pad = 0x80;
    update(&pad, 1);
    uint8_t zero = 0;
    while (fill != 56) update(&zero, 1);
    uint8_t len[8];
    for (int i = 0; i < 8; ++i) len[i] = static_cast<uint8_t>(total >> (56 - 8 * i));
    update(len, 8);
    char out[65];
    for (int i = 0; i < 8; ++i) std::snprintf(out + 8 * i, 9, "%08x", h[i]);
    return std::string(out, 64);
  }
};
}  // namespace

std::string sha256_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error("cannot open " + path);
  Sha256 s;
  std::vector<char> buf(1 << 20);
  while (f) {
    f.read(buf.data(), static_cast<std::streamsize>(buf.size()));
    s.update(reinterpret_cast<const uint8_t*>(buf.data()), static_cast<size_t>(f.gcount()));
  }
  return s.hex();
}

}  // namespace pf
