// Machine probes for the benchmark's "% of peak": the arithmetic peak of a register-only
// multiply-add loop per element type, and the read bandwidth of a stream over a working set.
//
// Why a register loop and not a GEMM: a GEMM measures a library, and a library can be
// misconfigured (OpenBLAS pinned to an older core type runs AVX2 kernels on an AVX-512 CPU,
// which made cases show more than 100% "of peak"). The loop below runs the widest
// multiply-add the CPU has (chosen at run time by CPUID, not by this build's flags), with
// enough independent accumulator chains to hide the instruction's latency on every port, on
// every requested thread: nothing sustained can go faster.
#pragma once

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "attnext/amx.hpp"
#include "attnext/lowp.hpp"

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#include <immintrin.h>
#define ATTNEXT_PROBE_X86 1
#endif

namespace attnext {
namespace probe {

// Independent accumulator chains per thread: FMA latency (4-6 cycles) x FMA ports (2) on
// current x86 cores is at most 12; 16 leaves margin and still fits the 32 vector registers of
// AVX-512 (the loop also holds two operands). With AVX2's 16 registers the compiler spills
// nothing either: the chains are the only live values besides the operands.
constexpr int kChains = 16;
// Loop trips per timed slice: 16 chains x 256K instructions, 1-5 ms per thread on current
// cores, long enough to swamp the parallel region's start-up (microseconds). A run is
// kSlices slices and the best slice counts: on a machine shared with other work, one slice
// in which another process took a core would halve the rate of all threads together, and
// the shorter the slice, the likelier some slice ran alone.
constexpr long kTrips = 256 * 1024;
constexpr int kSlices = 16;

struct Peak {
  double gflops = 0.0;  // floating-point operations per second / 1e9 (a multiply-add counts 2)
  std::string isa;      // the instruction that ran, for the report
};

using Clock = std::chrono::steady_clock;

// Runs `body(trips)` (which returns the flops it did) on `threads` threads, `runs` x kSlices
// times after one warm-up; returns the best GFLOP/s of all threads together.
template <typename Body>
double best_rate(Body body, int threads, int runs) {
  double best = 0.0;
  for (int r = 0; r <= runs * kSlices; ++r) {
    double flops = 0.0;
    const auto t0 = Clock::now();
#pragma omp parallel num_threads(threads) reduction(+ : flops)
    flops += body(kTrips);
    const double s = std::chrono::duration<double>(Clock::now() - t0).count();
    if (r > 0) best = std::max(best, flops / s / 1e9);  // slice 0 wakes the threads and clocks
  }
  return best;
}

// The multiply-add x = x * a + b with a just below 1 converges to b / (1 - a): no overflow,
// no denormals, so every instruction runs at full speed. The volatile sink keeps the result
// observable, so the loop cannot be removed. A macro, not a template: the vector intrinsics
// must be expanded inside the function that carries their target attribute (a helper or
// lambda without it cannot call them).
#define ATTNEXT_PROBE_CHAINS(V, a, b, FMA, ADD, trips)                        \
  do {                                                                       \
    V acc[kChains];                                                          \
    for (int c = 0; c < kChains; ++c) acc[c] = b;                            \
    for (long t = 0; t < trips; ++t)                                         \
      for (int c = 0; c < kChains; ++c) acc[c] = FMA(acc[c], a, b);          \
    V sum = acc[0];                                                          \
    for (int c = 1; c < kChains; ++c) sum = ADD(sum, acc[c]);                \
    volatile V sink = sum;                                                   \
    (void)sink;                                                              \
  } while (0)

#define ATTNEXT_PROBE_ADD(x, y) ((x) + (y))
#define ATTNEXT_PROBE_MULADD(x, a, b) ((x) * (a) + (b))

#if defined(ATTNEXT_PROBE_X86)
// Each returns the flops it did: trips x chains x lanes x 2.
__attribute__((target("avx512f"))) inline double fma_avx512_f32(long trips) {
  const __m512 a = _mm512_set1_ps(0.999f), b = _mm512_set1_ps(1e-3f);
  ATTNEXT_PROBE_CHAINS(__m512, a, b, _mm512_fmadd_ps, _mm512_add_ps, trips);
  return double(trips) * kChains * 32.0;
}
__attribute__((target("avx512f"))) inline double fma_avx512_f64(long trips) {
  const __m512d a = _mm512_set1_pd(0.999), b = _mm512_set1_pd(1e-3);
  ATTNEXT_PROBE_CHAINS(__m512d, a, b, _mm512_fmadd_pd, _mm512_add_pd, trips);
  return double(trips) * kChains * 16.0;
}
__attribute__((target("avx2,fma"))) inline double fma_avx2_f32(long trips) {
  const __m256 a = _mm256_set1_ps(0.999f), b = _mm256_set1_ps(1e-3f);
  ATTNEXT_PROBE_CHAINS(__m256, a, b, _mm256_fmadd_ps, _mm256_add_ps, trips);
  return double(trips) * kChains * 16.0;
}
__attribute__((target("avx2,fma"))) inline double fma_avx2_f64(long trips) {
  const __m256d a = _mm256_set1_pd(0.999), b = _mm256_set1_pd(1e-3);
  ATTNEXT_PROBE_CHAINS(__m256d, a, b, _mm256_fmadd_pd, _mm256_add_pd, trips);
  return double(trips) * kChains * 8.0;
}
#endif

#if defined(__AVX512BF16__)
// vdpbf16ps: per float32 lane, two bfloat16 products added to the lane (2 multiply-adds, 4
// flops). The products are tiny (1e-6) against the 1e-3 start, so the sums stay normal.
inline __m512 dpbf16(__m512 acc, __m512bh a, __m512bh b) { return _mm512_dpbf16_ps(acc, a, b); }
inline double dot_bf16(long trips) {
  const __m512bh a = _mm512_cvtne2ps_pbh(_mm512_set1_ps(1e-3f), _mm512_set1_ps(1e-3f));
  const __m512 start = _mm512_set1_ps(1e-3f);
  __m512 acc[kChains];
  for (int c = 0; c < kChains; ++c) acc[c] = start;
  for (long t = 0; t < trips; ++t)
    for (int c = 0; c < kChains; ++c) acc[c] = dpbf16(acc[c], a, a);
  __m512 sum = acc[0];
  for (int c = 1; c < kChains; ++c) sum = _mm512_add_ps(sum, acc[c]);
  volatile float sink = _mm512_reduce_add_ps(sum);
  (void)sink;
  return double(trips) * kChains * 64.0;  // 16 lanes x 2 pairs x 2 flops
}
#endif

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
// tdpbf16ps: one C tile (16 x 16 float32) += A (16 x 32 bfloat16) B, 8192 multiply-adds (16384
// flops). Six accumulator tiles cover the instruction's latency; A and B (1e-3 each) stay
// loaded, and the products (1e-6) keep the sums normal. Each thread configures its own tiles.
// One instruction does the work of 256 vdpbf16ps, so a slice runs trips / 16 rounds of six.
inline double dot_amx(long trips) {
  const long rounds = std::max(1L, trips / 16);
  const TileScope scope(full_tiles());
  alignas(64) std::uint16_t operand[16 * 32];
  std::fill(operand, operand + 16 * 32, std::uint16_t(0x3a83));  // bfloat16 1e-3
  _tile_loadd(6, operand, 64);
  _tile_loadd(7, operand, 64);
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  _tile_zero(4);
  _tile_zero(5);
  for (long t = 0; t < rounds; ++t) {
    _tile_dpbf16ps(0, 6, 7);
    _tile_dpbf16ps(1, 6, 7);
    _tile_dpbf16ps(2, 6, 7);
    _tile_dpbf16ps(3, 6, 7);
    _tile_dpbf16ps(4, 6, 7);
    _tile_dpbf16ps(5, 6, 7);
  }
  alignas(64) float sink[16 * 16];
  _tile_stored(0, sink, 64);
  volatile float keep = sink[0];
  (void)keep;
  return double(rounds) * 6 * 16384.0;
}
#endif

// Plain C++ for CPUs without AVX2/AVX-512 (and non-x86): what the compiler makes of it is
// the build's best multiply-add.
template <typename T>
inline double fma_scalar(long trips) {
  const T a = T(0.999), b = T(1e-3);
  ATTNEXT_PROBE_CHAINS(T, a, b, ATTNEXT_PROBE_MULADD, ATTNEXT_PROBE_ADD, trips);
  return double(trips) * kChains * 2.0;
}

// The peak multiply-add rate of `dtype` ("float32" | "float64") on `threads` threads.
inline Peak fma_peak(const std::string& dtype, int threads, int runs) {
  const bool f64 = dtype == "float64";
#if defined(ATTNEXT_PROBE_X86)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f"))
    return {best_rate(f64 ? fma_avx512_f64 : fma_avx512_f32, threads, runs), "avx512 fma"};
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
    return {best_rate(f64 ? fma_avx2_f64 : fma_avx2_f32, threads, runs), "avx2 fma"};
#endif
  return {best_rate(f64 ? fma_scalar<double> : fma_scalar<float>, threads, runs), "scalar multiply-add"};
}

// The bfloat16 product peak of the path attnext's kernels take: AMX tiles where they use them
// (amx_active()), vdpbf16ps where they use it (bf16_dot_active()), else their float32
// fallback, whose peak is float32's.
inline Peak bf16_peak(int threads, int runs) {
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
  if (amx_active()) return {best_rate(dot_amx, threads, runs), "amx_bf16 tdpbf16ps"};
#endif
#if defined(__AVX512BF16__)
  if (bf16_dot_active()) return {best_rate(dot_bf16, threads, runs), "avx512_bf16 vdpbf16ps"};
#endif
  Peak p = fma_peak("float32", threads, runs);
  p.isa = "float32 fallback (" + p.isa + "): the kernels do not use vdpbf16ps here";
  return p;
}

// Bytes read per timed run at least: a cache-sized buffer is read several times over, so each
// run lasts milliseconds and the parallel region's start-up does not count.
constexpr double kMinBytesPerRun = 256.0 * (1 << 20);
// Sequential streams a thread reads its part in, side by side: a core's prefetchers keep a
// bounded number of lines in flight per stream, so one stream per core under-reads memory.
constexpr int kReadStreams[] = {1, 2, 4, 8};

// The sum of x[0, n) read as `streams` equal runs of whole 64-byte lines in lockstep (a line
// of each run per step), then the tail. Eight accumulators, one per word of a line, so the
// compiler adds a line per vector instruction without reassociating a single sum.
inline uint64_t sum_streams(const uint64_t* x, size_t n, int streams) {
  constexpr size_t kLine = 8;
  const size_t run = n / size_t(streams) / kLine * kLine;
  uint64_t acc[kLine] = {};
  for (size_t i = 0; i < run; i += kLine)
    for (int s = 0; s < streams; ++s) {
      const uint64_t* line = x + size_t(s) * run + i;
      for (size_t w = 0; w < kLine; ++w) acc[w] += line[w];
    }
  uint64_t total = 0;
  for (size_t i = run * size_t(streams); i < n; ++i) total += x[i];
  for (size_t w = 0; w < kLine; ++w) total += acc[w];
  return total;
}

// The smallest set read_bandwidth reads: below a page the timing is the loop's start-up.
constexpr int64_t kMinReadBytes = 4096;

// Thread t's part [lo, hi) of `words` words split over `threads`: the same parts for the first
// touch and for every read, so each part sits near the thread that reads it.
struct Part {
  size_t lo, hi;
};
inline Part thread_part(size_t words, int threads, int t) {
  const size_t per = (words + size_t(threads) - 1) / size_t(threads);
  const size_t lo = std::min(words, size_t(t) * per);
  return {lo, std::min(words, lo + per)};
}

// Read bandwidth with `streams` streams per thread: `threads` threads sum their parts
// (thread_part) of `words` 64-bit words (the same part on every pass, so a cache-sized buffer
// stays in the cache), best of `runs` after one warm-up; bytes read / second / 1e9.
inline double read_gbs_streams(const uint64_t* data, size_t words, int threads, int runs, int streams) {
  const int passes = std::max(1, int(kMinBytesPerRun / (double(words) * 8.0)));
  double best = 0.0;
  for (int r = 0; r <= runs; ++r) {
    uint64_t total = 0;
    const auto t0 = Clock::now();
#pragma omp parallel for num_threads(threads) schedule(static, 1) reduction(+ : total)
    for (int t = 0; t < threads; ++t) {
      const Part part = thread_part(words, threads, t);
      for (int p = 0; p < passes; ++p) total += sum_streams(data + part.lo, part.hi - part.lo, streams);
    }
    const double s = std::chrono::duration<double>(Clock::now() - t0).count();
    volatile uint64_t sink = total;
    (void)sink;
    if (r > 0) best = std::max(best, double(words) * 8.0 * passes / s / 1e9);
  }
  return best;
}

// The machine's read bandwidth for a set of `nbytes` (>= kMinReadBytes) on `threads` threads:
// a buffer first written by the threads that will read it, then the best over kReadStreams
// streams per thread.
inline double read_bandwidth(int64_t nbytes, int threads, int runs) {
  const auto words = static_cast<size_t>(nbytes / 8);
  std::vector<uint64_t> data(words);
#pragma omp parallel for num_threads(threads) schedule(static, 1)
  for (int t = 0; t < threads; ++t) {
    const Part part = thread_part(words, threads, t);
    for (size_t i = part.lo; i < part.hi; ++i) data[i] = uint64_t(i);
  }
  double best = 0.0;
  for (int streams : kReadStreams) best = std::max(best, read_gbs_streams(data.data(), words, threads, runs, streams));
  return best;
}

}  // namespace probe
}  // namespace attnext
