// ops::choose_row, what a backend returns per output row so that sampling, verification and drafting need no
// logits on the host, against process_logits + sample_token (+ top_k_distribution for a drafting row's q) and
// the speculative sampling rule written out here independently (the verification loop as it read before
// backends computed p(d) and the residual).
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <vector>

#include "check.h"
#include "counter_rng.h"
#include "ops/ops.h"
#include "sampling.h"

using pearl::Distribution;
using pearl::DraftDistribution;
using pearl::SamplingParams;
using pearl::ops::ChosenToken;
using pearl::ops::TokenChoice;

namespace {

constexpr int kVocab = 3000;

// A row with a few dominant logits, a long flat tail, ties, NaN and -inf: every cut has work to do.
std::vector<float> logits_row(int variant) {
  std::vector<float> logits(kVocab);
  for (int i = 0; i < kVocab; ++i) {
    logits[static_cast<size_t>(i)] = static_cast<float>(std::sin(0.37 * i + variant) * 2.0 + 0.002 * ((i * 7) % 13));
  }
  for (int i = 0; i < 8; ++i) logits[static_cast<size_t>((variant * 131 + i * 389) % kVocab)] = 6.0f - 0.25f * i;
  logits[static_cast<size_t>((variant * 17 + 5) % kVocab)] = 5.0f;  // ties with another dominant logit
  logits[static_cast<size_t>((variant * 29 + 11) % kVocab)] = std::numeric_limits<float>::quiet_NaN();
  logits[static_cast<size_t>((variant * 43 + 3) % kVocab)] = -std::numeric_limits<float>::infinity();
  return logits;
}

TokenChoice processed_choice(const SamplingParams& params, int64_t position) {
  TokenChoice choice{params.temperature, params.seed, position};
  choice.processed = true;
  choice.top_k = params.top_k;
  choice.top_p = params.top_p;
  return choice;
}

// The residual draw of the speculative sampling rule: Gumbel-max over p's support of max(0, p - q) with the
// Residual stream, p's own draw when that is empty.
int32_t reference_residual(const Distribution& p, const DraftDistribution& q, uint64_t seed, int64_t position) {
  const pearl::CounterRng rng(seed, position, pearl::RandomPurpose::Residual);
  int32_t best = -1;
  double best_key = 0.0;
  for (size_t i = 0; i < p.tokens.size(); ++i) {
    double weight = p.probs[i];
    for (size_t j = 0; j < q.tokens.size(); ++j) {
      if (q.tokens[j] == p.tokens[i]) weight = std::max(0.0, p.probs[i] - static_cast<double>(q.probs[j]));
    }
    if (!(weight > 0.0)) continue;
    const double key = pearl::gumbel_key(std::log(weight), rng, p.tokens[i]);
    if (best < 0 || key > best_key || (key == best_key && p.tokens[i] < best)) {
      best = p.tokens[i];
      best_key = key;
    }
  }
  return best >= 0 ? best : pearl::sample_token(p, seed, position);
}

// The outcome of the speculative sampling rule over the target's processed distributions.
pearl::VerifyOutcome reference_outcome(const std::vector<Distribution>& target, const std::vector<int32_t>& drafts,
                                 const std::vector<DraftDistribution>& draft_dists, uint64_t seed,
                                 int64_t first_position) {
  const int num_draft = static_cast<int>(drafts.size());
  for (int i = 0; i < num_draft; ++i) {
    const Distribution& p = target[static_cast<size_t>(i)];
    const int64_t position = first_position + i;
    const int32_t draft = drafts[static_cast<size_t>(i)];
    if (draft_dists.empty()) {
      const int32_t token = pearl::sample_token(p, seed, position);
      if (token != draft) return pearl::VerifyOutcome{i, token};
      continue;
    }
    const DraftDistribution& q = draft_dists[static_cast<size_t>(i)];
    double q_draft = 0.0;
    for (size_t j = 0; j < q.tokens.size(); ++j) {
      if (q.tokens[j] == draft) q_draft = q.probs[j];
    }
    const double u = pearl::CounterRng(seed, position, pearl::RandomPurpose::Accept).uniform(0);
    if (u * q_draft < p.prob(draft)) continue;
    return pearl::VerifyOutcome{i, reference_residual(p, q, seed, position)};
  }
  return pearl::VerifyOutcome{num_draft, pearl::sample_token(target.back(), seed, first_position + num_draft)};
}

// A draft's sparse q around `draft`: it and a few other tokens, the draft's share given.
DraftDistribution draft_q(int32_t draft, float draft_share, int variant) {
  DraftDistribution q;
  q.tokens = {draft};
  q.probs = {draft_share};
  const int others = 3;
  for (int k = 1; k <= others; ++k) {
    q.tokens.push_back((draft + 97 * k + variant) % kVocab);
    q.probs.push_back((1.0f - draft_share) / others);
  }
  return q;
}

}  // namespace

