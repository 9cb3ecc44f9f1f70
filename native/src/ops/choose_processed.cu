// The processed rows of a step (ops::choose_row with processed set, temperature > 0): their support under
// process_logits' cuts (a segmented sort, an exact top-k selection, or the whole row), then the draw,
// p(draft) and the residual draw, or a drafting row's q. CPU twin: ops::choose_row (choose_token.cpp).
#include <cub/cub.cuh>

#include <algorithm>
#include <climits>
#include <cstdlib>
#include <stdexcept>
#include <string>

#include "counter_rng.h"
#include "cuda/check.h"
#include "token_candidate.cuh"

namespace pearl::gpu {

namespace {

constexpr int kSupportThreads = 512;
constexpr int kKeyThreads = 256;
constexpr int kKeysPerThread = 4;

// The weight process_logits gives a logit: exp((logit - max) / T) in double; NaN weighs 0.
__device__ __forceinline__ double weight_of(float logit, double max_logit, double inv_temperature) {
  return isnan(logit) ? 0.0 : exp((static_cast<double>(logit) - max_logit) * inv_temperature);
}

// A sort key whose ascending order is the logits' descending order. -0 and +0 weigh the same, so they share
// a key (the stable sort then orders them by id, as the host does); NaN (weight 0) goes last.
__device__ __forceinline__ uint32_t descending_key(float logit) {
  if (isnan(logit)) return 0xFFFFFFFFu;
  const uint32_t bits = __float_as_uint(logit == 0.0f ? 0.0f : logit);
  const uint32_t ascending = (bits & 0x80000000u) != 0 ? ~bits : (bits | 0x80000000u);
  return ~ascending;
}

__device__ __forceinline__ float key_logit(uint32_t key) {
  const uint32_t ascending = ~key;
  return __uint_as_float((ascending & 0x80000000u) != 0 ? (ascending & 0x7FFFFFFFu) : ~ascending);
}

// A processed row's support: tokens of weight > 0 whose (key, id) is at most (pivot_key, pivot_id), i.e. the
// sorted prefix that survives the cuts (everything for an uncut row); total is its weight.
struct RowSupport {
  double max_logit;
  double total;
  uint32_t pivot_key;
  int32_t pivot_id;
  int32_t valid;  // 0: no finite maximum (process_logits throws; the row gets token -1)
};

// The support of a row without a cut: every token of weight > 0 (no pivot can exclude one).
__device__ __forceinline__ RowSupport whole_support(double max_logit, double total) {
  return RowSupport{max_logit, total, 0xFFFFFFFFu, INT_MAX, 1};
}

__device__ __forceinline__ bool in_support(const RowSupport& support, float logit, int index, double weight) {
  if (!(weight > 0.0)) return false;
  const uint32_t key = descending_key(logit);
  return key < support.pivot_key || (key == support.pivot_key && index <= support.pivot_id);
}

// Whether processed row `slot` goes through the sort: Sorted rows always, Nucleus rows (slots from
// first_nucleus on) when the selection left their nucleus undecided (needs_sort, written by
// select_top_k_kernel before the sort pass).
__device__ __forceinline__ bool sorts_row(int slot, int first_nucleus, const int32_t* needs_sort) {
  return slot < first_nucleus || needs_sort[slot] != 0;
}

// Sort input for pass rows: keys[y][i] = descending_key(logit i of cut row first + y), ids[y][i] = i, and the
// segment offsets: [y * n, (y + 1) * n) for a row that sorts, empty for a Nucleus row already decided.
__global__ void __launch_bounds__(kKeyThreads) processed_keys_kernel(const float* __restrict__ logits, int n,
                                                                    const ProcessedRow* __restrict__ rows, int first,
                                                                    int first_nucleus,
                                                                    const int32_t* __restrict__ needs_sort,
                                                                    uint32_t* __restrict__ keys,
                                                                    int32_t* __restrict__ ids,
                                                                    int* __restrict__ begin_offsets,
                                                                    int* __restrict__ end_offsets) {
  const int y = blockIdx.y;
  const bool sorted = sorts_row(first + y, first_nucleus, needs_sort);
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    begin_offsets[y] = y * n;
    end_offsets[y] = sorted ? (y + 1) * n : y * n;
  }
  if (!sorted) return;
  const float* row_logits = logits + static_cast<int64_t>(rows[first + y].logits_row) * n;
  uint32_t* row_keys = keys + static_cast<int64_t>(y) * n;
  int32_t* row_ids = ids + static_cast<int64_t>(y) * n;
  const int start = blockIdx.x * kKeyThreads * kKeysPerThread + static_cast<int>(threadIdx.x);
#pragma unroll
  for (int j = 0; j < kKeysPerThread; ++j) {
    const int i = start + j * kKeyThreads;
    if (i < n) {
      row_keys[i] = descending_key(__ldg(row_logits + i));
      row_ids[i] = i;
    }
  }
}

// Sum of value(i) over [0, count) in a fixed order (per-thread strided sums, then CUB's block tree); every
// thread gets the result.
template <typename Reduce, typename Value>
__device__ double block_sum(typename Reduce::TempStorage& temp, double* shared_result, int count, Value value) {
  double partial = 0.0;
  for (int i = static_cast<int>(threadIdx.x); i < count; i += kSupportThreads) partial += value(i);
  __syncthreads();  // temp may still be in use by a previous collective
  const double sum = Reduce(temp).Sum(partial);
  if (threadIdx.x == 0) *shared_result = sum;
  __syncthreads();
  return *shared_result;
}

// A drafting row's q = top_k_distribution(p, return_top_k) from its sorted support [0, size) of total weight
// `total` (weight(j): the weight at sorted position j): the first min(size, return_top_k) entries (p's order),
// their probabilities p / (sum of the kept p, added in that order as the host does) rounded to float, then
// token -1 entries. The sum's terms are computed a block at a time and added by one thread.
template <typename Weight>
__device__ void write_returned_q(const ProcessedRow& row, const int32_t* sorted_ids, int size, double total,
                                 Weight weight, double* shares, double* shared_kept, TokenProbRow* returned_q) {
  const int keep = min(size, row.return_top_k);
  double kept = 0.0;
  for (int base = 0; base < keep; base += kSupportThreads) {
    const int position = base + static_cast<int>(threadIdx.x);
    __syncthreads();  // the previous block of shares has been added
    if (position < keep) shares[threadIdx.x] = weight(position) / total;
    __syncthreads();
    if (threadIdx.x == 0) {
      for (int j = 0; j < min(kSupportThreads, keep - base); ++j) kept += shares[j];
    }
  }
  if (threadIdx.x == 0) *shared_kept = kept;
  __syncthreads();
  kept = *shared_kept;
  TokenProbRow* entries = returned_q + row.returned_begin;
  for (int j = static_cast<int>(threadIdx.x); j < row.return_top_k; j += kSupportThreads) {
    entries[j] = j < keep ? TokenProbRow{sorted_ids[j], static_cast<float>(weight(j) / total / kept)}
                          : TokenProbRow{-1, 0.0f};
  }
}

// A row without a finite maximum (process_logits throws): token -1 and, for a drafting row, an empty q.
__device__ void write_rejected_row(const ProcessedRow& row, int slot, RowSupport* supports,
                                   TokenProbRow* returned_q) {
  if (threadIdx.x == 0) supports[slot] = RowSupport{0.0, 0.0, 0u, -1, 0};
  for (int j = static_cast<int>(threadIdx.x); j < row.return_top_k; j += kSupportThreads) {
    returned_q[row.returned_begin + j] = TokenProbRow{-1, 0.0f};
  }
}

// Writes a valid row's support and, for a drafting row, its q from the first `size` entries of p's order
// (sorted_ids; weight(j): the weight at position j of that order); every path writes them here.
template <typename Weight>
__device__ void write_support(const ProcessedRow& row, int slot, const RowSupport& support, const int32_t* sorted_ids,
                              int size, Weight weight, double* shares, double* shared_kept, RowSupport* supports,
                              TokenProbRow* returned_q) {
  if (threadIdx.x == 0) supports[slot] = support;
  if (row.return_top_k > 0) {
    write_returned_q(row, sorted_ids, size, support.total, weight, shares, shared_kept, returned_q);
  }
}

// The support of a cut row: the first `size` entries of p's order (sorted_keys, sorted_ids), its total added
// by block_sum in that order. Sorted rows and Selected rows with a top-k cut both end here, so the same
// support gets a bit-identical total on either path.
template <typename Reduce, typename Weight>
__device__ void write_prefix_support(typename Reduce::TempStorage& temp, double* shared_sum, const ProcessedRow& row,
                                     int slot, double max_logit, const uint32_t* sorted_keys,
                                     const int32_t* sorted_ids, int size, Weight weight, double* shares,
                                     double* shared_kept, RowSupport* supports, TokenProbRow* returned_q) {
  const double total = block_sum<Reduce>(temp, shared_sum, size, weight);
  write_support(row, slot, RowSupport{max_logit, total, sorted_keys[size - 1], sorted_ids[size - 1], 1}, sorted_ids,
                size, weight, shares, shared_kept, supports, returned_q);
}

// The nucleus within the first `size` entries of p's order (weight(position): the weight at that position):
// the length of the shortest prefix whose cumulative share of `kept` reaches top_p, or 0 when none within
// them does. The shares are added by a block scan a kSupportThreads chunk at a time, so a prefix's sum does
// not depend on the entries after it (nor on `size` past it): the Sorted and Selected/Nucleus paths give
// the same prefix the same cumulative share. Every thread gets the result; shared_count is scratch.
template <typename Scan, typename Weight>
__device__ int nucleus_length(typename Scan::TempStorage& temp, int* shared_count, int size, Weight weight,
                              double kept, double top_p) {
  __syncthreads();  // every thread has read shared_count's previous value
  if (threadIdx.x == 0) *shared_count = INT_MAX;
  double running = 0.0;
  for (int base = 0; base < size; base += kSupportThreads) {
    const int position = base + static_cast<int>(threadIdx.x);
    const double share = position < size ? weight(position) / kept : 0.0;
    double cumulative = 0.0;
    double chunk_total = 0.0;
    __syncthreads();
    Scan(temp).InclusiveSum(share, cumulative, chunk_total);
    if (position < size && running + cumulative >= top_p) atomicMin(shared_count, position);
    __syncthreads();
    if (*shared_count != INT_MAX) break;
    running += chunk_total;
  }
  return *shared_count != INT_MAX ? *shared_count + 1 : 0;
}

// One CTA per sorted row of the pass: process_logits' cuts over the sorted order. Candidates (weight > 0)
// are a prefix of it (the weight does not grow along it); top_k keeps the first k; the nucleus is the
// shortest prefix whose cumulative share of the kept weight reaches top_p. A drafting row also writes its q.
// A Nucleus row the selection decided (its segment was empty) keeps what select_top_k_kernel wrote.
__global__ void __launch_bounds__(kSupportThreads) cut_support_kernel(const uint32_t* __restrict__ keys,
                                                                     const int32_t* __restrict__ ids, int n,
                                                                     const ProcessedRow* __restrict__ rows, int first,
                                                                     int first_nucleus,
                                                                     const int32_t* __restrict__ needs_sort,
                                                                     RowSupport* __restrict__ supports,
                                                                     TokenProbRow* __restrict__ returned_q) {
  using Reduce = cub::BlockReduce<double, kSupportThreads>;
  using Scan = cub::BlockScan<double, kSupportThreads>;
  __shared__ union {
    typename Reduce::TempStorage reduce;
    typename Scan::TempStorage scan;
  } temp;
  __shared__ double shared_sum;
  __shared__ int shared_count;
  __shared__ double shares[kSupportThreads];
  __shared__ double shared_kept;
  const int slot = first + static_cast<int>(blockIdx.x);
  if (!sorts_row(slot, first_nucleus, needs_sort)) return;
  const ProcessedRow row = rows[slot];
  const uint32_t* row_keys = keys + static_cast<int64_t>(blockIdx.x) * n;
  const int32_t* row_ids = ids + static_cast<int64_t>(blockIdx.x) * n;
  const double max_logit = key_logit(row_keys[0]);
  if (!isfinite(max_logit)) {
    write_rejected_row(row, slot, supports, returned_q);
    return;
  }
  const double inv_temperature = 1.0 / static_cast<double>(row.temperature);
  const auto weight = [&](int position) { return weight_of(key_logit(row_keys[position]), max_logit, inv_temperature); };
  if (threadIdx.x == 0) {
    int low = 1;  // position 0 holds the maximum: weight 1
    int high = n;
    while (low < high) {
      const int middle = low + (high - low) / 2;
      if (weight(middle) > 0.0) {
        low = middle + 1;
      } else {
        high = middle;
      }
    }
    shared_count = low;
  }
  __syncthreads();
  const int candidates = shared_count;
  int size = row.top_k > 0 && row.top_k < candidates ? row.top_k : candidates;
  if (row.top_p < 1.0f) {
    const double kept = block_sum<Reduce>(temp.reduce, &shared_sum, size, weight);
    const int nucleus =
        nucleus_length<Scan>(temp.scan, &shared_count, size, weight, kept, static_cast<double>(row.top_p));
    if (nucleus > 0) size = nucleus;
  }
  write_prefix_support<Reduce>(temp.reduce, &shared_sum, row, slot, max_logit, row_keys, row_ids, size, weight, shares,
                               &shared_kept, supports, returned_q);
}

// ---- Selected rows: the first k of p's order from an exact top-k selection instead of a sort ----

constexpr int kSelectLoads = 8;           // loads in flight per thread in each pass over a row
constexpr int kCandidateCapacity = 2048;  // tokens at or above the selection's bound one CTA ranks
static_assert(kMaxSelectedTopK <= kSupportThreads, "the bound is the k-th smallest of the threads' minima");
static_assert(kMaxSelectedTopK <= kCandidateCapacity, "a row's top k must fit the candidates");

// visit(i, logit) for this thread's tokens i = threadIdx.x + j * kSupportThreads in ascending order (the order
// block_sum adds them in), kSelectLoads loads at a time. Every lane of a warp makes the same calls, so visit
// may use warp collectives; past n it gets NaN, whose key and weight count for nothing.
template <typename Visit>
__device__ __forceinline__ void for_each_logit(const float* row_logits, int n, Visit visit) {
  for (int base = 0; base < n; base += kSupportThreads * kSelectLoads) {
    float values[kSelectLoads];
#pragma unroll
    for (int j = 0; j < kSelectLoads; ++j) {
      const int i = base + j * kSupportThreads + static_cast<int>(threadIdx.x);
      values[j] = i < n ? __ldg(row_logits + i) : NAN;
    }
#pragma unroll
    for (int j = 0; j < kSelectLoads; ++j) visit(base + j * kSupportThreads + static_cast<int>(threadIdx.x), values[j]);
  }
}

// A token's place in the order (key ascending, id ascending) as one number, unique per token (< 2^50).
__device__ __forceinline__ uint64_t order_position(uint32_t key, int index, int n) {
  return static_cast<uint64_t>(key) * static_cast<uint64_t>(n) + static_cast<uint64_t>(index);
}

// Appends (key, index) to candidates when it qualifies (a warp takes its slots with one atomic); count ends
// as the number that qualified, of which the first `capacity` are stored.
__device__ __forceinline__ void offer_candidate(bool qualifies, uint32_t key, int index, uint64_t* candidates,
                                                int capacity, int* count) {
  const unsigned voters = __ballot_sync(0xffffffffu, qualifies);
  if (voters == 0) return;
  const unsigned lane = threadIdx.x % 32;
  int first = 0;
  if (lane == 0) first = atomicAdd(count, __popc(voters));
  first = __shfl_sync(0xffffffffu, first, 0);
  const int slot = first + __popc(voters & ((1u << lane) - 1u));
  if (qualifies && slot < capacity) {
    candidates[slot] = (static_cast<uint64_t>(key) << 32) | static_cast<uint32_t>(index);
  }
}

// One CTA per Selected or Nucleus row (processed_path): the first k of its candidates (tokens of weight > 0)
// in (key, id) order, the sorted path's prefix, found without sorting the row. A row with a top-k cut (k =
// top_k) has them as its support, or the nucleus within them with a top-p cut (write_prefix_support, as a
// Sorted row: the same kept weight, nucleus, total, pivot and q); a drafting row without a cut (k =
// return_top_k) keeps the whole support and takes them as q. A Nucleus row (k = kMaxSelectedTopK) has the
// nucleus within them as its support when it ends there or they are the whole support; otherwise it sets
// needs_sort[slot] and writes nothing, and the sort pass decides it (every other row clears its flag).
// Pass 1 finds the maximum and each thread's smallest key; the k-th smallest of those bounds the k-th key
// from above (k threads hold a token at or below it). Pass 2 adds an uncut row's total (block_sum's order,
// as uncut_support_kernel), counts the support and collects the tokens at or below the bound, which are few
// unless many tokens tie there; then ranking the candidates by (key, id) gives p's order exactly. When more
// than candidate_limit qualify, a bisection over order positions (integer counts, exact) narrows the bound
// until at most candidate_limit do, or to the k-th token itself, before collecting again.
__global__ void __launch_bounds__(kSupportThreads) select_top_k_kernel(const float* __restrict__ logits, int n,
                                                                      const ProcessedRow* __restrict__ rows, int first,
                                                                      int candidate_limit,
                                                                      int32_t* __restrict__ needs_sort,
                                                                      RowSupport* __restrict__ supports,
                                                                      TokenProbRow* __restrict__ returned_q) {
  using Reduce = cub::BlockReduce<double, kSupportThreads>;
  using Scan = cub::BlockScan<double, kSupportThreads>;
  using CountReduce = cub::BlockReduce<int, kSupportThreads>;
  using KeyReduce = cub::BlockReduce<uint32_t, kSupportThreads>;
  using KeySort = cub::BlockRadixSort<uint32_t, kSupportThreads, 1>;
  __shared__ union {
    typename Reduce::TempStorage reduce;
    typename Scan::TempStorage scan;
    typename CountReduce::TempStorage count;
    typename KeyReduce::TempStorage key;
    typename KeySort::TempStorage sort;
  } temp;
  __shared__ uint64_t candidates[kCandidateCapacity];
  __shared__ uint32_t top_keys[kMaxSelectedTopK];
  __shared__ int32_t top_ids[kMaxSelectedTopK];
  __shared__ double shares[kSupportThreads];
  __shared__ double shared_total;
  __shared__ double shared_kept;
  __shared__ uint32_t shared_min_key;
  __shared__ uint32_t shared_support_key;
  __shared__ uint32_t shared_bound_key;
  __shared__ int shared_count;
  __shared__ int shared_support_size;
  const int slot = first + static_cast<int>(blockIdx.x);
  const ProcessedRow row = rows[slot];
  const bool top_k_cut = row.top_k > 0;
  const bool top_p_cut = row.top_p < 1.0f;
  const int selected = top_k_cut ? row.top_k : top_p_cut ? kMaxSelectedTopK : row.return_top_k;
  // choose_processed's caller sorts every other row (processed_path); a row outside the bounds would
  // overrun the arrays above.
  if (selected < 1 || selected > kMaxSelectedTopK) __trap();
  const int slots = max(candidate_limit, selected);  // candidate_limit <= kCandidateCapacity
  const float* row_logits = logits + static_cast<int64_t>(row.logits_row) * n;

  uint32_t thread_min = 0xFFFFFFFFu;
  for_each_logit(row_logits, n, [&](int, float logit) { thread_min = min(thread_min, descending_key(logit)); });
  const uint32_t min_key = KeyReduce(temp.key).Reduce(thread_min, [](uint32_t a, uint32_t b) { return min(a, b); });
  if (threadIdx.x == 0) shared_min_key = min_key;
  __syncthreads();
  const double max_logit = key_logit(shared_min_key);
  if (threadIdx.x == 0) needs_sort[slot] = 0;
  if (!isfinite(max_logit)) {
    write_rejected_row(row, slot, supports, returned_q);
    return;
  }
  const double inv_temperature = 1.0 / static_cast<double>(row.temperature);
  const auto weight_at_key = [&](uint32_t key) { return weight_of(key_logit(key), max_logit, inv_temperature); };

  uint32_t sorted_min[1] = {thread_min};  // thread t ends with the t-th smallest of the threads' minima
  KeySort(temp.sort).Sort(sorted_min);
  if (static_cast<int>(threadIdx.x) == selected - 1) shared_bound_key = sorted_min[0];
  if (threadIdx.x < 32) {
    // The support is a prefix of the key order (the weight does not grow along it): its last key, between
    // the maximum's (weight 1) and -inf's (weight 0), found by the first warp probing 32 keys a round.
    uint32_t low = shared_min_key;
    uint32_t high = 0xFF800000u;
    while (high - low > 1) {
      const uint32_t probe = low + static_cast<uint32_t>(static_cast<uint64_t>(high - low) * (threadIdx.x + 1) / 33);
      const int positive = __popc(__ballot_sync(0xffffffffu, weight_at_key(probe) > 0.0));
      const uint32_t last_positive = __shfl_sync(0xffffffffu, probe, max(positive - 1, 0));
      const uint32_t first_zero = __shfl_sync(0xffffffffu, probe, min(positive, 31));
      if (positive > 0) low = last_positive;
      if (positive < 32) high = first_zero;
    }
    if (threadIdx.x == 0) {
      shared_support_key = low;
      shared_count = 0;
    }
  }
  __syncthreads();
  const uint32_t support_key = shared_support_key;
  // At least min(k, |support|) support tokens lie at or before it.
  const uint64_t bound = order_position(min(shared_bound_key, support_key), n - 1, n);

  // A top-k cut row's total is its selected tokens' (write_prefix_support); the whole support's is a
  // Nucleus row's kept weight, here in id order where the Sorted path adds it in p's order (ulp-level).
  double partial_total = 0.0;
  int partial_support = 0;
  for_each_logit(row_logits, n, [&](int i, float logit) {
    const uint32_t key = descending_key(logit);
    if (!top_k_cut) partial_total += weight_of(logit, max_logit, inv_temperature);
    partial_support += key <= support_key ? 1 : 0;
    offer_candidate(order_position(key, i, n) <= bound, key, i, candidates, slots, &shared_count);
  });
  const double total = Reduce(temp.reduce).Sum(partial_total);
  __syncthreads();
  const int support_size = CountReduce(temp.count).Sum(partial_support);
  if (threadIdx.x == 0) {
    shared_total = total;
    shared_support_size = support_size;
  }
  __syncthreads();
  const int keep = min(selected, shared_support_size);
  int count = shared_count;

  if (count > candidate_limit) {
    // Invariant: fewer than keep tokens lie before low, at least keep at or before high (count of them). At
    // low == high, high is the keep-th token's position and count == keep <= slots.
    uint64_t low = order_position(shared_min_key, 0, n);
    uint64_t high = bound;
    while (count > candidate_limit && low < high) {
      const uint64_t middle = low + (high - low) / 2;
      int partial = 0;
      for_each_logit(row_logits, n, [&](int i, float logit) {
        partial += order_position(descending_key(logit), i, n) <= middle ? 1 : 0;
      });
      __syncthreads();  // every thread has read the previous shared_count
      const int at_most = CountReduce(temp.count).Sum(partial);
      if (threadIdx.x == 0) shared_count = at_most;
      __syncthreads();
      if (shared_count >= keep) {
        high = middle;
        count = shared_count;
      } else {
        low = middle + 1;
      }
    }
    __syncthreads();
    if (threadIdx.x == 0) shared_count = 0;
    __syncthreads();
    for_each_logit(row_logits, n, [&](int i, float logit) {
      const uint32_t key = descending_key(logit);
      offer_candidate(order_position(key, i, n) <= high, key, i, candidates, slots, &shared_count);
    });
    __syncthreads();
  }

  // The candidates hold every token up to the bound, so their first keep by (key, id) are p's first keep.
  for (int s = static_cast<int>(threadIdx.x); s < count; s += kSupportThreads) {
    const uint64_t entry = candidates[s];
    int rank = 0;
    for (int j = 0; j < count; ++j) rank += candidates[j] < entry ? 1 : 0;
    if (rank < keep) {
      top_keys[rank] = static_cast<uint32_t>(entry >> 32);
      top_ids[rank] = static_cast<int32_t>(entry & 0xFFFFFFFFu);
    }
  }
  __syncthreads();
  const auto weight = [&](int position) { return weight_at_key(top_keys[position]); };
  if (!top_k_cut && !top_p_cut) {
    write_support(row, slot, whole_support(max_logit, shared_total), top_ids, keep, weight,
                  shares, &shared_kept, supports, returned_q);
    return;
  }
  int size = keep;
  if (top_p_cut) {
    // The kept weight as cut_support_kernel has it: the top k's, added in p's order by block_sum (the same
    // sum), or the whole support's (pass 2's id-order sum: see above).
    const double kept = top_k_cut ? block_sum<Reduce>(temp.reduce, &shared_total, keep, weight) : shared_total;
    const int nucleus =
        nucleus_length<Scan>(temp.scan, &shared_count, keep, weight, kept, static_cast<double>(row.top_p));
    // Past the k the cumulative share only grows, so the sorted path would find the same nucleus; without
    // one here, a top-k cut (or a Nucleus row holding its whole support) keeps all k, as cut_support_kernel
    // keeps its whole prefix, and any other Nucleus row needs the order past k.
    if (nucleus == 0 && !top_k_cut && keep < shared_support_size) {
      if (threadIdx.x == 0) needs_sort[slot] = 1;
      return;
    }
    if (nucleus > 0) size = nucleus;
  }
  write_prefix_support<Reduce>(temp.reduce, &shared_total, row, slot, max_logit, top_keys, top_ids, size, weight,
                               shares, &shared_kept, supports, returned_q);
}

// One CTA per uncut processed row (a sampled-draft window's): the whole row is the support.
__global__ void __launch_bounds__(kSupportThreads) uncut_support_kernel(const float* __restrict__ logits, int n,
                                                                       const ProcessedRow* __restrict__ rows, int first,
                                                                       RowSupport* __restrict__ supports) {
  using Reduce = cub::BlockReduce<double, kSupportThreads>;
  using MaxReduce = cub::BlockReduce<float, kSupportThreads>;
  __shared__ union {
    typename Reduce::TempStorage reduce;
    typename MaxReduce::TempStorage max;
  } temp;
  __shared__ double shared_sum;
  __shared__ float shared_max;
  const int slot = first + static_cast<int>(blockIdx.x);
  const ProcessedRow row = rows[slot];
  const float* row_logits = logits + static_cast<int64_t>(row.logits_row) * n;
  float partial_max = -INFINITY;
  for (int i = static_cast<int>(threadIdx.x); i < n; i += kSupportThreads) {
    const float logit = __ldg(row_logits + i);
    if (!isnan(logit)) partial_max = fmaxf(partial_max, logit);
  }
  const float block_max = MaxReduce(temp.max).Reduce(partial_max, [](float a, float b) { return fmaxf(a, b); });
  if (threadIdx.x == 0) shared_max = block_max;
  __syncthreads();
  const double max_logit = shared_max;
  if (!isfinite(max_logit)) {
    write_rejected_row(row, slot, supports, nullptr);  // a Whole row returns no q
    return;
  }
  const double inv_temperature = 1.0 / static_cast<double>(row.temperature);
  const double total = block_sum<Reduce>(temp.reduce, &shared_sum, n, [&](int i) {
    return weight_of(__ldg(row_logits + i), max_logit, inv_temperature);
  });
  if (threadIdx.x == 0) supports[slot] = whole_support(max_logit, total);
}

// q(token) for a draft row (q's tokens ascending), 0 outside q.
__device__ __forceinline__ double q_prob(const int32_t* q_tokens, const float* q_probs, int begin, int count,
                                         int token) {
  int low = begin;
  int high = begin + count;
  while (low < high) {
    const int middle = low + (high - low) / 2;
    if (q_tokens[middle] < token) {
      low = middle + 1;
    } else {
      high = middle;
    }
  }
  return low < begin + count && q_tokens[low] == token ? static_cast<double>(q_probs[low]) : 0.0;
}

// One CTA per (chunk, processed row): the chunk's best Gumbel-max keys for the row's own draw (log p(x) plus
// the Sample stream's noise) and, for a draft row, the residual draw (log max(0, p(x) - q(x)), Residual stream).
__global__ void __launch_bounds__(kChooseThreads) processed_draw_chunk_kernel(
    const float* __restrict__ logits, int n, const ProcessedRow* __restrict__ rows,
    const RowSupport* __restrict__ supports, const int32_t* __restrict__ q_tokens, const float* __restrict__ q_probs,
    double* __restrict__ chunk_key, int* __restrict__ chunk_index) {
  __shared__ Candidate warp_results[2][kChooseThreads / 32];
  const int slot = blockIdx.y;
  const ProcessedRow row = rows[slot];
  const RowSupport support = supports[slot];
  const float* row_logits = logits + static_cast<int64_t>(row.logits_row) * n;
  const double inv_temperature = 1.0 / static_cast<double>(row.temperature);
  const CounterRng sample_rng(row.seed, row.position, RandomPurpose::Sample);
  const CounterRng residual_rng(row.seed, row.position, RandomPurpose::Residual);
  const bool judges = row.draft_token >= 0;
  const int chunk_start = blockIdx.x * kChooseChunk;
  Candidate best_sample{0.0, -1};
  Candidate best_residual{0.0, -1};
  // A drafting row's token is drawn from its q, not from p.
  if (support.valid && row.return_top_k == 0) {
    for (int j = 0; j < kChoosePerThread; ++j) {
      const int i = chunk_start + j * kChooseThreads + static_cast<int>(threadIdx.x);
      if (i >= n) break;
      const float logit = __ldg(row_logits + i);
      const double weight = weight_of(logit, support.max_logit, inv_temperature);
      if (!in_support(support, logit, i, weight)) continue;
      const double p = weight / support.total;
      best_sample = better(best_sample, Candidate{gumbel_key(log(p), sample_rng, i), i});
      if (judges) {
        const double residual = fmax(0.0, p - q_prob(q_tokens, q_probs, row.q_begin, row.q_count, i));
        if (residual > 0.0) best_residual = better(best_residual, Candidate{gumbel_key(log(residual), residual_rng, i), i});
      }
    }
  }
  best_sample = warp_best(best_sample);
  best_residual = warp_best(best_residual);
  if (threadIdx.x % 32 == 0) {
    warp_results[0][threadIdx.x / 32] = best_sample;
    warp_results[1][threadIdx.x / 32] = best_residual;
  }
  __syncthreads();
  if (threadIdx.x < 32) {
    const bool lane = threadIdx.x < kChooseThreads / 32;
    best_sample = warp_best(lane ? warp_results[0][threadIdx.x] : Candidate{0.0, -1});
    best_residual = warp_best(lane ? warp_results[1][threadIdx.x] : Candidate{0.0, -1});
    if (threadIdx.x == 0) {
      const int64_t sample_slot = (static_cast<int64_t>(slot) * gridDim.x + blockIdx.x) * 2;
      chunk_key[sample_slot] = best_sample.key;
      chunk_index[sample_slot] = best_sample.index;
      chunk_key[sample_slot + 1] = best_residual.key;
      chunk_index[sample_slot + 1] = best_residual.index;
    }
  }
}

// One warp per processed row: the best of its chunks' draws (none for a drafting row), and p(draft).
__global__ void processed_draw_rows_kernel(const float* __restrict__ logits, int n,
                                           const ProcessedRow* __restrict__ rows,
                                           const RowSupport* __restrict__ supports,
                                           const double* __restrict__ chunk_key, const int* __restrict__ chunk_index,
                                           int chunks, ChosenTokenRow* __restrict__ out) {
  const int slot = blockIdx.x;
  Candidate sample{0.0, -1};
  Candidate residual{0.0, -1};
  for (int c = static_cast<int>(threadIdx.x); c < chunks; c += 32) {
    const int64_t index = (static_cast<int64_t>(slot) * chunks + c) * 2;
    sample = better(sample, Candidate{chunk_key[index], chunk_index[index]});
    residual = better(residual, Candidate{chunk_key[index + 1], chunk_index[index + 1]});
  }
  sample = warp_best(sample);
  residual = warp_best(residual);
  if (threadIdx.x != 0) return;
  const ProcessedRow row = rows[slot];
  const RowSupport support = supports[slot];
  ChosenTokenRow chosen{support.valid ? sample.index : -1, -1, 0.0};
  if (support.valid && row.draft_token >= 0) {
    const float logit = logits[static_cast<int64_t>(row.logits_row) * n + row.draft_token];
    const double weight = weight_of(logit, support.max_logit, 1.0 / static_cast<double>(row.temperature));
    chosen.draft_prob = in_support(support, logit, row.draft_token, weight) ? weight / support.total : 0.0;
    // An empty residual only arises from rounding when p and q agree: p's own draw stands in (sample_residual).
    chosen.residual_token = residual.index >= 0 ? residual.index : sample.index;
  }
  out[row.logits_row] = chosen;
}

// The processed path's scratch, carved from one allocation.
struct ProcessedScratch {
  RowSupport* supports;
  double* chunk_key;
  int* chunk_index;
  int32_t* needs_sort;  // per row: a Nucleus row the selection left to the sort (select_top_k_kernel)
  int* begin_offsets;
  int* end_offsets;
  uint32_t* keys[2];
  int32_t* ids[2];
  void* sort_temp;
  size_t sort_temp_bytes;
  size_t total_bytes;
};

size_t sort_temp_bytes(int n) {
  size_t bytes = 0;
  cub::DoubleBuffer<uint32_t> keys(nullptr, nullptr);
  cub::DoubleBuffer<int32_t> ids(nullptr, nullptr);
  const int* offsets = nullptr;
  check_cuda(cub::DeviceSegmentedRadixSort::SortPairs(nullptr, bytes, keys, ids, kProcessedSortRows * n,
                                                      kProcessedSortRows, offsets, offsets + 1),
             "sizing the segmented sort");
  return bytes;
}

ProcessedScratch carve(void* scratch, int max_rows, int n) {
  const size_t chunks = static_cast<size_t>((n + kChooseChunk - 1) / kChooseChunk);
  const size_t sort_items = static_cast<size_t>(kProcessedSortRows) * static_cast<size_t>(n);
  const auto aligned = [](size_t bytes) { return (bytes + 255) & ~size_t{255}; };
  char* base = static_cast<char*>(scratch);
  size_t offset = 0;
  const auto take = [&](size_t bytes) {
    void* pointer = base == nullptr ? nullptr : base + offset;
    offset += aligned(bytes);
    return pointer;
  };
  ProcessedScratch carved{};
  carved.supports = static_cast<RowSupport*>(take(static_cast<size_t>(max_rows) * sizeof(RowSupport)));
  carved.chunk_key = static_cast<double*>(take(static_cast<size_t>(max_rows) * chunks * 2 * sizeof(double)));
  carved.chunk_index = static_cast<int*>(take(static_cast<size_t>(max_rows) * chunks * 2 * sizeof(int)));
  carved.needs_sort = static_cast<int32_t*>(take(static_cast<size_t>(max_rows) * sizeof(int32_t)));
  carved.begin_offsets = static_cast<int*>(take(kProcessedSortRows * sizeof(int)));
  carved.end_offsets = static_cast<int*>(take(kProcessedSortRows * sizeof(int)));
  for (int b = 0; b < 2; ++b) {
    carved.keys[b] = static_cast<uint32_t*>(take(sort_items * sizeof(uint32_t)));
    carved.ids[b] = static_cast<int32_t*>(take(sort_items * sizeof(int32_t)));
  }
  carved.sort_temp_bytes = sort_temp_bytes(n);
  carved.sort_temp = take(carved.sort_temp_bytes);
  carved.total_bytes = offset;
  return carved;
}

}  // namespace

