#include "thread_pool.h"

#include <algorithm>

namespace pearl {

namespace {

// Polling yields the core each time, so that on an oversubscribed machine (draft and target engines
// side by side) the thread holding the work runs instead of the spinners. A few hundred yields (tens of
// microseconds when the core is free) bridge consecutive kernels of one step; an idle engine soon sleeps.
constexpr int kSpinIterations = 256;

// generation_ packs a loop counter with the loop's number of ranges in its low bits.
constexpr int kPartsBits = 16;
constexpr uint64_t kPartsMask = (uint64_t{1} << kPartsBits) - 1;

template <typename Predicate>
bool spin_until(const Predicate& done) {
  for (int i = 0; i < kSpinIterations; ++i) {
    if (done()) return true;
    std::this_thread::yield();
  }
  return done();
}

}  // namespace

ThreadPool::ThreadPool(int num_threads) {
  if (num_threads <= 0) num_threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  num_threads = std::min<int>(num_threads, static_cast<int>(kPartsMask));
  num_threads_ = num_threads;
  for (int i = 1; i < num_threads_; ++i) workers_.emplace_back([this, i] { worker_loop(i); });
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;
  }
  work_ready_.notify_all();
  for (std::thread& worker : workers_) worker.join();
}

void ThreadPool::worker_loop(int index) {
  uint64_t seen_generation = 0;
  while (true) {
    const auto has_news = [&] {
      return stopping_.load(std::memory_order_acquire) ||
             generation_.load(std::memory_order_acquire) != seen_generation;
    };
    if (!spin_until(has_news)) {
      std::unique_lock<std::mutex> lock(mutex_);
      work_ready_.wait(lock, has_news);
    }
    if (stopping_.load(std::memory_order_acquire)) return;
    seen_generation = generation_.load(std::memory_order_acquire);
    // A thread without a range must not touch ranges_: the caller may already be filling it for the
    // next loop. One with a range is counted in pending_, so ranges_ and task_ (written before the
    // generation was published) stay put until it is done.
    if (static_cast<uint64_t>(index) >= (seen_generation & kPartsMask)) continue;
    const auto range = ranges_[static_cast<size_t>(index)];
    try {
      (*task_)(range.first, range.second);
    } catch (...) {
      std::lock_guard<std::mutex> lock(mutex_);
      if (!error_) error_ = std::current_exception();
    }
    if (pending_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
      // Taking the lock orders this notification after the caller's predicate check.
      { std::lock_guard<std::mutex> lock(mutex_); }
      work_done_.notify_one();
    }
  }
}

void ThreadPool::parallel_for(int64_t n, int64_t min_chunk, const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  const int64_t max_parts = std::max<int64_t>(1, n / std::max<int64_t>(1, min_chunk));
  const int parts = static_cast<int>(std::min<int64_t>(num_threads_, max_parts));
  if (parts == 1) {
    fn(0, n);
    return;
  }
  ranges_.clear();
  for (int i = 0; i < parts; ++i) ranges_.emplace_back(n * i / parts, n * (i + 1) / parts);
  task_ = &fn;
  error_ = nullptr;
  pending_.store(parts - 1, std::memory_order_relaxed);
  {
    std::lock_guard<std::mutex> lock(mutex_);
    const uint64_t counter = (generation_.load(std::memory_order_relaxed) >> kPartsBits) + 1;
    generation_.store(counter << kPartsBits | static_cast<uint64_t>(parts), std::memory_order_release);
  }
  work_ready_.notify_all();

  std::exception_ptr error;
  try {
    fn(ranges_[0].first, ranges_[0].second);
  } catch (...) {
    error = std::current_exception();
  }
  const auto all_done = [&] { return pending_.load(std::memory_order_acquire) == 0; };
  if (!spin_until(all_done)) {
    std::unique_lock<std::mutex> lock(mutex_);
    work_done_.wait(lock, all_done);
  }
  std::lock_guard<std::mutex> lock(mutex_);
  task_ = nullptr;
  if (!error) error = error_;
  if (error) std::rethrow_exception(error);
}

}  // namespace pearl
