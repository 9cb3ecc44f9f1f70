#include "engine.h"

#include <algorithm>
#include <cmath>
#include <deque>
#include <optional>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <unordered_set>

#include "backend.h"
#include "kv_cache.h"
#include "model_config.h"
#include "safetensors.h"
#include "sampling.h"
#include "weights.h"

namespace pearl {

namespace {

[[noreturn]] void invalid_item(const StepItem& item, const std::string& message) {
  throw std::runtime_error("step: sequence " + std::to_string(item.seq_id) + ": " + message);
}

void validate_draft_distribution(const StepItem& item, size_t index, int32_t draft_token, int vocab_size) {
  const DraftDistribution& q = item.draft_dists[index];
  const std::string where = "draft_dists[" + std::to_string(index) + "] ";
  if (q.tokens.empty() || q.tokens.size() != q.probs.size()) {
    invalid_item(item, where + "needs as many probs as tokens, and at least one");
  }
  std::unordered_set<int32_t> seen;
  double total = 0.0;
  bool holds_draft = false;
  for (size_t j = 0; j < q.tokens.size(); ++j) {
    if (q.tokens[j] < 0 || q.tokens[j] >= vocab_size) {
      invalid_item(item, where + "token id " + std::to_string(q.tokens[j]) + " is out of range [0, " +
                             std::to_string(vocab_size) + ")");
    }
    if (!seen.insert(q.tokens[j]).second) invalid_item(item, where + "repeats token " + std::to_string(q.tokens[j]));
    if (!std::isfinite(q.probs[j]) || q.probs[j] < 0.0f) invalid_item(item, where + "has a negative or non-finite prob");
    total += q.probs[j];
    if (q.tokens[j] == draft_token && q.probs[j] > 0.0f) holds_draft = true;
  }
  if (std::fabs(total - 1.0) > 1e-3) {
    invalid_item(item, where + "probs sum to " + std::to_string(total) + ", not 1");
  }
  if (!holds_draft) {
    invalid_item(item, where + "gives draft token " + std::to_string(draft_token) + " no probability");
  }
}

class EngineImpl : public Engine {
 public:
  explicit EngineImpl(const EngineOptions& options)
      : config_(ModelConfig::load(options.model_dir)),
        checkpoint_(std::make_unique<Checkpoint>(options.model_dir)),
        backend_(create_backend(config_, *checkpoint_, validated(options))),
        cache_(backend_->num_blocks(), options.block_size) {
    info_.architecture = config_.architecture;
    info_.model_type = config_.model_type;
    info_.vocab_size = config_.vocab_size;
    info_.hidden_size = config_.hidden_size;
    info_.num_layers = config_.num_layers;
    info_.num_heads = config_.num_heads;
    info_.num_kv_heads = config_.num_kv_heads;
    info_.head_dim = config_.head_dim;
    info_.max_position_embeddings = config_.max_position_embeddings;
    info_.eos_token_ids = config_.eos_token_ids;
    info_.bos_token_id = config_.bos_token_id;
    info_.dtype = dtype_torch_name(checkpoint_->find("model.embed_tokens.weight")->dtype);
    info_.backend = backend_->name();
    info_.num_parameters = count_parameters(config_);
    // The backend holds its own copy of the weights: unmap the files.
    checkpoint_.reset();
  }

  const ModelInfo& info() const override { return info_; }

  void add_sequence(uint64_t seq_id) override { cache_.add_sequence(seq_id); }
  bool has_sequence(uint64_t seq_id) const override { return cache_.has_sequence(seq_id); }
  int64_t sequence_length(uint64_t seq_id) const override { return cache_.length(seq_id); }
  void truncate(uint64_t seq_id, int64_t length) override {
    cache_.truncate(seq_id, length);
    next_tokens_.erase(seq_id);
  }
  void release(uint64_t seq_id) override {
    cache_.release(seq_id);
    next_tokens_.erase(seq_id);
  }
  CacheStats cache_stats() const override { return cache_.stats(); }

  std::vector<StepResult> step(const std::vector<StepItem>& items) override {
    if (!in_flight_.empty()) throw std::logic_error("step: steps begun by begin_step are still in flight");
    begin_step(items);
    return finish_step();
  }

  bool can_begin_behind(const std::vector<StepItem>& items) const override {
    return in_flight_.size() == 1 && in_flight_.front().overlappable && overlappable(items);
  }

