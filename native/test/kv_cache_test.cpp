#include "kv_cache.h"

#include <numeric>

#include "check.h"

using pearl::CacheStats;
using pearl::KvCacheManager;

namespace {

std::vector<int32_t> iota_tokens(int count, int32_t first = 100) {
  std::vector<int32_t> tokens(static_cast<size_t>(count));
  std::iota(tokens.begin(), tokens.end(), first);
  return tokens;
}

void append(KvCacheManager& cache, uint64_t seq, const std::vector<int32_t>& tokens,
            std::vector<int32_t>* slots = nullptr) {
  std::vector<int32_t> ignored;
  const auto copy = cache.append(seq, tokens.data(), static_cast<int64_t>(tokens.size()), slots ? slots : &ignored);
  CHECK(!copy);
}

bool same_stats(const CacheStats& a, const CacheStats& b) {
  return a.blocks_total == b.blocks_total && a.blocks_used == b.blocks_used && a.blocks_free == b.blocks_free &&
         a.blocks_cached == b.blocks_cached && a.prefix_hit_tokens == b.prefix_hit_tokens &&
         a.prefix_queries == b.prefix_queries && a.prefix_hits == b.prefix_hits && a.sequences == b.sequences;
}

}  // namespace

TEST(allocate_and_release_return_to_start) {
  KvCacheManager cache(8, 4);
  const CacheStats start = cache.stats();
  CHECK_EQ(start.blocks_free, 8);
  cache.add_sequence(1);
  cache.add_sequence(2);
  CHECK_THROWS(cache.add_sequence(1), "already exists");
  CHECK_EQ(cache.blocks_needed(1, 10), 3);
  std::vector<int32_t> slots;
  append(cache, 1, iota_tokens(10), &slots);
  CHECK_EQ(slots.size(), size_t{10});
  const auto& table = cache.block_table(1);
  CHECK_EQ(table.size(), size_t{3});
  for (int p = 0; p < 10; ++p) CHECK_EQ(slots[static_cast<size_t>(p)], table[static_cast<size_t>(p / 4)] * 4 + p % 4);
  append(cache, 2, iota_tokens(3));
  append(cache, 1, iota_tokens(2));  // fills block 2 of sequence 1 without a new block
  CHECK_EQ(cache.block_table(1).size(), size_t{3});
  CHECK_EQ(cache.length(1), int64_t{12});
  CacheStats mid = cache.stats();
  CHECK_EQ(mid.blocks_used, 4);
  CHECK_EQ(mid.blocks_free, 4);
  CHECK_EQ(mid.sequences, 2);
  cache.truncate(1, 5);
  CHECK_EQ(cache.block_table(1).size(), size_t{2});
  CHECK_EQ(cache.stats().blocks_used, 3);
  cache.release(1);
  cache.release(2);
  CHECK(same_stats(cache.stats(), start));
  CHECK_THROWS(cache.release(1), "unknown sequence 1");
  CHECK_THROWS(cache.length(9), "unknown sequence 9");
}

