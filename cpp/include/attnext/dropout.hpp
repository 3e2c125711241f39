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

#if defined(__AVX512F__) && defined(__BMI2__)
#include <immintrin.h>
#define ATTNEXT_DROPOUT_AVX512 1
#else
#define ATTNEXT_DROPOUT_AVX512 0
#endif

#include "strided.hpp"

namespace attnext {

struct Dropout {
  std::uint64_t seed = 0;
  std::uint64_t threshold = 0;  // T = floor(p * 2^32): a word below it drops the element
  double keep_scale = 1.0;      // 1 / (1 - p), 0 for p = 1
  // False exactly when the rule changes nothing (p = 0, or a p so small that T = 0 and
  // 1 / (1 - p) rounds to 1): then no kernel looks at the generator and the path is unchanged.
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

namespace dropout_detail {

// Below, every form applies one set of decisions to tile a and, when b is not null, to tile b
// of the same layout (the backward's P and dP share their decisions).

// The rule applied element by element (any strides): one Philox call per group of four keys.
template <typename Acc>
void apply_scalar(const Dropout& d, std::uint64_t n, index_t i0, index_t rows, index_t j0, index_t cols, Acc* a,
                  Acc* b, index_t row_stride, index_t col_stride) {
  const Acc keep = static_cast<Acc>(d.keep_scale);
  const index_t jz = j0 + cols;
  for (index_t r = 0; r < rows; ++r) {
    for (index_t j = j0; j < jz;) {
      std::uint32_t w[4];
      words(d, n, i0 + r, j >> 2, w);
      for (const index_t group_end = std::min(jz, (j | 3) + 1); j < group_end; ++j) {
        const index_t at = r * row_stride + (j - j0) * col_stride;
        const bool drop = w[j & 3] < d.threshold;
        a[at] = drop ? Acc(0) : a[at] * keep;
        if (b) b[at] = drop ? Acc(0) : b[at] * keep;
      }
    }
  }
}

#if ATTNEXT_DROPOUT_AVX512
// The same rule, 16 Philox instances at a time (one per 32-bit lane of an AVX-512 register).
constexpr index_t kLanes = 16;

// Philox4x32-10 of the 16 counters (c[0][l], c[1][l], c[2][l], c[3][l]), in place.
inline void philox16(__m512i c[4], std::uint32_t key0, std::uint32_t key1) {
  const __m512i m0 = _mm512_set1_epi32(static_cast<int>(kMul0));
  const __m512i m1 = _mm512_set1_epi32(static_cast<int>(kMul1));
  const __mmask16 odd = 0xAAAA;
  for (int r = 0; r < kRounds; ++r) {
    // _mm512_mul_epu32 multiplies the even 32-bit lanes (the low halves of the 64-bit ones):
    // the odd lanes are shifted down for a second product, and each lane's high and low words
    // are blended back into place.
    const __m512i p0e = _mm512_mul_epu32(c[0], m0), p0o = _mm512_mul_epu32(_mm512_srli_epi64(c[0], 32), m0);
    const __m512i p1e = _mm512_mul_epu32(c[2], m1), p1o = _mm512_mul_epu32(_mm512_srli_epi64(c[2], 32), m1);
    const __m512i hi0 = _mm512_mask_blend_epi32(odd, _mm512_srli_epi64(p0e, 32), p0o);
    const __m512i lo0 = _mm512_mask_blend_epi32(odd, p0e, _mm512_slli_epi64(p0o, 32));
    const __m512i hi1 = _mm512_mask_blend_epi32(odd, _mm512_srli_epi64(p1e, 32), p1o);
    const __m512i lo1 = _mm512_mask_blend_epi32(odd, p1e, _mm512_slli_epi64(p1o, 32));
    constexpr int kXor3 = 0x96;  // ternary-logic truth table of a ^ b ^ c
    c[0] = _mm512_ternarylogic_epi32(hi1, c[1], _mm512_set1_epi32(static_cast<int>(key0)), kXor3);
    c[1] = lo1;
    c[2] = _mm512_ternarylogic_epi32(hi0, c[3], _mm512_set1_epi32(static_cast<int>(key1)), kXor3);
    c[3] = lo0;
    key0 += kBump0;
    key1 += kBump1;
  }
}

// x[l] = 0 for the lanes in drop, x[l] * keep for the others, over the 16 lanes in valid of
// the consecutive elements at x (lanes outside valid are neither read nor written).
inline void scale_lanes(float* x, __mmask16 valid, __mmask16 drop, float keep) {
  const __m512 v = _mm512_maskz_loadu_ps(valid, x);
  _mm512_mask_storeu_ps(x, valid, _mm512_maskz_mul_ps(static_cast<__mmask16>(~drop), v, _mm512_set1_ps(keep)));
}

inline void scale_lanes(double* x, __mmask16 valid, __mmask16 drop, double keep) {
  for (int h = 0; h < 2; ++h) {
    const __mmask8 vh = static_cast<__mmask8>(valid >> (8 * h)), dh = static_cast<__mmask8>(drop >> (8 * h));
    if (vh == 0) continue;
    const __m512d v = _mm512_maskz_loadu_pd(vh, x + 8 * h);
    _mm512_mask_storeu_pd(x + 8 * h, vh, _mm512_maskz_mul_pd(static_cast<__mmask8>(~dh), v, _mm512_set1_pd(keep)));
  }
}

// scale_lanes on a + at and, if there is one, on b + at.
template <typename Acc>
inline void scale_both(Acc* a, Acc* b, index_t at, __mmask16 valid, __mmask16 drop, Acc keep) {
  scale_lanes(a + at, valid, drop, keep);
  if (b) scale_lanes(b + at, valid, drop, keep);
}

inline __mmask16 first_lanes(index_t count) {
  return count >= kLanes ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << count) - 1u);
}

// The low 32 bits of x in every lane (a counter or key word of Philox).
inline __m512i splat_word(std::uint64_t x) {
  return _mm512_set1_epi32(static_cast<int>(static_cast<std::uint32_t>(x)));
}

// What the vector forms below share: the keep scale, the drop threshold T in every lane, the
// lane numbers 0..15 and the seed's two key words.
template <typename Acc>
struct PhiloxLanes {
  explicit PhiloxLanes(const Dropout& d)
      : keep(static_cast<Acc>(d.keep_scale)),
        threshold(splat_word(d.threshold)),
        lane(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15)),
        k0(static_cast<std::uint32_t>(d.seed)),
        k1(static_cast<std::uint32_t>(d.seed >> 32)) {}
  Acc keep;
  __m512i threshold, lane;
  std::uint32_t k0, k1;
};

