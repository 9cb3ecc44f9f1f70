#include "sampling.h"

#include <cmath>
#include <map>

#include "check.h"
#include "ops/ops.h"

using pearl::DraftDistribution;
using pearl::Distribution;
using pearl::SamplingParams;

namespace {

SamplingParams params(float temperature, int top_k = 0, float top_p = 1.0f, uint64_t seed = 0) {
  SamplingParams p;
  p.temperature = temperature;
  p.top_k = top_k;
  p.top_p = top_p;
  p.seed = seed;
  return p;
}

// Logits whose softmax is exactly `probs` (up to rounding).
std::vector<float> logits_for(const std::vector<double>& probs) {
  std::vector<float> logits;
  for (double p : probs) logits.push_back(p > 0 ? static_cast<float>(std::log(p)) : -INFINITY);
  return logits;
}

Distribution from_q(const DraftDistribution& q) {
  Distribution d;
  d.tokens = q.tokens;
  d.probs.assign(q.probs.begin(), q.probs.end());
  return d;
}

// 5 standard errors of a frequency estimated from n draws.
double tolerance(double p, int n) { return 5.0 * std::sqrt(std::max(p * (1 - p), 1e-4) / n) + 1e-9; }

}  // namespace

TEST(greedy_picks_the_lowest_id_among_ties) {
  const std::vector<float> logits = {1.0f, 3.0f, -2.0f, 3.0f, 2.9f};
  const Distribution p = pearl::process_logits(logits.data(), 5, params(0.0f));
  CHECK(p.tokens == (std::vector<int32_t>{1}));
  CHECK_EQ(p.probs[0], 1.0);
  CHECK_EQ(pearl::sample_token(p, 123, 9), 1);
  const std::vector<float> with_nan = {NAN, 0.5f, 0.5f};
  CHECK_EQ(pearl::process_logits(with_nan.data(), 3, params(0.0f)).tokens[0], 1);
}

// The rule every backend follows when it picks tokens itself (the CUDA kernel is held to it in test:gpu).
TEST(choose_token_greedy_skips_nan_and_breaks_ties_towards_the_lowest_id) {
  const pearl::ops::TokenChoice greedy;
  const std::vector<float> signed_zeros = {-1.0f, -0.0f, 0.0f, NAN};
  CHECK_EQ(pearl::ops::choose_token(signed_zeros.data(), 4, greedy), 1);
  const std::vector<float> infinities = {NAN, -INFINITY, -INFINITY, NAN};
  CHECK_EQ(pearl::ops::choose_token(infinities.data(), 4, greedy), 1);
  const std::vector<float> all_nan = {NAN, NAN};
  CHECK_EQ(pearl::ops::choose_token(all_nan.data(), 2, greedy), -1);
  CHECK_THROWS(pearl::process_logits(all_nan.data(), 2, params(0.0f)), "every logit is NaN");
  CHECK_THROWS(pearl::chosen_token_distribution(-1), "every logit is NaN");
  CHECK(pearl::chosen_token_distribution(7).tokens == (std::vector<int32_t>{7}));
  // Sampling never picks a token whose logit is not finite, and gives -1 when none is.
  const pearl::ops::TokenChoice hot{1.0f, 5, 3};
  CHECK_EQ(pearl::ops::choose_token(infinities.data(), 4, hot), -1);
  const std::vector<float> one_finite = {-INFINITY, NAN, 2.0f, -INFINITY};
  CHECK_EQ(pearl::ops::choose_token(one_finite.data(), 4, hot), 2);
}

