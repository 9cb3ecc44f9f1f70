// The runtime's public API: one Engine owns one model, one backend and one paged KV cache.
// Everything a service needs goes through here; the Node binding is a thin wrapper over it.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace pearl {

// Processed distribution p = top_p(top_k(softmax(logits / temperature))). temperature 0 means greedy
// (argmax, ties to the lowest id). seed makes every random draw a pure function of (seed, position),
// so a request is reproducible whatever else shares the batch.
struct SamplingParams {
  float temperature = 0.0f;
  int top_k = 0;       // 0: no top-k cut
  float top_p = 1.0f;  // 1: no nucleus cut
  uint64_t seed = 0;
};

// A draft proposal's sparse distribution q at one position: the top-k (token, prob) pairs it sampled
// from. Empty when the draft was greedy (q is one-hot on the proposed token).
struct DraftDistribution {
  std::vector<int32_t> tokens;
  std::vector<float> probs;
};

// Log-probabilities of tokens at consecutive positions: for each, the token's own and the top_k most likely
// tokens' there (most likely first, ties to the lowest id; -inf for a token a top-k/top-p cut removed).
struct Logprobs {
  int top_k = 0;
  std::vector<int32_t> tokens;
  std::vector<float> logprobs;
  std::vector<int32_t> top_tokens;  // [tokens.size() * top_k]
  std::vector<float> top_logprobs;  // [tokens.size() * top_k]
};

enum class StepOutput {
  None,    // only extend the KV cache (a prefill chunk that is not the last)
  Sample,  // verify the trailing draft tokens (if any) and return the next token
  Logits,  // like Sample, and also return the raw logits of every appended row (tests, oracles)
};

// One sequence's part of a batched step. The sequence's KV holds positions [0, length); the step appends
// `tokens` at positions [length, length + tokens.size()).
//
// Verification: the last `num_draft` tokens are draft proposals d_1..d_k; the token before them (the last
// committed token, not yet in the KV) is always present, so tokens.size() >= num_draft + 1. Row i's
// distribution judges d_{i+1}; the step returns how many proposals were accepted (n) and the target's
// token at the first unaccepted position (correction, or bonus when n == k). The engine then truncates
// the sequence so its KV ends right after the last accepted token: length becomes
// old_length + tokens.size() - num_draft + n. num_draft == 0 is a plain decode or a prefill's last chunk.
struct StepItem {
  uint64_t seq_id = 0;
  std::vector<int32_t> tokens;
  int num_draft = 0;
  std::vector<DraftDistribution> draft_dists;  // empty, or num_draft entries (sampled draft)
  StepOutput output = StepOutput::Sample;
  SamplingParams sampling;
  // True when the appended non-draft tokens are committed text (a prompt, or the target's verified
  // tokens). Accepted draft tokens of a verify step are committed too. Only full blocks of committed
  // tokens are ever published to the prefix cache.
  bool commit = true;
  // A drafting service asks for q: when > 0 and sampling.temperature > 0, the next token is sampled from
  // the top-`return_top_k` truncated distribution and that distribution is returned with it.
  int return_top_k = 0;
  // The step's input is the next_token this sequence's previous step returned, then `tokens` (which may be
  // empty). The engine knows that token as soon as the previous step ends, so a caller may queue this step
  // behind it without waiting for its result: the next forward pass starts at once instead of after the
  // caller's round trip (pipelined decode). Only a step with output Sample or Logits leaves a token to
  // feed; truncate, release, a failed step and a step with output None forget it.
  bool feed_next_token = false;
  // >= 0: the result's `logprobs` hold, for each token the step emits (the accepted drafts, then next_token),
  // its log-probability at its position and the `logprobs` most likely tokens' (append_logprob_row in sampling.h:
  // the distribution the request samples from). The window's logits then go to the host (on cuda, a copy of
  // vocab floats per window row).
  int logprobs = -1;
  // >= 0: the result's `prompt_logprobs` hold, for every row before the verify window (every row of a step
  // with output None), the raw log-probability of the token after it and the `prompt_logprobs` most likely
  // tokens': the scores of a prompt's tokens given the ones before them. The token after the item's last row
  // is the next step's first, so a prefill chunk that is not the prompt's last names it in
  // next_prompt_token. Every row of such a step is computed (no prefix-cache match).
  int prompt_logprobs = -1;
  int32_t next_prompt_token = -1;
};