TEST(prefix_hits_follow_the_chain) {
  KvCacheManager cache(16, 4);
  const auto prompt = iota_tokens(13);
  cache.add_sequence(1);
  append(cache, 1, prompt);
  cache.commit(1, 0, 13);
  const std::vector<int32_t> published(cache.block_table(1).begin(), cache.block_table(1).begin() + 3);
  cache.release(1);
  CHECK_EQ(cache.stats().blocks_cached, 3);  // the partial 4th block is never published

  // At most 11 tokens may come from the cache: 2 full blocks.
  cache.add_sequence(2);
  CHECK(cache.can_match_prefix(2));
  CHECK_EQ(cache.match_prefix(2, prompt.data(), 11), int64_t{8});
  CHECK(cache.block_table(2) == (std::vector<int32_t>{published[0], published[1]}));
  CHECK_EQ(cache.length(2), int64_t{8});
  CHECK_EQ(cache.stats().blocks_cached, 1);

  // A different first block breaks the chain even when the second block's tokens are equal.
  cache.add_sequence(3);
  std::vector<int32_t> other = prompt;
  other[0] = 7;
  CHECK_EQ(cache.match_prefix(3, other.data(), 12), int64_t{0});
  // Divergence inside block 2: blocks 0 and 1 match.
  cache.add_sequence(4);
  std::vector<int32_t> diverging = prompt;
  diverging[9] = 7;
  CHECK_EQ(cache.match_prefix(4, diverging.data(), 12), int64_t{8});
  // A sequence holding its blocks shares them.
  cache.add_sequence(5);
  CHECK_EQ(cache.match_prefix(5, prompt.data(), 12), int64_t{12});
  CHECK_EQ(cache.block_table(5)[2], published[2]);
  const CacheStats stats = cache.stats();
  CHECK_EQ(stats.prefix_queries, int64_t{4});
  CHECK_EQ(stats.prefix_hits, int64_t{3});
  CHECK_EQ(stats.prefix_hit_tokens, int64_t{28});
  CHECK_EQ(stats.blocks_used, 3);
  CHECK_EQ(stats.blocks_cached, 0);
  // A sequence that is not at a committed block boundary cannot match.
  append(cache, 3, iota_tokens(2));
  CHECK(!cache.can_match_prefix(3));
  CHECK_EQ(cache.match_prefix(3, prompt.data(), 12), int64_t{0});
}

TEST(uncommitted_tokens_are_never_published) {
  KvCacheManager cache(8, 4);
  cache.add_sequence(1);
  append(cache, 1, iota_tokens(8));
  cache.commit(1, 0, 6);  // block 0 committed, block 1 half committed
  cache.release(1);
  CHECK_EQ(cache.stats().blocks_cached, 1);
  cache.add_sequence(2);
  CHECK_EQ(cache.match_prefix(2, iota_tokens(9).data(), 8), int64_t{4});

  // Commits must be contiguous with the committed prefix.
  cache.add_sequence(3);
  append(cache, 3, iota_tokens(8, 500));
  cache.commit(3, 4, 8);
  CHECK_EQ(cache.committed_length(3), int64_t{0});
  cache.commit(3, 0, 8);
  CHECK_EQ(cache.committed_length(3), int64_t{8});
}

TEST(a_fed_token_is_set_before_it_is_committed) {
  KvCacheManager cache(8, 4);
  cache.add_sequence(1);
  append(cache, 1, iota_tokens(3));
  cache.commit(1, 0, 2);
  cache.set_token(1, 2, 7);
  CHECK_EQ(cache.tokens(1)[2], 7);
  CHECK_THROWS(cache.set_token(1, 1, 7), "is committed or not appended");
  CHECK_THROWS(cache.set_token(1, 3, 7), "is committed or not appended");
}

TEST(lru_reuses_the_oldest_cached_block) {
  KvCacheManager cache(4, 2);
  const auto a = iota_tokens(4, 10);
  const auto b = iota_tokens(4, 20);
  cache.add_sequence(1);
  append(cache, 1, a);
  cache.commit(1, 0, 4);
  const auto a_blocks = cache.block_table(1);
  cache.release(1);
  cache.add_sequence(2);
  append(cache, 2, b);
  cache.commit(2, 0, 4);
  cache.release(2);
  CHECK_EQ(cache.stats().blocks_cached, 4);
  CHECK_EQ(cache.stats().blocks_free, 4);

  // A new block comes from the least recently freed: a's tail (tails are freed first).
  cache.add_sequence(3);
  append(cache, 3, iota_tokens(2, 90));
  CHECK_EQ(cache.block_table(3)[0], a_blocks[1]);
  CHECK_EQ(cache.stats().blocks_cached, 3);
  cache.add_sequence(4);
  CHECK_EQ(cache.match_prefix(4, a.data(), 4), int64_t{2});  // a's head is still cached
  cache.add_sequence(5);
  CHECK_EQ(cache.match_prefix(5, b.data(), 4), int64_t{4});  // b untouched
}

