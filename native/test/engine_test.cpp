// The engine on tiny random checkpoints written by the test: agreement with an independent reference
// forward pass for every architecture, bit-exact batch invariance, prefix caching, rollback,
// verification and input validation.
#include "engine.h"

#include <algorithm>
#include <cmath>
#include <functional>
#include <cstring>
#include <filesystem>
#include <memory>

#include "check.h"
#include "test_model.h"

using pearl::Engine;
using pearl::EngineOptions;
using pearl::StepItem;
using pearl::StepOutput;
using pearl::StepResult;
using testing::TempDir;
using testing::TinySpec;

namespace {

struct Fixture {
  explicit Fixture(const TinySpec& spec) : model(testing::write_tiny_model(dir.path(), spec)) {}
  std::unique_ptr<Engine> engine(int num_threads = 2, int block_size = 4, int num_blocks = 0) const {
    EngineOptions options;
    options.model_dir = dir.path();
    options.num_threads = num_threads;
    options.block_size = block_size;
    options.num_blocks = num_blocks;
    return Engine::create(options);
  }
  TempDir dir;
  testing::TinyModel model;
};

StepItem item(uint64_t seq, std::vector<int32_t> tokens, StepOutput output = StepOutput::Sample, int num_draft = 0) {
  StepItem it;
  it.seq_id = seq;
  it.tokens = std::move(tokens);
  it.output = output;
  it.num_draft = num_draft;
  return it;
}

StepResult step_one(Engine& engine, const StepItem& it) { return engine.step({it})[0]; }

std::vector<int32_t> prompt_tokens(int count, int vocab, int salt) {
  std::vector<int32_t> tokens;
  for (int i = 0; i < count; ++i) tokens.push_back((i * 37 + salt * 11 + 5) % vocab);
  return tokens;
}

std::vector<int32_t> slice(const std::vector<int32_t>& tokens, size_t begin, size_t end) {
  return std::vector<int32_t>(tokens.begin() + static_cast<std::ptrdiff_t>(begin),
                              tokens.begin() + static_cast<std::ptrdiff_t>(end));
}

bool same_bits(const float* a, const float* b, size_t count) { return std::memcmp(a, b, count * sizeof(float)) == 0; }

// Row `row` of a [rows, vocab] logits vector.
const float* row_of(const std::vector<float>& logits, size_t row, int vocab) {
  return logits.data() + row * static_cast<size_t>(vocab);
}

std::vector<TinySpec> architecture_specs() {
  std::vector<TinySpec> specs;
  TinySpec llama31;  // GQA 2:1, llama3 rope scaling, attention and MLP biases, untied
  llama31.llama3_rope = true;
  llama31.rope_theta = 500000.0;
  llama31.attention_bias = true;
  llama31.mlp_bias = true;
  specs.push_back(llama31);
  TinySpec llama32;  // tied embeddings, transformers 5 rope_parameters
  llama32.tie_embeddings = true;
  llama32.rope_parameters = true;
  llama32.llama3_rope = true;
  llama32.seed = 11;
  specs.push_back(llama32);
  TinySpec qwen2;  // q/k/v bias, multi-query (1 kv head), head_dim 10, three shards
  qwen2.architecture = "Qwen2ForCausalLM";
  qwen2.hidden = 40;
  qwen2.kv_heads = 1;
  qwen2.tie_embeddings = true;
  qwen2.shards = 3;
  qwen2.seed = 3;
  specs.push_back(qwen2);
  TinySpec qwen3;  // q/k norm, explicit head_dim != hidden / heads, bf16 weights
  qwen3.architecture = "Qwen3ForCausalLM";
  qwen3.hidden = 32;
  qwen3.head_dim = 16;
  qwen3.dtype = "BF16";
  qwen3.rope_theta = 1000000.0;
  qwen3.seed = 5;
  specs.push_back(qwen3);
  TinySpec mistral;  // sliding window, fp16 weights
  mistral.architecture = "MistralForCausalLM";
  mistral.sliding_window = 6;
  mistral.dtype = "F16";
  mistral.seed = 9;
  specs.push_back(mistral);
  return specs;
}

}  // namespace

