// Bahdanau's additive score, in one place: score(i, j) = v . tanh(q'_i + k'_j), where
// q' = q W_q (+ bias) and k' = k W_k are projections computed once per call as GEMMs.
// Only (Lq + Lk) x U projections are ever stored, never the (Lq, Lk, U) tensor.
#pragma once

#include <cstring>

#include "strided.hpp"
#include "vmath.hpp"

namespace attnext {

// out[j] = sum_u v[u] * tanh(qp[u] + kp[j * U + u]) for j in [0, lk).
//   qp (U,) contiguous, kp (lk, U) row-major contiguous, v (U,) contiguous.
// The u-sum is accumulated lane-wise then reduced in a fixed order (deterministic).
template <typename T>
inline void additive_scores_row(const T* qp, const T* kp, const T* v, index_t units, index_t lk, T* out) {
  namespace ei = Eigen::internal;
  using P = vm::Packet<T>;
  constexpr index_t W = vm::packet_size<T>();
  const index_t full = units / W * W;
  const index_t rest = units - full;
  alignas(64) T q_tail[W] = {}, v_tail[W] = {}, k_tail[W] = {};
  if (rest) {
    std::memcpy(q_tail, qp + full, sizeof(T) * rest);
    std::memcpy(v_tail, v + full, sizeof(T) * rest);
  }
  for (index_t j = 0; j < lk; ++j) {
    const T* kr = kp + j * units;
    P acc = ei::pset1<P>(T(0));
    for (index_t u = 0; u < full; u += W) {
      const P t = vm::tanh<T>(ei::padd(ei::ploadu<P>(qp + u), ei::ploadu<P>(kr + u)));
      acc = ei::pmadd(ei::ploadu<P>(v + u), t, acc);
    }
    if (rest) {
      std::memcpy(k_tail, kr + full, sizeof(T) * rest);
      const P t = vm::tanh<T>(ei::padd(ei::pload<P>(q_tail), ei::pload<P>(k_tail)));
      acc = ei::pmadd(ei::pload<P>(v_tail), t, acc);
    }
    out[j] = ei::predux(acc);
  }
}

}  // namespace attnext