TEST(processed_rows_draw_what_process_logits_and_sample_token_draw) {
  int compared = 0;
  for (int variant = 0; variant < 4; ++variant) {
    const std::vector<float> logits = logits_row(variant);
    for (float temperature : {0.0f, 0.4f, 1.0f, 1.9f}) {
      for (const auto& [top_k, top_p] : {std::pair<int, float>{0, 0.9f}, {40, 1.0f}, {5, 0.8f}, {1, 1.0f},
                                         {kVocab + 5, 0.999f}, {0, 1.0f}}) {
        for (uint64_t seed = 1; seed <= 25; ++seed) {
          const SamplingParams params{temperature, top_k, top_p, seed * 7919 + variant};
          const int64_t position = static_cast<int64_t>(seed % 11) + 3;
          const ChosenToken chosen = pearl::ops::choose_row(logits.data(), kVocab, processed_choice(params, position));
          const Distribution p = pearl::process_logits(logits.data(), kVocab, params);
          CHECK_EQ(chosen.token, pearl::sample_token(p, params.seed, position));
          CHECK_EQ(chosen.residual_token, -1);  // no draft judged
          ++compared;
        }
      }
    }
  }
  CHECK_EQ(compared, 4 * 4 * 6 * 25);
}

TEST(one_pass_rows_are_choose_tokens) {
  const std::vector<float> logits = logits_row(1);
  for (uint64_t seed = 0; seed < 50; ++seed) {
    const TokenChoice choice{seed % 2 == 0 ? 0.0f : 0.8f, seed, static_cast<int64_t>(seed) + 1};
    CHECK_EQ(pearl::ops::choose_row(logits.data(), kVocab, choice).token,
             pearl::ops::choose_token(logits.data(), kVocab, choice));
  }
}

