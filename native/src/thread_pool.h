// A small persistent pool for data-parallel loops. Work is split into contiguous index ranges, one per
// thread; the caller's thread takes the first range. Callers must only split independent outputs
// (rows, columns, heads), never one reduction, so results do not depend on the split.
//
// A forward pass issues a few dozen short loops back to back, so waiting threads spin briefly before
// they sleep: a condition-variable wake-up costs more than a small matmul.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace pearl {

class ThreadPool {
 public:
  explicit ThreadPool(int num_threads);  // 0: std::thread::hardware_concurrency()
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return num_threads_; }

  // Calls fn(begin, end) over a partition of [0, n) into at most size() ranges, each at least
  // `min_chunk` long (small loops run on the caller's thread alone). Returns when all ranges are done;
  // rethrows the first exception a range threw.
  void parallel_for(int64_t n, int64_t min_chunk, const std::function<void(int64_t, int64_t)>& fn);

 private:
  void worker_loop(int index);

  int num_threads_;
  std::vector<std::thread> workers_;
  std::mutex mutex_;
  std::condition_variable work_ready_;
  std::condition_variable work_done_;
  const std::function<void(int64_t, int64_t)>* task_ = nullptr;
  std::vector<std::pair<int64_t, int64_t>> ranges_;
  std::atomic<uint64_t> generation_{0};  // loop counter << 16 | number of ranges
  std::atomic<int> pending_{0};
  std::exception_ptr error_;  // guarded by mutex_
  std::atomic<bool> stopping_{false};
};

}  // namespace pearl