// A backend that samples a row itself draws the very token the engine's host path draws from the
// processed distribution at the same (seed, position): the two are one rule.
TEST(choose_token_sampling_draws_what_sample_token_draws) {
  std::vector<float> logits(300);
  for (size_t i = 0; i < logits.size(); ++i) logits[i] = static_cast<float>(std::sin(0.37 * i) * 3.0 + 0.01 * i);
  int differing = 0;
  std::map<int32_t, int> seen;
  for (float temperature : {0.3f, 1.0f, 2.5f}) {
    for (uint64_t seed = 1; seed <= 200; ++seed) {
      const int64_t position = static_cast<int64_t>(seed % 17) + 4;
      const pearl::ops::TokenChoice choice{temperature, seed, position};
      const int32_t chosen = pearl::ops::choose_token(logits.data(), static_cast<int>(logits.size()), choice);
      const pearl::Distribution p =
          pearl::process_logits(logits.data(), static_cast<int>(logits.size()), params(temperature, 0, 1.0f, seed));
      if (chosen != pearl::sample_token(p, seed, position)) ++differing;
      ++seen[chosen];
    }
  }
  CHECK_EQ(differing, 0);
  CHECK(seen.size() > 20);  // the draws really vary with the seed
}

TEST(temperature_top_k_and_top_p_supports) {
  const std::vector<double> probs = {0.05, 0.5, 0.15, 0.3};
  const std::vector<float> logits = logits_for(probs);
  Distribution p = pearl::process_logits(logits.data(), 4, params(1.0f));
  CHECK_EQ(p.tokens.size(), size_t{4});
  for (int t = 0; t < 4; ++t) CHECK_NEAR(p.prob(t), probs[static_cast<size_t>(t)], 1e-6);

  p = pearl::process_logits(logits.data(), 4, params(1.0f, 2));
  CHECK_EQ(p.tokens.size(), size_t{2});
  CHECK_NEAR(p.prob(1), 0.5 / 0.8, 1e-6);
  CHECK_NEAR(p.prob(3), 0.3 / 0.8, 1e-6);

  p = pearl::process_logits(logits.data(), 4, params(1.0f, 0, 0.75f));
  CHECK_EQ(p.tokens.size(), size_t{2});
  CHECK_NEAR(p.prob(1), 0.5 / 0.8, 1e-6);
  p = pearl::process_logits(logits.data(), 4, params(1.0f, 0, 0.81f));
  CHECK_EQ(p.tokens.size(), size_t{3});
  CHECK_NEAR(p.prob(2), 0.15 / 0.95, 1e-6);
  CHECK_EQ(p.prob(0), 0.0);
  // top_p applies to the renormalized top-k distribution.
  p = pearl::process_logits(logits.data(), 4, params(1.0f, 3, 0.6f));
  CHECK_EQ(p.tokens.size(), size_t{2});  // 0.5/0.95 < 0.6 <= 0.8/0.95
  // Temperature 2 flattens: p ~ sqrt(probs).
  p = pearl::process_logits(logits.data(), 4, params(2.0f));
  double total = 0;
  for (double q : probs) total += std::sqrt(q);
  CHECK_NEAR(p.prob(0), std::sqrt(0.05) / total, 1e-6);
  // Tied logits at the top-k boundary keep the lowest id.
  const std::vector<float> tied = {2.0f, 1.0f, 1.0f, 1.0f};
  p = pearl::process_logits(tied.data(), 4, params(1.0f, 2));
  CHECK_EQ(p.prob(1) > 0.0, true);
  CHECK_EQ(p.prob(2), 0.0);
  // A nucleus over a large vocabulary sorts in growing windows; the result is the same set.
  std::vector<float> wide(5000);
  for (size_t i = 0; i < wide.size(); ++i) wide[i] = static_cast<float>(std::sin(static_cast<double>(i) * 0.37) * 2.0);
  p = pearl::process_logits(wide.data(), 5000, params(1.0f, 0, 0.9f));
  double kept = 0.0, smallest_kept = 1.0;
  const Distribution full = pearl::process_logits(wide.data(), 5000, params(1.0f));
  for (int32_t t : p.tokens) {
    kept += full.prob(t);
    smallest_kept = std::min(smallest_kept, full.prob(t));
  }
  CHECK(kept >= 0.9);
  CHECK(kept - smallest_kept < 0.9);  // minimal
}

