#include "safetensors.h"

#include <cmath>
#include <limits>

#include "check.h"
#include "test_model.h"

using pearl::Checkpoint;
using pearl::DType;
using pearl::SafetensorsFile;
using testing::SafetensorsWriter;
using testing::TempDir;

namespace {

std::vector<float> sample_values(size_t count) {
  std::vector<float> values;
  for (size_t i = 0; i < count; ++i) values.push_back(std::sin(static_cast<float>(i) * 0.7f) * 3.0f);
  return values;
}

}  // namespace

TEST(reads_f32_bf16_f16_tensors) {
  TempDir dir;
  SafetensorsWriter writer;
  const auto f32 = writer.add("a.f32", "F32", {2, 3}, sample_values(6));
  const auto bf16 = writer.add("b.bf16", "BF16", {5}, sample_values(5));
  const auto f16 = writer.add("c.f16", "F16", {1, 1, 7}, sample_values(7));
  writer.write(dir.file("x.safetensors"));

  SafetensorsFile file(dir.file("x.safetensors"));
  CHECK_EQ(file.tensors().size(), size_t{3});
  CHECK_EQ(file.metadata().size(), size_t{1});
  CHECK_EQ(file.metadata()[0].second, std::string("pt"));
  const pearl::TensorInfo* a = file.find("a.f32");
  CHECK(a != nullptr);
  CHECK(a->dtype == DType::F32);
  CHECK(a->shape == (std::vector<int64_t>{2, 3}));
  CHECK(pearl::load_f32(*a) == f32);
  CHECK(file.find("b.bf16")->dtype == DType::BF16);
  CHECK(pearl::load_f32(*file.find("b.bf16")) == bf16);
  CHECK(pearl::load_f32(*file.find("c.f16")) == f16);
  CHECK(file.find("missing") == nullptr);
  // The rounding really happened: 16-bit values differ from the float32 originals.
  CHECK(bf16 != sample_values(5));
}

TEST(converts_special_half_values) {
  TempDir dir;
  const float inf = std::numeric_limits<float>::infinity();
  const std::vector<float> values = {0.0f, -0.0f, 1.0f, -2.5f, 65504.0f, 6.103515625e-05f, 5.9604645e-08f,
                                     3.0517578e-05f, inf, -inf, 1e6f};
  SafetensorsWriter writer;
  writer.add("h", "F16", {static_cast<int64_t>(values.size())}, values);
  writer.add("b", "BF16", {static_cast<int64_t>(values.size())}, values);
  writer.write(dir.file("x.safetensors"));
  SafetensorsFile file(dir.file("x.safetensors"));
  const auto h = pearl::load_f32(*file.find("h"));
  CHECK_EQ(h[0], 0.0f);
  CHECK(std::signbit(h[1]));
  CHECK_EQ(h[2], 1.0f);
  CHECK_EQ(h[3], -2.5f);
  CHECK_EQ(h[4], 65504.0f);         // largest normal
  CHECK_EQ(h[5], 6.103515625e-05f);  // smallest normal
  CHECK_EQ(h[6], 5.9604645e-08f);    // smallest subnormal
  CHECK_EQ(h[7], 3.0517578e-05f);    // a subnormal
  CHECK_EQ(h[8], inf);
  CHECK_EQ(h[9], -inf);
  CHECK_EQ(h[10], inf);  // overflow
  const auto b = pearl::load_f32(*file.find("b"));
  CHECK_EQ(b[3], -2.5f);
  CHECK_EQ(b[10], 999424.0f);  // 1e6 rounded to 8 significant bits
}