TEST(truncate_copies_shared_or_published_blocks_before_writing) {
  KvCacheManager cache(8, 4);
  const auto prompt = iota_tokens(8);
  cache.add_sequence(1);
  append(cache, 1, prompt);
  cache.commit(1, 0, 8);
  const int32_t shared = cache.block_table(1)[0];

  cache.add_sequence(2);
  CHECK_EQ(cache.match_prefix(2, prompt.data(), 7), int64_t{4});
  CHECK_EQ(cache.block_table(2)[0], shared);
  cache.truncate(2, 2);
  CHECK_EQ(cache.committed_length(2), int64_t{2});
  CHECK_EQ(cache.blocks_needed(2, 3), 2);  // a copy of the shared block plus one new block
  std::vector<int32_t> slots;
  const std::vector<int32_t> tail = {1, 2, 3};
  const auto copy = cache.append(2, tail.data(), 3, &slots);
  CHECK(copy.has_value());
  CHECK_EQ(copy->source, shared);
  CHECK(copy->destination != shared);
  CHECK_EQ(cache.block_table(2)[0], copy->destination);
  CHECK_EQ(slots[0], copy->destination * 4 + 2);
  CHECK_EQ(cache.block_table(1)[0], shared);  // the other sequence keeps the original

  // A published block held by one sequence is copied too, so the cached prefix stays intact.
  cache.truncate(1, 6);
  const auto second_copy = cache.append(1, tail.data(), 1, &slots);
  CHECK(second_copy.has_value());
  cache.release(1);
  cache.release(2);
  cache.add_sequence(3);
  CHECK_EQ(cache.match_prefix(3, prompt.data(), 8), int64_t{8});

  // Truncating unpublished tokens needs no copy.
  cache.add_sequence(4);
  append(cache, 4, iota_tokens(6, 40));
  cache.truncate(4, 3);
  append(cache, 4, iota_tokens(2, 60));
  CHECK_THROWS(cache.truncate(4, 9), "cannot truncate sequence 4 to 9");
}

TEST(running_out_of_blocks_changes_nothing) {
  KvCacheManager cache(3, 4);
  cache.add_sequence(1);
  cache.add_sequence(2);
  append(cache, 1, iota_tokens(8));
  const CacheStats before = cache.stats();
  std::vector<int32_t> slots = {42};
  const auto tokens = iota_tokens(9);
  CHECK_THROWS(cache.append(2, tokens.data(), 9, &slots), "out of KV cache blocks: sequence 2 needs 3 more, 1 of 3");
  CHECK(same_stats(cache.stats(), before));
  CHECK_EQ(cache.length(2), int64_t{0});
  CHECK(cache.block_table(2).empty());
  CHECK_EQ(slots.size(), size_t{1});
  append(cache, 2, iota_tokens(4));  // what fits still works
  CHECK_EQ(cache.stats().blocks_free, 0);
}

TEST(equal_prefixes_published_twice_share_one_chain) {
  KvCacheManager cache(8, 2);
  const auto prompt = iota_tokens(4);
  cache.add_sequence(1);
  cache.add_sequence(2);
  append(cache, 1, prompt);
  append(cache, 2, prompt);
  cache.commit(1, 0, 4);
  cache.commit(2, 0, 4);
  cache.release(1);
  cache.release(2);
  CHECK_EQ(cache.stats().blocks_cached, 2);
  cache.add_sequence(3);
  CHECK_EQ(cache.match_prefix(3, prompt.data(), 4), int64_t{4});
  // Extending through the duplicate's chain is also found.
  cache.add_sequence(4);
  append(cache, 4, prompt);
  cache.commit(4, 0, 4);
  append(cache, 4, {7, 8});
  cache.commit(4, 4, 6);
  cache.release(4);
  cache.add_sequence(5);
  const std::vector<int32_t> longer = {100, 101, 102, 103, 7, 8};
  CHECK_EQ(cache.match_prefix(5, longer.data(), 6), int64_t{6});
}

int main() { return check::run_all(); }
