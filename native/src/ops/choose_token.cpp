#include <algorithm>
#include <cmath>
#include <stdexcept>

#include "counter_rng.h"
#include "ops.h"
#include "sampling.h"

namespace pearl::ops {

int32_t choose_token(const float* logits, int n, const TokenChoice& choice) {
  const bool sample = choice.temperature > 0.0f;
  const double inv_temperature = sample ? 1.0 / static_cast<double>(choice.temperature) : 0.0;
  const CounterRng rng(choice.seed, choice.position, RandomPurpose::Sample);
  int32_t best = -1;
  double best_key = 0.0;
  for (int32_t i = 0; i < n; ++i) {
    if (std::isnan(logits[i]) || (sample && !std::isfinite(logits[i]))) continue;
    const double key = sample ? gumbel_key(logits[i] * inv_temperature, rng, i) : logits[i];
    if (best < 0 || key > best_key) {
      best = i;
      best_key = key;
    }
  }
  return best;
}

DraftDistribution returned_q(const TokenProb* entries, int capacity) {
  DraftDistribution q;
  for (int i = 0; i < capacity && entries[i].token >= 0; ++i) {
    q.tokens.push_back(entries[i].token);
    q.probs.push_back(entries[i].prob);
  }
  return q;
}

ChosenToken choose_row(const float* logits, int n, const TokenChoice& choice, TokenProb* q_entries) {
  if (!choice.processed) {
    ChosenToken chosen;
    chosen.token = choose_token(logits, n, choice);
    return chosen;
  }
  SamplingParams params;
  params.temperature = choice.temperature;
  params.top_k = choice.top_k;
  params.top_p = choice.top_p;
  params.seed = choice.seed;
  const Distribution p = process_logits(logits, n, params);
  if (choice.return_top_k > 0) {
    if (q_entries == nullptr) throw std::invalid_argument("choose_row: a drafting row needs room for its q");
    const DraftDistribution q = top_k_distribution(p, choice.return_top_k);
    std::fill(q_entries, q_entries + choice.return_top_k, TokenProb{});
    for (size_t i = 0; i < q.tokens.size(); ++i) q_entries[i] = TokenProb{q.tokens[i], q.probs[i]};
    ChosenToken chosen;
    chosen.token = sample_draft_token(q, choice.seed, choice.position);
    return chosen;
  }
  return choose_from_distribution(p, choice.seed, choice.position, choice.draft_token, choice.draft_dist);
}

}  // namespace pearl::ops