TEST(matches_the_reference_forward_for_every_architecture) {
  for (const TinySpec& spec : architecture_specs()) {
    Fixture fixture(spec);
    auto engine = fixture.engine();
    const std::vector<int32_t> tokens = prompt_tokens(21, spec.vocab, 1);
    engine->add_sequence(1);
    const StepResult result = step_one(*engine, item(1, tokens, StepOutput::Logits));
    const std::vector<double> expected = testing::reference_logits(fixture.model, tokens);
    CHECK_EQ(result.logits.size(), expected.size());
    double max_error = 0.0, max_magnitude = 0.0;
    for (size_t i = 0; i < expected.size(); ++i) {
      max_error = std::max(max_error, std::fabs(result.logits[i] - expected[i]));
      max_magnitude = std::max(max_magnitude, std::fabs(expected[i]));
    }
    if (!(max_error <= 1e-5 * max_magnitude)) {
      check::fail(__FILE__, __LINE__,
                  spec.architecture + ": max error " + std::to_string(max_error) + " for logits up to " +
                      std::to_string(max_magnitude));
    }
    CHECK(max_magnitude > 2.0);  // the random model is far from uniform

    const pearl::ModelInfo& info = engine->info();
    CHECK_EQ(info.architecture, spec.architecture);
    CHECK_EQ(info.vocab_size, spec.vocab);
    CHECK_EQ(info.head_dim, spec.resolved_head_dim());
    CHECK_EQ(info.backend, std::string("cpu"));
    CHECK(info.eos_token_ids == (std::vector<int32_t>{2, 3}));
    CHECK_EQ(info.bos_token_id, 1);
    CHECK_EQ(info.dtype, std::string(spec.dtype == "BF16" ? "bfloat16" : spec.dtype == "F16" ? "float16" : "float32"));
    int64_t parameters = 0;
    for (const auto& [name, values] : fixture.model.tensors) parameters += static_cast<int64_t>(values.size());
    CHECK_EQ(info.num_parameters, parameters);
  }
}

TEST(row_logits_are_bit_identical_alone_batched_chunked_and_in_verify_windows) {
  Fixture fixture{TinySpec{}};
  const int vocab = fixture.model.spec.vocab;
  const auto a = prompt_tokens(19, vocab, 1);
  const auto b = prompt_tokens(7, vocab, 2);
  const auto c = prompt_tokens(33, vocab, 3);

  auto alone = fixture.engine(1);
  alone->add_sequence(1);
  const std::vector<float> reference = step_one(*alone, item(1, a, StepOutput::Logits)).logits;

  // In one batch with other sequences, on two threads.
  auto batched = fixture.engine(2);
  for (uint64_t s : {1, 2, 3}) batched->add_sequence(s);
  const auto results =
      batched->step({item(2, b, StepOutput::Logits), item(1, a, StepOutput::Logits), item(3, c, StepOutput::Logits)});
  CHECK(results[1].logits == reference);
  CHECK(same_bits(results[1].logits.data(), reference.data(), reference.size()));

  // Token by token, each decode batched with another sequence's prefill chunk.
  auto decoding = fixture.engine(2);
  decoding->add_sequence(1);
  decoding->add_sequence(2);
  for (size_t t = 0; t < a.size(); ++t) {
    std::vector<StepItem> items = {item(1, {a[t]}, StepOutput::Logits)};
    if (t < c.size() / 3) items.push_back(item(2, slice(c, 3 * t, 3 * t + 3), StepOutput::None));
    const auto step = decoding->step(items);
    CHECK(same_bits(step[0].logits.data(), row_of(reference, t, vocab), static_cast<size_t>(vocab)));
  }

  // Prefill in uneven chunks.
  auto chunked = fixture.engine(2);
  chunked->add_sequence(1);
  size_t position = 0;
  for (size_t chunk : {5, 9, 5}) {
    const auto logits = step_one(*chunked, item(1, slice(a, position, position + chunk), StepOutput::Logits)).logits;
    CHECK(same_bits(logits.data(), row_of(reference, position, vocab), chunk * static_cast<size_t>(vocab)));
    position += chunk;
  }

  // Inside a verify window: the committed token plus six drafts.
  auto verifying = fixture.engine(2);
  verifying->add_sequence(1);
  verifying->add_sequence(2);
  step_one(*verifying, item(1, slice(a, 0, 12), StepOutput::None));
  const auto window = verifying->step({item(2, b, StepOutput::Sample), item(1, slice(a, 12, 19), StepOutput::Logits, 6)});
  CHECK(same_bits(window[1].logits.data(), row_of(reference, 12, vocab), 7 * static_cast<size_t>(vocab)));
}

