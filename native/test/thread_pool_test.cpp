#include "thread_pool.h"

#include <atomic>
#include <stdexcept>
#include <vector>

#include "check.h"

TEST(parallel_for_covers_every_index_once) {
  pearl::ThreadPool pool(3);
  CHECK_EQ(pool.size(), 3);
  for (int64_t n : {0, 1, 2, 7, 1000}) {
    std::vector<std::atomic<int>> hits(static_cast<size_t>(n));
    for (auto& hit : hits) hit = 0;
    pool.parallel_for(n, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) ++hits[static_cast<size_t>(i)];
    });
    for (auto& hit : hits) CHECK_EQ(hit.load(), 1);
  }
}

TEST(back_to_back_loops_of_varying_width_run_each_range_once) {
  // Threads without a range in one loop must not pick up ranges of the next.
  pearl::ThreadPool pool(4);
  std::vector<std::atomic<int>> hits(4);
  for (int round = 0; round < 20000; ++round) {
    const int64_t n = 1 + round % 4;
    for (auto& hit : hits) hit = 0;
    pool.parallel_for(n, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) ++hits[static_cast<size_t>(i)];
    });
    for (int64_t i = 0; i < 4; ++i) CHECK_EQ(hits[static_cast<size_t>(i)].load(), i < n ? 1 : 0);
  }
}

TEST(small_loops_stay_on_the_calling_thread) {
  pearl::ThreadPool pool(2);
  int calls = 0;
  pool.parallel_for(10, 100, [&](int64_t begin, int64_t end) {
    ++calls;
    CHECK_EQ(begin, int64_t{0});
    CHECK_EQ(end, int64_t{10});
  });
  CHECK_EQ(calls, 1);
}

TEST(exceptions_reach_the_caller_and_the_pool_survives) {
  pearl::ThreadPool pool(2);
  CHECK_THROWS(pool.parallel_for(100, 1,
                                 [&](int64_t begin, int64_t) {
                                   if (begin > 0) throw std::runtime_error("worker failed");
                                 }),
               "worker failed");
  std::atomic<int64_t> sum{0};
  pool.parallel_for(100, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) sum += i;
  });
  CHECK_EQ(sum.load(), int64_t{4950});
}

int main() { return check::run_all(); }