  void begin_step(const std::vector<StepItem>& items) override {
    if (!in_flight_.empty() && !can_begin_behind(items)) {
      throw std::logic_error("begin_step: the step cannot begin while the one in flight has not finished");
    }
    try {
      StepInFlight step;
      step.items = items;
      step.overlappable = overlappable(items);
      resolve_fed_tokens(step);
      validate(step.items);
      for (const StepItem& item : step.items) step.old_lengths.push_back(cache_.length(item.seq_id));
      try {
        launch(step);
      } catch (...) {
        undo(step);
        throw;
      }
      in_flight_.push_back(std::move(step));
    } catch (...) {
      for (const StepItem& item : items) next_tokens_.erase(item.seq_id);
      throw;
    }
  }

  bool step_finished() override { return backend_->forward_finished(); }

  std::vector<StepResult> finish_step() override {
    if (in_flight_.empty()) throw std::logic_error("finish_step: no step in flight");
    StepInFlight& step = in_flight_.front();
    try {
      backend_->finish_forward();
      if (!step.failure.empty()) throw std::runtime_error(step.failure);
      std::vector<StepResult> results = complete(step);
      if (in_flight_.size() > 1) hand_over_tokens(results, in_flight_[1]);
      in_flight_.pop_front();
      return results;
    } catch (...) {
      abandon_in_flight();
      throw;
    }
  }

 private:
  static const EngineOptions& validated(const EngineOptions& options) {
    if (options.block_size <= 0) throw std::runtime_error("block_size must be positive");
    if (options.num_blocks < 0) throw std::runtime_error("num_blocks must be >= 0 (0 picks a default)");
    if (options.num_threads < 0) throw std::runtime_error("num_threads must be >= 0 (0 uses every core)");
    return options;
  }

  // A step between begin_step and finish_step: its items (fed tokens in place), where the backend writes
  // its outputs, and what turning them into results needs.
  struct StepInFlight {
    // Items whose fed token the step before picks on the device: items[item] takes the token of that step's
    // items[source_item].
    struct DeviceFed {
      size_t item;
      size_t source_item;
    };
    std::vector<StepItem> items;
    std::vector<int64_t> old_lengths;
    bool overlappable = false;
    std::vector<DeviceFed> device_fed;
    std::string failure;  // set when the step before picked no token for one of device_fed
    std::vector<ops::TokenChoice> choices;  // per output
    std::vector<size_t> window_output;      // the output of each item's first window row
    std::vector<size_t> first_logit_row;    // in the host logits, which hold full outputs only
    std::vector<size_t> pre_window_rows;    // an item's full rows before its window (prompt scores, Logits)
    std::vector<size_t> q_offset;           // a drafting item's q in the returned q entries
    std::vector<float> logits;
    std::vector<ops::ChosenToken> chosen;
    std::vector<ops::TokenProb> returned;
  };

  // Whether a step may run while another is in flight (Backend::begin_forward): a one-pass decode or prefill
  // of few rows without drafts, so its sequences' lengths after it are known before it ends and nothing of it
  // needs the host between the device's passes (its one output row is not drawn from a processed
  // distribution, by the rule the backend applies to the row's choice).
  bool overlappable(const std::vector<StepItem>& items) const {
    if (items.empty()) return false;
    size_t rows = 0;
    for (const StepItem& item : items) {
      if (item.num_draft != 0 || item.output != StepOutput::Sample) return false;
      if (item.logprobs >= 0 || item.prompt_logprobs >= 0) return false;
      if (ops::draws_processed(window_choice(item, 0, 0))) return false;
      rows += item.tokens.size() + (item.feed_next_token ? 1 : 0);
    }
    return rows <= static_cast<size_t>(backend_->max_overlapped_rows());
  }

  // Puts each fed token in front of its item's tokens: known on the host, or, for a sequence of the step in
  // flight, a placeholder that the device replaces with that step's token (hand_over_tokens records it here).
  void resolve_fed_tokens(StepInFlight& step) const {
    for (size_t i = 0; i < step.items.size(); ++i) {
      StepItem& item = step.items[i];
      if (!item.feed_next_token) continue;
      item.feed_next_token = false;
      int32_t token = 0;
      const std::optional<size_t> source = item_in_flight(item.seq_id);
      if (source) {
        step.device_fed.push_back({i, *source});
      } else {
        const auto next = next_tokens_.find(item.seq_id);
        if (next == next_tokens_.end()) {
          invalid_item(item, "feed_next_token: no token to feed (the sequence's last step returned none, failed, or "
                             "was followed by a truncate)");
        }
        token = next->second;
      }
      item.tokens.insert(item.tokens.begin(), token);
    }
  }

