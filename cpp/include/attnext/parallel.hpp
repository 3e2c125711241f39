// Thread count control and the parallel-for every kernel uses.
//
// The thread count is a process-wide setting, not OpenMP's per-thread ICV, so that
// set_num_threads() from one Python thread applies to kernels started from any other.
// Work is always split into blocks whose boundaries do not depend on the thread count, so
// every result is bit-identical for any number of threads.
//
// After fork() the child computes serially. An OpenMP runtime's thread pool does not survive
// fork: the child inherits the pool's bookkeeping but not its threads, and with GNU libgomp the
// child's first parallel region waits forever for them (the OpenMP standard leaves fork
// undefined). A pthread_atfork child handler, installed before the first parallel region, marks
// a forked child, and there get_num_threads() is 1 and set_num_threads() has no effect, so no
// kernel opens an OpenMP region. This covers os.fork, multiprocessing's "fork" start method
// and the children of a "forkserver"; "spawn" starts a fresh process with the full thread
// count. Results do not change (they never depend on the thread count).
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <exception>
#include <mutex>

#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
#define ATTNEXT_HAS_ATFORK 1
#endif

namespace attnext {

// True in a process made by fork() from one that had loaded the library.
inline std::atomic<bool>& forked_child() {
  static std::atomic<bool> flag{false};
  return flag;
}

// Installs the fork handler once per process (called at module load and before every parallel
// region, so it is in place before any thread pool exists).
inline void install_fork_handler() {
#ifdef ATTNEXT_HAS_ATFORK
  static const bool installed = pthread_atfork(nullptr, nullptr, [] { forked_child().store(true); }) == 0;
  (void)installed;
#endif
}

// The most threads set_num_threads accepts. Why 256: the work is split into blocks whose
// boundaries do not depend on the thread count, and more threads than cores only adds
// scheduling overhead, so the cap only has to exceed the core counts CPU attention meets (the
// gain past 256 threads is nil for these memory-bound kernels). And each OpenMP thread reserves
// a stack of address space (8 MB with glibc's default): 256 threads reserve 2 GB, which fits
// under address-space limits where 1024 threads (8 GB) made libgomp print "Thread creation
// failed" and exit. Below the cap, the binding refuses a count the process cannot start
// (it tries first: libgomp ends the process when it cannot create a pool thread).
constexpr int kMaxThreads = 256;

inline std::atomic<int>& thread_setting() {
#ifdef _OPENMP
  static std::atomic<int> n{std::min(kMaxThreads, std::max(1, omp_get_max_threads()))};
#else
  static std::atomic<int> n{1};
#endif
  return n;
}

// The thread count kernels use: the setting, or 1 in a forked child (see the top of this file).
inline int get_num_threads() {
  if (forked_child().load(std::memory_order_relaxed)) return 1;
  return thread_setting().load(std::memory_order_relaxed);
}

// Callers bound n (the binding refuses counts above its documented cap).
inline void set_num_threads(int n) { thread_setting().store(std::clamp(n, 1, kMaxThreads), std::memory_order_relaxed); }

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
  install_fork_handler();
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