// p(d) and the residual draw are those of the target's processed distribution, and a window verified from
// the backend's per-row choices gets the outcome the speculative sampling rule gives on the distributions.
TEST(sampled_draft_windows_from_chosen_rows_equal_the_rule_on_distributions) {
  int accepted_drafts = 0, residual_draws = 0, bonus_tokens = 0;
  for (uint64_t seed = 0; seed < 150; ++seed) {
    const int variant = static_cast<int>(seed % 5);
    const float temperature = seed % 3 == 0 ? 0.0f : (seed % 3 == 1 ? 0.7f : 1.3f);
    const SamplingParams params{temperature, seed % 4 == 0 ? 0 : 20, seed % 2 == 0 ? 0.85f : 1.0f, seed};
    const int num_draft = 3;
    const int64_t first_position = 40 + static_cast<int64_t>(seed);
    std::vector<std::vector<float>> rows;
    std::vector<Distribution> target;
    for (int i = 0; i <= num_draft; ++i) {
      rows.push_back(logits_row(variant + i));
      target.push_back(pearl::process_logits(rows.back().data(), kVocab, params));
    }
    // Drafts the target likes (its own draw) or not (a token outside most supports), with varied q(d).
    std::vector<int32_t> drafts;
    std::vector<DraftDistribution> draft_dists;
    for (int i = 0; i < num_draft; ++i) {
      const int64_t position = first_position + i;
      const int32_t liked = pearl::sample_token(target[static_cast<size_t>(i)], seed, position);
      const int32_t draft = (seed + static_cast<uint64_t>(i)) % 4 == 3 ? (liked + 1500) % kVocab : liked;
      drafts.push_back(draft);
      draft_dists.push_back(draft_q(draft, 0.2f + 0.25f * static_cast<float>((seed + i) % 4), variant));
    }
    std::vector<ChosenToken> chosen;
    for (int i = 0; i <= num_draft; ++i) {
      TokenChoice choice = processed_choice(params, first_position + i);
      if (i < num_draft) {
        choice.draft_token = drafts[static_cast<size_t>(i)];
        choice.draft_dist = &draft_dists[static_cast<size_t>(i)];
      }
      chosen.push_back(pearl::ops::choose_row(rows[static_cast<size_t>(i)].data(), kVocab, choice));
      const Distribution& p = target[static_cast<size_t>(i)];
      CHECK_EQ(chosen.back().token, pearl::sample_token(p, seed, first_position + i));
      if (i < num_draft) {
        CHECK_EQ(chosen.back().draft_prob, p.prob(drafts[static_cast<size_t>(i)]));
        CHECK_EQ(chosen.back().residual_token,
                 reference_residual(p, draft_dists[static_cast<size_t>(i)], seed, first_position + i));
      }
    }
    const pearl::VerifyOutcome expected = reference_outcome(target, drafts, draft_dists, seed, first_position);
    const pearl::VerifyOutcome from_rows = pearl::verify_drafts(
        [&](int i) { return chosen[static_cast<size_t>(i)]; }, drafts.data(), num_draft, draft_dists, seed,
        first_position);
    const pearl::VerifyOutcome from_distributions = pearl::verify_drafts(
        [&](int i) { return target[static_cast<size_t>(i)]; }, drafts.data(), num_draft, draft_dists, seed,
        first_position);
    CHECK_EQ(from_rows.accepted, expected.accepted);
    CHECK_EQ(from_rows.next_token, expected.next_token);
    CHECK_EQ(from_distributions.accepted, expected.accepted);
    CHECK_EQ(from_distributions.next_token, expected.next_token);
    accepted_drafts += expected.accepted;
    if (expected.accepted == num_draft) {
      ++bonus_tokens;
    } else {
      ++residual_draws;
    }
  }
  // The seeds exercise acceptance, rejection with a residual draw, and whole windows accepted.
  CHECK(accepted_drafts > 50);
  CHECK(residual_draws > 20);
  CHECK(bonus_tokens > 5);
}

TEST(greedy_windows_from_chosen_rows_equal_the_rule_on_distributions) {
  for (uint64_t seed = 0; seed < 60; ++seed) {
    const SamplingParams params{seed % 2 == 0 ? 0.0f : 0.9f, 10, 0.9f, seed};
    std::vector<std::vector<float>> rows;
    std::vector<Distribution> target;
    std::vector<int32_t> drafts;
    for (int i = 0; i <= 2; ++i) {
      rows.push_back(logits_row(static_cast<int>(seed) + i));
      target.push_back(pearl::process_logits(rows.back().data(), kVocab, params));
      if (i < 2) drafts.push_back(i == 0 || seed % 3 != 0 ? pearl::sample_token(target.back(), seed, 7 + i) : 0);
    }
    const pearl::VerifyOutcome expected = reference_outcome(target, drafts, {}, seed, 7);
    const pearl::VerifyOutcome outcome = pearl::verify_drafts(
        [&](int i) {
          return pearl::ops::choose_row(rows[static_cast<size_t>(i)].data(), kVocab, processed_choice(params, 7 + i));
        },
        drafts.data(), 2, {}, seed, 7);
    CHECK_EQ(outcome.accepted, expected.accepted);
    CHECK_EQ(outcome.next_token, expected.next_token);
  }
}