  // The sequence's item in the step in flight, if it has one.
  std::optional<size_t> item_in_flight(uint64_t seq_id) const {
    if (in_flight_.empty()) return std::nullopt;
    const std::vector<StepItem>& items = in_flight_.front().items;
    for (size_t i = 0; i < items.size(); ++i) {
      if (items[i].seq_id == seq_id) return i;
    }
    return std::nullopt;
  }

  // The step in flight finished with `results`; the step behind it learns the tokens it took on the device.
  void hand_over_tokens(const std::vector<StepResult>& results, StepInFlight& behind) {
    for (const StepInFlight::DeviceFed& fed : behind.device_fed) {
      const int32_t token = results[fed.source_item].next_token;
      StepItem& item = behind.items[fed.item];
      if (token < 0) {
        behind.failure = "step: sequence " + std::to_string(item.seq_id) + ": the step before picked no token to feed";
        continue;
      }
      item.tokens.front() = token;
      cache_.set_token(item.seq_id, behind.old_lengths[fed.item], token);
    }
  }

  // Leaves every sequence of the step as it was before it (blocks it took go back to the pool).
  void undo(const StepInFlight& step) {
    for (size_t i = 0; i < step.items.size(); ++i) cache_.truncate(step.items[i].seq_id, step.old_lengths[i]);
  }

  // After a failure: every step in flight is waited for and undone, newest first, and its sequences forget
  // their token to feed.
  void abandon_in_flight() {
    for (size_t i = 1; i < in_flight_.size(); ++i) {
      try {
        backend_->finish_forward();
      } catch (...) {
        // The first failure is the one reported.
      }
    }
    for (auto step = in_flight_.rbegin(); step != in_flight_.rend(); ++step) {
      undo(*step);
      for (const StepItem& item : step->items) next_tokens_.erase(item.seq_id);
    }
    in_flight_.clear();
  }

  // Whether the logits of the item's window must reach the host: a Logits step returns them, and
  // log-probabilities are computed from them there (append_logprob_row). Every token, p(draft), residual
  // draw and drafting q the backend computes next to the logits (ops::choose_row), so the host never sees a
  // vocabulary-sized row otherwise.
  static bool needs_host_logits(const StepItem& item) {
    return item.output == StepOutput::Logits || item.logprobs >= 0;
  }

  // Whether the item has rows before its window to output (a Logits step's, or the prompt rows it scores):
  // those are computed whatever the prefix cache holds.
  static bool outputs_pre_window_rows(const StepItem& item) {
    return item.output == StepOutput::Logits || item.prompt_logprobs >= 0;
  }

  // A drafting step that returns q (top_k_distribution of p) with the next token drawn from it.
  static bool returns_q(const StepItem& item) { return item.return_top_k > 0 && item.sampling.temperature > 0.0f; }

  // How the backend picks the token of row `window_row` of the item's verify window (0: the last committed
  // token's row; the window has num_draft + 1 rows), which sits at `position`.
  ops::TokenChoice window_choice(const StepItem& item, int window_row, int64_t position) const {
    const SamplingParams& s = item.sampling;
    ops::TokenChoice choice{s.temperature, s.seed, position};
    const bool sampled_drafts = !item.draft_dists.empty();
    // process_logits + sample_token whenever the draw is not the whole softmax's one-pass Gumbel-max, for
    // every row of a sampled-draft window (p(d), the residual and the bonus draw are the host rule's), for a
    // Logits step, whose tokens thus follow from the logits it returns by the host rule, and for a drafting
    // step, whose q is the top of p.
    choice.processed = s.top_k > 0 || s.top_p < 1.0f || sampled_drafts || item.output == StepOutput::Logits ||
                       returns_q(item);
    choice.top_k = s.top_k;
    choice.top_p = s.top_p;
    // q never holds more than the vocabulary, so the backend's room for it need not either.
    if (returns_q(item)) choice.return_top_k = std::min(item.return_top_k, config_.vocab_size);
    if (sampled_drafts && window_row < item.num_draft) {
      const size_t draft = static_cast<size_t>(window_row);
      choice.draft_token = item.tokens[item.tokens.size() - static_cast<size_t>(item.num_draft) + draft];
      choice.draft_dist = &item.draft_dists[draft];
    }
    return choice;
  }

