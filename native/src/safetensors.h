// Memory-mapped safetensors files and Hugging Face checkpoints (one file or shards listed in
// model.safetensors.index.json). Layout: 8-byte little-endian header length N, N bytes of JSON
// {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}, then the raw data, with
// offsets relative to the end of the header. Every error names the file and, where one is at fault, the
// tensor.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

namespace pearl {

enum class DType { Bool, U8, I8, F8_E4M3, F8_E5M2, I16, U16, F16, BF16, I32, U32, F32, I64, U64, F64 };

size_t dtype_size(DType dtype);
const char* dtype_name(DType dtype);  // as safetensors spells it: "F32", "BF16", ...
// The torch name of a floating dtype the loader converts ("float32", "bfloat16", "float16"); empty otherwise.
const char* dtype_torch_name(DType dtype);

struct TensorInfo {
  std::string name;
  std::string file;  // path of the file holding the data
  DType dtype = DType::F32;
  std::vector<int64_t> shape;
  int64_t num_elements = 0;
  const uint8_t* data = nullptr;  // inside the mapping; not necessarily aligned
  size_t num_bytes = 0;
};

std::string shape_to_string(const std::vector<int64_t>& shape);

// Converts F32, F16 or BF16 data to float32; any other dtype is an error naming the tensor.
void convert_to_f32(const TensorInfo& tensor, float* out);
std::vector<float> load_f32(const TensorInfo& tensor);

class MappedFile {
 public:
  explicit MappedFile(const std::string& path);
  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  const uint8_t* data() const { return data_; }
  size_t size() const { return size_; }

 private:
  const uint8_t* data_ = nullptr;
  size_t size_ = 0;
};

class SafetensorsFile {
 public:
  explicit SafetensorsFile(const std::string& path);

  const std::string& path() const { return path_; }
  const std::vector<TensorInfo>& tensors() const { return tensors_; }
  const TensorInfo* find(const std::string& name) const;
  const std::vector<std::pair<std::string, std::string>>& metadata() const { return metadata_; }

 private:
  std::string path_;
  std::unique_ptr<MappedFile> mapping_;
  std::vector<TensorInfo> tensors_;
  std::unordered_map<std::string, size_t> index_;
  std::vector<std::pair<std::string, std::string>> metadata_;
};

// All tensors of a model folder: model.safetensors.index.json (sharded) when present, else
// model.safetensors.
class Checkpoint {
 public:
  explicit Checkpoint(const std::string& model_dir);

  const TensorInfo* find(const std::string& name) const;
  const std::vector<std::string>& files() const { return files_; }
  size_t num_tensors() const { return index_.size(); }

 private:
  std::vector<std::unique_ptr<SafetensorsFile>> shards_;
  std::vector<std::string> files_;
  std::unordered_map<std::string, const TensorInfo*> index_;
};

}  // namespace pearl