TEST(gumbel_sampling_matches_p) {
  const std::vector<double> probs = {0.1, 0.45, 0.05, 0.25, 0.15};
  const std::vector<float> logits = logits_for(probs);
  const Distribution p = pearl::process_logits(logits.data(), 5, params(1.0f));
  const int n = 200000;
  std::vector<int> by_seed(5, 0), by_position(5, 0);
  for (int i = 0; i < n; ++i) {
    ++by_seed[static_cast<size_t>(pearl::sample_token(p, static_cast<uint64_t>(i), 17))];
    ++by_position[static_cast<size_t>(pearl::sample_token(p, 99, i))];
  }
  for (size_t t = 0; t < 5; ++t) {
    CHECK_NEAR(by_seed[t] / double(n), probs[t], tolerance(probs[t], n));
    CHECK_NEAR(by_position[t] / double(n), probs[t], tolerance(probs[t], n));
  }
  // Reproducible: a pure function of (seed, position).
  CHECK_EQ(pearl::sample_token(p, 5, 6), pearl::sample_token(p, 5, 6));
}

TEST(top_k_distribution_is_sorted_and_renormalized) {
  const std::vector<float> logits = logits_for({0.2, 0.1, 0.3, 0.1, 0.3});
  const Distribution p = pearl::process_logits(logits.data(), 5, params(1.0f));
  const DraftDistribution q = pearl::top_k_distribution(p, 3);
  CHECK(q.tokens == (std::vector<int32_t>{2, 4, 0}));
  CHECK_NEAR(q.probs[0], 0.375, 1e-6);
  CHECK_NEAR(q.probs[2], 0.25, 1e-6);
  CHECK_EQ(pearl::top_k_distribution(p, 10).tokens.size(), size_t{5});
}

TEST(greedy_draft_accepts_with_probability_p) {
  const std::vector<double> probs = {0.1, 0.45, 0.05, 0.25, 0.15};
  const std::vector<float> logits = logits_for(probs);
  const Distribution p = pearl::process_logits(logits.data(), 5, params(1.0f));
  const auto target = [&](int) { return p; };
  const int n = 100000;
  const int32_t draft = 3;
  int accepted = 0;
  std::vector<int> corrections(5, 0);
  for (int seed = 0; seed < n; ++seed) {
    const pearl::VerifyOutcome outcome =
        pearl::verify_drafts(target, &draft, 1, {}, static_cast<uint64_t>(seed), 40);
    if (outcome.accepted == 1) {
      ++accepted;
      // The bonus is the target's own sample at the next position.
      CHECK_EQ(outcome.next_token, pearl::sample_token(p, static_cast<uint64_t>(seed), 41));
    } else {
      ++corrections[static_cast<size_t>(outcome.next_token)];
      // The correction is the token plain decoding samples at that position.
      CHECK_EQ(outcome.next_token, pearl::sample_token(p, static_cast<uint64_t>(seed), 40));
    }
  }
  CHECK_NEAR(accepted / double(n), 0.25, tolerance(0.25, n));
  const int rejected = n - accepted;
  CHECK_EQ(corrections[3], 0);
  for (size_t t = 0; t < 5; ++t) {
    if (t == 3) continue;
    const double expected = probs[t] / 0.75;  // p without the draft, renormalized
    CHECK_NEAR(corrections[t] / double(rejected), expected, tolerance(expected, rejected));
  }
}