  // Every check that can fail happens here, before any state changes.
  void validate(const std::vector<StepItem>& items) const {
    std::unordered_set<uint64_t> seen;
    int64_t blocks_needed = 0;
    for (const StepItem& item : items) {
      if (!cache_.has_sequence(item.seq_id)) invalid_item(item, "unknown sequence");
      if (!seen.insert(item.seq_id).second) invalid_item(item, "appears more than once in the batch");
      const int64_t count = static_cast<int64_t>(item.tokens.size());
      if (count == 0) invalid_item(item, "empty token list");
      for (size_t i = 0; i < item.tokens.size(); ++i) {
        if (item.tokens[i] < 0 || item.tokens[i] >= config_.vocab_size) {
          invalid_item(item, "token id " + std::to_string(item.tokens[i]) + " at index " + std::to_string(i) +
                                 " is out of range [0, " + std::to_string(config_.vocab_size) + ")");
        }
      }
      if (item.num_draft < 0 || item.num_draft >= count) {
        invalid_item(item, "num_draft " + std::to_string(item.num_draft) + " must be in [0, " +
                               std::to_string(count - 1) + "] for " + std::to_string(count) + " tokens");
      }
      if (item.num_draft > 0 && item.output == StepOutput::None) {
        invalid_item(item, "draft tokens need output Sample or Logits to be verified");
      }
      if (!item.draft_dists.empty()) {
        if (static_cast<int>(item.draft_dists.size()) != item.num_draft) {
          invalid_item(item, "draft_dists has " + std::to_string(item.draft_dists.size()) + " entries for " +
                                 std::to_string(item.num_draft) + " draft tokens");
        }
        for (size_t i = 0; i < item.draft_dists.size(); ++i) {
          validate_draft_distribution(item, i, item.tokens[static_cast<size_t>(count - item.num_draft) + i],
                                      config_.vocab_size);
        }
      }
      const SamplingParams& sampling = item.sampling;
      if (!std::isfinite(sampling.temperature) || sampling.temperature < 0.0f) {
        invalid_item(item, "temperature must be a finite number >= 0");
      }
      if (sampling.top_k < 0) invalid_item(item, "top_k must be >= 0");
      if (!(sampling.top_p > 0.0f && sampling.top_p <= 1.0f)) invalid_item(item, "top_p must be in (0, 1]");
      if (item.return_top_k < 0) invalid_item(item, "return_top_k must be >= 0");
      if (item.return_top_k > 0 && item.num_draft > 0) {
        invalid_item(item, "return_top_k is for drafting steps and needs num_draft == 0");
      }
      if (item.logprobs < -1 || item.prompt_logprobs < -1) {
        invalid_item(item, "logprobs and prompt_logprobs must be >= -1 (-1: none)");
      }
      if (item.prompt_logprobs >= 0 && item.output == StepOutput::None &&
          !(item.next_prompt_token >= 0 && item.next_prompt_token < config_.vocab_size)) {
        invalid_item(item, "prompt_logprobs of a step with output None need next_prompt_token in [0, " +
                               std::to_string(config_.vocab_size) + "), the token after its last row");
      }
      const int64_t length = cache_.length(item.seq_id);
      if (length + count > config_.max_position_embeddings) {
        invalid_item(item, "length " + std::to_string(length) + " + " + std::to_string(count) +
                               " tokens exceeds max_position_embeddings (" +
                               std::to_string(config_.max_position_embeddings) + ")");
      }
      blocks_needed += cache_.blocks_needed(item.seq_id, count);
    }
    if (blocks_needed > cache_.free_blocks()) {
      throw std::runtime_error("step: out of KV cache blocks: the batch needs " + std::to_string(blocks_needed) +
                               ", " + std::to_string(cache_.free_blocks()) + " of " +
                               std::to_string(cache_.num_blocks()) + " are free");
    }
  }