TEST(prefix_cache_hit_gives_the_same_logits_as_a_cold_prefill) {
  Fixture fixture{TinySpec{}};
  const auto prompt = prompt_tokens(18, fixture.model.spec.vocab, 4);

  auto cold = fixture.engine();
  cold->add_sequence(1);
  const StepResult cold_first = step_one(*cold, item(1, prompt));
  const StepResult cold_next = step_one(*cold, item(1, {cold_first.next_token}, StepOutput::Logits));

  auto warm = fixture.engine();
  warm->add_sequence(1);
  step_one(*warm, item(1, prompt));
  warm->release(1);
  CHECK_EQ(warm->cache_stats().blocks_cached, 4);
  warm->add_sequence(2);
  const StepResult warm_first = step_one(*warm, item(2, prompt));
  const pearl::CacheStats stats = warm->cache_stats();
  CHECK_EQ(stats.prefix_hits, int64_t{1});
  CHECK_EQ(stats.prefix_hit_tokens, int64_t{16});
  CHECK_EQ(warm_first.next_token, cold_first.next_token);
  CHECK_EQ(warm_first.length, int64_t{18});
  const StepResult warm_next = step_one(*warm, item(2, {warm_first.next_token}, StepOutput::Logits));
  CHECK(same_bits(warm_next.logits.data(), cold_next.logits.data(), cold_next.logits.size()));

  // Uncommitted tokens are never published: a draft-side prompt does not feed the cache.
  warm->add_sequence(3);
  StepItem uncommitted = item(3, prompt_tokens(12, fixture.model.spec.vocab, 9), StepOutput::None);
  uncommitted.commit = false;
  step_one(*warm, uncommitted);
  warm->release(3);
  warm->add_sequence(4);
  step_one(*warm, item(4, prompt_tokens(12, fixture.model.spec.vocab, 9)));
  CHECK_EQ(warm->cache_stats().prefix_hits, int64_t{1});
}

TEST(truncate_and_reappend_equals_never_appended) {
  Fixture fixture{TinySpec{}};
  const int vocab = fixture.model.spec.vocab;
  const auto prompt = prompt_tokens(10, vocab, 5);
  const auto detour = prompt_tokens(5, vocab, 6);
  const auto tail = prompt_tokens(4, vocab, 7);

  auto cold = fixture.engine();
  cold->add_sequence(1);
  step_one(*cold, item(1, prompt, StepOutput::None));
  const auto expected = step_one(*cold, item(1, tail, StepOutput::Logits)).logits;

  auto engine = fixture.engine();
  engine->add_sequence(1);
  step_one(*engine, item(1, prompt, StepOutput::None));
  StepItem speculative = item(1, detour, StepOutput::None);
  speculative.commit = false;
  step_one(*engine, speculative);
  CHECK_EQ(engine->sequence_length(1), int64_t{15});
  engine->truncate(1, 10);
  CHECK_EQ(engine->sequence_length(1), int64_t{10});
  const auto logits = step_one(*engine, item(1, tail, StepOutput::Logits)).logits;
  CHECK(same_bits(logits.data(), expected.data(), expected.size()));

  // Rolling back into a block shared through the prefix cache copies it first: the other sequence and
  // the cached prefix keep their K/V.
  auto shared = fixture.engine();
  const auto long_prompt = prompt_tokens(17, vocab, 8);
  shared->add_sequence(1);
  const StepResult first = step_one(*shared, item(1, long_prompt));
  shared->add_sequence(2);
  step_one(*shared, item(2, long_prompt));
  CHECK_EQ(shared->cache_stats().prefix_hit_tokens, int64_t{16});
  shared->truncate(2, 6);
  const auto rewritten = step_one(*shared, item(2, tail, StepOutput::Logits)).logits;
  auto reference = fixture.engine();
  reference->add_sequence(1);
  step_one(*reference, item(1, slice(long_prompt, 0, 6), StepOutput::None));
  const auto rewritten_expected = step_one(*reference, item(1, tail, StepOutput::Logits)).logits;
  CHECK(same_bits(rewritten.data(), rewritten_expected.data(), rewritten_expected.size()));
  const auto continued = step_one(*shared, item(1, {first.next_token}, StepOutput::Logits)).logits;
  reference->add_sequence(2);
  step_one(*reference, item(2, long_prompt, StepOutput::None));
  const auto continued_expected = step_one(*reference, item(2, {first.next_token}, StepOutput::Logits)).logits;
  CHECK(same_bits(continued.data(), continued_expected.data(), continued_expected.size()));
}