struct StepResult {
  uint64_t seq_id = 0;
  int accepted = 0;         // accepted draft tokens
  int32_t next_token = -1;  // -1 when output == None
  std::vector<float> logits;  // [tokens.size() * vocab] when output == Logits
  DraftDistribution q;        // when return_top_k > 0 and sampling
  Logprobs logprobs;          // when logprobs >= 0 and output != None: accepted + 1 tokens
  Logprobs prompt_logprobs;   // when prompt_logprobs >= 0: one per row before the window
  int64_t length = 0;         // sequence length (tokens in the KV) after the step
};

struct EngineOptions {
  std::string model_dir;
  std::string backend = "cpu";  // "cpu" | "cuda" | "auto"
  int block_size = 16;
  int num_blocks = 0;           // 0: derive from memory_fraction / a default capacity
  int num_threads = 0;          // cpu backend; 0: all cores
  std::vector<int> devices;     // cuda backend
  // Batch-invariant numerics: a row's logits never depend on what else shares its step, so greedy
  // pearl/sd output equals ar token for token whatever the batch composition. The cpu backend is always
  // batch-invariant; this only changes the cuda backend (every matrix product takes the batch-invariant
  // kernel, which costs throughput on steps of more than 16 rows).
  bool deterministic = false;
};

struct ModelInfo {
  std::string architecture;  // e.g. "LlamaForCausalLM"
  std::string model_type;
  int vocab_size = 0;
  int hidden_size = 0;
  int num_layers = 0;
  int num_heads = 0;
  int num_kv_heads = 0;
  int head_dim = 0;
  int max_position_embeddings = 0;
  std::vector<int32_t> eos_token_ids;
  int32_t bos_token_id = -1;
  std::string dtype;  // weights as stored: "bfloat16" | "float16" | "float32"
  std::string backend;
  int64_t num_parameters = 0;
};

struct CacheStats {
  int block_size = 0;
  int blocks_total = 0;
  int blocks_used = 0;    // referenced by at least one sequence
  int blocks_free = 0;    // unreferenced (includes cached)
  int blocks_cached = 0;  // unreferenced but holding a published prefix, reusable on a hit
  int64_t prefix_hit_tokens = 0;
  int64_t prefix_queries = 0;
  int64_t prefix_hits = 0;
  int sequences = 0;
};

class Engine {
 public:
  // Throws std::runtime_error with a message naming the file, field or tensor at fault.
  static std::unique_ptr<Engine> create(const EngineOptions& options);
  virtual ~Engine() = default;

  virtual const ModelInfo& info() const = 0;

  // A new empty sequence. A step that appends committed tokens at a block boundary is matched against
  // the prefix cache: cached full blocks are reused and only the rest is computed (at least one token is
  // always computed). Logits steps skip the match so that every row is computed.
  virtual void add_sequence(uint64_t seq_id) = 0;
  virtual bool has_sequence(uint64_t seq_id) const = 0;
  virtual int64_t sequence_length(uint64_t seq_id) const = 0;
  // Speculative rollback: keep positions [0, length). length <= current length.
  virtual void truncate(uint64_t seq_id, int64_t length) = 0;
  // Frees the sequence's blocks (published ones stay cached for reuse).
  virtual void release(uint64_t seq_id) = 0;

  // One batched forward over all items (each seq_id at most once). Validates everything first and throws
  // without changing any state on bad input (unknown sequence, token id out of range, empty tokens,
  // past max_position_embeddings, out of KV blocks, bad num_draft or draft_dists, no token to feed), except
  // that the items' sequences forget their token to feed: a step queued behind a failed one must not feed
  // an older token.
  virtual std::vector<StepResult> step(const std::vector<StepItem>& items) = 0;

  // step() in two halves, so that a step can begin while the one before it runs on the device (overlapped
  // steps; the Node binding's engine thread does this when its queue allows). begin_step validates and
  // launches (throwing as step() does); finish_step waits for the oldest begun step and returns its results.
  // A second step may begin only while exactly one is in flight and can_begin_behind(items) says so: both
  // one-pass decode or prefill steps of few rows without drafts, on a backend that overlaps (the CPU backend
  // does not). Its items may feed the tokens the first step picks (feed_next_token): the device hands them
  // over. When finish_step throws, every step in flight has failed and been undone.
  virtual bool can_begin_behind(const std::vector<StepItem>& items) const = 0;
  virtual void begin_step(const std::vector<StepItem>& items) = 0;
  // Whether finish_step would return without waiting for the device.
  virtual bool step_finished() = 0;
  virtual std::vector<StepResult> finish_step() = 0;

  virtual CacheStats cache_stats() const = 0;
};

}  // namespace pearl