  // Appends every item's tokens to its sequence and begins the backend's forward pass over them.
  void launch(StepInFlight& step) {
    const std::vector<StepItem>& items = step.items;
    const std::vector<int64_t>& old_lengths = step.old_lengths;
    // Prefix-cache matches first, so that this step's allocations cannot evict a block another item
    // is about to reuse. The row before the drafts (and every draft) is always computed, and so is a token
    // the device has yet to feed.
    std::vector<int64_t> matched(items.size(), 0);
    std::vector<bool> device_fed(items.size(), false);
    for (const StepInFlight::DeviceFed& fed : step.device_fed) device_fed[fed.item] = true;
    for (size_t i = 0; i < items.size(); ++i) {
      const StepItem& item = items[i];
      if (!item.commit || outputs_pre_window_rows(item) || device_fed[i] || !cache_.can_match_prefix(item.seq_id)) {
        continue;
      }
      const int64_t committed_tokens = static_cast<int64_t>(item.tokens.size()) - item.num_draft;
      matched[i] = cache_.match_prefix(item.seq_id, item.tokens.data(), committed_tokens - 1);
    }

    ForwardBatch batch;
    std::vector<int32_t> slots;
    step.window_output.assign(items.size(), 0);
    step.first_logit_row.assign(items.size(), 0);
    step.pre_window_rows.assign(items.size(), 0);
    step.q_offset.assign(items.size(), 0);
    size_t full_outputs = 0;
    size_t q_entries = 0;
    for (size_t i = 0; i < items.size(); ++i) {
      const StepItem& item = items[i];
      const int64_t count = static_cast<int64_t>(item.tokens.size());
      const auto copy = cache_.append(item.seq_id, item.tokens.data() + matched[i], count - matched[i], &slots);
      if (copy) backend_->copy_block(copy->source, copy->destination);
      batch.block_tables.push_back(cache_.block_table(item.seq_id));
      const int64_t first_row = static_cast<int64_t>(batch.tokens.size());
      for (int64_t t = matched[i]; t < count; ++t) {
        batch.tokens.push_back(item.tokens[static_cast<size_t>(t)]);
        batch.positions.push_back(static_cast<int32_t>(old_lengths[i] + t));
        batch.slots.push_back(slots[static_cast<size_t>(t - matched[i])]);
        batch.row_table.push_back(static_cast<int32_t>(i));
      }
      step.first_logit_row[i] = full_outputs;
      // A step with output None has no window: all its rows come before it.
      const int64_t window_from = item.output == StepOutput::None ? count : count - item.num_draft - 1;
      const int64_t logit_from = outputs_pre_window_rows(item) ? matched[i] : window_from;
      step.window_output[i] = batch.logit_rows.size() + static_cast<size_t>(window_from - logit_from);
      step.pre_window_rows[i] = static_cast<size_t>(window_from - logit_from);
      const bool full_window = needs_host_logits(item);
      for (int64_t t = logit_from; t < count; ++t) {
        const bool pre_window = t < window_from;
        batch.logit_rows.push_back(static_cast<int32_t>(first_row + t - matched[i]));
        // Rows whose token goes unused (a Logits step's prompt, scored prompt rows) take the argmax, the
        // cheapest pick.
        batch.choices.push_back(pre_window ? ops::TokenChoice{}
                                           : window_choice(item, static_cast<int>(t - window_from),
                                                           old_lengths[i] + t + 1));
        const bool full = pre_window || full_window;
        batch.full_logits.push_back(full ? 1 : 0);
        if (full) ++full_outputs;
        if (batch.choices.back().return_top_k > 0) step.q_offset[i] = q_entries;
        q_entries += static_cast<size_t>(batch.choices.back().return_top_k);
      }
    }
    if (!step.device_fed.empty()) {
      const StepInFlight& before = in_flight_.front();
      batch.fed_outputs.assign(batch.tokens.size(), -1);
      size_t row = 0;
      for (size_t i = 0; i < items.size(); ++i) {
        if (device_fed[i]) {
          const auto fed = std::find_if(step.device_fed.begin(), step.device_fed.end(),
                                        [&](const StepInFlight::DeviceFed& entry) { return entry.item == i; });
          batch.fed_outputs[row] = static_cast<int32_t>(before.window_output[fed->source_item]);
        }
        row += items[i].tokens.size() - static_cast<size_t>(matched[i]);
      }
    }

    step.choices = batch.choices;
    step.logits.resize(full_outputs * static_cast<size_t>(config_.vocab_size));
    step.chosen.resize(batch.logit_rows.size());
    step.returned.resize(q_entries);
    backend_->begin_forward(batch, step.logits.data(), step.chosen.data(), step.returned.data());
  }

