// Each CUDA kernel against its CPU twin (native/src/ops/<op>.cpp), in the manner of llm.c: fresh random inputs,
// outputs poisoned with NaN before the kernel runs, and the relative error ||gpu - cpu|| / ||cpu|| held to what
// bf16 operands allow (exact where the kernel only moves or compares values). Built with PEARL_CUDA, run by
// `npm run test:gpu` (tools/gpu_run.sh's test stage) on the CUDA machine.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "check.h"
#include "cuda/collective.h"
#include "cuda/cublaslt.h"
#include "ops/cuda_ops.cuh"
#include "ops/ops.h"
#include "tensor_parallel.h"
#include "thread_pool.h"

namespace {

using pearl::gpu::bf16;

constexpr float kBf16Operands = 1e-2f;  // bf16 inputs or outputs against a float32 reference
constexpr float kFloatSums = 1e-4f;     // the same products summed in another order, float32 throughout

std::vector<float> random_floats(size_t count, std::mt19937& rng, float scale = 1.0f) {
  std::normal_distribution<float> normal(0.0f, scale);
  std::vector<float> values(count);
  for (float& value : values) value = normal(rng);
  return values;
}

// bf16 values (as floats) and their bits.
struct Bf16Values {
  std::vector<float> values;
  std::vector<uint16_t> bits;
};

Bf16Values rounded(const std::vector<float>& values) {
  Bf16Values out;
  for (float value : values) {
    const uint16_t bits = pearl::float_to_bf16_bits(value);
    const uint32_t word = static_cast<uint32_t>(bits) << 16;
    float as_float;
    std::memcpy(&as_float, &word, sizeof(as_float));
    out.bits.push_back(bits);
    out.values.push_back(as_float);
  }
  return out;
}

template <typename T>
T* to_device(const std::vector<T>& host) {
  T* device = nullptr;
  PEARL_CUDA_CHECK(cudaMalloc(&device, std::max<size_t>(1, host.size()) * sizeof(T)));
  PEARL_CUDA_CHECK(cudaMemcpy(device, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice));
  return device;
}

bf16* bf16_to_device(const Bf16Values& values) {
  return reinterpret_cast<bf16*>(to_device(values.bits));
}

// A device buffer of `count` T, every byte 0xFF first (NaN for floats and bf16), so an output the kernel
// misses cannot pass.
template <typename T>
T* poisoned(size_t count) {
  T* device = nullptr;
  PEARL_CUDA_CHECK(cudaMalloc(&device, count * sizeof(T)));
  PEARL_CUDA_CHECK(cudaMemset(device, 0xFF, count * sizeof(T)));
  return device;
}

std::vector<float> floats_from_device(const float* device, size_t count) {
  PEARL_CUDA_CHECK(cudaDeviceSynchronize());
  std::vector<float> host(count);
  PEARL_CUDA_CHECK(cudaMemcpy(host.data(), device, count * sizeof(float), cudaMemcpyDeviceToHost));
  return host;
}

std::vector<float> bf16_from_device(const bf16* device, size_t count) {
  PEARL_CUDA_CHECK(cudaDeviceSynchronize());
  std::vector<uint16_t> bits(count);
  PEARL_CUDA_CHECK(cudaMemcpy(bits.data(), device, count * sizeof(uint16_t), cudaMemcpyDeviceToHost));
  std::vector<float> values(count);
  for (size_t i = 0; i < count; ++i) {
    const uint32_t word = static_cast<uint32_t>(bits[i]) << 16;
    std::memcpy(&values[i], &word, sizeof(float));
  }
  return values;
}

// ||actual - expected|| / ||expected||; infinite when any actual value is not finite.
double relative_error(const std::vector<float>& actual, const std::vector<float>& expected) {
  double difference = 0.0;
  double norm = 0.0;
  for (size_t i = 0; i < expected.size(); ++i) {
    if (!std::isfinite(actual[i])) return INFINITY;
    difference += (static_cast<double>(actual[i]) - expected[i]) * (static_cast<double>(actual[i]) - expected[i]);
    norm += static_cast<double>(expected[i]) * expected[i];
  }
  return std::sqrt(difference / std::max(norm, 1e-30));
}

#define CHECK_RELATIVE(actual, expected, bound)                                                          \
  do {                                                                                                   \
    const double error_ = relative_error((actual), (expected));                                        \
    std::printf("     %s: relative error %.2e (bound %.0e)\n", #actual, error_, static_cast<double>(bound)); \
    CHECK(error_ < (bound));                                                                             \
  } while (0)

}  // namespace

TEST(embedding_copies_the_token_rows_exactly) {
  std::mt19937 rng(1);
  const int vocab = 300, dim = 136, rows = 9;
  const Bf16Values table = rounded(random_floats(static_cast<size_t>(vocab) * dim, rng));
  const std::vector<int32_t> tokens = {0, 299, 17, 17, 150, 3, 298, 64, 1};
  std::vector<float> expected(static_cast<size_t>(rows) * dim);
  pearl::ops::embedding(table.values.data(), dim, tokens.data(), rows, expected.data());
  float* out = poisoned<float>(expected.size());
  pearl::gpu::embedding(bf16_to_device(table), dim, to_device(tokens), rows, out, nullptr);
  CHECK(floats_from_device(out, expected.size()) == expected);
}

TEST(rmsnorm_matches_the_cpu_norm_within_bf16_rounding) {
  std::mt19937 rng(2);
  const int rows = 7, dim = 4096;
  const std::vector<float> x = random_floats(static_cast<size_t>(rows) * dim, rng, 3.0f);
  const std::vector<float> weight = random_floats(dim, rng);
  std::vector<float> expected(x.size());
  pearl::ops::rmsnorm(x.data(), dim, rows, dim, weight.data(), 1e-5f, expected.data(), dim);
  bf16* out = poisoned<bf16>(x.size());
  pearl::gpu::rmsnorm(to_device(x), nullptr, rows, dim, to_device(weight), 1e-5f, out, false, nullptr);
  CHECK_RELATIVE(bf16_from_device(out, x.size()), expected, kBf16Operands);
}

TEST(silu_mul_reads_the_interleaved_gate_up_layout) {
  std::mt19937 rng(3);
  const int rows = 5, inter = 352;
  const std::vector<float> plain = random_floats(static_cast<size_t>(rows) * 2 * inter, rng, 2.0f);
  std::vector<float> interleaved(plain.size());
  for (int r = 0; r < rows; ++r) {
    for (int i = 0; i < inter; ++i) {
      const size_t row = static_cast<size_t>(r) * 2 * inter;
      interleaved[row + pearl::gpu::gate_up_row(i, false)] = plain[row + i];
      interleaved[row + pearl::gpu::gate_up_row(i, true)] = plain[row + inter + i];
    }
  }
  std::vector<float> expected(static_cast<size_t>(rows) * inter);
  pearl::ops::silu_mul(plain.data(), rows, inter, expected.data());
  bf16* out = poisoned<bf16>(expected.size());
  pearl::gpu::silu_mul(to_device(interleaved), rows, inter, out, nullptr);
  CHECK_RELATIVE(bf16_from_device(out, expected.size()), expected, kBf16Operands);
}

TEST(skinny_matmul_and_cublaslt_match_the_cpu_product_for_every_row_count) {
  std::mt19937 rng(4);
  pearl::ThreadPool pool(2);
  const int k = 1024, n = 776;
  const Bf16Values weight = rounded(random_floats(static_cast<size_t>(n) * k, rng, 0.05f));
  const std::vector<float> bias = random_floats(n, rng);
  const bf16* device_weight = bf16_to_device(weight);
  const float* device_bias = to_device(bias);
  pearl::gpu::CublasLtGemm cublas(size_t{32} << 20);
  for (int rows : {1, 3, 16, 40}) {
    const Bf16Values x = rounded(random_floats(static_cast<size_t>(rows) * k, rng));
    std::vector<float> expected(static_cast<size_t>(rows) * n);
    pearl::ops::matmul(x.values.data(), rows, k, weight.values.data(), bias.data(), n, expected.data(), pool);
    float* y = poisoned<float>(expected.size());
    if (rows <= pearl::gpu::kSkinnyMaxRows) {
      pearl::gpu::skinny_matmul(bf16_to_device(x), rows, k, device_weight, device_bias, n, y, false, 0, false,
                                nullptr);
    } else {
      cublas.matmul(bf16_to_device(x), rows, k, device_weight, n, y, false, nullptr);
      pearl::gpu::add_bias(y, rows, n, device_bias, nullptr);
    }
    std::printf("     rows %d\n", rows);
    CHECK_RELATIVE(floats_from_device(y, expected.size()), expected, kFloatSums);
  }
}

TEST(rope_store_kv_and_paged_attention_match_rope_kv_store_and_attention) {
  std::mt19937 rng(5);
  pearl::ThreadPool pool(2);
  const int heads = 8, kv_heads = 2, head_dim = 64, rows = 40, block_size = 16, blocks = 6;
  const int q_dim = heads * head_dim, kv_dim = kv_heads * head_dim, width = q_dim + 2 * kv_dim;
  const std::vector<float> qkv = random_floats(static_cast<size_t>(rows) * width, rng);
  const std::vector<int32_t> table = {3, 1, 4};
  std::vector<int32_t> positions(rows), slots(rows), row_table(rows, 0);
  for (int r = 0; r < rows; ++r) {
    positions[r] = r;
    slots[r] = table[static_cast<size_t>(r / block_size)] * block_size + r % block_size;
  }
  const std::vector<float> inv_freq = pearl::ops::rope_inv_freq(pearl::RopeConfig{}, head_dim);

  // CPU: rotate q and k, store K/V (as bf16 values, the cache's precision), attend.
  std::vector<float> rotated = qkv;
  pearl::ops::rope(rotated.data(), width, rows, heads + kv_heads, head_dim, positions.data(), inv_freq.data());
  const size_t cache_elements = static_cast<size_t>(blocks) * block_size * kv_dim;
  std::vector<float> k_cache(cache_elements, 0.0f), v_cache(cache_elements, 0.0f);
  pearl::ops::KvLayerView view{k_cache.data(), v_cache.data(), block_size, kv_heads, head_dim};
  pearl::ops::kv_store(rotated.data() + q_dim, rotated.data() + q_dim + kv_dim, width, rows, slots.data(), view);
  k_cache = rounded(k_cache).values;
  v_cache = rounded(v_cache).values;
  view = {k_cache.data(), v_cache.data(), block_size, kv_heads, head_dim};
  const std::vector<std::vector<int32_t>> tables = {table};
  pearl::ops::AttentionRows attention_rows{positions.data(), row_table.data(), &tables, 0};
  std::vector<float> expected(static_cast<size_t>(rows) * q_dim);
  pearl::ops::attention(rotated.data(), width, rows, heads, view, attention_rows, expected.data(), pool);

  // GPU: the same rows through rope_store_kv (in place, K/V into the paged bf16 cache) and attention.
  float* device_qkv = to_device(qkv);
  pearl::gpu::DeviceKvLayer kv;
  kv.k = poisoned<bf16>(cache_elements);
  kv.v = poisoned<bf16>(cache_elements);
  kv.block_size = block_size;
  kv.num_kv_heads = kv_heads;
  kv.head_dim = head_dim;
  const int32_t* device_positions = to_device(positions);
  const int32_t* device_slots = to_device(slots);
  pearl::gpu::rope_store_kv(device_qkv, width, rows, heads, head_dim, device_positions, to_device(inv_freq),
                            nullptr, nullptr, 1e-5f, device_slots, kv, false, nullptr);
  const std::vector<float> gpu_rotated = floats_from_device(device_qkv, qkv.size());
  std::vector<float> expected_q, actual_q;
  for (int r = 0; r < rows; ++r) {
    for (int i = 0; i < q_dim + kv_dim; ++i) {
      expected_q.push_back(rotated[static_cast<size_t>(r) * width + i]);
      actual_q.push_back(gpu_rotated[static_cast<size_t>(r) * width + i]);
    }
  }
  CHECK_RELATIVE(actual_q, expected_q, kFloatSums);
  pearl::gpu::DeviceRows device_rows;
  device_rows.positions = device_positions;
  device_rows.slots = device_slots;
  device_rows.row_table = to_device(row_table);
  device_rows.block_tables = to_device(table);
  device_rows.table_stride = to_device(std::vector<int32_t>{static_cast<int32_t>(table.size())});
  float* scratch = poisoned<float>(pearl::gpu::attention_scratch_floats(rows, heads, head_dim));
  bf16* out = poisoned<bf16>(expected.size());
  pearl::gpu::attention(device_qkv, width, rows, heads, kv, device_rows, 0, scratch, out, false, nullptr);
  CHECK_RELATIVE(bf16_from_device(out, expected.size()), expected, kBf16Operands);
}

TEST(choose_token_takes_the_cpu_argmax_lowest_index_first) {
  std::mt19937 rng(6);
  const int rows = 6, n = 5000;
  std::vector<float> logits = random_floats(static_cast<size_t>(rows) * n, rng);
  logits[2 * n + 10] = logits[2 * n + 4000] = 9.0f;  // a tie: the lower index wins
  std::vector<pearl::gpu::TokenChoiceRow> choices(rows);
  pearl::gpu::ChosenTokenRow* out = poisoned<pearl::gpu::ChosenTokenRow>(rows);
  void* scratch = poisoned<uint8_t>(pearl::gpu::choose_token_scratch_bytes(rows, n));
  pearl::gpu::choose_token(to_device(logits), rows, n, to_device(choices), scratch, out, nullptr);
  PEARL_CUDA_CHECK(cudaDeviceSynchronize());
  std::vector<pearl::gpu::ChosenTokenRow> chosen(rows);
  PEARL_CUDA_CHECK(cudaMemcpy(chosen.data(), out, rows * sizeof(chosen[0]), cudaMemcpyDeviceToHost));
  for (int r = 0; r < rows; ++r) {
    const int32_t expected = pearl::ops::choose_token(logits.data() + static_cast<size_t>(r) * n, n, {});
    CHECK_EQ(chosen[static_cast<size_t>(r)].token, expected);
  }
  CHECK_EQ(chosen[2].token, 10);
}

TEST(ranks_sharing_a_gpu_add_in_rank_order_and_gather_vocabulary_shards) {
  std::mt19937 rng(7);
  const int ranks = 3;
  const size_t count = 5000;
  std::vector<std::vector<float>> partials;
  std::vector<float*> buffers;
  for (int r = 0; r < ranks; ++r) {
    partials.push_back(random_floats(count, rng));
    buffers.push_back(to_device(partials.back()));
  }
  cudaStream_t stream = nullptr;
  PEARL_CUDA_CHECK(cudaStreamCreate(&stream));
  const std::vector<cudaStream_t> streams(ranks, stream);
  const auto collective = pearl::gpu::Collective::create({0, 0, 0}, streams, false, count);
  CHECK(std::string(collective->kind()) == "shared-device");
  collective->all_reduce_sum(buffers, count);
  std::vector<float> expected(count);
  for (size_t i = 0; i < count; ++i) expected[i] = (partials[0][i] + partials[1][i]) + partials[2][i];
  for (int r = 0; r < ranks; ++r) CHECK(floats_from_device(buffers[static_cast<size_t>(r)], count) == expected);

  // Vocabulary shards of 4 rows: 3 ranks of 24 columns for a vocabulary of 70 (2 padded columns).
  const int rows = 4, local_vocab = 24, vocab = 70;
  std::vector<float> full = random_floats(static_cast<size_t>(rows) * ranks * local_vocab, rng);
  std::vector<const float*> send;
  std::vector<float*> gathered;
  for (int r = 0; r < ranks; ++r) {
    std::vector<float> shard;
    for (int row = 0; row < rows; ++row) {
      for (int c = 0; c < local_vocab; ++c) shard.push_back(full[static_cast<size_t>(row) * ranks * local_vocab + r * local_vocab + c]);
    }
    send.push_back(to_device(shard));
    gathered.push_back(poisoned<float>(static_cast<size_t>(ranks) * rows * local_vocab));
  }
  collective->all_gather(send, gathered, static_cast<size_t>(rows) * local_vocab);
  std::vector<float> expected_logits;
  for (int row = 0; row < rows; ++row) {
    for (int c = 0; c < vocab; ++c) expected_logits.push_back(full[static_cast<size_t>(row) * ranks * local_vocab + c]);
  }
  for (int r = 0; r < ranks; ++r) {
    float* logits = poisoned<float>(expected_logits.size());
    pearl::gpu::assemble_vocab_shards(gathered[static_cast<size_t>(r)], rows, local_vocab, vocab, logits, stream);
    CHECK(floats_from_device(logits, expected_logits.size()) == expected_logits);
  }
}

int main() { return check::run_all(); }
