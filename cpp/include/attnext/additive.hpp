// Bahdanau's additive score, in one place: score(i, j) = v . tanh(q'_i + k'_j), where
// q' = q W_q (+ bias) and k' = k W_k are projections computed once per call as GEMMs.
// Only (Lq + Lk) x U projections are ever stored, never the (Lq, Lk, U) tensor.
//
// The fast form. tanh(a + b) = 1 - 2 / (1 + e^{2a} e^{2b}) = 1 - 2 e^{-2a} / (e^{-2a} + e^{2b}):
// the exponentials factor over the sum, so e^{-2q'} (one per query unit) and e^{2k'} (one per
// key unit) are computed once, and
//   v . tanh(q' + k') = sum_u v_u + sum_u w_u / (e^{-2q'_u} + e^{2k'_u}),  w_u = -2 v_u e^{-2q'_u},
// with w also computed once per query row. No exp or tanh polynomial is left in the inner loop:
// two units share one division, (w1 d2 + w2 d1) / (d1 d2) with d = e^{-2q'} + e^{2k'}. The
// loop is bound by the multiply pipes, which also carry part of each vector division, so
// halving the divisions for three extra multiplies is the cheapest of the forms we measured
// (one division per term, a reciprocal with a Newton step, three or four units per division,
// which also narrows the range below; figures in docs/benchmarks.md).
// Accuracy: every operation is correctly rounded and the term is a ratio of positive
// numbers, so each term is within a few ulp of the exact tanh form.
// Range: the factored form is used while every |q'_u| and |k'_u| is at most exp_form_limit
// (20 for float, 170 for double), so that the sums stay normal finite numbers, and every w_u
// is finite. A row or key set outside that range (or holding NaN/inf) goes through the plain
// vectorised tanh instead; which path runs depends only on the data, never on the thread count.
//
// Types: the kernels read q, k and the weights as `In` and compute the projections, the
// scores and everything after them in `Acc`; conversions happen where the projections read
// their operands (the GEMM's packers, Eigen's casts). The score functions below the
// projections therefore take only the accumulation type, T.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include <algorithm>
#include <vector>

#include "gemm.hpp"
#include "lowp.hpp"
#include "parallel.hpp"
#include "scratch.hpp"
#include "strided.hpp"
#include "vmath.hpp"

#if defined(__SSE__) || defined(__AVX__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace attnext {

template <typename T>
constexpr T exp_form_limit() {
  return std::is_same<T, float>::value ? T(20) : T(170);
}

// |x| as the unsigned integer of its bits with the sign cleared. These integers order the
// magnitudes (NaN above inf, inf above every finite value), and an integer max over an array
// vectorises where a floating-point one with a NaN test does not.
template <typename T>
using MagnitudeBits = std::conditional_t<sizeof(T) == 4, std::uint32_t, std::uint64_t>;

template <typename T>
inline MagnitudeBits<T> magnitude_bits(T x) {
  static_assert(sizeof(T) == sizeof(MagnitudeBits<T>), "float or double");
  MagnitudeBits<T> bits;
  std::memcpy(&bits, &x, sizeof bits);
  return bits & (~MagnitudeBits<T>(0) >> 1);
}

// The largest magnitude_bits of x[0, n) (0 for n = 0).
template <typename T>
inline MagnitudeBits<T> max_magnitude_bits(const T* x, index_t n) {
  MagnitudeBits<T> largest = 0;
  for (index_t i = 0; i < n; ++i) largest = std::max(largest, magnitude_bits(x[i]));
  return largest;
}

// Whether every |x_i| is at most limit (false for NaN).
template <typename T>
inline bool all_within(const T* x, index_t n, T limit) {
  return max_magnitude_bits(x, n) <= magnitude_bits(limit);
}