// Tiles whose queries are consecutive (row stride 1, the blocked path's P^T): the lanes are 16
// queries, and one Philox round trip decides a group of four keys for all of them.
template <typename Acc>
void apply_query_lanes(const Dropout& d, std::uint64_t n, index_t i0, index_t rows, index_t j0, index_t cols,
                       Acc* a, Acc* b, index_t col_stride) {
  const PhiloxLanes<Acc> pl(d);
  const index_t jz = j0 + cols;
  for (index_t r0 = 0; r0 < rows; r0 += kLanes) {
    const __mmask16 valid = first_lanes(rows - r0);
    // uint32(i0 + r0) + l wraps exactly as uint32(i0 + r0 + l) does.
    const __m512i queries = _mm512_add_epi32(splat_word(static_cast<std::uint64_t>(i0 + r0)), pl.lane);
    for (index_t g = j0 >> 2; g <= (jz - 1) >> 2; ++g) {
      __m512i c[4] = {splat_word(static_cast<std::uint64_t>(g)), queries, splat_word(n), splat_word(n >> 32)};
      philox16(c, pl.k0, pl.k1);
      for (index_t j = std::max(j0, 4 * g); j < std::min(jz, 4 * g + 4); ++j)
        scale_both(a, b, (j - j0) * col_stride + r0, valid, _mm512_cmplt_epu32_mask(c[j & 3], pl.threshold), pl.keep);
    }
  }
}