TEST(verify_steps_accept_the_targets_own_tokens) {
  Fixture fixture{TinySpec{}};
  const auto prompt = prompt_tokens(9, fixture.model.spec.vocab, 10);
  // Greedy autoregressive reference.
  auto ar = fixture.engine();
  ar->add_sequence(1);
  std::vector<int32_t> generated = {step_one(*ar, item(1, prompt)).next_token};
  for (int i = 0; i < 10; ++i) generated.push_back(step_one(*ar, item(1, {generated.back()})).next_token);

  auto engine = fixture.engine();
  engine->add_sequence(1);
  CHECK_EQ(step_one(*engine, item(1, prompt)).next_token, generated[0]);
  // All five drafts right: accepted, and the bonus is the sixth token.
  StepResult outcome = step_one(*engine, item(1, slice(generated, 0, 6), StepOutput::Sample, 5));
  CHECK_EQ(outcome.accepted, 5);
  CHECK_EQ(outcome.next_token, generated[6]);
  CHECK_EQ(outcome.length, int64_t{9 + 6});
  // Third draft wrong: two accepted, the correction is the target's token, the KV is cut after it.
  std::vector<int32_t> window = slice(generated, 6, 11);
  window[3] = (window[3] + 1) % fixture.model.spec.vocab;
  outcome = step_one(*engine, item(1, window, StepOutput::Sample, 4));
  CHECK_EQ(outcome.accepted, 2);
  CHECK_EQ(outcome.next_token, generated[9]);
  CHECK_EQ(outcome.length, int64_t{9 + 6 + 3});
  CHECK_EQ(engine->sequence_length(1), int64_t{18});
  // Decoding continues exactly as the reference.
  CHECK_EQ(step_one(*engine, item(1, {generated[9]})).next_token, generated[10]);
}

TEST(begun_steps_finish_in_order_and_the_cpu_backend_overlaps_none) {
  Fixture fixture{TinySpec{}};
  const auto prompt = prompt_tokens(9, fixture.model.spec.vocab, 4);
  auto reference = fixture.engine();
  reference->add_sequence(1);
  const StepResult expected = step_one(*reference, item(1, prompt));

  auto engine = fixture.engine();
  engine->add_sequence(1);
  StepItem fed = item(1, {});
  fed.feed_next_token = true;
  CHECK(!engine->can_begin_behind({fed}));  // nothing in flight
  engine->begin_step({item(1, prompt)});
  CHECK(!engine->can_begin_behind({fed}));  // the CPU backend computes on the calling thread
  CHECK_THROWS(engine->begin_step({fed}), "cannot begin while the one in flight has not finished");
  CHECK_THROWS(engine->step({fed}), "still in flight");
  CHECK(engine->step_finished());
  const StepResult first = engine->finish_step().at(0);
  CHECK_EQ(first.next_token, expected.next_token);
  CHECK_EQ(first.length, expected.length);
  CHECK_THROWS(engine->finish_step(), "no step in flight");
  CHECK_EQ(step_one(*engine, fed).next_token, step_one(*reference, item(1, {expected.next_token})).next_token);
}

