#include "safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <limits>
#include <stdexcept>

#include "half.h"
#include "json.h"

namespace pearl {

namespace {

struct DTypeEntry {
  DType dtype;
  const char* name;
  size_t size;
};

constexpr DTypeEntry kDTypes[] = {
    {DType::Bool, "BOOL", 1},      {DType::U8, "U8", 1},   {DType::I8, "I8", 1},
    {DType::F8_E4M3, "F8_E4M3", 1}, {DType::F8_E5M2, "F8_E5M2", 1}, {DType::I16, "I16", 2},
    {DType::U16, "U16", 2},        {DType::F16, "F16", 2}, {DType::BF16, "BF16", 2},
    {DType::I32, "I32", 4},        {DType::U32, "U32", 4}, {DType::F32, "F32", 4},
    {DType::I64, "I64", 8},        {DType::U64, "U64", 8}, {DType::F64, "F64", 8},
};

const DTypeEntry& entry_for(DType dtype) {
  for (const DTypeEntry& entry : kDTypes) {
    if (entry.dtype == dtype) return entry;
  }
  throw std::logic_error("dtype missing from the dtype table");
}

bool parse_dtype(const std::string& name, DType* dtype) {
  for (const DTypeEntry& entry : kDTypes) {
    if (name == entry.name) {
      *dtype = entry.dtype;
      return true;
    }
  }
  return false;
}

uint64_t read_le64(const uint8_t* p) {
  uint64_t value = 0;
  for (int i = 7; i >= 0; --i) value = (value << 8) | p[i];
  return value;
}

}  // namespace

size_t dtype_size(DType dtype) { return entry_for(dtype).size; }
const char* dtype_name(DType dtype) { return entry_for(dtype).name; }

const char* dtype_torch_name(DType dtype) {
  switch (dtype) {
    case DType::F32: return "float32";
    case DType::F16: return "float16";
    case DType::BF16: return "bfloat16";
    default: return "";
  }
}

std::string shape_to_string(const std::vector<int64_t>& shape) {
  std::string out = "[";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i > 0) out += ", ";
    out += std::to_string(shape[i]);
  }
  return out + "]";
}

void convert_to_f32(const TensorInfo& tensor, float* out) {
  const size_t n = static_cast<size_t>(tensor.num_elements);
  switch (tensor.dtype) {
    case DType::F32:
      std::memcpy(out, tensor.data, n * sizeof(float));
      return;
    case DType::BF16:
      for (size_t i = 0; i < n; ++i) {
        uint16_t bits;
        std::memcpy(&bits, tensor.data + 2 * i, 2);
        out[i] = bf16_to_float(bits);
      }
      return;
    case DType::F16:
      for (size_t i = 0; i < n; ++i) {
        uint16_t bits;
        std::memcpy(&bits, tensor.data + 2 * i, 2);
        out[i] = f16_to_float(bits);
      }
      return;
    default:
      throw std::runtime_error(tensor.file + ": tensor " + tensor.name + " has dtype " + dtype_name(tensor.dtype) +
                               "; only F32, F16 and BF16 weights are supported");
  }
}

std::vector<float> load_f32(const TensorInfo& tensor) {
  std::vector<float> out(static_cast<size_t>(tensor.num_elements));
  convert_to_f32(tensor, out.data());
  return out;
}

MappedFile::MappedFile(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw std::runtime_error(path + ": cannot open file: " + std::strerror(errno));
  struct stat info;
  if (::fstat(fd, &info) != 0) {
    int error = errno;
    ::close(fd);
    throw std::runtime_error(path + ": cannot stat file: " + std::strerror(error));
  }
  if (!S_ISREG(info.st_mode)) {
    ::close(fd);
    throw std::runtime_error(path + ": not a regular file");
  }
  size_ = static_cast<size_t>(info.st_size);
  if (size_ > 0) {
    void* mapping = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
    if (mapping == MAP_FAILED) {
      int error = errno;
      ::close(fd);
      throw std::runtime_error(path + ": mmap failed: " + std::strerror(error));
    }
    data_ = static_cast<const uint8_t*>(mapping);
  }
  ::close(fd);
}

