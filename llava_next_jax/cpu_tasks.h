// Tasks on XLA:CPU's thread pool, shared by the native kernels (cpu_kernels.cc, cpu_attention.cc).
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace llava_next {

// Runs fn(0), ..., fn(count - 1) as tasks on the caller and up to one helper per thread of XLA's
// pool (never more helpers than tasks beyond the caller's): each task is claimed by whichever thread
// comes first, the caller included, so the call finishes even when every pool thread is busy
// elsewhere. Returns when all have run. A helper the pool starts late finds nothing left to claim and
// touches none of fn's data.
template <typename Fn>
void RunTasks(xla::ffi::ThreadPool& pool, int64_t count, Fn fn) {
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), count) - 1;
  struct Counters {
    std::atomic<int64_t> next{0}, done{0};
  };
  auto counters = std::make_shared<Counters>();
  auto work = [counters, count, fn] {
    for (int64_t t; (t = counters->next.fetch_add(1)) < count;) {
      fn(t);
      counters->done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule(decltype(work)(work));  // a copy per task
  work();
  while (counters->done.load(std::memory_order_acquire) < count) std::this_thread::yield();
}

}  // namespace llava_next