TEST(seeded_speculative_output_equals_autoregressive_output) {
  Fixture fixture{TinySpec{}};
  const int vocab = fixture.model.spec.vocab;
  const auto prompt = prompt_tokens(8, vocab, 12);
  pearl::SamplingParams sampling;
  sampling.temperature = 0.9f;
  sampling.top_k = 30;
  sampling.top_p = 0.95f;
  sampling.seed = 42;
  const auto sampled = [&](StepItem it) {
    it.sampling = sampling;
    return it;
  };

  auto ar = fixture.engine();
  ar->add_sequence(1);
  std::vector<int32_t> expected = {step_one(*ar, sampled(item(1, prompt))).next_token};
  while (expected.size() < 24) expected.push_back(step_one(*ar, sampled(item(1, {expected.back()}))).next_token);

  // A noisy greedy "draft": right most of the time, wrong sometimes, windows of varying length.
  auto engine = fixture.engine();
  engine->add_sequence(1);
  std::vector<int32_t> output = {step_one(*engine, sampled(item(1, prompt))).next_token};
  int round = 0, total_accepted = 0;
  while (output.size() < expected.size()) {
    const size_t k = std::min<size_t>(1 + round % 4, expected.size() - output.size());
    std::vector<int32_t> window = {output.back()};
    for (size_t j = 0; j < k; ++j) {
      const int32_t right = expected[output.size() + j];
      window.push_back((round + static_cast<int>(j)) % 5 == 3 ? (right + 1) % vocab : right);
    }
    const StepResult outcome = step_one(*engine, sampled(item(1, window, StepOutput::Sample, static_cast<int>(k))));
    output.insert(output.end(), window.begin() + 1, window.begin() + 1 + outcome.accepted);
    output.push_back(outcome.next_token);
    total_accepted += outcome.accepted;
    ++round;
  }
  output.resize(expected.size());
  CHECK(output == expected);
  CHECK(total_accepted > 0);

  // A sampled draft sends its top-k distribution with each token.
  auto drafter = fixture.engine();
  drafter->add_sequence(1);
  StepItem draft_step = sampled(item(1, prompt));
  draft_step.return_top_k = 4;
  const StepResult proposal = step_one(*drafter, draft_step);
  CHECK_EQ(proposal.q.tokens.size(), size_t{4});
  double total = 0.0;
  for (size_t i = 0; i < 4; ++i) {
    total += proposal.q.probs[i];
    if (i > 0) CHECK(proposal.q.probs[i] <= proposal.q.probs[i - 1]);
  }
  CHECK_NEAR(total, 1.0, 1e-5);
  CHECK(std::find(proposal.q.tokens.begin(), proposal.q.tokens.end(), proposal.next_token) != proposal.q.tokens.end());
  // The target verifies it against its own distribution.
  engine->add_sequence(2);
  const StepResult first = step_one(*engine, sampled(item(2, prompt)));
  StepItem verify = sampled(item(2, {first.next_token, proposal.next_token}, StepOutput::Sample, 1));
  verify.draft_dists = {proposal.q};
  const StepResult outcome = step_one(*engine, verify);
  CHECK(outcome.accepted == 0 || outcome.accepted == 1);
  CHECK_EQ(outcome.length, int64_t{8 + 1 + outcome.accepted});
}

// log_softmax of one row, in double, the way a user would compute it from the logits.
std::vector<double> log_softmax(const float* logits, int vocab) {
  double max_logit = logits[0];
  for (int i = 1; i < vocab; ++i) max_logit = std::max(max_logit, static_cast<double>(logits[i]));
  double total = 0.0;
  for (int i = 0; i < vocab; ++i) total += std::exp(logits[i] - max_logit);
  std::vector<double> out(static_cast<size_t>(vocab));
  for (int i = 0; i < vocab; ++i) out[static_cast<size_t>(i)] = logits[i] - max_logit - std::log(total);
  return out;
}

