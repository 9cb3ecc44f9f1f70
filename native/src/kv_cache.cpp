#include "kv_cache.h"

#include <algorithm>
#include <stdexcept>
#include <string>

#include "counter_rng.h"

namespace pearl {

namespace {
constexpr uint64_t kRootHash = 0x5A17C0FFEE5EEDull;
}

KvCacheManager::KvCacheManager(int num_blocks, int block_size) : block_size_(block_size) {
  if (num_blocks <= 0) throw std::invalid_argument("KV cache needs at least one block");
  if (block_size <= 0) throw std::invalid_argument("KV cache block size must be positive");
  blocks_.resize(static_cast<size_t>(num_blocks));
  never_published_free_.reserve(static_cast<size_t>(num_blocks));
  // Handed out from the back: block 0 first.
  for (int32_t block = num_blocks - 1; block >= 0; --block) never_published_free_.push_back(block);
}

KvCacheManager::Sequence& KvCacheManager::sequence(uint64_t seq_id) {
  auto it = sequences_.find(seq_id);
  if (it == sequences_.end()) throw std::runtime_error("unknown sequence " + std::to_string(seq_id));
  return it->second;
}

const KvCacheManager::Sequence& KvCacheManager::sequence(uint64_t seq_id) const {
  auto it = sequences_.find(seq_id);
  if (it == sequences_.end()) throw std::runtime_error("unknown sequence " + std::to_string(seq_id));
  return it->second;
}

void KvCacheManager::add_sequence(uint64_t seq_id) {
  if (!sequences_.emplace(seq_id, Sequence{}).second) {
    throw std::runtime_error("sequence " + std::to_string(seq_id) + " already exists");
  }
}

int64_t KvCacheManager::length(uint64_t seq_id) const {
  return static_cast<int64_t>(sequence(seq_id).tokens.size());
}

int64_t KvCacheManager::committed_length(uint64_t seq_id) const { return sequence(seq_id).committed; }

const std::vector<int32_t>& KvCacheManager::block_table(uint64_t seq_id) const { return sequence(seq_id).blocks; }

const std::vector<int32_t>& KvCacheManager::tokens(uint64_t seq_id) const { return sequence(seq_id).tokens; }

int KvCacheManager::blocks_needed(uint64_t seq_id, int64_t count) const {
  const Sequence& seq = sequence(seq_id);
  if (count <= 0) return 0;
  const int64_t length = static_cast<int64_t>(seq.tokens.size());
  const int64_t blocks_after = (length + count + block_size_ - 1) / block_size_;
  int64_t needed = blocks_after - static_cast<int64_t>(seq.blocks.size());
  if (length % block_size_ != 0) {
    const Block& last = blocks_[static_cast<size_t>(seq.blocks.back())];
    if (last.ref_count > 1 || last.published) ++needed;
  }
  return static_cast<int>(needed);
}

int KvCacheManager::free_blocks() const {
  return static_cast<int>(never_published_free_.size() + lru_.size());
}

int32_t KvCacheManager::allocate_block() {
  int32_t block;
  if (!never_published_free_.empty()) {
    block = never_published_free_.back();
    never_published_free_.pop_back();
  } else if (!lru_.empty()) {
    block = lru_.front();
    lru_.pop_front();
    blocks_[static_cast<size_t>(block)].cached = false;
    unpublish(block);
  } else {
    throw std::logic_error("KV cache allocation without a free block");
  }
  blocks_[static_cast<size_t>(block)].ref_count = 1;
  return block;
}

void KvCacheManager::unpublish(int32_t block) {
  Block& b = blocks_[static_cast<size_t>(block)];
  if (!b.published) return;
  auto it = published_.find(b.hash);
  if (it != published_.end() && it->second == block) published_.erase(it);
  b.published = false;
  b.tokens.clear();
  b.tokens.shrink_to_fit();
}

void KvCacheManager::drop_reference(int32_t block) {
  Block& b = blocks_[static_cast<size_t>(block)];
  if (--b.ref_count > 0) return;
  if (b.published) {
    b.cached = true;
    b.lru_position = lru_.insert(lru_.end(), block);
  } else {
    never_published_free_.push_back(block);
  }
}

uint64_t KvCacheManager::block_hash(uint64_t parent_hash, const int32_t* tokens) const {
  uint64_t hash = mix64(parent_hash);
  for (int i = 0; i < block_size_; ++i) hash = mix64(hash ^ static_cast<uint32_t>(tokens[i]));
  return hash;
}

int32_t KvCacheManager::find_published(uint64_t hash, uint64_t parent_publish_id, const int32_t* tokens) const {
  auto it = published_.find(hash);
  if (it == published_.end()) return -1;
  const Block& candidate = blocks_[static_cast<size_t>(it->second)];
  if (candidate.parent_publish_id != parent_publish_id) return -1;
  if (!std::equal(candidate.tokens.begin(), candidate.tokens.end(), tokens)) return -1;
  return it->second;
}

bool KvCacheManager::can_match_prefix(uint64_t seq_id) const {
  const Sequence& seq = sequence(seq_id);
  const int64_t length = static_cast<int64_t>(seq.tokens.size());
  return length % block_size_ == 0 && seq.committed == length &&
         static_cast<int64_t>(seq.chain_ids.size()) == length / block_size_;
}

int64_t KvCacheManager::match_prefix(uint64_t seq_id, const int32_t* tokens, int64_t max_tokens) {
  Sequence& seq = sequence(seq_id);
  if (!can_match_prefix(seq_id)) return 0;
  ++prefix_queries_;
  int64_t matched = 0;
  while (matched + block_size_ <= max_tokens) {
    const int32_t* block_tokens = tokens + matched;
    const uint64_t parent_hash = seq.chain_hashes.empty() ? kRootHash : seq.chain_hashes.back();
    const uint64_t parent_id = seq.chain_ids.empty() ? 0 : seq.chain_ids.back();
    const uint64_t hash = block_hash(parent_hash, block_tokens);
    const int32_t block = find_published(hash, parent_id, block_tokens);
    if (block < 0) break;
    Block& b = blocks_[static_cast<size_t>(block)];
    if (b.cached) {
      lru_.erase(b.lru_position);
      b.cached = false;
    }
    ++b.ref_count;
    seq.blocks.push_back(block);
    seq.tokens.insert(seq.tokens.end(), block_tokens, block_tokens + block_size_);
    seq.committed = static_cast<int64_t>(seq.tokens.size());
    seq.chain_ids.push_back(b.publish_id);
    seq.chain_hashes.push_back(hash);
    matched += block_size_;
  }
  if (matched > 0) {
    ++prefix_hits_;
    prefix_hit_tokens_ += matched;
  }
  return matched;
}

std::optional<KvCacheManager::BlockCopy> KvCacheManager::append(uint64_t seq_id, const int32_t* tokens, int64_t count,
                                                                std::vector<int32_t>* slots) {
  Sequence& seq = sequence(seq_id);
  const int needed = blocks_needed(seq_id, count);
  if (needed > free_blocks()) {
    throw std::runtime_error("out of KV cache blocks: sequence " + std::to_string(seq_id) + " needs " +
                             std::to_string(needed) + " more, " + std::to_string(free_blocks()) + " of " +
                             std::to_string(num_blocks()) + " are free");
  }
  slots->clear();
  if (count <= 0) return std::nullopt;
  std::optional<BlockCopy> copy;
  const int64_t length = static_cast<int64_t>(seq.tokens.size());
  if (length % block_size_ != 0) {
    const int32_t last = seq.blocks.back();
    const Block& b = blocks_[static_cast<size_t>(last)];
    if (b.ref_count > 1 || b.published) {
      const int32_t fresh = allocate_block();
      copy = BlockCopy{last, fresh};
      seq.blocks.back() = fresh;
      drop_reference(last);
    }
  }
  for (int64_t position = length; position < length + count; ++position) {
    if (position % block_size_ == 0) seq.blocks.push_back(allocate_block());
    slots->push_back(seq.blocks[static_cast<size_t>(position / block_size_)] * block_size_ +
                     static_cast<int32_t>(position % block_size_));
  }
  seq.tokens.insert(seq.tokens.end(), tokens, tokens + count);
  return copy;
}

void KvCacheManager::set_token(uint64_t seq_id, int64_t position, int32_t token) {
  Sequence& seq = sequence(seq_id);
  if (position < seq.committed || position >= static_cast<int64_t>(seq.tokens.size())) {
    throw std::logic_error("set_token: position " + std::to_string(position) + " of sequence " + std::to_string(seq_id) +
                           " is committed or not appended");
  }
  seq.tokens[static_cast<size_t>(position)] = token;
}

void KvCacheManager::truncate(uint64_t seq_id, int64_t length) {
  Sequence& seq = sequence(seq_id);
  const int64_t current = static_cast<int64_t>(seq.tokens.size());
  if (length < 0 || length > current) {
    throw std::runtime_error("cannot truncate sequence " + std::to_string(seq_id) + " to " + std::to_string(length) +
                             ": its length is " + std::to_string(current));
  }
  const size_t keep_blocks = static_cast<size_t>((length + block_size_ - 1) / block_size_);
  while (seq.blocks.size() > keep_blocks) {
    drop_reference(seq.blocks.back());
    seq.blocks.pop_back();
  }
  seq.tokens.resize(static_cast<size_t>(length));
  seq.committed = std::min(seq.committed, length);
  const size_t keep_chain = std::min(seq.chain_ids.size(), static_cast<size_t>(length / block_size_));
  seq.chain_ids.resize(keep_chain);
  seq.chain_hashes.resize(keep_chain);
}

void KvCacheManager::release(uint64_t seq_id) {
  Sequence& seq = sequence(seq_id);
  // Last block first, so that a prefix's tail is evicted before its head.
  for (auto it = seq.blocks.rbegin(); it != seq.blocks.rend(); ++it) drop_reference(*it);
  sequences_.erase(seq_id);
}

void KvCacheManager::commit(uint64_t seq_id, int64_t begin, int64_t end) {
  Sequence& seq = sequence(seq_id);
  end = std::min(end, static_cast<int64_t>(seq.tokens.size()));
  if (begin > seq.committed || end <= seq.committed) return;
  seq.committed = end;
  publish_committed_blocks(seq);
}

void KvCacheManager::publish_committed_blocks(Sequence& seq) {
  const size_t full_blocks = static_cast<size_t>(seq.committed / block_size_);
  while (seq.chain_ids.size() < full_blocks) {
    const size_t index = seq.chain_ids.size();
    const int32_t* block_tokens = seq.tokens.data() + index * static_cast<size_t>(block_size_);
    const uint64_t parent_hash = index == 0 ? kRootHash : seq.chain_hashes.back();
    const uint64_t parent_id = index == 0 ? 0 : seq.chain_ids.back();
    const uint64_t hash = block_hash(parent_hash, block_tokens);
    const int32_t existing = find_published(hash, parent_id, block_tokens);
    uint64_t chain_id;
    if (existing >= 0) {
      // An equal block was published first (two sequences computed the same prefix at once); the
      // chain continues through it and this copy stays private.
      chain_id = blocks_[static_cast<size_t>(existing)].publish_id;
    } else {
      // A different block under the same hash (a collision) keeps its entry; this prefix then stays
      // unpublished from here on.
      if (published_.count(hash) != 0) return;
      const int32_t block = seq.blocks[index];
      Block& b = blocks_[static_cast<size_t>(block)];
      b.published = true;
      b.hash = hash;
      b.publish_id = next_publish_id_++;
      b.parent_publish_id = parent_id;
      b.tokens.assign(block_tokens, block_tokens + block_size_);
      published_.emplace(hash, block);
      chain_id = b.publish_id;
    }
    seq.chain_ids.push_back(chain_id);
    seq.chain_hashes.push_back(hash);
  }
}

CacheStats KvCacheManager::stats() const {
  CacheStats stats;
  stats.block_size = block_size_;
  stats.blocks_total = num_blocks();
  stats.blocks_free = free_blocks();
  stats.blocks_used = stats.blocks_total - stats.blocks_free;
  stats.blocks_cached = static_cast<int>(lru_.size());
  stats.prefix_queries = prefix_queries_;
  stats.prefix_hits = prefix_hits_;
  stats.prefix_hit_tokens = prefix_hit_tokens_;
  stats.sequences = static_cast<int>(sequences_.size());
  return stats;
}

}  // namespace pearl