TEST(sampled_draft_follows_min_p_over_q_and_the_residual) {
  // Target p and draft q (sparse, top-3 of some draft model).
  const std::vector<double> probs = {0.1, 0.45, 0.05, 0.25, 0.15};
  const std::vector<float> logits = logits_for(probs);
  const Distribution p = pearl::process_logits(logits.data(), 5, params(1.0f));
  DraftDistribution q;
  q.tokens = {1, 2, 4};
  q.probs = {0.3f, 0.5f, 0.2f};
  const auto target = [&](int) { return p; };
  const int n = 200000;
  std::map<int32_t, int> proposed, accepted;
  std::vector<int> output(5, 0), residual(5, 0);
  int rejections = 0;
  for (int seed = 0; seed < n; ++seed) {
    // The draft samples d from q with the same seed and position, as a drafting service would.
    const int32_t draft = pearl::sample_token(from_q(q), static_cast<uint64_t>(seed), 8);
    const pearl::VerifyOutcome outcome =
        pearl::verify_drafts(target, &draft, 1, {q}, static_cast<uint64_t>(seed), 8);
    ++proposed[draft];
    if (outcome.accepted == 1) {
      ++accepted[draft];
      ++output[static_cast<size_t>(draft)];
    } else {
      ++rejections;
      ++residual[static_cast<size_t>(outcome.next_token)];
      ++output[static_cast<size_t>(outcome.next_token)];
    }
  }
  for (size_t j = 0; j < q.tokens.size(); ++j) {
    const int32_t d = q.tokens[j];
    const double rate = std::min(1.0, probs[static_cast<size_t>(d)] / q.probs[j]);
    CHECK_NEAR(accepted[d] / double(proposed[d]), rate, tolerance(rate, proposed[d]));
  }
  // Residual norm(max(0, p - q)): tokens 0 (0.1), 1 (0.15), 3 (0.25); mass 0.5.
  const std::vector<double> expected_residual = {0.2, 0.3, 0.0, 0.5, 0.0};
  for (size_t t = 0; t < 5; ++t) {
    CHECK_NEAR(residual[t] / double(rejections), expected_residual[t], tolerance(expected_residual[t], rejections));
  }
  // Overall the emitted token is distributed exactly as p.
  for (size_t t = 0; t < 5; ++t) CHECK_NEAR(output[t] / double(n), probs[t], tolerance(probs[t], n));
}

TEST(multi_token_windows_stop_at_the_first_rejection) {
  const std::vector<float> logits_a = {0.0f, 5.0f, 1.0f};  // greedy: 1
  const std::vector<float> logits_b = {4.0f, 0.0f, 1.0f};  // greedy: 0
  const std::vector<float> logits_c = {0.0f, 1.0f, 6.0f};  // greedy: 2
  const std::vector<const std::vector<float>*> rows = {&logits_a, &logits_b, &logits_c};
  const auto target = [&](int i) { return pearl::process_logits(rows[static_cast<size_t>(i)]->data(), 3, params(0.0f)); };
  const int32_t good[] = {1, 0};
  pearl::VerifyOutcome outcome = pearl::verify_drafts(target, good, 2, {}, 0, 5);
  CHECK_EQ(outcome.accepted, 2);
  CHECK_EQ(outcome.next_token, 2);
  const int32_t bad_second[] = {1, 2};
  outcome = pearl::verify_drafts(target, bad_second, 2, {}, 0, 5);
  CHECK_EQ(outcome.accepted, 1);
  CHECK_EQ(outcome.next_token, 0);
  const int32_t bad_first[] = {2, 0};
  outcome = pearl::verify_drafts(target, bad_first, 2, {}, 0, 5);
  CHECK_EQ(outcome.accepted, 0);
  CHECK_EQ(outcome.next_token, 1);
  // Greedy target with a sampled draft: accepted iff the draft is the argmax.
  DraftDistribution q;
  q.tokens = {1, 2};
  q.probs = {0.6f, 0.4f};
  DraftDistribution q2;
  q2.tokens = {0, 2};
  q2.probs = {0.1f, 0.9f};
  const int32_t drafts[] = {1, 2};
  outcome = pearl::verify_drafts(target, drafts, 2, {q, q2}, 3, 5);
  CHECK_EQ(outcome.accepted, 1);
  CHECK_EQ(outcome.next_token, 0);
}

int main() { return check::run_all(); }