TEST(logprobs_are_the_rows_of_the_committed_tokens_in_every_step_shape) {
  Fixture fixture{TinySpec{}};
  const int vocab = fixture.model.spec.vocab;
  const auto prompt = prompt_tokens(11, vocab, 3);
  const auto scored = [](StepItem it, int logprobs, int prompt_logprobs = -1) {
    it.logprobs = logprobs;
    it.prompt_logprobs = prompt_logprobs;
    return it;
  };
  // The reference: every row's logits of the greedy continuation, from one Logits step.
  auto reference = fixture.engine();
  reference->add_sequence(1);
  std::vector<int32_t> sequence = prompt;
  sequence.push_back(step_one(*reference, item(1, prompt)).next_token);
  for (int i = 0; i < 6; ++i) sequence.push_back(step_one(*reference, item(1, {sequence.back()})).next_token);
  auto whole = fixture.engine();
  whole->add_sequence(1);
  const std::vector<float> logits = step_one(*whole, item(1, sequence, StepOutput::Logits)).logits;
  // Row r scores the token at r + 1; greedy requests score log_softmax.
  const auto expected = [&](size_t row, int32_t token) { return log_softmax(row_of(logits, row, vocab), vocab)[token]; };

  // Prompt scores over two chunks: the first names the token after it.
  auto engine = fixture.engine();
  engine->add_sequence(1);
  StepItem first_chunk = scored(item(1, slice(prompt, 0, 5), StepOutput::None), -1, 3);
  first_chunk.next_prompt_token = prompt[5];
  const StepResult chunk = step_one(*engine, first_chunk);
  const StepResult last = step_one(*engine, scored(item(1, slice(prompt, 5, 11)), 2, 3));
  std::vector<float> prompt_scores = chunk.prompt_logprobs.logprobs;
  prompt_scores.insert(prompt_scores.end(), last.prompt_logprobs.logprobs.begin(), last.prompt_logprobs.logprobs.end());
  CHECK_EQ(prompt_scores.size(), size_t{10});
  for (size_t r = 0; r < 10; ++r) CHECK_NEAR(prompt_scores[r], expected(r, prompt[r + 1]), 1e-5);
  CHECK_EQ(chunk.prompt_logprobs.top_tokens.size(), size_t{5 * 3});
  const std::vector<double> row0 = log_softmax(row_of(logits, 0, vocab), vocab);
  const int32_t argmax = static_cast<int32_t>(std::max_element(row0.begin(), row0.end()) - row0.begin());
  CHECK_EQ(chunk.prompt_logprobs.top_tokens[0], argmax);
  CHECK(chunk.prompt_logprobs.top_logprobs[0] >= chunk.prompt_logprobs.top_logprobs[1]);
  // The first generated token, then a verify window with every draft right: accepted + 1 scores.
  CHECK_EQ(last.logprobs.tokens.size(), size_t{1});
  CHECK_EQ(last.logprobs.tokens[0], sequence[11]);
  CHECK_NEAR(last.logprobs.logprobs[0], expected(10, sequence[11]), 1e-5);
  CHECK_EQ(last.logprobs.top_tokens[0], sequence[11]);  // greedy: the token is the most likely
  const StepResult outcome = step_one(*engine, scored(item(1, slice(sequence, 11, 15), StepOutput::Sample, 3), 1));
  CHECK_EQ(outcome.accepted, 3);
  CHECK_EQ(outcome.logprobs.tokens.size(), size_t{4});
  for (size_t r = 0; r < 4; ++r) {
    CHECK_EQ(outcome.logprobs.tokens[r], sequence[12 + r]);
    CHECK_NEAR(outcome.logprobs.logprobs[r], expected(11 + r, sequence[12 + r]), 1e-5);
  }

  // Sampled: the processed distribution (temperature, top-k), the same in a window as decoded alone.
  pearl::SamplingParams sampling;
  sampling.temperature = 0.7f;
  sampling.top_k = 5;
  sampling.seed = 7;
  auto ar = fixture.engine();
  ar->add_sequence(1);
  StepItem prefill = scored(item(1, prompt), 4);
  prefill.sampling = sampling;
  std::vector<StepResult> decoded = {step_one(*ar, prefill)};
  for (int i = 0; i < 3; ++i) {
    StepItem decode = scored(item(1, {decoded.back().next_token}), 4);
    decode.sampling = sampling;
    decoded.push_back(step_one(*ar, decode));
  }
  auto speculative = fixture.engine();
  speculative->add_sequence(1);
  CHECK_EQ(step_one(*speculative, prefill).next_token, decoded[0].next_token);
  StepItem window = scored(item(1, {decoded[0].next_token, decoded[1].next_token, decoded[2].next_token}), 4);
  window.num_draft = 2;
  window.sampling = sampling;
  const StepResult sampled = step_one(*speculative, window);
  CHECK_EQ(sampled.accepted, 2);
  for (size_t r = 0; r < 3; ++r) {
    const pearl::Logprobs& alone = decoded[r + 1].logprobs;
    CHECK_EQ(sampled.logprobs.tokens[r], alone.tokens[0]);
    CHECK(same_bits(&sampled.logprobs.logprobs[r], alone.logprobs.data(), 1));
    CHECK(same_bits(&sampled.logprobs.top_logprobs[r * 4], alone.top_logprobs.data(), 4));
  }
  // With a top-k cut of 5 the four most likely tokens renormalize: log p = (l - logsumexp over the top 5) / T.
  const std::vector<float> first_row(row_of(logits, 10, vocab), row_of(logits, 10, vocab) + vocab);
  std::vector<float> scaled = first_row;
  for (float& value : scaled) value /= sampling.temperature;
  std::vector<float> sorted = scaled;
  std::sort(sorted.begin(), sorted.end(), std::greater<float>());
  double top_total = 0.0;
  for (int i = 0; i < 5; ++i) top_total += std::exp(static_cast<double>(sorted[i]) - sorted[0]);
  const pearl::Logprobs& first_scores = decoded[0].logprobs;
  for (int i = 0; i < 4; ++i) {
    CHECK_NEAR(first_scores.top_logprobs[static_cast<size_t>(i)], sorted[static_cast<size_t>(i)] - sorted[0] - std::log(top_total), 1e-5);
  }
  CHECK_NEAR(first_scores.logprobs[0], scaled[static_cast<size_t>(first_scores.tokens[0])] - sorted[0] - std::log(top_total), 1e-5);

  // A step without a next prompt token cannot score its last row.
  engine->add_sequence(2);
  CHECK_THROWS(step_one(*engine, scored(item(2, prompt, StepOutput::None), -1, 0)), "next_prompt_token");
}

