// A dense, C-ordered host array (float32, int32 or int64) and the file formats pf-run reads and writes:
// NumPy .npy, safetensors (an export's golden/ sets) and PNG (zlib stored blocks; no third-party code).
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace pf {

enum class DType { F32, I32, I64, F64 };

const char* dtype_name(DType d);
size_t dtype_size(DType d);

struct Array {
  DType dtype = DType::F32;
  std::vector<int64_t> shape;
  std::vector<uint64_t> storage;  // 8-byte aligned bytes

  Array() = default;
  Array(DType d, std::vector<int64_t> s);
  static Array f32(std::vector<int64_t> s, float fill = 0.f);

  int64_t numel() const;
  size_t nbytes() const { return static_cast<size_t>(numel()) * dtype_size(dtype); }
  void* data() { return storage.data(); }
  const void* data() const { return storage.data(); }
  float* f() { return reinterpret_cast<float*>(storage.data()); }
  const float* f() const { return reinterpret_cast<const float*>(storage.data()); }
  std::vector<float> to_float() const;  // any dtype, converted
  Array as(DType d) const;             // converted copy
  std::string shape_str() const;
};

// NumPy .npy (format 1.0/2.0/3.0, little-endian <f4 <f8 <i4 <i8, C order)
Array read_npy(const std::string& path);
void write_npy(const std::string& path, const Array& a);

// safetensors: name -> array (F32, F64, I32, I64)
std::map<std::string, Array> read_safetensors(const std::string& path);

// 8-bit RGB PNG from interleaved HWC bytes
void write_png(const std::string& path, int width, int height, const std::vector<uint8_t>& rgb);
std::vector<uint8_t> png_bytes(int width, int height, const std::vector<uint8_t>& rgb);

// lower-case hex SHA-256 of a file
std::string sha256_file(const std::string& path);

}  // namespace pf