// expo[0, n) = exp(factor raw[0, n)); returns whether every |raw| <= exp_form_limit (false for
// NaN), i.e. whether the factored form may be used with these values. expo is written either way.
template <typename T>
inline bool additive_exp_form(const T* raw, T* expo, index_t n, T factor = T(2)) {
  namespace ei = Eigen::internal;
  using P = vm::Packet<T>;
  constexpr index_t W = vm::packet_size<T>();
  const P f = ei::pset1<P>(factor);
  index_t i = 0;
  for (; i + W <= n; i += W) ei::pstoreu(expo + i, ei::pexp(ei::pmul(f, ei::ploadu<P>(raw + i))));
  if (i < n) {
    alignas(64) T tail[W] = {};
    std::memcpy(tail, raw + i, sizeof(T) * (n - i));
    ei::pstore(tail, ei::pexp(ei::pmul(f, ei::pload<P>(tail))));
    std::memcpy(expo + i, tail, sizeof(T) * (n - i));
  }
  return all_within(raw, n, exp_form_limit<T>());
}

// v with its scaling for the factored form, worked out once per call (additive_v):
// exponent is chosen so that every |v'| < 1 for v' = v 2^-exponent (an exact scaling, undone
// on the scores; it bounds the pairwise numerators in additive_scores_row). factored is false,
// and the plain form is to be used, when v holds NaN or inf or 2^exponent would not be a
// finite T (v beyond 2^(max_exponent-1)).
template <typename T>
struct AdditiveV {
  const T* v = nullptr;
  int exponent = 0;
  bool factored = false;
};

template <typename T>
inline AdditiveV<T> additive_v(const T* v, index_t units) {
  const MagnitudeBits<T> bits = max_magnitude_bits(v, units);
  T largest;
  std::memcpy(&largest, &bits, sizeof largest);
  AdditiveV<T> form{v, 0, false};
  if (!std::isfinite(largest)) return form;
  if (largest > T(0)) form.exponent = std::ilogb(largest) + 1;
  form.factored = form.exponent < std::numeric_limits<T>::max_exponent;
  return form;
}

// A query row's factored form: inv = e^{-2 raw} and weight = -2 v 2^-exponent e^{-2 raw}
// (U each). Returns whether the form may be used: v allows it, every |raw| is in range and
// every weight is finite.
template <typename T>
inline bool additive_query_form(const T* raw, const AdditiveV<T>& v, T* inv, T* weight, index_t units) {
  if (!v.factored) return false;
  const bool in_range = additive_exp_form(raw, inv, units, T(-2));
  const T scale = std::ldexp(T(-2), -v.exponent);
  for (index_t u = 0; u < units; ++u) weight[u] = scale * v.v[u] * inv[u];
  return in_range && all_within(weight, units, std::numeric_limits<T>::max());
}

// Projected key rows (Lk, U) row-major: the raw projection and, when every value is in range,
// e^{2 raw} (expo == nullptr otherwise).
template <typename T>
struct AdditiveRows {
  const T* raw = nullptr;
  const T* expo = nullptr;
};

// One projected query row (U,): the raw projection and, when additive_query_form allowed it,
// inv = e^{-2 raw}, weight = -2 v 2^-exponent e^{-2 raw} and v's exponent (inv = nullptr otherwise).
template <typename T>
struct AdditiveQuery {
  const T* raw = nullptr;
  const T* inv = nullptr;
  const T* weight = nullptr;
  int exponent = 0;
};