TEST(bad_input_throws_without_changing_state) {
  Fixture fixture{TinySpec{}};
  const int vocab = fixture.model.spec.vocab;
  auto engine = fixture.engine(2, 4, 12);
  engine->add_sequence(1);
  engine->add_sequence(2);
  const auto prompt = prompt_tokens(10, vocab, 13);
  step_one(*engine, item(1, prompt, StepOutput::None));
  const pearl::CacheStats before = engine->cache_stats();

  const auto expect_rejected = [&](const std::vector<StepItem>& items, const std::string& fragment) {
    CHECK_THROWS(engine->step(items), fragment);
    CHECK_EQ(engine->sequence_length(1), int64_t{10});
    CHECK_EQ(engine->sequence_length(2), int64_t{0});
    const pearl::CacheStats after = engine->cache_stats();
    CHECK_EQ(after.blocks_used, before.blocks_used);
    CHECK_EQ(after.blocks_free, before.blocks_free);
    CHECK_EQ(after.prefix_queries, before.prefix_queries);
  };
  const StepItem valid = item(2, {1, 2, 3});
  expect_rejected({valid, item(9, {1})}, "sequence 9: unknown sequence");
  expect_rejected({valid, item(2, {4})}, "sequence 2: appears more than once");
  expect_rejected({valid, item(1, {})}, "empty token list");
  expect_rejected({valid, item(1, {5, -1})}, "token id -1 at index 1 is out of range [0, 101)");
  expect_rejected({valid, item(1, {vocab})}, "token id 101 at index 0 is out of range");
  expect_rejected({item(1, {1, 2}, StepOutput::Sample, 2)}, "num_draft 2 must be in [0, 1]");
  expect_rejected({item(1, {1, 2}, StepOutput::Sample, -1)}, "num_draft -1");
  expect_rejected({item(1, {1, 2}, StepOutput::None, 1)}, "need output Sample or Logits");
  StepItem dists = item(1, {1, 2, 3}, StepOutput::Sample, 2);
  dists.draft_dists = {pearl::DraftDistribution{{2}, {1.0f}}};
  expect_rejected({dists}, "draft_dists has 1 entries for 2 draft tokens");
  dists.draft_dists.push_back(pearl::DraftDistribution{{4, 5}, {0.5f, 0.5f}});
  expect_rejected({dists}, "draft_dists[1] gives draft token 3 no probability");
  dists.draft_dists[1] = pearl::DraftDistribution{{3, 5}, {0.5f, 0.2f}};
  expect_rejected({dists}, "probs sum to");
  dists.draft_dists[1] = pearl::DraftDistribution{{3, 3}, {0.5f, 0.5f}};
  expect_rejected({dists}, "repeats token 3");
  StepItem hot = item(1, {1});
  hot.sampling.temperature = -1.0f;
  expect_rejected({hot}, "temperature");
  hot.sampling.temperature = 1.0f;
  hot.sampling.top_p = 0.0f;
  expect_rejected({hot}, "top_p must be in (0, 1]");
  StepItem drafting = item(1, {1, 2}, StepOutput::Sample, 1);
  drafting.return_top_k = 3;
  expect_rejected({drafting}, "return_top_k");
  expect_rejected({valid, item(1, std::vector<int32_t>(119, 1))}, "exceeds max_position_embeddings (128)");
  // 12 blocks of 4: sequence 1 holds 3; 40 more tokens need 10 (the partial block has room for 2).
  expect_rejected({valid, item(1, std::vector<int32_t>(40, 1), StepOutput::None)}, "out of KV cache blocks");
  CHECK_THROWS(engine->truncate(1, 11), "cannot truncate");
  CHECK_THROWS(engine->add_sequence(1), "already exists");
  CHECK_THROWS(engine->release(5), "unknown sequence 5");

  // The engine still computes exactly what a fresh one does.
  const auto logits = engine->step({valid, item(1, {7, 8}, StepOutput::Logits)})[1].logits;
  auto fresh = fixture.engine();
  fresh->add_sequence(1);
  step_one(*fresh, item(1, prompt, StepOutput::None));
  const auto expected = step_one(*fresh, item(1, {7, 8}, StepOutput::Logits)).logits;
  CHECK(same_bits(logits.data(), expected.data(), expected.size()));
  engine->release(1);
  engine->release(2);
  CHECK_EQ(engine->cache_stats().blocks_used, 0);
}