size_t processed_scratch_bytes(int max_rows, int n) { return carve(nullptr, max_rows, n).total_bytes; }

namespace {

// PEARL_CUDA_SELECT_CANDIDATES: the candidates a selected row ranks before it bisects (default and most
// kCandidateCapacity). 0 makes every selected row bisect down to its k-th token: tests use it to run the
// bisection, which only heavy ties reach at the default, on real rows.
int selected_candidate_limit() {
  const char* value = std::getenv("PEARL_CUDA_SELECT_CANDIDATES");
  if (value == nullptr || *value == '\0') return kCandidateCapacity;
  char* end = nullptr;
  const long limit = std::strtol(value, &end, 10);
  if (*end != '\0' || limit < 0 || limit > kCandidateCapacity) {
    throw std::invalid_argument("PEARL_CUDA_SELECT_CANDIDATES must be an integer from 0 to " +
                                std::to_string(kCandidateCapacity) + ", got \"" + value + "\"");
  }
  return static_cast<int>(limit);
}

}  // namespace

void choose_processed(const float* logits, int n, const ProcessedRow* rows, int num_rows, int num_sorted_rows,
                      int num_nucleus_rows, int num_selected_rows, const int32_t* q_tokens, const float* q_probs,
                      void* scratch, int max_rows, ChosenTokenRow* out, TokenProbRow* returned_q,
                      cudaStream_t stream) {
  if (num_rows == 0) return;
  if (num_rows > max_rows) throw std::runtime_error("choose_processed: more rows than its scratch holds");
  if (num_sorted_rows < 0 || num_nucleus_rows < 0 || num_selected_rows < 0 ||
      num_sorted_rows + num_nucleus_rows + num_selected_rows > num_rows) {
    throw std::invalid_argument("choose_processed: sorted, nucleus and selected rows must be among the rows");
  }
  const ProcessedScratch carved = carve(scratch, max_rows, n);
  // Nucleus rows try the selection first; the sort pass then takes the Sorted rows and the Nucleus rows it
  // flagged (the others get empty segments and keep what the selection wrote).
  const int selection_rows = num_nucleus_rows + num_selected_rows;
  if (selection_rows > 0) {
    select_top_k_kernel<<<selection_rows, kSupportThreads, 0, stream>>>(logits, n, rows, num_sorted_rows,
                                                                        selected_candidate_limit(), carved.needs_sort,
                                                                        carved.supports, returned_q);
    check_launch("select_top_k");
  }
  const int rows_to_sort = num_sorted_rows + num_nucleus_rows;
  const int key_blocks = (n + kKeyThreads * kKeysPerThread - 1) / (kKeyThreads * kKeysPerThread);
  for (int first = 0; first < rows_to_sort; first += kProcessedSortRows) {
    const int pass_rows = std::min(kProcessedSortRows, rows_to_sort - first);
    processed_keys_kernel<<<dim3(key_blocks, pass_rows), kKeyThreads, 0, stream>>>(
        logits, n, rows, first, num_sorted_rows, carved.needs_sort, carved.keys[0], carved.ids[0],
        carved.begin_offsets, carved.end_offsets);
    check_launch("processed_keys");
    cub::DoubleBuffer<uint32_t> keys(carved.keys[0], carved.keys[1]);
    cub::DoubleBuffer<int32_t> ids(carved.ids[0], carved.ids[1]);
    size_t temp_bytes = carved.sort_temp_bytes;
    check_cuda(cub::DeviceSegmentedRadixSort::SortPairs(carved.sort_temp, temp_bytes, keys, ids, pass_rows * n,
                                                        pass_rows, carved.begin_offsets, carved.end_offsets, 0, 32,
                                                        stream),
               "the segmented sort of cut rows");
    cut_support_kernel<<<pass_rows, kSupportThreads, 0, stream>>>(keys.Current(), ids.Current(), n, rows, first,
                                                                  num_sorted_rows, carved.needs_sort,
                                                                  carved.supports, returned_q);
    check_launch("cut_support");
  }
  const int first_whole = rows_to_sort + num_selected_rows;
  if (num_rows > first_whole) {
    uncut_support_kernel<<<num_rows - first_whole, kSupportThreads, 0, stream>>>(logits, n, rows, first_whole,
                                                                                  carved.supports);
    check_launch("uncut_support");
  }
  const int chunks = (n + kChooseChunk - 1) / kChooseChunk;
  processed_draw_chunk_kernel<<<dim3(chunks, num_rows), kChooseThreads, 0, stream>>>(
      logits, n, rows, carved.supports, q_tokens, q_probs, carved.chunk_key, carved.chunk_index);
  check_launch("processed_draw_chunk");
  processed_draw_rows_kernel<<<num_rows, 32, 0, stream>>>(logits, n, rows, carved.supports, carved.chunk_key,
                                                          carved.chunk_index, chunks, out);
  check_launch("processed_draw_rows");
}

}  // namespace pearl::gpu
