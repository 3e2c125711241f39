// Vectorised elementwise math on contiguous buffers, built on Eigen's packet primitives.
//
// Eigen's own array expressions would do this too, but they peel a scalar prologue up to the
// first aligned address, and the scalar and packet exp differ in the last bit: a value's
// result would then depend on where its buffer happens to start. Here every element, tail
// included, goes through the same packet code, so results depend only on the values.
#pragma once

#include <Eigen/Core>

#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "strided.hpp"

namespace attnext {
namespace vm {

namespace ei = Eigen::internal;

template <typename T>
using Packet = typename ei::packet_traits<T>::type;

template <typename T>
constexpr index_t packet_size() {
  return ei::unpacket_traits<Packet<T>>::size;
}

// Below this argument exp(x) is under the smallest normal number; we return exactly 0 there
// (Eigen's pexp clamps and would return a denormal for -inf), so masked keys weigh exactly 0.
template <typename T>
constexpr T exp_underflow() {
  return std::is_same<T, float>::value ? T(-87.33) : T(-708.39);
}

template <typename T>
inline Packet<T> exp(const Packet<T>& x) {
  const Packet<T> e = ei::pexp(x);
  return ei::pselect(ei::pcmp_lt(x, ei::pset1<Packet<T>>(exp_underflow<T>())), ei::pzero(x), e);
}

// THE probability exponential: p = exp(x) in natural units, for x = s - max formed by the
// caller first (so no finite score or mask is ever multiplied before the subtraction, and
// nothing finite overflows). Every attention probability, rescale factor and chunk merge of
// every path (SDPA blocked and decode, softmax, additive) goes through it, so probabilities
// and lse do not depend on the path. exp(-inf) and anything below the smallest normal result
// is exactly 0 (masked keys weigh exactly 0); NaN stays NaN.
//
// With AVX-512 and float it is 2^(x log2 e): a round, a degree-6 polynomial of the fraction on
// [-1/2, 1/2] (relative error ~1.2e-7, about 2 ulp) and one vscalefps, about half the
// instructions of a general exp (exp is most of the non-GEMM work of attention). Elsewhere
// (double, or no AVX-512) it is exp above.
template <typename T>
inline Packet<T> prob_exp(const Packet<T>& x) {
#if defined(EIGEN_VECTORIZE_AVX512)  // Packet16f is __m512 there
  if constexpr (std::is_same<T, float>::value) {
    // x log2 e of a non-positive x cannot overflow; max(c, t) keeps a NaN t, and -inf or
    // anything below -200 gives 2^-200 * p, which is 0 in float.
    const __m512 t = _mm512_max_ps(_mm512_set1_ps(-200.0f), _mm512_mul_ps(x, _mm512_set1_ps(1.4426950408889634f)));
    const __m512 m = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(t, m);
    // 2^f = sum_k (f ln 2)^k / k!, k <= 6.
    __m512 y = _mm512_set1_ps(1.5403530393381606e-4f);
    y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(1.3333558146428443e-3f));
    y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(9.6181291076284772e-3f));
    y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(5.5504108664821580e-2f));
    y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(2.4022650695910071e-1f));
    y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(6.9314718055994531e-1f));
    y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(y, m);
  } else {
    return exp<T>(x);
  }
#else
  return exp<T>(x);
#endif
}

// The same exponential for one value (through a packet, so it gives the packet's bits).
template <typename T>
inline T prob_exp_one(T x) {
  return ei::pfirst(prob_exp<T>(ei::pset1<Packet<T>>(x)));
}

