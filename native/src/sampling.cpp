#include "sampling.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <stdexcept>

#include "counter_rng.h"
#include "ops/ops.h"

namespace pearl {

double Distribution::prob(int32_t token) const {
  for (size_t i = 0; i < tokens.size(); ++i) {
    if (tokens[i] == token) return probs[i];
  }
  return 0.0;
}

namespace {

// Orders (probability descending, token id ascending): the canonical order of every cut.
struct ByProbability {
  const std::vector<double>* weights;
  bool operator()(int32_t a, int32_t b) const {
    const double wa = (*weights)[static_cast<size_t>(a)];
    const double wb = (*weights)[static_cast<size_t>(b)];
    return wa != wb ? wa > wb : a < b;
  }
};

Distribution one_hot(int32_t token) {
  Distribution p;
  p.tokens.push_back(token);
  p.probs.push_back(1.0);
  return p;
}

// Smallest prefix (in canonical order) whose mass reaches top_p; sorts only as much as it needs.
size_t nucleus_size(std::vector<int32_t>& candidates, const std::vector<double>& weights, double total, double top_p) {
  const ByProbability order{&weights};
  size_t sorted = 0;
  double cumulative = 0.0;
  size_t window = 64;
  while (sorted < candidates.size()) {
    const size_t end = std::min(candidates.size(), sorted + window);
    std::partial_sort(candidates.begin() + static_cast<std::ptrdiff_t>(sorted),
                      candidates.begin() + static_cast<std::ptrdiff_t>(end), candidates.end(), order);
    for (size_t i = sorted; i < end; ++i) {
      cumulative += weights[static_cast<size_t>(candidates[i])] / total;
      if (cumulative >= top_p) return i + 1;
    }
    sorted = end;
    window *= 4;
  }
  return candidates.size();
}

// Gumbel-max over a support: the largest gumbel_key(log w(x)), ties to the lowest id; w need not be
// normalized. ops::choose_token draws the same way from a whole row of logits.
int32_t gumbel_argmax(const std::vector<int32_t>& tokens, const std::vector<double>& weights, const CounterRng& rng) {
  int32_t best_token = -1;
  double best_key = 0.0;
  for (size_t i = 0; i < tokens.size(); ++i) {
    if (!(weights[i] > 0.0)) continue;
    const double key = gumbel_key(std::log(weights[i]), rng, tokens[i]);
    if (best_token < 0 || key > best_key || (key == best_key && tokens[i] < best_token)) {
      best_key = key;
      best_token = tokens[i];
    }
  }
  return best_token;
}

// Sample from norm(max(0, p - q)); q is zero outside its support. sampled is p's own draw at `position`.
int32_t sample_residual(const Distribution& p, const DraftDistribution& q, uint64_t seed, int64_t position,
                        int32_t sampled) {
  std::vector<double> residual(p.probs);
  for (size_t i = 0; i < p.tokens.size(); ++i) {
    for (size_t j = 0; j < q.tokens.size(); ++j) {
      if (q.tokens[j] == p.tokens[i]) residual[i] = std::max(0.0, p.probs[i] - static_cast<double>(q.probs[j]));
    }
  }
  const int32_t token = gumbel_argmax(p.tokens, residual, CounterRng(seed, position, RandomPurpose::Residual));
  // A rejection has probability 1 - sum(min(p, q)) = sum(max(0, p - q)), so an empty residual only arises
  // from rounding when p and q agree; p itself is then the right distribution.
  return token >= 0 ? token : sampled;
}

[[noreturn]] void throw_nothing_to_choose() {
  throw std::runtime_error(
      "no token to choose: every logit is NaN (or, when sampling, infinite; with a top-k/top-p cut or a sampled "
      "draft, any +inf logit)");
}

}  // namespace

Distribution chosen_token_distribution(int32_t token) {
  if (token < 0) throw_nothing_to_choose();
  return one_hot(token);
}

const ops::ChosenToken& checked_choice(const ops::ChosenToken& choice) {
  if (choice.token < 0) throw_nothing_to_choose();
  return choice;
}

Distribution process_logits(const float* logits, int vocab_size, const SamplingParams& params) {
  if (params.temperature <= 0.0f) return chosen_token_distribution(ops::choose_token(logits, vocab_size, {}));

  const double inv_temperature = 1.0 / static_cast<double>(params.temperature);
  double max_logit = -std::numeric_limits<double>::infinity();
  for (int i = 0; i < vocab_size; ++i) {
    if (!std::isnan(logits[i])) max_logit = std::max(max_logit, static_cast<double>(logits[i]));
  }
  if (!std::isfinite(max_logit)) throw std::runtime_error("logits have no finite maximum");

  std::vector<double> weights(static_cast<size_t>(vocab_size));
  std::vector<int32_t> candidates;
  candidates.reserve(static_cast<size_t>(vocab_size));
  for (int32_t i = 0; i < vocab_size; ++i) {
    const double w = std::isnan(logits[i]) ? 0.0 : std::exp((logits[i] - max_logit) * inv_temperature);
    weights[static_cast<size_t>(i)] = w;
    if (w > 0.0) candidates.push_back(i);
  }
  if (params.top_k > 0 && static_cast<size_t>(params.top_k) < candidates.size()) {
    const auto kth = candidates.begin() + params.top_k;
    std::nth_element(candidates.begin(), kth, candidates.end(), ByProbability{&weights});
    candidates.resize(static_cast<size_t>(params.top_k));
    std::sort(candidates.begin(), candidates.end());
  }
  double total = 0.0;
  for (int32_t token : candidates) total += weights[static_cast<size_t>(token)];
  if (params.top_p < 1.0f) {
    candidates.resize(nucleus_size(candidates, weights, total, static_cast<double>(params.top_p)));
    std::sort(candidates.begin(), candidates.end());
    total = 0.0;
    for (int32_t token : candidates) total += weights[static_cast<size_t>(token)];
  }

  Distribution p;
  p.tokens = std::move(candidates);
  p.probs.reserve(p.tokens.size());
  for (int32_t token : p.tokens) p.probs.push_back(weights[static_cast<size_t>(token)] / total);
  return p;
}

void append_logprob_row(const float* logits, int vocab_size, const SamplingParams& params, int32_t token,
                        Logprobs& out) {
  constexpr double kMinusInfinity = -std::numeric_limits<double>::infinity();
  std::vector<double> logprob(static_cast<size_t>(vocab_size), kMinusInfinity);
  if (params.temperature > 0.0f) {
    const Distribution p = process_logits(logits, vocab_size, params);
    for (size_t i = 0; i < p.tokens.size(); ++i) logprob[static_cast<size_t>(p.tokens[i])] = std::log(p.probs[i]);
  } else {
    double max_logit = kMinusInfinity;
    for (int i = 0; i < vocab_size; ++i) {
      if (!std::isnan(logits[i])) max_logit = std::max(max_logit, static_cast<double>(logits[i]));
    }
    if (!std::isfinite(max_logit)) throw std::runtime_error("logits have no finite maximum");
    double total = 0.0;
    for (int i = 0; i < vocab_size; ++i) {
      if (!std::isnan(logits[i])) total += std::exp(static_cast<double>(logits[i]) - max_logit);
    }
    const double log_total = std::log(total);
    for (int i = 0; i < vocab_size; ++i) {
      if (!std::isnan(logits[i])) logprob[static_cast<size_t>(i)] = logits[i] - max_logit - log_total;
    }
  }
  out.tokens.push_back(token);
  out.logprobs.push_back(static_cast<float>(logprob[static_cast<size_t>(token)]));
  std::vector<int32_t> order(static_cast<size_t>(vocab_size));
  std::iota(order.begin(), order.end(), 0);
  const size_t top = std::min(order.size(), static_cast<size_t>(std::max(out.top_k, 0)));
  std::partial_sort(order.begin(), order.begin() + static_cast<std::ptrdiff_t>(top), order.end(),
                    ByProbability{&logprob});
  for (size_t i = 0; i < top; ++i) {
    out.top_tokens.push_back(order[i]);
    out.top_logprobs.push_back(static_cast<float>(logprob[static_cast<size_t>(order[i])]));
  }
}

int32_t sample_token(const Distribution& p, uint64_t seed, int64_t position) {
  if (p.tokens.size() == 1) return p.tokens[0];
  return gumbel_argmax(p.tokens, p.probs, CounterRng(seed, position, RandomPurpose::Sample));
}

DraftDistribution top_k_distribution(const Distribution& p, int k) {
  std::vector<size_t> order(p.tokens.size());
  std::iota(order.begin(), order.end(), size_t{0});
  const size_t keep = std::min(order.size(), static_cast<size_t>(std::max(k, 1)));
  std::partial_sort(order.begin(), order.begin() + static_cast<std::ptrdiff_t>(keep), order.end(),
                    [&](size_t a, size_t b) {
                      return p.probs[a] != p.probs[b] ? p.probs[a] > p.probs[b] : p.tokens[a] < p.tokens[b];
                    });
  double total = 0.0;
  for (size_t i = 0; i < keep; ++i) total += p.probs[order[i]];
  DraftDistribution q;
  for (size_t i = 0; i < keep; ++i) {
    q.tokens.push_back(p.tokens[order[i]]);
    q.probs.push_back(static_cast<float>(p.probs[order[i]] / total));
  }
  return q;
}

int32_t sample_draft_token(const DraftDistribution& q, uint64_t seed, int64_t position) {
  Distribution sent;
  sent.tokens = q.tokens;
  sent.probs.assign(q.probs.begin(), q.probs.end());
  return sample_token(sent, seed, position);
}

ops::ChosenToken choose_from_distribution(const Distribution& p, uint64_t seed, int64_t position, int32_t draft_token,
                                          const DraftDistribution* draft_dist) {
  ops::ChosenToken choice;
  choice.token = sample_token(p, seed, position);
  if (draft_token >= 0) {
    choice.draft_prob = p.prob(draft_token);
    choice.residual_token = sample_residual(p, *draft_dist, seed, position, choice.token);
  }
  return choice;
}

// Greedy draft (q one-hot on d): the target's token at each position is its own Gumbel-max sample t,
// which is distributed as p, and d is accepted iff d == t. So d is accepted with probability p(d), and
// on rejection the emitted t is distributed as p conditioned on t != d, i.e. p without d, renormalized:
// exactly the speculative sampling rule for a one-hot q. Because t depends only on (p, seed, position),
// it is also the token plain autoregressive decoding with the same seed emits there, so a seeded
// speculative run reproduces the target-only run token for token, whatever the draft proposed.
//
// Sampled draft: accept d with probability min(1, p(d)/q(d)) using a uniform keyed to the position,
// independent of the noise the draft used to pick d; on rejection sample norm(max(0, p - q)). When all
// drafts are accepted the bonus token is p's own Gumbel-max sample at the next position.
VerifyOutcome verify_drafts(const std::function<ops::ChosenToken(int)>& target, const int32_t* drafts, int num_draft,
                            const std::vector<DraftDistribution>& draft_dists, uint64_t seed,
                            int64_t first_position) {
  for (int i = 0; i < num_draft; ++i) {
    const ops::ChosenToken row = target(i);
    const int64_t position = first_position + i;
    const int32_t draft = drafts[i];
    if (draft_dists.empty()) {
      if (row.token != draft) return VerifyOutcome{i, row.token};
      continue;
    }
    const DraftDistribution& q = draft_dists[static_cast<size_t>(i)];
    double q_draft = 0.0;
    for (size_t j = 0; j < q.tokens.size(); ++j) {
      if (q.tokens[j] == draft) q_draft = q.probs[j];
    }
    const double u = CounterRng(seed, position, RandomPurpose::Accept).uniform(0);
    if (u * q_draft < row.draft_prob) continue;
    return VerifyOutcome{i, row.residual_token};
  }
  return VerifyOutcome{num_draft, target(num_draft).token};
}

VerifyOutcome verify_drafts(const std::function<Distribution(int)>& target, const int32_t* drafts, int num_draft,
                            const std::vector<DraftDistribution>& draft_dists, uint64_t seed,
                            int64_t first_position) {
  const std::function<ops::ChosenToken(int)> chosen = [&](int i) {
    const bool judges_sampled_draft = !draft_dists.empty() && i < num_draft;
    return choose_from_distribution(target(i), seed, first_position + i, judges_sampled_draft ? drafts[i] : -1,
                                    judges_sampled_draft ? &draft_dists[static_cast<size_t>(i)] : nullptr);
  };
  return verify_drafts(chosen, drafts, num_draft, draft_dists, seed, first_position);
}

}  // namespace pearl