TEST(rejects_short_and_inconsistent_files) {
  TempDir dir;
  SafetensorsWriter writer;
  writer.add("w", "F32", {4}, {1, 2, 3, 4});
  const std::string good = writer.bytes();
  const std::string path = dir.file("bad.safetensors");

  testing::write_file(path, good.substr(0, 5));
  CHECK_THROWS(SafetensorsFile{path}, "file too short");
  CHECK_THROWS(SafetensorsFile{path}, path);

  std::string long_header = good;
  long_header[0] = '\xFF';
  long_header[3] = '\x01';
  testing::write_file(path, long_header);
  CHECK_THROWS(SafetensorsFile{path}, "header length");

  testing::write_file(path, good.substr(0, good.size() - 4));  // data cut short
  CHECK_THROWS(SafetensorsFile{path}, "tensor w: data_offsets [0, 16] out of range");

  testing::write_file(path, SafetensorsWriter::assemble("{\"w\": {\"dtype\": \"F32\",", std::string(16, '\0')));
  CHECK_THROWS(SafetensorsFile{path}, "bad header: invalid JSON at offset");

  testing::write_file(path, SafetensorsWriter::assemble("[1, 2]  ", ""));
  CHECK_THROWS(SafetensorsFile{path}, "expected a JSON object");

  const auto with_entry = [&](const std::string& entry, size_t data_bytes) {
    testing::write_file(path, SafetensorsWriter::assemble("{" + entry + "}", std::string(data_bytes, '\0')));
  };
  with_entry(R"("w": {"dtype": "F13", "shape": [4], "data_offsets": [0, 16]})", 16);
  CHECK_THROWS(SafetensorsFile{path}, "tensor w: unknown dtype \"F13\"");
  with_entry(R"("w": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]})", 16);
  CHECK_THROWS(SafetensorsFile{path}, "out of range");
  with_entry(R"("w": {"dtype": "F32", "shape": [5], "data_offsets": [0, 16]})", 16);
  CHECK_THROWS(SafetensorsFile{path}, "span 16 bytes but shape [5] of F32 needs 20");
  with_entry(R"("w": {"dtype": "F32", "shape": [4], "data_offsets": [16, 0]})", 16);
  CHECK_THROWS(SafetensorsFile{path}, "0 <= begin <= end");
  with_entry(R"("w": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]})", 16);
  CHECK_THROWS(SafetensorsFile{path}, "non-negative integers");
  with_entry(R"("w": {"dtype": "F32", "data_offsets": [0, 16]})", 16);
  CHECK_THROWS(SafetensorsFile{path}, "tensor w: missing shape");
  with_entry(R"("w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                "v": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]})", 16);
  CHECK_THROWS(SafetensorsFile{path}, "overlap");
  with_entry(R"("w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}, "__metadata__": {"a": 1})", 16);
  CHECK_THROWS(SafetensorsFile{path}, "__metadata__");
  CHECK_THROWS(SafetensorsFile{dir.file("absent.safetensors")}, "cannot open file");
  CHECK_THROWS(SafetensorsFile{dir.path()}, "not a regular file");
}

TEST(non_float_tensors_cannot_be_loaded_as_weights) {
  TempDir dir;
  SafetensorsWriter writer;
  writer.add_raw("ids", "I64", {2}, std::string(16, '\x01'));
  writer.write(dir.file("x.safetensors"));
  SafetensorsFile file(dir.file("x.safetensors"));
  CHECK(file.find("ids")->dtype == DType::I64);
  CHECK_THROWS(pearl::load_f32(*file.find("ids")), "tensor ids has dtype I64");
}

TEST(checkpoint_reads_single_and_sharded_folders) {
  TempDir single;
  SafetensorsWriter writer;
  writer.add("x", "F32", {2}, {1, 2});
  writer.write(single.file("model.safetensors"));
  Checkpoint one(single.path());
  CHECK_EQ(one.num_tensors(), size_t{1});
  CHECK(pearl::load_f32(*one.find("x")) == (std::vector<float>{1, 2}));

  TempDir sharded;
  SafetensorsWriter first, second;
  first.add("a", "F32", {1}, {5});
  second.add("b", "BF16", {2}, {6, 7});
  first.write(sharded.file("model-00001-of-00002.safetensors"));
  second.write(sharded.file("model-00002-of-00002.safetensors"));
  testing::write_file(sharded.file("model.safetensors.index.json"),
                      R"({"metadata": {"total_size": 8}, "weight_map": {"a": "model-00001-of-00002.safetensors",
                          "b": "model-00002-of-00002.safetensors"}})");
  Checkpoint two(sharded.path());
  CHECK_EQ(two.files().size(), size_t{2});
  CHECK(pearl::load_f32(*two.find("a")) == (std::vector<float>{5}));
  CHECK(pearl::load_f32(*two.find("b")) == (std::vector<float>{6, 7}));
  CHECK(two.find("c") == nullptr);
}

TEST(checkpoint_errors_name_the_file_and_tensor) {
  TempDir dir;
  CHECK_THROWS(Checkpoint{dir.path()}, "no model.safetensors or model.safetensors.index.json");
  CHECK_THROWS(Checkpoint{dir.file("nope")}, "not a directory");

  SafetensorsWriter writer;
  writer.add("a", "F32", {1}, {5});
  writer.write(dir.file("shard-1.safetensors"));
  const std::string index = dir.file("model.safetensors.index.json");
  testing::write_file(index, R"({"weight_map": {"a": "shard-1.safetensors", "b": "shard-1.safetensors"}})");
  CHECK_THROWS(Checkpoint{dir.path()}, "tensor b is mapped to shard-1.safetensors but that file does not contain it");
  testing::write_file(index, R"({"weight_map": {"a": "shard-2.safetensors"}})");
  CHECK_THROWS(Checkpoint{dir.path()}, "shard-2.safetensors: cannot open file");
  testing::write_file(index, R"({"weight_map": {"a": "../shard-1.safetensors"}})");
  CHECK_THROWS(Checkpoint{dir.path()}, "invalid file name");
  testing::write_file(index, R"({"metadata": {}})");
  CHECK_THROWS(Checkpoint{dir.path()}, "missing \"weight_map\"");
  testing::write_file(index, R"({"weight_map": )");
  CHECK_THROWS(Checkpoint{dir.path()}, "model.safetensors.index.json: invalid JSON");
}

int main() { return check::run_all(); }
