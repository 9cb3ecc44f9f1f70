// Block bookkeeping of the paged KV cache; the K/V storage itself belongs to the backend. Each sequence
// maps its positions onto fixed-size blocks through a block table. Blocks are reference counted, so a
// prefix-cache hit shares blocks between sequences.
//
// Prefix cache: a full block whose tokens are all committed is published under a chained hash (the
// parent block's hash and the block's tokens). A lookup is verified by comparing tokens and the parent's
// publication id, so a hit always means the whole prefix is equal, never just the hash. A published block
// nobody references stays findable in an LRU list until the allocator needs it for something else.
#pragma once

#include <cstdint>
#include <list>
#include <optional>
#include <unordered_map>
#include <vector>

#include "engine.h"

namespace pearl {

class KvCacheManager {
 public:
  KvCacheManager(int num_blocks, int block_size);

  int block_size() const { return block_size_; }
  int num_blocks() const { return static_cast<int>(blocks_.size()); }

  // Throws if the id exists already.
  void add_sequence(uint64_t seq_id);
  bool has_sequence(uint64_t seq_id) const { return sequences_.count(seq_id) != 0; }
  int64_t length(uint64_t seq_id) const;
  int64_t committed_length(uint64_t seq_id) const;
  const std::vector<int32_t>& block_table(uint64_t seq_id) const;
  const std::vector<int32_t>& tokens(uint64_t seq_id) const;

  // Blocks that appending `count` tokens takes from the free pool, at most: new blocks plus a
  // copy-on-write copy of a shared or published partial last block.
  int blocks_needed(uint64_t seq_id, int64_t count) const;
  // Blocks the allocator can hand out now: never-published free blocks plus cached ones.
  int free_blocks() const;

  // Whether the sequence can take cached blocks: its length is a block multiple and every token in it
  // is committed and chained.
  bool can_match_prefix(uint64_t seq_id) const;
  // Attaches published blocks equal to the next full blocks of `tokens` (at most `max_tokens` tokens) to
  // the sequence and returns how many tokens they cover. Counts a prefix-cache query.
  int64_t match_prefix(uint64_t seq_id, const int32_t* tokens, int64_t max_tokens);

  struct BlockCopy {
    int32_t source;
    int32_t destination;
  };
  // Appends tokens at positions [length, length + count): returns the slot (block * block_size + offset) of
  // each new position in `slots`, and the copy the storage must make first when the partial last block
  // was shared or published (copy-on-write). Throws, changing nothing, when blocks run out.
  std::optional<BlockCopy> append(uint64_t seq_id, const int32_t* tokens, int64_t count, std::vector<int32_t>* slots);

  // The token at `position`, appended and not yet committed, becomes `token`: a token the device fed to a
  // step before the host knew it.
  void set_token(uint64_t seq_id, int64_t position, int32_t token);
  // Keeps positions [0, length).
  void truncate(uint64_t seq_id, int64_t length);
  void release(uint64_t seq_id);

  // Tokens [begin, end) are committed. The committed prefix grows only when it reaches `begin`; newly
  // completed committed blocks are published.
  void commit(uint64_t seq_id, int64_t begin, int64_t end);

  CacheStats stats() const;

 private:
  struct Block {
    int ref_count = 0;
    bool published = false;
    bool cached = false;  // in lru_
    uint64_t hash = 0;
    uint64_t publish_id = 0;         // unique per publication, never reused
    uint64_t parent_publish_id = 0;  // 0 for the first block of a sequence
    std::vector<int32_t> tokens;     // the block's tokens while published
    std::list<int32_t>::iterator lru_position;
  };
  struct Sequence {
    std::vector<int32_t> blocks;
    std::vector<int32_t> tokens;
    int64_t committed = 0;
    // For the first chain_ids.size() blocks: the publication (this block or an equal one published
    // earlier) that stands for the prefix ending with that block, and its chained hash.
    std::vector<uint64_t> chain_ids;
    std::vector<uint64_t> chain_hashes;
  };

  Sequence& sequence(uint64_t seq_id);
  const Sequence& sequence(uint64_t seq_id) const;
  int32_t allocate_block();
  void drop_reference(int32_t block);
  void unpublish(int32_t block);
  void publish_committed_blocks(Sequence& seq);
  // The published block equal to a sequence's next block, or -1.
  int32_t find_published(uint64_t hash, uint64_t parent_publish_id, const int32_t* tokens) const;
  uint64_t block_hash(uint64_t parent_hash, const int32_t* tokens) const;

  int block_size_;
  std::vector<Block> blocks_;
  std::vector<int32_t> never_published_free_;
  std::list<int32_t> lru_;  // cached free blocks, least recently freed first
  std::unordered_map<uint64_t, int32_t> published_;
  std::unordered_map<uint64_t, Sequence> sequences_;
  uint64_t next_publish_id_ = 1;
  int64_t prefix_queries_ = 0;
  int64_t prefix_hits_ = 0;
  int64_t prefix_hit_tokens_ = 0;
};

}  // namespace pearl
