#include "thread_pool.h"

#include <algorithm>
#include <exception>

namespace pearl {

ThreadPool::ThreadPool(int num_threads) {
  if (num_threads <= 0) num_threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
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
    std::unique_lock<std::mutex> lock(mutex_);
    work_ready_.wait(lock, [&] { return stopping_ || generation_ != seen_generation; });
    if (stopping_) return;
    seen_generation = generation_;
    if (static_cast<size_t>(index) >= ranges_.size()) continue;
    const auto range = ranges_[static_cast<size_t>(index)];
    const auto* task = task_;
    lock.unlock();
    std::exception_ptr error;
    try {
      (*task)(range.first, range.second);
    } catch (...) {
      error = std::current_exception();
    }
    lock.lock();
    if (error && !error_) error_ = error;
    if (--pending_ == 0) work_done_.notify_one();
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
  std::exception_ptr error;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    ranges_.clear();
    for (int i = 0; i < parts; ++i) ranges_.emplace_back(n * i / parts, n * (i + 1) / parts);
    task_ = &fn;
    pending_ = parts - 1;
    error_ = nullptr;
    ++generation_;
  }
  work_ready_.notify_all();
  try {
    fn(ranges_[0].first, ranges_[0].second);
  } catch (...) {
    error = std::current_exception();
  }
  std::unique_lock<std::mutex> lock(mutex_);
  work_done_.wait(lock, [&] { return pending_ == 0; });
  task_ = nullptr;
  if (!error) error = error_;
  lock.unlock();
  if (error) std::rethrow_exception(error);
}

}  // namespace pearl