namespace detail {

// out[i] = the sum of the lanes of a_i, i < 4, each in a fixed order that does not depend on
// the other three (a key scored alone, as (acc, 0, 0, 0), gets the same bits as in a group).
// With AVX-512 the four reductions share their shuffles: quarters of two vectors are added
// across the pair, then across the four, then within each quarter, ~14 instructions for the
// four sums instead of ~32.
template <typename P, typename T>
inline void sum_lanes4(const P& a0, const P& a1, const P& a2, const P& a3, T* out) {
  namespace ei = Eigen::internal;
#if defined(EIGEN_VECTORIZE_AVX512)
  if constexpr (std::is_same<P, __m512>::value) {
    // quarter q of s01: lanes of a0 (q < 2) or a1 (q >= 2), quarters q%2 and q%2 + 2 added
    const __m512 s01 = _mm512_add_ps(_mm512_shuffle_f32x4(a0, a1, _MM_SHUFFLE(1, 0, 1, 0)),
                                     _mm512_shuffle_f32x4(a0, a1, _MM_SHUFFLE(3, 2, 3, 2)));
    const __m512 s23 = _mm512_add_ps(_mm512_shuffle_f32x4(a2, a3, _MM_SHUFFLE(1, 0, 1, 0)),
                                     _mm512_shuffle_f32x4(a2, a3, _MM_SHUFFLE(3, 2, 3, 2)));
    // quarter i: the four partial sums of a_i
    __m512 s = _mm512_add_ps(_mm512_shuffle_f32x4(s01, s23, _MM_SHUFFLE(2, 0, 2, 0)),
                             _mm512_shuffle_f32x4(s01, s23, _MM_SHUFFLE(3, 1, 3, 1)));
    s = _mm512_add_ps(s, _mm512_permute_ps(s, _MM_SHUFFLE(2, 3, 0, 1)));
    s = _mm512_add_ps(s, _mm512_permute_ps(s, _MM_SHUFFLE(1, 0, 3, 2)));
    const __m512i first_of_quarters = _mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0);
    _mm_storeu_ps(out, _mm512_castps512_ps128(_mm512_permutexvar_ps(first_of_quarters, s)));
    return;
  } else if constexpr (std::is_same<P, __m512d>::value) {
    const __m512d s01 = _mm512_add_pd(_mm512_shuffle_f64x2(a0, a1, _MM_SHUFFLE(1, 0, 1, 0)),
                                      _mm512_shuffle_f64x2(a0, a1, _MM_SHUFFLE(3, 2, 3, 2)));
    const __m512d s23 = _mm512_add_pd(_mm512_shuffle_f64x2(a2, a3, _MM_SHUFFLE(1, 0, 1, 0)),
                                      _mm512_shuffle_f64x2(a2, a3, _MM_SHUFFLE(3, 2, 3, 2)));
    __m512d s = _mm512_add_pd(_mm512_shuffle_f64x2(s01, s23, _MM_SHUFFLE(2, 0, 2, 0)),
                              _mm512_shuffle_f64x2(s01, s23, _MM_SHUFFLE(3, 1, 3, 1)));
    s = _mm512_add_pd(s, _mm512_permute_pd(s, 0x55));
    const __m512i first_of_quarters = _mm512_setr_epi64(0, 2, 4, 6, 0, 0, 0, 0);
    _mm256_storeu_pd(out, _mm512_castpd512_pd256(_mm512_permutexvar_pd(first_of_quarters, s)));
    return;
  }
#endif
  out[0] = ei::predux(a0);
  out[1] = ei::predux(a1);
  out[2] = ei::predux(a2);
  out[3] = ei::predux(a3);
}

// One query row's operands in one form (additive_scores_row below), fixed at compile time so
// that each inner loop is straight: qa is added to the key operand ka, wa weighs each term.
// Factored: start = the lanes of sum_u v_u (in units of 2^exponent, as the weights),
// term = 1 / (e^{-2q'} + e^{2k'}). Plain: start = 0, term = tanh(q' + k').
template <typename T, bool factored>
struct RowForm {
  using P = vm::Packet<T>;
  static constexpr index_t W = vm::packet_size<T>();
  const T *qa, *wa, *ka;
  index_t units, full, rest;
  // The tail lanes: weight 0 makes their terms vanish; the query operand is padded with 1 so
  // that a factored term stays 0 / 1 rather than 0 / 0. k_tail holds up to four keys' tails.
  alignas(64) T q_tail[W], w_tail[W] = {}, k_tail[4][W] = {};
  P start;
  T unit;  // factored sums are in units of 2^exponent: scaled back by an exact power of two