  // The results of a step whose forward pass has finished: verify outcomes, then each sequence cut after its
  // last accepted token and its committed tokens published.
  std::vector<StepResult> complete(const StepInFlight& step) {
    const std::vector<StepItem>& items = step.items;
    const std::vector<int64_t>& old_lengths = step.old_lengths;
    const size_t vocab = static_cast<size_t>(config_.vocab_size);
    std::vector<StepResult> results;
    results.reserve(items.size());
    for (size_t i = 0; i < items.size(); ++i) {
      const StepItem& item = items[i];
      const int64_t count = static_cast<int64_t>(item.tokens.size());
      StepResult result;
      result.seq_id = item.seq_id;
      if (item.output != StepOutput::None) {
        if (item.output == StepOutput::Logits) {
          const float* item_logits = step.logits.data() + step.first_logit_row[i] * vocab;
          result.logits.assign(item_logits, item_logits + static_cast<size_t>(count) * vocab);
        }
        // Rows of the window: the last committed token's row, then one per draft. A drafting step's window is
        // its last row alone, whose token the backend drew from the q it returned.
        const int64_t first_position = old_lengths[i] + count - item.num_draft;
        const auto target = [&](int row) {
          return checked_choice(step.chosen[step.window_output[i] + static_cast<size_t>(row)]);
        };
        const VerifyOutcome outcome = verify_drafts(target, item.tokens.data() + (count - item.num_draft),
                                                    item.num_draft, item.draft_dists, item.sampling.seed,
                                                    first_position);
        result.accepted = outcome.accepted;
        result.next_token = outcome.next_token;
        if (returns_q(item)) {
          result.q = ops::returned_q(step.returned.data() + step.q_offset[i],
                                     step.choices[step.window_output[i]].return_top_k);
        }
        if (item.logprobs >= 0) {
          // Window row r judged draft r and holds the target's distribution at the position of the r-th
          // emitted token: the same row, bit for bit, that plain decoding computes there.
          const float* window = step.logits.data() + (step.first_logit_row[i] + step.pre_window_rows[i]) * vocab;
          const int32_t* drafts = item.tokens.data() + (count - item.num_draft);
          result.logprobs.top_k = std::min(item.logprobs, config_.vocab_size);
          for (int r = 0; r <= result.accepted; ++r) {
            append_logprob_row(window + static_cast<size_t>(r) * vocab, config_.vocab_size, item.sampling,
                               r < result.accepted ? drafts[r] : result.next_token, result.logprobs);
          }
        }
      }
      if (item.prompt_logprobs >= 0) {
        const float* rows = step.logits.data() + step.first_logit_row[i] * vocab;
        result.prompt_logprobs.top_k = std::min(item.prompt_logprobs, config_.vocab_size);
        for (size_t r = 0; r < step.pre_window_rows[i]; ++r) {
          const int32_t scored = r + 1 < item.tokens.size() ? item.tokens[r + 1] : item.next_prompt_token;
          append_logprob_row(rows + r * vocab, config_.vocab_size, SamplingParams{}, scored, result.prompt_logprobs);
        }
      }
      if (result.next_token >= 0) {
        next_tokens_[item.seq_id] = result.next_token;
      } else {
        next_tokens_.erase(item.seq_id);
      }
      const int64_t new_length = old_lengths[i] + count - item.num_draft + result.accepted;
      // Only rejected drafts are cut: a step begun behind this one may have appended after it.
      if (result.accepted < item.num_draft) cache_.truncate(item.seq_id, new_length);
      if (item.commit) cache_.commit(item.seq_id, old_lengths[i], new_length);
      result.length = new_length;
      results.push_back(std::move(result));
    }
    return results;
  }

  ModelConfig config_;
  std::unique_ptr<Checkpoint> checkpoint_;
  std::unique_ptr<Backend> backend_;
  KvCacheManager cache_;
  ModelInfo info_;
  std::unordered_map<uint64_t, int32_t> next_tokens_;  // what feed_next_token feeds, per sequence
  std::deque<StepInFlight> in_flight_;                 // begun steps, oldest first (at most two)
};

}  // namespace

std::unique_ptr<Engine> Engine::create(const EngineOptions& options) { return std::make_unique<EngineImpl>(options); }

}  // namespace pearl