// Rows whose keys are consecutive (column stride 1, the decode path's): the lanes are 16
// groups of four keys, whose decisions are interleaved back into key order (bit 4l + w of the
// 64-bit mask is word w of lane l).
template <typename Acc>
void apply_key_lanes(const Dropout& d, std::uint64_t n, index_t i0, index_t rows, index_t j0, index_t cols,
                     Acc* a, Acc* b, index_t row_stride) {
  const PhiloxLanes<Acc> pl(d);
  const index_t jz = j0 + cols;
  const index_t aligned = std::min(jz, (j0 + 3) & ~index_t(3));  // the first group boundary
  constexpr std::uint64_t kWord0 = 0x1111111111111111ull;
  for (index_t r = 0; r < rows; ++r) {
    const index_t i = i0 + r, row = r * row_stride;
    apply_scalar(d, n, i, index_t(1), j0, aligned - j0, a + row, b ? b + row : nullptr, index_t(0), index_t(1));
    for (index_t j = aligned; j < jz; j += 4 * kLanes) {
      __m512i c[4] = {_mm512_add_epi32(splat_word(static_cast<std::uint64_t>(j >> 2)), pl.lane),
                      splat_word(static_cast<std::uint64_t>(i)), splat_word(n), splat_word(n >> 32)};
      philox16(c, pl.k0, pl.k1);
      std::uint64_t drop = 0;
      for (int w = 0; w < 4; ++w) drop |= _pdep_u64(_mm512_cmplt_epu32_mask(c[w], pl.threshold), kWord0 << w);
      const index_t nk = std::min(4 * kLanes, jz - j);
      for (index_t q = 0; q < nk; q += kLanes)
        scale_both(a, b, row + (j - j0) + q, first_lanes(nk - q), static_cast<__mmask16>(drop >> q), pl.keep);
    }
  }
}
#endif

// The dispatch behind apply_dropout_tile(s): the scalar rule is the specification; with
// AVX-512 the forms with 16 Philox instances per register serve unit-stride tiles and give the
// same bits.
template <typename Acc>
void apply(const Dropout& d, std::uint64_t n, index_t i0, index_t rows, index_t j0, index_t cols, Acc* a, Acc* b,
           index_t row_stride, index_t col_stride) {
  if (rows <= 0 || cols <= 0) return;
  if (d.threshold > 0xFFFFFFFFu) {  // p = 1: every word is below T, everything is dropped
    for (index_t r = 0; r < rows; ++r)
      for (index_t c = 0; c < cols; ++c) {
        a[r * row_stride + c * col_stride] = Acc(0);
        if (b) b[r * row_stride + c * col_stride] = Acc(0);
      }
    return;
  }
#if ATTNEXT_DROPOUT_AVX512
  // Few rows of consecutive keys go by keys; otherwise consecutive queries go by queries.
  if (col_stride == 1 && (row_stride != 1 || rows < kLanes / 2)) {
    apply_key_lanes(d, n, i0, rows, j0, cols, a, b, row_stride);
    return;
  }
  if (row_stride == 1) {
    apply_query_lanes(d, n, i0, rows, j0, cols, a, b, col_stride);
    return;
  }
#endif
  apply_scalar(d, n, i0, rows, j0, cols, a, b, row_stride, col_stride);
}

}  // namespace dropout_detail

// tile[r * row_stride + c * col_stride] holds element (n, i0 + r, j0 + c) for r < rows,
// c < cols: kept entries are multiplied by keep_scale, dropped ones set to 0 (one Philox call
// per group of four keys of a row; 16 at once with AVX-512).
template <typename Acc>
void apply_dropout_tile(const Dropout& d, std::uint64_t n, index_t i0, index_t rows, index_t j0, index_t cols,
                        Acc* tile, index_t row_stride, index_t col_stride) {
  dropout_detail::apply<Acc>(d, n, i0, rows, j0, cols, tile, nullptr, row_stride, col_stride);
}

// The same decisions applied to two tiles of one layout (the backward's P and dP), generated
// once for both.
template <typename Acc>
void apply_dropout_tiles(const Dropout& d, std::uint64_t n, index_t i0, index_t rows, index_t j0, index_t cols,
                         Acc* tile_a, Acc* tile_b, index_t row_stride, index_t col_stride) {
  dropout_detail::apply<Acc>(d, n, i0, rows, j0, cols, tile_a, tile_b, row_stride, col_stride);
}

}  // namespace attnext
