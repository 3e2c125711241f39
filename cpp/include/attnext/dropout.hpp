// Attention dropout from a counter-based generator: each keep decision is a pure function of
// (seed, batch entry n, query i, key j), so it is never stored, the backward regenerates it,
// and it cannot depend on tiling, path or thread count.
//
// The generator is Philox4x32-10 (Salmon, Moraes, Dror and Shaw, "Parallel random numbers: as
// easy as 1, 2, 3", SC'11). One round on the counter c = (c0, c1, c2, c3) with key (k0, k1):
//   (hi0, lo0) = 0xD2511F53 * c0, (hi1, lo1) = 0xCD9E8D57 * c2   (32 x 32 -> 64 bit products)
//   c = (hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0);  k0 += 0x9E3779B9, k1 += 0xBB67AE85 (mod 2^32)
// Ten rounds; the output is c after round 10.
//
// The rule (docs/backward.md; python/attnext/_philox.py is its NumPy twin, bit for bit):
//   counter = (uint32(j >> 2), uint32(i), uint32(n), uint32(n >> 32)),
//   key = (uint32(seed), uint32(seed >> 32)), word = output word (j & 3);
//   the element is dropped iff word < T, T = floor(p * 2^32) (a uint64, so p = 1 drops all);
//   kept elements are multiplied by 1 / (1 - p) (0 when p = 1), dropped ones are set to 0
//   (not multiplied: a dropped NaN probability is 0 too).
// One Philox call thus decides four neighbouring keys of one query. n is the flat C-order
// index of the kernel's batch entry (batch..., query head).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "strided.hpp"

namespace attnext {

struct Dropout {
  std::uint64_t seed = 0;
  std::uint64_t threshold = 0;  // T = floor(p * 2^32): a word below it drops the element
  double keep_scale = 1.0;      // 1 / (1 - p), 0 for p = 1
  // False exactly for p = 0: then no kernel looks at the generator and the path is unchanged.
  // (A p so small that T = 0 still scales the kept elements.)
  bool active() const { return threshold != 0 || keep_scale != 1.0; }
};

// p in [0, 1] (the binding checks it).
inline Dropout make_dropout(double p, std::uint64_t seed) {
  Dropout d;
  d.seed = seed;
  // p * 2^32 is exact in double (a power-of-two scaling), so the floor is the rule's T.
  d.threshold = static_cast<std::uint64_t>(std::floor(std::ldexp(p, 32)));
  d.keep_scale = p < 1.0 ? 1.0 / (1.0 - p) : 0.0;
  return d;
}

namespace dropout_detail {

constexpr std::uint32_t kMul0 = 0xD2511F53u;
constexpr std::uint32_t kMul1 = 0xCD9E8D57u;
constexpr std::uint32_t kBump0 = 0x9E3779B9u;  // the golden ratio's fraction
constexpr std::uint32_t kBump1 = 0xBB67AE85u;  // sqrt(3) - 1
constexpr int kRounds = 10;

}  // namespace dropout_detail

inline void philox4x32_10(const std::uint32_t ctr[4], std::uint32_t key0, std::uint32_t key1, std::uint32_t out[4]) {
  std::uint32_t c0 = ctr[0], c1 = ctr[1], c2 = ctr[2], c3 = ctr[3];
  for (int r = 0; r < dropout_detail::kRounds; ++r) {
    const std::uint64_t p0 = static_cast<std::uint64_t>(dropout_detail::kMul0) * c0;
    const std::uint64_t p1 = static_cast<std::uint64_t>(dropout_detail::kMul1) * c2;
    const std::uint32_t n0 = static_cast<std::uint32_t>(p1 >> 32) ^ c1 ^ key0;
    const std::uint32_t n2 = static_cast<std::uint32_t>(p0 >> 32) ^ c3 ^ key1;
    c0 = n0;
    c1 = static_cast<std::uint32_t>(p1);
    c2 = n2;
    c3 = static_cast<std::uint32_t>(p0);
    key0 += dropout_detail::kBump0;
    key1 += dropout_detail::kBump1;
  }
  out[0] = c0, out[1] = c1, out[2] = c2, out[3] = c3;
}

namespace dropout_detail {

// The four output words for the counter of key group c = j >> 2 of query i in batch entry n.
inline void words(const Dropout& d, std::uint64_t n, std::int64_t i, std::int64_t c, std::uint32_t out[4]) {
  const std::uint32_t ctr[4] = {static_cast<std::uint32_t>(c), static_cast<std::uint32_t>(i),
                                static_cast<std::uint32_t>(n), static_cast<std::uint32_t>(n >> 32)};
  philox4x32_10(ctr, static_cast<std::uint32_t>(d.seed), static_cast<std::uint32_t>(d.seed >> 32), out);
}

}  // namespace dropout_detail

// Whether element (n, i, j) is dropped: THE rule; every other form below computes exactly this.
inline bool dropped(const Dropout& d, std::uint64_t n, std::int64_t i, std::int64_t j) {
  std::uint32_t w[4];
  dropout_detail::words(d, n, i, j >> 2, w);
  return w[j & 3] < d.threshold;
}

// tile[r * row_stride + c * col_stride] holds element (n, i0 + r, j0 + c) for r < rows,
// c < cols: kept entries are multiplied by keep_scale, dropped ones set to 0. One Philox call
// serves the (up to) four keys of a group j >> 2.
template <typename Acc>
void apply_dropout_tile(const Dropout& d, std::uint64_t n, index_t i0, index_t rows, index_t j0, index_t cols,
                        Acc* tile, index_t row_stride, index_t col_stride) {
  const Acc keep = static_cast<Acc>(d.keep_scale);
  const index_t jz = j0 + cols;
  for (index_t r = 0; r < rows; ++r) {
    Acc* row = tile + r * row_stride;
    for (index_t j = j0; j < jz;) {
      std::uint32_t w[4];
      dropout_detail::words(d, n, i0 + r, j >> 2, w);
      for (const index_t group_end = std::min(jz, (j | 3) + 1); j < group_end; ++j) {
        Acc& x = row[(j - j0) * col_stride];
        x = w[j & 3] < d.threshold ? Acc(0) : x * keep;
      }
    }
  }
}

}  // namespace attnext