  RowForm(const AdditiveQuery<T>& q, const AdditiveRows<T>& k, const T* v, index_t units_)
      : qa(factored ? q.inv : q.raw), wa(factored ? q.weight : v), ka(factored ? k.expo : k.raw), units(units_),
        full(units_ / W * W), rest(units_ - units_ / W * W) {
    namespace ei = Eigen::internal;
    std::fill(q_tail, q_tail + W, factored ? T(1) : T(0));
    if (rest) {
      std::memcpy(q_tail, qa + full, sizeof(T) * rest);
      std::memcpy(w_tail, wa + full, sizeof(T) * rest);
    }
    start = ei::pset1<P>(T(0));
    if constexpr (factored) {
      const P scale = ei::pset1<P>(std::ldexp(T(1), -q.exponent));
      alignas(64) T v_tail[W] = {};
      for (index_t u = 0; u < full; u += W) start = ei::padd(start, ei::pmul(scale, ei::ploadu<P>(v + u)));
      if (rest) {
        std::memcpy(v_tail, v + full, sizeof(T) * rest);
        start = ei::padd(start, ei::pmul(scale, ei::pload<P>(v_tail)));
      }
    }
    unit = factored ? std::ldexp(T(1), q.exponent) : T(1);
  }
  T finish(T sum) const { return factored ? sum * unit : sum; }

  // acc + w term(q, k), one unit per lane
  static P add_term(const P& acc, const P& w, const P& qu, const P& ku) {
    namespace ei = Eigen::internal;
    if constexpr (factored)
      return ei::padd(acc, ei::pdiv(w, ei::padd(qu, ku)));
    else
      return ei::pmadd(w, vm::tanh<T>(ei::padd(qu, ku)), acc);
  }
  // Factored, two units at a time share one division:
  //   w1 / d1 + w2 / d2 = (w1 d2 + w2 d1) / (d1 d2),  d = e^{-2q'} + e^{2k'}.
  // In range: d in [2e^-2L, 2e^2L] (L = exp_form_limit) and |w| < 2 e^2L (|v'| < 1), so the
  // numerator and d1 d2 stay normal finite numbers (float: L = 20, e^80 ~ 5.5e34; double: L =
  // 170, e^680 ~ 1e295). Rounding: as for the two terms taken apart, a few ulp of |w1/d1| + |w2/d2|.
  static P add_pair(const P& i1, const P& i2, const P& w1, const P& w2, const T* kr, const P& acc) {
    namespace ei = Eigen::internal;
    const P d1 = ei::padd(i1, ei::ploadu<P>(kr)), d2 = ei::padd(i2, ei::ploadu<P>(kr + W));
    const P num = ei::pmadd(w2, d1, ei::pmul(w1, d2));
    return ei::padd(acc, ei::pdiv(num, ei::pmul(d1, d2)));
  }
};