// A drafting row returns q = top_k_distribution(p, k) in its k entries (token -1 past q's size) and the token
// sample_token draws from q as sent (float probabilities), for every k from 1 to more than the vocabulary,
// whole-softmax rows and cut rows, rows with ties (logits_row's) and a flat tail, and a temperature so low
// that most weights underflow to 0 (a support of a few tokens, smaller than most k).
TEST(drafting_rows_return_the_top_k_of_p_and_draw_from_it) {
  int compared = 0;
  int from_below_the_top = 0;  // draws that are not q's most likely token: q is really sampled
  int beyond_an_underflowed_support = 0;  // uncut rows whose k exceeds a support that excludes weight-0 tokens
  for (int variant = 0; variant < 3; ++variant) {
    std::vector<float> logits = logits_row(variant);
    if (variant == 2) {
      for (int i = 0; i < kVocab; i += 3) logits[static_cast<size_t>(i)] = 1.5f;  // a wide tie
    }
    for (float temperature : {0.005f, 0.3f, 1.0f, 2.5f}) {
      for (const auto& [top_k, top_p] : {std::pair<int, float>{0, 1.0f}, {0, 0.9f}, {40, 1.0f}, {7, 0.95f}}) {
        for (int k : {1, 2, 5, 16, 64, kVocab + 3}) {
          for (uint64_t seed = 1; seed <= 6; ++seed) {
            const SamplingParams params{temperature, top_k, top_p, seed * 104729 + variant};
            const int64_t position = 100 + static_cast<int64_t>(seed) * 3;
            TokenChoice choice = processed_choice(params, position);
            choice.return_top_k = k;
            std::vector<pearl::ops::TokenProb> entries(static_cast<size_t>(k), pearl::ops::TokenProb{-7, -1.0f});
            const ChosenToken chosen = pearl::ops::choose_row(logits.data(), kVocab, choice, entries.data());

            const DraftDistribution expected =
                pearl::top_k_distribution(pearl::process_logits(logits.data(), kVocab, params), k);
            CHECK(!expected.tokens.empty() && expected.tokens.size() <= static_cast<size_t>(k));
            if (top_k == 0 && top_p >= 1.0f && k < kVocab && expected.tokens.size() < static_cast<size_t>(k)) {
              ++beyond_an_underflowed_support;
            }
            for (size_t j = 0; j < entries.size(); ++j) {
              if (j < expected.tokens.size()) {
                CHECK_EQ(entries[j].token, expected.tokens[j]);
                CHECK_EQ(entries[j].prob, expected.probs[j]);
              } else {
                CHECK_EQ(entries[j].token, -1);
                CHECK_EQ(entries[j].prob, 0.0f);
              }
            }
            const DraftDistribution returned = pearl::ops::returned_q(entries.data(), k);
            CHECK(returned.tokens == expected.tokens);
            CHECK(returned.probs == expected.probs);

            Distribution q;
            q.tokens = expected.tokens;
            q.probs.assign(expected.probs.begin(), expected.probs.end());
            CHECK_EQ(chosen.token, pearl::sample_token(q, params.seed, position));
            CHECK_EQ(chosen.token, pearl::sample_draft_token(expected, params.seed, position));
            CHECK_EQ(chosen.residual_token, -1);
            if (chosen.token != expected.tokens[0]) ++from_below_the_top;
            ++compared;
          }
        }
      }
    }
  }
  CHECK_EQ(compared, 3 * 4 * 4 * 6 * 6);
  CHECK(from_below_the_top > 100);
  CHECK(beyond_an_underflowed_support > 0);
}

TEST(a_drafting_row_without_room_for_q_or_a_finite_maximum_is_refused) {
  TokenChoice choice = processed_choice(SamplingParams{1.0f, 0, 1.0f, 3}, 5);
  choice.return_top_k = 4;
  const std::vector<float> logits = logits_row(0);
  CHECK_THROWS(pearl::ops::choose_row(logits.data(), kVocab, choice), "room for its q");
  std::vector<float> infinite = logits;
  infinite[9] = std::numeric_limits<float>::infinity();
  std::vector<pearl::ops::TokenProb> entries(4);
  CHECK_THROWS(pearl::ops::choose_row(infinite.data(), kVocab, choice, entries.data()), "no finite maximum");
  CHECK(pearl::ops::returned_q(entries.data(), 4).tokens.empty());
  CHECK_EQ(pearl::sample_draft_token(DraftDistribution{}, 3, 5), -1);
}

TEST(rows_without_a_choice_are_refused) {
  std::vector<float> logits = logits_row(0);
  logits[3] = std::numeric_limits<float>::infinity();
  CHECK_THROWS(pearl::ops::choose_row(logits.data(), kVocab, processed_choice(SamplingParams{1.0f, 5, 1.0f, 1}, 0)),
               "no finite maximum");
  CHECK_THROWS(pearl::checked_choice(ChosenToken{}), "no token to choose");
  const ChosenToken fine{4, -1, 0.0};
  CHECK_EQ(pearl::checked_choice(fine).token, 4);
}

int main() { return check::run_all(); }
