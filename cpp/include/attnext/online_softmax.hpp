// The online softmax, in one place: the running state of a softmax over keys seen tile by tile
// (or chunk by chunk), its update by a new tile, the log-sum-exp merge of two partial states,
// and the lse a finished state gives. Every kernel path (SDPA blocked and decode, the chunk
// merges, softmax rows) uses these, with the one probability exponential vm::prob_exp, so lse
// and probabilities do not depend on the path that ran.
//
// A state is (m, l): m the running max of the scores seen (-inf while no key was visible, NaN
// once a visible score was NaN), l = sum_j exp(s_j - shift(m)), where shift(m) is m, or 0
// while m is -inf (so that -inf - shift stays -inf and hidden keys weigh exactly 0). An
// accumulated output o = sum_j exp(s_j - shift(m)) v_j goes with it. Functions work lane-wise
// on packets (one state per lane); the _one forms take one state and give the packet's bits.
#pragma once

#include <cmath>
#include <limits>

#include "vmath.hpp"

namespace attnext {
namespace softmax_state {

namespace ei = Eigen::internal;
template <typename T>
using Pk = vm::Packet<T>;

// The exponential's shift for a running max: 0 while nothing is visible.
template <typename T>
inline Pk<T> shift_of(const Pk<T>& m) {
  const Pk<T> ninf = ei::pset1<Pk<T>>(-std::numeric_limits<T>::infinity());
  return ei::pselect(ei::pcmp_eq(m, ninf), ei::pzero(m), m);
}

// What a tile needs after the max was raised: its probabilities are prob_exp(s - shift), and
// the state's sum and output so far are multiplied by alpha.
template <typename T>
struct Step {
  Pk<T> shift;
  Pk<T> alpha;
};

// THE online-softmax update, part 1: raises the running max m to include a tile whose max is
// tile_max (NaN wins: a NaN score reaches the output) and returns the tile's shift and the
// rescale factor alpha = prob_exp(m_old - shift) (0 when m_old was -inf).
template <typename T>
inline Step<T> raise_max(Pk<T>& m, const Pk<T>& tile_max) {
  const Pk<T> m_old = m;
  m = ei::pmax<Eigen::PropagateNaN>(m_old, tile_max);
  Step<T> st;
  st.shift = shift_of<T>(m);
  st.alpha = vm::prob_exp<T>(ei::psub(m_old, st.shift));
  return st;
}

// Part 2: the running sum after a tile whose probabilities (taken with st.shift) sum to
// tile_sum. The output is updated the same way: o = o * alpha + P V.
template <typename T>
inline Pk<T> add_sum(const Pk<T>& l, const Step<T>& st, const Pk<T>& tile_sum) {
  return ei::pmadd(l, st.alpha, tile_sum);
}

// Factors of a merge: the merged output is o * a + o2 * b.
template <typename T>
struct MergeFactors {
  Pk<T> a;
  Pk<T> b;
};

// THE log-sum-exp merge of partial state (m2, l2) into (m, l). A state that saw nothing
// (m2 = -inf, l2 = 0, o2 = 0) changes nothing; a NaN max on either side makes the result NaN.
template <typename T>
inline MergeFactors<T> merge(Pk<T>& m, Pk<T>& l, const Pk<T>& m2, const Pk<T>& l2) {
  const Step<T> st = raise_max<T>(m, m2);
  const Pk<T> b = vm::prob_exp<T>(ei::psub(m2, st.shift));
  l = ei::pmadd(l, st.alpha, ei::pmul(l2, b));
  return {st.alpha, b};
}

// 1 / l, the factor that normalises a finished state's output: 0 for a row that saw nothing
// (l == 0), NaN for a NaN sum.
template <typename T>
inline Pk<T> inverse_sum(const Pk<T>& l) {
  const Pk<T> zero = ei::pzero(l);
  return ei::pselect(ei::pcmp_le(l, zero), zero, ei::pdiv(ei::pset1<Pk<T>>(T(1)), l));
}

// THE lse of a finished state, natural log: shift(m) + log(l); -inf for a row that saw
// nothing (l == 0), NaN when m or l is.
template <typename T>
inline T lse(T m, T l) {
  if (l == T(0)) return -std::numeric_limits<T>::infinity();
  return (m == -std::numeric_limits<T>::infinity() ? T(0) : m) + std::log(l);
}

// One-state forms (lane 0 of the packet forms, so their bits are the packets').
template <typename T>
inline T inverse_sum_one(T l) {
  return ei::pfirst(inverse_sum<T>(ei::pset1<Pk<T>>(l)));
}

template <typename T>
struct MergeFactorsOne {
  T a;
  T b;
};

template <typename T>
inline MergeFactorsOne<T> merge_one(T& m, T& l, T m2, T l2) {
  Pk<T> pm = ei::pset1<Pk<T>>(m), pl = ei::pset1<Pk<T>>(l);
  const MergeFactors<T> f = merge<T>(pm, pl, ei::pset1<Pk<T>>(m2), ei::pset1<Pk<T>>(l2));
  m = ei::pfirst(pm);
  l = ei::pfirst(pl);
  return {ei::pfirst(f.a), ei::pfirst(f.b)};
}

}  // namespace softmax_state
}  // namespace attnext