// out[j, j + 4) for keys j..j+3: four keys share each load of the query's operands.
template <typename T, bool factored>
inline void score_key_group(RowForm<T, factored>& f, index_t j, T* out) {
  namespace ei = Eigen::internal;
  using P = vm::Packet<T>;
  constexpr index_t W = vm::packet_size<T>();
  const T* qa = f.qa;
  const T* wa = f.wa;
  const index_t full = f.full, rest = f.rest;
  const T* k0 = f.ka + j * f.units;
  const T* k1 = k0 + f.units;
  const T* k2 = k1 + f.units;
  const T* k3 = k2 + f.units;
  P a0 = f.start, a1 = f.start, a2 = f.start, a3 = f.start;
  index_t u = 0;
  if constexpr (factored) {
    for (; u + 2 * W <= full; u += 2 * W) {
      const P i1 = ei::ploadu<P>(qa + u), i2 = ei::ploadu<P>(qa + u + W);
      const P w1 = ei::ploadu<P>(wa + u), w2 = ei::ploadu<P>(wa + u + W);
      a0 = f.add_pair(i1, i2, w1, w2, k0 + u, a0);
      a1 = f.add_pair(i1, i2, w1, w2, k1 + u, a1);
      a2 = f.add_pair(i1, i2, w1, w2, k2 + u, a2);
      a3 = f.add_pair(i1, i2, w1, w2, k3 + u, a3);
    }
  }
  for (; u < full; u += W) {
    const P qu = ei::ploadu<P>(qa + u), wu = ei::ploadu<P>(wa + u);
    a0 = f.add_term(a0, wu, qu, ei::ploadu<P>(k0 + u));
    a1 = f.add_term(a1, wu, qu, ei::ploadu<P>(k1 + u));
    a2 = f.add_term(a2, wu, qu, ei::ploadu<P>(k2 + u));
    a3 = f.add_term(a3, wu, qu, ei::ploadu<P>(k3 + u));
  }
  if (rest) {
    std::memcpy(f.k_tail[0], k0 + full, sizeof(T) * rest);
    std::memcpy(f.k_tail[1], k1 + full, sizeof(T) * rest);
    std::memcpy(f.k_tail[2], k2 + full, sizeof(T) * rest);
    std::memcpy(f.k_tail[3], k3 + full, sizeof(T) * rest);
    const P qu = ei::pload<P>(f.q_tail), wu = ei::pload<P>(f.w_tail);
    a0 = f.add_term(a0, wu, qu, ei::pload<P>(f.k_tail[0]));
    a1 = f.add_term(a1, wu, qu, ei::pload<P>(f.k_tail[1]));
    a2 = f.add_term(a2, wu, qu, ei::pload<P>(f.k_tail[2]));
    a3 = f.add_term(a3, wu, qu, ei::pload<P>(f.k_tail[3]));
  }
  sum_lanes4(a0, a1, a2, a3, out + j);
  for (int i = 0; i < 4; ++i) out[j + i] = f.finish(out[j + i]);
}

// out[j] for one key, through the same lane sums as a group (its bits do not depend on it
// being scored alone).
template <typename T, bool factored>
inline void score_key(RowForm<T, factored>& f, index_t j, T* out) {
  namespace ei = Eigen::internal;
  using P = vm::Packet<T>;
  constexpr index_t W = vm::packet_size<T>();
  const T* qa = f.qa;
  const T* wa = f.wa;
  const T* kr = f.ka + j * f.units;
  P acc = f.start;
  index_t u = 0;
  if constexpr (factored)
    for (; u + 2 * W <= f.full; u += 2 * W)
      acc = f.add_pair(ei::ploadu<P>(qa + u), ei::ploadu<P>(qa + u + W), ei::ploadu<P>(wa + u),
                       ei::ploadu<P>(wa + u + W), kr + u, acc);
  for (; u < f.full; u += W)
    acc = f.add_term(acc, ei::ploadu<P>(wa + u), ei::ploadu<P>(qa + u), ei::ploadu<P>(kr + u));
  if (f.rest) {
    std::memcpy(f.k_tail[0], kr + f.full, sizeof(T) * f.rest);
    acc = f.add_term(acc, ei::pload<P>(f.w_tail), ei::pload<P>(f.q_tail), ei::pload<P>(f.k_tail[0]));
  }
  const P zero = ei::pset1<P>(T(0));
  T sums[4];
  sum_lanes4(acc, zero, zero, zero, sums);
  out[j] = f.finish(sums[0]);
}

template <typename T, bool factored>
inline void additive_scores_row_in_form(const AdditiveQuery<T>& q, const AdditiveRows<T>& k, const T* v,
                                        index_t units, index_t lk, T* out) {
  RowForm<T, factored> f(q, k, v, units);
  index_t j = 0;
  for (; j + 4 <= lk; j += 4) score_key_group(f, j, out);
  for (; j < lk; ++j) score_key(f, j, out);
}

}  // namespace detail