TEST(create_reports_bad_models_and_options) {
  Fixture fixture{TinySpec{}};
  EngineOptions options;
  options.model_dir = fixture.dir.path();
  options.backend = "cuda";
  CHECK_THROWS(Engine::create(options), "backend \"cuda\" is not available");
  options.backend = "tpu";
  CHECK_THROWS(Engine::create(options), "unknown backend \"tpu\"");
  options.backend = "auto";
  CHECK_EQ(Engine::create(options)->info().backend, std::string("cpu"));
  options.block_size = 0;
  CHECK_THROWS(Engine::create(options), "block_size must be positive");
  options.block_size = 16;
  options.model_dir = fixture.dir.file("absent");
  CHECK_THROWS(Engine::create(options), "config.json: file not found");

  const std::string config = testing::tiny_config_json(fixture.model.spec);
  const auto with_config = [&](const std::string& from, const std::string& to) {
    std::string changed = config;
    changed.replace(changed.find(from), from.size(), to);
    testing::write_file(fixture.dir.file("config.json"), changed);
  };
  options.model_dir = fixture.dir.path();
  with_config("\"num_hidden_layers\": 2", "\"num_hidden_layers\": 3");
  CHECK_THROWS(Engine::create(options), "missing tensor model.layers.2.input_layernorm.weight");
  with_config("\"intermediate_size\": 80", "\"intermediate_size\": 81");
  CHECK_THROWS(Engine::create(options), "tensor model.layers.0.mlp.gate_proj.weight has shape [80, 48] but the config "
                                        "needs [81, 48]");
  with_config("\"tie_word_embeddings\": false", "\"tie_word_embeddings\": true");
  CHECK(Engine::create(options) != nullptr);  // an lm_head the config does not use is ignored
  with_config("\"vocab_size\": 101,", "");
  CHECK_THROWS(Engine::create(options), "missing required field \"vocab_size\"");
  testing::write_file(fixture.dir.file("config.json"), config);

  const std::string weights = fixture.dir.file("model.safetensors");
  const auto size = std::filesystem::file_size(weights);
  std::filesystem::resize_file(weights, size - 100);
  CHECK_THROWS(Engine::create(options), "out of range");
  std::filesystem::resize_file(weights, 6);
  CHECK_THROWS(Engine::create(options), "file too short");
}

int main() { return check::run_all(); }
