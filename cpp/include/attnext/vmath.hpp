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

// x <- exp(x - shift) in place; returns the sum of the results, accumulated lane-wise in a
// fixed order (independent of alignment and thread count).
template <typename T>
inline T exp_shifted_sum(T* x, index_t n, T shift) {
  constexpr index_t P = packet_size<T>();
  const Packet<T> s = ei::pset1<Packet<T>>(shift);
  Packet<T> acc = ei::pset1<Packet<T>>(T(0));
  index_t i = 0;
  for (; i + P <= n; i += P) {
    const Packet<T> e = exp<T>(ei::psub(ei::ploadu<Packet<T>>(x + i), s));
    ei::pstoreu(x + i, e);
    acc = ei::padd(acc, e);
  }
  if (i < n) {
    alignas(64) T tail[P];
    for (index_t k = 0; k < P; ++k) tail[k] = -std::numeric_limits<T>::infinity();
    std::memcpy(tail, x + i, sizeof(T) * (n - i));
    const Packet<T> e = exp<T>(ei::psub(ei::pload<Packet<T>>(tail), s));
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