// out[j] = sum_u v[u] * tanh(q[u] + k[j * U + u]) for j in [0, lk).
//   q: one query row; k: lk key rows (lk, U) row-major contiguous; v (U,) contiguous.
// The factored form runs when both q.inv and k.expo are given, else the plain tanh. Factored,
// each lane starts from its share of sum_u v_u and adds w_u / (e^{-2q'_u} + e^{2k'_u}).
// Four keys share each load of q's operands; the u-sum is accumulated lane-wise then reduced in
// a fixed order, so a key's score does not depend on its position or the thread count.
template <typename T>
inline void additive_scores_row(const AdditiveQuery<T>& q, const AdditiveRows<T>& k, const T* v, index_t units,
                                index_t lk, T* out) {
  if (q.inv && k.expo)
    detail::additive_scores_row_in_form<T, true>(q, k, v, units, lk, out);
  else
    detail::additive_scores_row_in_form<T, false>(q, k, v, units, lk, out);
}

// Scratch tags (scratch.hpp) of the additive kernels' projections.
struct AdditiveQueryTag {};
struct AdditiveQueryFormTag {};
struct AdditiveKeyRawTag {};
struct AdditiveKeyExpTag {};

// Rows of queries scored (or keys put in exponential form) by one parallel task: fixed, so
// results are bit-identical for any thread count.
constexpr index_t kAdditiveRowBlock = 64;

inline index_t additive_row_blocks(index_t rows) { return (rows + kAdditiveRowBlock - 1) / kAdditiveRowBlock; }

// dst (rows, n) = a (rows, k) b (k, n), with results that depend only on the values. Eigen
// evaluates very small products (rows + n + k < EIGEN_GEMM_TO_COEFFBASED_THRESHOLD) coefficient
// by coefficient with a vectorised inner product that peels up to the first aligned address,
// so their last bits would depend on where our scratch buffers happen to start; those get a
// plain loop here. A few rows go through matrix-vector products (no packing of b, which is
// what one decoder step needs), more through a GEMM. The choice depends on the shapes only.
template <typename T, typename A, typename B>
void product_rows(const A& a, const B& b, T* dst) {
  const index_t rows = a.rows(), depth = a.cols(), n = b.cols();
  using RowVec = Eigen::Matrix<T, 1, Eigen::Dynamic>;
  if (rows + n + depth < EIGEN_GEMM_TO_COEFFBASED_THRESHOLD) {
    for (index_t r = 0; r < rows; ++r)
      for (index_t c = 0; c < n; ++c) {
        T acc = T(0);
        for (index_t d = 0; d < depth; ++d) acc += a(r, d) * b(d, c);
        dst[r * n + c] = acc;
      }
  } else if (rows < 4) {
    for (index_t r = 0; r < rows; ++r) Eigen::Map<RowVec>(dst + r * n, n).noalias() = a.row(r) * b;
  } else {
    MatrixMap<T>(dst, rows, n).noalias() = a * b;
  }
}

#if defined(__AVX512F__)
// project_block for 16-bit x and w (a decoding step's few rows): dst row = bias + sum_d x[d]
// w[d, :], w's contiguous rows read in place 16 values a load (load16) and accumulated in float,
// instead of Eigen's cast, which would copy all of w to float first.
template <typename In>
void project_block_16(const Strided<const In>& x, index_t b, index_t r0, index_t rows, const ConstMatrixMap<In>& w,
                      const float* bias, float* dst) {
  const index_t depth = w.rows(), units = w.cols();
  const In* xb = x.data + x.batch_offset(b, 2) + r0 * x.stride(-2);
  for (index_t r = 0; r < rows; ++r) {
    float* y = dst + r * units;
    if (bias)
      std::copy(bias, bias + units, y);
    else
      std::fill(y, y + units, 0.0f);
    for (index_t d = 0; d < depth; ++d) {
      const float xd = static_cast<float>(xb[r * x.stride(-2) + d * x.stride(-1)]);
      const In* wd = w.data() + d * units;
      const __m512 xv = _mm512_set1_ps(xd);
      index_t u = 0;
      for (; u + 16 <= units; u += 16)
        _mm512_storeu_ps(y + u, _mm512_fmadd_ps(xv, load16(wd + u), _mm512_loadu_ps(y + u)));
      for (; u < units; ++u) y[u] += xd * static_cast<float>(wd[u]);
    }
  }
}
#endif

