// Thread count control and the parallel-for every kernel uses.
//
// The thread count is a process-wide setting, not OpenMP's per-thread ICV, so that
// set_num_threads() from one Python thread applies to kernels started from any other.
// Work is always split into blocks whose boundaries do not depend on the thread count, so
// every result is bit-identical for any number of threads.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <exception>
#include <mutex>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace attnext {

inline std::atomic<int>& thread_setting() {
#ifdef _OPENMP
  static std::atomic<int> n{std::max(1, omp_get_max_threads())};
#else
  static std::atomic<int> n{1};
#endif
  return n;
}

inline int get_num_threads() { return thread_setting().load(std::memory_order_relaxed); }

inline void set_num_threads(int n) { thread_setting().store(std::max(1, n), std::memory_order_relaxed); }

inline bool openmp_enabled() {
#ifdef _OPENMP
  return true;
#else
  return false;
#endif
}

// Runs body(i) for i in [0, n) on the library's threads. `dynamic` suits blocks of uneven
// cost (causal masks); either way each i is computed by exactly one thread in the same way.
// An exception escaping an OpenMP region would terminate the process, so the first one
// thrown by any block (std::bad_alloc for a tile buffer, say) is carried out and rethrown.
template <typename Body>
void parallel_for(std::int64_t n, Body&& body, bool dynamic = false) {
  if (n <= 0) return;
  const int threads = static_cast<int>(std::min<std::int64_t>(get_num_threads(), n));
  if (threads <= 1) {
    for (std::int64_t i = 0; i < n; ++i) body(i);
    return;
  }
#ifdef _OPENMP
  std::exception_ptr error;
  std::mutex error_lock;
  auto guarded = [&](std::int64_t i) {
    try {
      body(i);
    } catch (...) {
      std::lock_guard<std::mutex> hold(error_lock);
      if (!error) error = std::current_exception();
    }
  };
  if (dynamic) {
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
    for (std::int64_t i = 0; i < n; ++i) guarded(i);
  } else {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (std::int64_t i = 0; i < n; ++i) guarded(i);
  }
  if (error) std::rethrow_exception(error);
#else
  for (std::int64_t i = 0; i < n; ++i) body(i);
#endif
}

}  // namespace attnext