// tanh: Eigen vectorises it for float; for double we use tanh|x| = 1 - 2 / (exp(2|x|) + 1),
// whose absolute error stays at a few ulp of 1, plenty for a score that sums many of them.
template <typename T>
inline Packet<T> tanh(const Packet<T>& x) {
  if constexpr (std::is_same<T, float>::value) {
    return ei::ptanh(x);
  } else {
    const Packet<T> one = ei::pset1<Packet<T>>(T(1));
    const Packet<T> two = ei::pset1<Packet<T>>(T(2));
    const Packet<T> ax = ei::pabs(x);
    const Packet<T> e = ei::pexp(ei::pmul(two, ax));
    const Packet<T> t = ei::psub(one, ei::pdiv(two, ei::padd(e, one)));
    // Restore the sign of x (t >= 0); NaN stays NaN through pexp and the arithmetic.
    return ei::pselect(ei::pcmp_lt(x, ei::pzero(x)), ei::pnegate(t), t);
  }
}

// Calls f on every packet of x[0, n), writing the result back; the tail goes through a
// zero-padded packet so it sees the same code as the body.
template <typename T, typename F>
inline void transform(T* x, index_t n, F f) {
  constexpr index_t P = packet_size<T>();
  index_t i = 0;
  for (; i + P <= n; i += P) ei::pstoreu(x + i, f(ei::ploadu<Packet<T>>(x + i)));
  if (i < n) {
    alignas(64) T tail[P] = {};
    std::memcpy(tail, x + i, sizeof(T) * (n - i));
    ei::pstore(tail, f(ei::pload<Packet<T>>(tail)));
    std::memcpy(x + i, tail, sizeof(T) * (n - i));
  }
}

// x <- prob_exp(x - shift) in place; returns the sum of the results, accumulated lane-wise in a
// fixed order (independent of alignment and thread count).
template <typename T>
inline T exp_shifted_sum(T* x, index_t n, T shift) {
  constexpr index_t P = packet_size<T>();
  const Packet<T> s = ei::pset1<Packet<T>>(shift);
  Packet<T> acc = ei::pset1<Packet<T>>(T(0));
  index_t i = 0;
  for (; i + P <= n; i += P) {
    const Packet<T> e = prob_exp<T>(ei::psub(ei::ploadu<Packet<T>>(x + i), s));
    ei::pstoreu(x + i, e);
    acc = ei::padd(acc, e);
  }
  if (i < n) {
    alignas(64) T tail[P];
    for (index_t k = 0; k < P; ++k) tail[k] = -std::numeric_limits<T>::infinity();
    std::memcpy(tail, x + i, sizeof(T) * (n - i));
    const Packet<T> e = prob_exp<T>(ei::psub(ei::pload<Packet<T>>(tail), s));
    ei::pstore(tail, e);
    std::memcpy(x + i, tail, sizeof(T) * (n - i));
    acc = ei::padd(acc, e);
  }
  return ei::predux(acc);
}

// Maximum of x[0, n); NaN if any element is NaN (as NumPy's max), -inf for n == 0.
template <typename T>
inline T max_propagate_nan(const T* x, index_t n) {
  constexpr index_t P = packet_size<T>();
  constexpr T neg_inf = -std::numeric_limits<T>::infinity();
  Packet<T> acc = ei::pset1<Packet<T>>(neg_inf);
  index_t i = 0;
  for (; i + P <= n; i += P) acc = ei::pmax<Eigen::PropagateNaN>(acc, ei::ploadu<Packet<T>>(x + i));
  alignas(64) T lanes[P];
  ei::pstore(lanes, acc);
  T m = neg_inf;
  bool nan = false;
  for (index_t k = 0; k < P; ++k) {
    nan |= lanes[k] != lanes[k];
    m = lanes[k] > m ? lanes[k] : m;
  }
  for (; i < n; ++i) {
    nan |= x[i] != x[i];
    m = x[i] > m ? x[i] : m;
  }
  return nan ? std::numeric_limits<T>::quiet_NaN() : m;
}

inline void scale(float* x, index_t n, float a) {
  for (index_t i = 0; i < n; ++i) x[i] *= a;
}
inline void scale(double* x, index_t n, double a) {
  for (index_t i = 0; i < n; ++i) x[i] *= a;
}

}  // namespace vm
}  // namespace attnext