// Rows [r0, r0 + rows) of batch entry b of x (..., L, D) times w (D, U) (+ bias) into dst
// (rows, U) row-major; x and w are cast to Acc where Eigen reads them (16-bit inputs on AVX-512
// builds: project_block_16).
template <typename In, typename Acc>
void project_block(const Strided<const In>& x, index_t b, index_t r0, index_t rows, const ConstMatrixMap<In>& w,
                   const Acc* bias, Acc* dst) {
#if defined(__AVX512F__)
  if constexpr (is_lowp<In>::value && std::is_same<Acc, float>::value)
    return project_block_16<In>(x, b, r0, rows, w, bias, dst);
#endif
  const index_t units = w.cols();
  using RowVec = Eigen::Matrix<Acc, 1, Eigen::Dynamic>;
  product_rows<Acc>(matrix_of(x, b, r0, rows).template cast<Acc>(), w.template cast<Acc>(), dst);
  if (bias) {
    const Eigen::Map<const RowVec> bv(bias, units);
    for (index_t r = 0; r < rows; ++r) Eigen::Map<RowVec>(dst + r * units, units) += bv;
  }
}

// dst (rows of every batch entry, U) = x (..., L, D) w (D, U) (+ bias), row-major. Many rows go
// through the packed GEMM (on the library's threads when `parallel`), a few through
// project_block; the choice depends on the shapes only.
template <typename In, typename Acc>
void project_rows(const Strided<const In>& x, const ConstMatrixMap<In>& w, const Acc* bias, Acc* dst, bool parallel) {
  const index_t batches = x.batch_count(2), len = x.dim(-2), depth = x.dim(-1), units = w.cols();
  if (batches * len < kPackedGemmMinRows) {
    for (index_t b = 0; b < batches; ++b) project_block<In, Acc>(x, b, 0, len, w, bias, dst + b * len * units);
    return;
  }
  const index_t row_stride = x.stride(-2), col_stride = x.stride(-1);
  const auto x_rows = [&](index_t m0, index_t rows, index_t k0, index_t kc, const PanelWriter<In>& out) {
    for (index_t r = 0; r < rows; ++r) {
      const index_t m = m0 + r;
      pack_row(x.data + x.batch_offset(m / len, 2) + (m % len) * row_stride + k0 * col_stride, col_stride, kc, out,
               r);
    }
  };
  const auto w_rows = [&](index_t n0, index_t cols, index_t k0, index_t kc, const PanelWriter<In>& out) {
    for (index_t k = 0; k < kc; ++k) out.put_run(k, 0, w.data() + (k0 + k) * units + n0, cols);
  };
  const auto x_row = [&](index_t m) -> const In* {
    return col_stride == 1 ? x.data + x.batch_offset(m / len, 2) + (m % len) * row_stride : nullptr;
  };
  const InPlaceW<In> w_in_place{w.data(), units};
  packed_gemm<In, Acc>(batches * len, units, depth, x_rows, x_row, w_rows, bias, dst, parallel, &w_in_place);
}

// Scores of projected query rows q_proj (rows, U) row-major against one batch entry's projected
// keys: tile[r * ld + j] = v . tanh(q_proj_r + k'_j) for j < lk, each row in the factored form
// when its values and the keys allow it (the forward and the backward both score through here).
template <typename Acc>
void additive_score_projected(const Acc* q_proj, index_t rows, index_t units, const AdditiveRows<Acc>& keys,
                              const AdditiveV<Acc>& v, index_t lk, Acc* tile, index_t ld) {
  const Scratch<Acc, AdditiveQueryFormTag> form(static_cast<size_t>(2 * units));  // a row's inv and weight
  Acc* const inv = form.data();
  Acc* const weight = inv + units;
  for (index_t r = 0; r < rows; ++r) {
    const Acc* qr = q_proj + r * units;
    const bool factored = keys.expo && additive_query_form(qr, v, inv, weight, units);
    const AdditiveQuery<Acc> query{qr, factored ? inv : nullptr, weight, v.exponent};
    additive_scores_row(query, keys, v.v, units, lk, tile + r * ld);
  }
}

