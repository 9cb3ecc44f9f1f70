// Sampling and speculative verification next to the logits (docs/design.md §4, exactness).
//
// Every random choice uses counter-based noise keyed by (seed, position, purpose), so a seeded request
// draws the same tokens whatever shares its batch, and the target's token at a position is the same
// whether it is produced by plain decoding or inside a verify window.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "engine.h"
#include "ops/ops.h"

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

// Appends one row to `out`: the log-probability of `token` and the out.top_k most likely tokens'. Sampling
// params (temperature > 0) score the processed distribution p = process_logits(logits, params), -inf
// outside p's support (vLLM's "processed_logprobs"); greedy params score log_softmax(logits), since greedy
// decoding applies no temperature or cut (nor does vLLM's). Prompt scores pass greedy params: raw, as vLLM's
// prompt logprobs are in every mode. Throws where process_logits does (no finite maximum).
void append_logprob_row(const float* logits, int vocab_size, const SamplingParams& params, int32_t token,
                        Logprobs& out);

// The one-hot distribution of a chosen token (process_logits' greedy case). Throws for -1 (nothing
// could be chosen).
Distribution chosen_token_distribution(int32_t token);

// A backend's choice for a row, checked: throws for token -1 (nothing could be chosen).
const ops::ChosenToken& checked_choice(const ops::ChosenToken& choice);

// Gumbel-max draw at `position`: argmax over the support of log p(x) + G(seed, position, x).
int32_t sample_token(const Distribution& p, uint64_t seed, int64_t position);

// The renormalized top-k of p (probabilities descending, ties to the lowest id), as a drafting service
// sends it along with a token sampled from it.
DraftDistribution top_k_distribution(const Distribution& p, int k);

// The drafting service's token: sample_token over q as sent (its float probabilities); -1 for an empty q.
int32_t sample_draft_token(const DraftDistribution& q, uint64_t seed, int64_t position);

// What verification needs from the target's row at `position`, given its processed distribution p: its own
// draw (sample_token) and, when the row judges a sampled draft (draft_token >= 0 with q = *draft_dist),
// p(draft_token) and the residual draw from norm(max(0, p - q)) (p's own draw when that is empty). A
// backend computes the same next to the logits (ops::choose_row).
ops::ChosenToken choose_from_distribution(const Distribution& p, uint64_t seed, int64_t position,
                                          int32_t draft_token = -1, const DraftDistribution* draft_dist = nullptr);

// What verifying a window of drafts decides. (The target service's proto message Verdict is a different
// thing: one step's emitted tokens for one session.)
struct VerifyOutcome {
  int accepted = 0;         // accepted draft tokens
  int32_t next_token = -1;  // correction at the first rejected position, or the bonus token
};

// Verifies drafts d_1..d_k proposed at positions first_position .. first_position + k - 1.
// target(i) is what the target's row i of the window (position first_position + i, i = 0..k) chose: for a
// greedy draft (draft_dists empty) its token, for a sampled draft (one sparse q per draft token)
// p(d_{i+1}) and the residual draw of rows i < k, and the bonus row's token.
VerifyOutcome verify_drafts(const std::function<ops::ChosenToken(int)>& target, const int32_t* drafts, int num_draft,
                            const std::vector<DraftDistribution>& draft_dists, uint64_t seed,
                            int64_t first_position);

// The same outcome from the target's processed distributions (target(i) for row i): each row's choices are
// choose_from_distribution's.
VerifyOutcome verify_drafts(const std::function<Distribution(int)>& target, const int32_t* drafts, int num_draft,
                            const std::vector<DraftDistribution>& draft_dists, uint64_t seed,
                            int64_t first_position);

}  // namespace pearl
