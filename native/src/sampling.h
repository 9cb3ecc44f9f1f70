// Sampling and speculative verification next to the logits (DESIGN §5).
//
// Every random choice uses counter-based noise keyed by (seed, position, purpose), so a seeded request
// draws the same tokens whatever shares its batch, and the target's token at a position is the same
// whether it is produced by plain decoding or inside a verify window.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "engine.h"

namespace pearl {

// A processed distribution p = top_p(top_k(softmax(logits / T))) over its support (probabilities > 0,
// summing to 1). Support order is unspecified; ties are always broken towards the lowest token id.
struct Distribution {
  std::vector<int32_t> tokens;
  std::vector<double> probs;

  double prob(int32_t token) const;  // 0 outside the support
};

// Greedy (temperature 0) gives the one-hot argmax, ties to the lowest id.
Distribution process_logits(const float* logits, int vocab_size, const SamplingParams& params);

// The one-hot distribution of a token the backend chose (ops::choose_token): what process_logits and
// sample_token would give for a greedy row, or the same draw for a sampled one. Throws for -1 (nothing
// could be chosen).
Distribution chosen_token_distribution(int32_t token);

// Gumbel-max draw at `position`: argmax over the support of log p(x) + G(seed, position, x).
int32_t sample_token(const Distribution& p, uint64_t seed, int64_t position);

// The renormalized top-k of p (probabilities descending, ties to the lowest id), as a drafting service
// sends it along with a token sampled from it.
DraftDistribution top_k_distribution(const Distribution& p, int k);

struct Verdict {
  int accepted = 0;         // accepted draft tokens
  int32_t next_token = -1;  // correction at the first rejected position, or the bonus token
};

// Verifies drafts d_1..d_k proposed at positions first_position .. first_position + k - 1.
// target(i) is the target's processed distribution for position first_position + i (i = 0..k; row i of
// the window). draft_dists is empty for a greedy draft, else one sparse q per draft token.
Verdict verify_drafts(const std::function<Distribution(int)>& target, const int32_t* drafts, int num_draft,
                      const std::vector<DraftDistribution>& draft_dists, uint64_t seed, int64_t first_position);

}  // namespace pearl