// Query rows [r0, r0 + rows) of batch entry b of q (..., Lq, Dq) projected: dst (rows, U) =
// q_r W_q + bias, on the calling thread (the forward and the backward project through here).
template <typename In, typename Acc>
void additive_project_query_block(const Strided<const In>& q, index_t b, index_t r0, index_t rows,
                                  const ConstMatrixMap<In>& w_query, const Acc* bias, Acc* dst) {
  const Strided<const In> q_rows(q.data + q.batch_offset(b, 2) + r0 * q.stride(-2), {rows, q.dim(-1)},
                                 {q.stride(-2), q.stride(-1)});
  project_rows<In, Acc>(q_rows, w_query, bias, dst, /*parallel=*/false);
}

// Scores of query rows [r0, r0 + rows) of batch entry b of q (..., Lq, Dq) against one batch
// entry's projected keys: tile[r * ld + j] = v . tanh(q_r W_q + bias + k'_j) for j < lk. The
// rows are projected by the calling task itself (no parallelism inside), so they are still in
// this core's cache when they are scored.
template <typename In, typename Acc>
void additive_score_block(const Strided<const In>& q, index_t b, index_t r0, index_t rows,
                          const ConstMatrixMap<In>& w_query, const Acc* bias, const AdditiveRows<Acc>& keys,
                          const AdditiveV<Acc>& v, index_t lk, Acc* tile, index_t ld) {
  const index_t units = w_query.cols();
  const Scratch<Acc, AdditiveQueryTag> q_proj(static_cast<size_t>(rows * units));
  additive_project_query_block<In, Acc>(q, b, r0, rows, w_query, bias, q_proj.data());
  additive_score_projected<Acc>(q_proj.data(), rows, units, keys, v, lk, tile, ld);
}

// Projected keys of (..., Lk, Dk) through w_key (Dk, U): raw = k W_k and expo = exp(2 raw),
// both (batches, Lk, U) C-contiguous, and ok (batches,) = whether the batch entry's values all
// lie in the factored form's range (see above). `parallel` = false runs everything on the
// calling thread (a caller already inside a task); the results are the same.
template <typename In, typename Acc = In>
void additive_prepare_keys(const Strided<const In>& key, const ConstMatrixMap<In>& w_key, Acc* raw, Acc* expo,
                           bool* ok, bool parallel = true) {
  const index_t batches = key.batch_count(2), lk = key.dim(-2), units = w_key.cols();
  project_rows<In, Acc>(key, w_key, static_cast<const Acc*>(nullptr), raw, parallel);
  const index_t nb = additive_row_blocks(lk);
  std::vector<unsigned char> block_ok(static_cast<size_t>(batches * nb), 1);
  const auto exp_block = [&](index_t task) {
    const index_t b = task / nb, r0 = (task % nb) * kAdditiveRowBlock;
    const index_t rows = std::min(kAdditiveRowBlock, lk - r0);
    const index_t at = (b * lk + r0) * units;
    block_ok[static_cast<size_t>(task)] = additive_exp_form(raw + at, expo + at, rows * units);
  };
  if (parallel)
    parallel_for(batches * nb, exp_block);
  else
    for (index_t task = 0; task < batches * nb; ++task) exp_block(task);
  for (index_t b = 0; b < batches; ++b) {
    bool all = true;
    for (index_t t = 0; t < nb; ++t) all &= block_ok[static_cast<size_t>(b * nb + t)] != 0;
    ok[b] = all;
  }
}

}  // namespace attnext