MappedFile::~MappedFile() {
  if (data_ != nullptr) ::munmap(const_cast<uint8_t*>(data_), size_);
}

SafetensorsFile::SafetensorsFile(const std::string& path) : path_(path), mapping_(std::make_unique<MappedFile>(path)) {
  const size_t file_size = mapping_->size();
  if (file_size < 8) {
    throw std::runtime_error(path + ": file too short for a safetensors header (" + std::to_string(file_size) +
                             " bytes)");
  }
  const uint64_t header_length = read_le64(mapping_->data());
  if (header_length > file_size - 8) {
    throw std::runtime_error(path + ": header length " + std::to_string(header_length) + " exceeds the file size (" +
                             std::to_string(file_size) + " bytes)");
  }
  const char* header_text = reinterpret_cast<const char*>(mapping_->data() + 8);
  Json header;
  try {
    header = Json::parse(std::string_view(header_text, header_length));
  } catch (const JsonError& error) {
    throw std::runtime_error(path + ": bad header: " + error.what());
  }
  if (!header.is_object()) throw std::runtime_error(path + ": bad header: expected a JSON object");

  const uint8_t* data_start = mapping_->data() + 8 + header_length;
  const uint64_t data_size = file_size - 8 - header_length;

  for (size_t i = 0; i < header.keys().size(); ++i) {
    const std::string& name = header.keys()[i];
    const Json& entry = header.value_at(i);
    if (name == "__metadata__") {
      if (!entry.is_object()) throw std::runtime_error(path + ": __metadata__ must be an object of strings");
      for (size_t m = 0; m < entry.keys().size(); ++m) {
        if (!entry.value_at(m).is_string()) {
          throw std::runtime_error(path + ": __metadata__ value of \"" + entry.keys()[m] + "\" is not a string");
        }
        metadata_.emplace_back(entry.keys()[m], entry.value_at(m).as_string());
      }
      continue;
    }
    const std::string where = path + ": tensor " + name + ": ";
    if (!entry.is_object()) throw std::runtime_error(where + "entry is not an object");
    const Json* dtype_json = entry.find("dtype");
    const Json* shape_json = entry.find("shape");
    const Json* offsets_json = entry.find("data_offsets");
    if (dtype_json == nullptr || !dtype_json->is_string()) throw std::runtime_error(where + "missing dtype");
    if (shape_json == nullptr || !shape_json->is_array()) throw std::runtime_error(where + "missing shape");
    if (offsets_json == nullptr || !offsets_json->is_array() || offsets_json->size() != 2) {
      throw std::runtime_error(where + "data_offsets must be [begin, end]");
    }

    TensorInfo tensor;
    tensor.name = name;
    tensor.file = path;
    if (!parse_dtype(dtype_json->as_string(), &tensor.dtype)) {
      throw std::runtime_error(where + "unknown dtype \"" + dtype_json->as_string() + "\"");
    }
    uint64_t num_elements = 1;
    for (const Json& dim_json : shape_json->as_array()) {
      if (!dim_json.is_integer() || dim_json.as_int64() < 0) {
        throw std::runtime_error(where + "shape entries must be non-negative integers");
      }
      const uint64_t dim = static_cast<uint64_t>(dim_json.as_int64());
      if (dim != 0 && num_elements > std::numeric_limits<uint64_t>::max() / 16 / dim) {
        throw std::runtime_error(where + "shape is too large");
      }
      num_elements *= dim;
      tensor.shape.push_back(static_cast<int64_t>(dim));
    }
    const Json& begin_json = offsets_json->as_array()[0];
    const Json& end_json = offsets_json->as_array()[1];
    if (!begin_json.is_integer() || !end_json.is_integer() || begin_json.as_int64() < 0 ||
        end_json.as_int64() < begin_json.as_int64()) {
      throw std::runtime_error(where + "data_offsets must be integers with 0 <= begin <= end");
    }
    const uint64_t begin = static_cast<uint64_t>(begin_json.as_int64());
    const uint64_t end = static_cast<uint64_t>(end_json.as_int64());
    if (end > data_size) {
      throw std::runtime_error(where + "data_offsets [" + std::to_string(begin) + ", " + std::to_string(end) +
                               "] out of range: the data section has " + std::to_string(data_size) + " bytes");
    }
    const uint64_t expected_bytes = num_elements * dtype_size(tensor.dtype);
    if (end - begin != expected_bytes) {
      throw std::runtime_error(where + "data_offsets span " + std::to_string(end - begin) + " bytes but shape " +
                               shape_to_string(tensor.shape) + " of " + dtype_name(tensor.dtype) + " needs " +
                               std::to_string(expected_bytes));
    }
    tensor.num_elements = static_cast<int64_t>(num_elements);
    tensor.data = data_start + begin;
    tensor.num_bytes = static_cast<size_t>(expected_bytes);
    index_.emplace(name, tensors_.size());
    tensors_.push_back(std::move(tensor));
  }

  std::vector<const TensorInfo*> by_offset;
  for (const TensorInfo& tensor : tensors_) by_offset.push_back(&tensor);
  std::sort(by_offset.begin(), by_offset.end(), [](const TensorInfo* a, const TensorInfo* b) {
    return a->data != b->data ? a->data < b->data : a->num_bytes < b->num_bytes;
  });
  for (size_t i = 1; i < by_offset.size(); ++i) {
    const TensorInfo* previous = by_offset[i - 1];
    if (by_offset[i]->data < previous->data + previous->num_bytes) {
      throw std::runtime_error(path + ": tensors " + previous->name + " and " + by_offset[i]->name +
                               " overlap in the data section");
    }
  }
}

const TensorInfo* SafetensorsFile::find(const std::string& name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : &tensors_[it->second];
}

Checkpoint::Checkpoint(const std::string& model_dir) {
  namespace fs = std::filesystem;
  const fs::path dir(model_dir);
  if (!fs::is_directory(dir)) throw std::runtime_error(model_dir + ": not a directory");
  const fs::path index_path = dir / "model.safetensors.index.json";
  const fs::path single_path = dir / "model.safetensors";

  if (fs::exists(index_path)) {
    const std::string index_file = index_path.string();
    Json index = Json::parse_file(index_file);
    const Json* weight_map = index.find("weight_map");
    if (weight_map == nullptr || !weight_map->is_object()) {
      throw std::runtime_error(index_file + ": missing \"weight_map\" object");
    }
    std::unordered_map<std::string, SafetensorsFile*> shard_by_name;
    for (size_t i = 0; i < weight_map->keys().size(); ++i) {
      const std::string& tensor_name = weight_map->keys()[i];
      const Json& shard_json = weight_map->value_at(i);
      if (!shard_json.is_string()) {
        throw std::runtime_error(index_file + ": weight_map entry for " + tensor_name + " is not a file name");
      }
      const std::string& shard_name = shard_json.as_string();
      // Shards must sit in the model folder: a name with a path separator could point anywhere.
      if (shard_name.empty() || shard_name.find('/') != std::string::npos || shard_name == "." ||
          shard_name == "..") {
        throw std::runtime_error(index_file + ": weight_map entry for " + tensor_name + " has invalid file name \"" +
                                 shard_name + "\"");
      }
      auto found = shard_by_name.find(shard_name);
      if (found == shard_by_name.end()) {
        shards_.push_back(std::make_unique<SafetensorsFile>((dir / shard_name).string()));
        files_.push_back(shards_.back()->path());
        found = shard_by_name.emplace(shard_name, shards_.back().get()).first;
      }
      const TensorInfo* tensor = found->second->find(tensor_name);
      if (tensor == nullptr) {
        throw std::runtime_error(index_file + ": tensor " + tensor_name + " is mapped to " + shard_name +
                                 " but that file does not contain it");
      }
      index_.emplace(tensor_name, tensor);
    }
    return;
  }
  if (!fs::exists(single_path)) {
    throw std::runtime_error(model_dir + ": no model.safetensors or model.safetensors.index.json");
  }
  shards_.push_back(std::make_unique<SafetensorsFile>(single_path.string()));
  files_.push_back(shards_.back()->path());
  for (const TensorInfo& tensor : shards_.back()->tensors()) index_.emplace(tensor.name, &tensor);
}

const TensorInfo* Checkpoint::find(const std::string& name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : it->second;
}

}  // namespace pearl
