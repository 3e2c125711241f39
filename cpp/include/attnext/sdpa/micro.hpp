// SDPA's micro-kernels and packers: the only places that read the input element type In and
// turn it into the accumulation type Acc (a later bfloat16 path plugs in here: its own packing
// of Q and a dot-product micro-kernel; nothing outside this file reads In).
//
// Tile geometry of the blocked path: a block of Bq = kC packets of queries sits in the SIMD
// lanes, Q packed transposed, Qt (E, Bq), so that
//   S^T (keys, Bq)  += K[j, e] (broadcast) * Qt[e, :]      (K read in place, any strides)
//   O^T (Ev, Bq)    += V[j, c] (broadcast) * P^T[j, :]     (V read in place, any strides)
// and kR key rows (or value columns) make one micro-tile.
#pragma once

#include <Eigen/Core>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>

#include "../strided.hpp"
#include "../vmath.hpp"

namespace attnext {
namespace sdpa_detail {

namespace ei = Eigen::internal;
template <typename T>
using Pk = vm::Packet<T>;

// kC x kR: kC query packets times kR key rows give kC * kR = 24 accumulators, which with the
// kC query packets and one broadcast fill the 32 vector registers of AVX-512 (fewer registers
// spill a little, still correct). Bq = 64 floats also keeps Qt (E x Bq) in L1 at E = 64.
constexpr int kC = 4;
constexpr int kR = 6;

template <typename Acc>
constexpr index_t block_queries() {
  return kC * vm::packet_size<Acc>();
}

template <typename T>
constexpr T neg_inf() {
  return -std::numeric_limits<T>::infinity();
}

// One element of In as Acc (the conversion of every scalar read).
template <typename Acc, typename In>
inline Acc to_acc(In x) {
  return static_cast<Acc>(x);
}

// A packet of Acc from P consecutive In values.
template <typename Acc, typename In>
inline Pk<Acc> load_acc(const In* x) {
  if constexpr (std::is_same<In, Acc>::value) {
    return ei::ploadu<Pk<Acc>>(x);
  } else {
    alignas(64) Acc tmp[vm::packet_size<Acc>()];
    for (index_t k = 0; k < vm::packet_size<Acc>(); ++k) tmp[k] = static_cast<Acc>(x[k]);
    return ei::pload<Pk<Acc>>(tmp);
  }
}

// St[r][:] = sum_e K[r, e] * Qt[e][:] for R keys (rows of K at k0 + r * ks, element stride ke).
// mx[c] is raised to the lane-wise max of the scores written.
template <typename In, typename Acc, int R>
inline void qk_micro(const In* k0, index_t ks, index_t ke, index_t E, const Acc* Qt, Acc* St, Pk<Acc>* mx) {
  constexpr index_t P = vm::packet_size<Acc>();
  constexpr index_t Bq = block_queries<Acc>();
  Pk<Acc> acc[R][kC];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < kC; ++c) acc[r][c] = ei::pset1<Pk<Acc>>(Acc(0));
  for (index_t e = 0; e < E; ++e) {
    const Acc* qrow = Qt + e * Bq;
    Pk<Acc> qv[kC];
    for (int c = 0; c < kC; ++c) qv[c] = ei::pload<Pk<Acc>>(qrow + c * P);
    const In* kcol = k0 + e * ke;
    for (int r = 0; r < R; ++r) {
      const Pk<Acc> kb = ei::pset1<Pk<Acc>>(to_acc<Acc>(kcol[r * ks]));
      for (int c = 0; c < kC; ++c) acc[r][c] = ei::pmadd(kb, qv[c], acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < kC; ++c) {
      ei::pstore(St + r * Bq + c * P, acc[r][c]);
      mx[c] = ei::pmax(mx[c], acc[r][c]);
    }
}

// Ot[r][:] = Ot[r][:] * alpha + sum_j V[j, r] * Pt[j][:] for R value columns (column r of V
// at v0 + r * ve, rows at stride vs), nj keys. Careful: lanes whose score Sh[j][:] (before the
// exponential) is -inf, the hidden keys, are skipped instead of adding 0 * V, so a NaN or inf
// in a hidden value row never reaches the output (the caller takes this variant only for
// tiles with hidden keys and a non-finite value).
template <typename In, typename Acc, int R, bool Careful>
inline void pv_micro(const In* v0, index_t vs, index_t ve, index_t nj, const Acc* Pt, const Acc* Sh, Acc* Ot,
                     const Pk<Acc>* alpha, bool rescale) {
  constexpr index_t P = vm::packet_size<Acc>();
  constexpr index_t Bq = block_queries<Acc>();
  Pk<Acc> acc[R][kC];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < kC; ++c) {
      acc[r][c] = ei::pload<Pk<Acc>>(Ot + r * Bq + c * P);
      if (rescale) acc[r][c] = ei::pmul(acc[r][c], alpha[c]);
    }
  for (index_t j = 0; j < nj; ++j) {
    const Acc* prow = Pt + j * Bq;
    Pk<Acc> pv[kC];
    for (int c = 0; c < kC; ++c) pv[c] = ei::pload<Pk<Acc>>(prow + c * P);
    const In* vrow = v0 + j * vs;
    if constexpr (Careful) {
      Pk<Acc> hidden[kC];
      const Pk<Acc> ninf = ei::pset1<Pk<Acc>>(neg_inf<Acc>());
      for (int c = 0; c < kC; ++c) hidden[c] = ei::pcmp_eq(ei::pload<Pk<Acc>>(Sh + j * Bq + c * P), ninf);
      for (int r = 0; r < R; ++r) {
        const Pk<Acc> vb = ei::pset1<Pk<Acc>>(to_acc<Acc>(vrow[r * ve]));
        for (int c = 0; c < kC; ++c) acc[r][c] = ei::pselect(hidden[c], acc[r][c], ei::pmadd(vb, pv[c], acc[r][c]));
      }
    } else {
      for (int r = 0; r < R; ++r) {
        const Pk<Acc> vb = ei::pset1<Pk<Acc>>(to_acc<Acc>(vrow[r * ve]));
        for (int c = 0; c < kC; ++c) acc[r][c] = ei::pmadd(vb, pv[c], acc[r][c]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < kC; ++c) ei::pstore(Ot + r * Bq + c * P, acc[r][c]);
}

// Runs f(integral_constant<R>, offset) over n items in micro-tiles of kR, then the remainder.
template <typename F>
inline void for_micro_tiles(index_t n, F&& f) {
  index_t r = 0;
  for (; r + kR <= n; r += kR) f(std::integral_constant<int, kR>{}, r);
  switch (n - r) {
    case 1: f(std::integral_constant<int, 1>{}, r); break;
    case 2: f(std::integral_constant<int, 2>{}, r); break;
    case 3: f(std::integral_constant<int, 3>{}, r); break;
    case 4: f(std::integral_constant<int, 4>{}, r); break;
    case 5: f(std::integral_constant<int, 5>{}, r); break;
    default: break;
  }
  static_assert(kR == 6, "the remainder switch above covers kR - 1 cases");
}

// Whether n packed Acc values (aligned, n a multiple of the packet size) are all finite.
// x * 0 is NaN exactly for a non-finite x, and a NaN survives the sum.
template <typename Acc>
inline bool all_finite(const Acc* x, index_t n) {
  constexpr index_t P = vm::packet_size<Acc>();
  const Pk<Acc> zero = ei::pset1<Pk<Acc>>(Acc(0));
  Pk<Acc> acc = zero;
  for (index_t i = 0; i < n; i += P) acc = ei::padd(acc, ei::pmul(ei::pload<Pk<Acc>>(x + i), zero));
  const Acc s = ei::predux(acc);
  return s == s;
}

// Whether rows [0, n) of a matrix of In (row stride rs, element stride cs, `cols` columns)
// are all finite: the check that decides whether a tile with hidden keys needs the careful
// P V. Its cost, one vector pass over the tile's value rows, is paid only by such tiles.
template <typename Acc, typename In>
inline bool rows_finite(const In* x, index_t rs, index_t cs, index_t n, index_t cols) {
  constexpr index_t P = vm::packet_size<Acc>();
  const Pk<Acc> zero = ei::pset1<Pk<Acc>>(Acc(0));
  Pk<Acc> acc = zero;
  Acc tail = Acc(0);
  for (index_t j = 0; j < n; ++j) {
    const In* row = x + j * rs;
    index_t c = 0;
    if (cs == 1)
      for (; c + P <= cols; c += P) acc = ei::padd(acc, ei::pmul(load_acc<Acc>(row + c), zero));
    for (; c < cols; ++c) tail += to_acc<Acc>(row[c * cs]) * Acc(0);
  }
  const Acc s = ei::predux(acc) + tail;
  return s == s;
}

// Qt[e][i] = scale * Q[i, e] for the block's nq queries (rows at qb + i * qs, element stride
// qe); lanes past nq are zero. Contiguous rows go through P x P register transposes.
template <typename In, typename Acc>
inline void pack_q(const In* qb, index_t qs, index_t qe, index_t nq, index_t E, Acc scale, Acc* Qt) {
  constexpr index_t P = vm::packet_size<Acc>();
  constexpr index_t Bq = block_queries<Acc>();
  for (index_t e = 0; e < E; ++e) std::fill(Qt + e * Bq + nq, Qt + (e + 1) * Bq, Acc(0));
  index_t i = 0;
  if (qe == 1) {
    const Pk<Acc> sc = ei::pset1<Pk<Acc>>(scale);
    for (; i + P <= nq; i += P) {
      index_t e = 0;
      for (; e + P <= E; e += P) {
        ei::PacketBlock<Pk<Acc>, static_cast<int>(P)> blk;
        for (index_t r = 0; r < P; ++r) blk.packet[r] = load_acc<Acc>(qb + (i + r) * qs + e);
        ei::ptranspose(blk);
        for (index_t r = 0; r < P; ++r) ei::pstore(Qt + (e + r) * Bq + i, ei::pmul(blk.packet[r], sc));
      }
      for (; e < E; ++e)
        for (index_t r = 0; r < P; ++r) Qt[e * Bq + i + r] = scale * to_acc<Acc>(qb[(i + r) * qs + e]);
    }
  }
  for (; i < nq; ++i)
    for (index_t e = 0; e < E; ++e) Qt[e * Bq + i] = scale * to_acc<Acc>(qb[i * qs + e * qe]);
}

// Whether q * scale can overflow where q is finite: only for |scale| > 1 (the default
// 1/sqrt(E) never does); then the packed values are checked.
template <typename Acc>
inline bool scale_may_overflow(Acc scale) {
  return !(std::abs(scale) <= Acc(1));
}

// Packs Q with the scale folded in when that cannot overflow (|scale| <= 1, or every packed
// value finite); otherwise packs it unscaled and returns false: the caller then scales the
// scores after the dot products (a finite q * k * scale must not become inf through an
// overflowing q * scale).
template <typename In, typename Acc>
inline bool pack_q_scaled(const In* qb, index_t qs, index_t qe, index_t nq, index_t E, Acc scale, Acc* Qt) {
  constexpr index_t Bq = block_queries<Acc>();
  pack_q(qb, qs, qe, nq, E, scale, Qt);
  if (!scale_may_overflow(scale) || all_finite(Qt, E * Bq)) return true;
  pack_q(qb, qs, qe, nq, E, Acc(1), Qt);
  return false;
}

// The decode path's packer: query rows (nq, E) (rows at qb + i * qs, element stride qe) into
// qbuf, contiguous, scaled when that cannot overflow (as pack_q_scaled; else unscaled and
// false is returned: the caller scales the scores after the dot products).
template <typename In, typename Acc>
bool pack_q_rows(const In* qb, index_t qs, index_t qe, index_t nq, index_t E, Acc scale, Acc* qbuf) {
  const bool check = scale_may_overflow(scale);
  for (int attempt = 0; attempt < 2; ++attempt) {
    const Acc f = attempt == 0 ? scale : Acc(1);
    Acc bad = Acc(0);
    for (index_t i = 0; i < nq; ++i)
      for (index_t e = 0; e < E; ++e) {
        const Acc x = f * to_acc<Acc>(qb[i * qs + e * qe]);
        qbuf[i * E + e] = x;
        if (check) bad += x * Acc(0);  // NaN exactly when some x is not finite
      }
    if (bad == bad) return attempt == 0;
  }
  return false;
}

// dst[c] = o[c] * f for one output row (the decode path's unpacker).
template <typename Acc, typename Out>
inline void store_scaled(const Acc* o, Acc f, index_t n, Out* dst) {
  for (index_t c = 0; c < n; ++c) dst[c] = static_cast<Out>(o[c] * f);
}

// o[i, c] = Ot[c][i] * f[i] for the block's nq queries (o: rows of Ev, contiguous).
template <typename Acc, typename Out>
inline void unpack_o(const Acc* Ot, const Acc* f, index_t nq, index_t Ev, Out* o) {
  constexpr index_t P = vm::packet_size<Acc>();
  constexpr index_t Bq = block_queries<Acc>();
  index_t i = 0;
  if constexpr (std::is_same<Acc, Out>::value) {
    for (; i + P <= nq; i += P) {
      index_t c = 0;
      for (; c + P <= Ev; c += P) {
        ei::PacketBlock<Pk<Acc>, static_cast<int>(P)> blk;
        for (index_t r = 0; r < P; ++r) blk.packet[r] = ei::pload<Pk<Acc>>(Ot + (c + r) * Bq + i);
        ei::ptranspose(blk);
        for (index_t r = 0; r < P; ++r)
          ei::pstoreu(o + (i + r) * Ev + c, ei::pmul(blk.packet[r], ei::pset1<Pk<Acc>>(f[i + r])));
      }
      for (; c < Ev; ++c)
        for (index_t r = 0; r < P; ++r) o[(i + r) * Ev + c] = Ot[c * Bq + i + r] * f[i + r];
    }
  }
  for (; i < nq; ++i)
    for (index_t c = 0; c < Ev; ++c) o[i * Ev + c] = static_cast<Out>(Ot[c * Bq + i] * f[i]);
}

// Dot product of a contiguous Acc vector with a contiguous In vector, fixed lane order.
template <typename Acc, typename In>
inline Acc dot(const Acc* a, const In* x, index_t n) {
  constexpr index_t P = vm::packet_size<Acc>();
  Pk<Acc> acc0 = ei::pset1<Pk<Acc>>(Acc(0)), acc1 = acc0;
  index_t e = 0;
  for (; e + 2 * P <= n; e += 2 * P) {
    acc0 = ei::pmadd(ei::ploadu<Pk<Acc>>(a + e), load_acc<Acc>(x + e), acc0);
    acc1 = ei::pmadd(ei::ploadu<Pk<Acc>>(a + e + P), load_acc<Acc>(x + e + P), acc1);
  }
  for (; e + P <= n; e += P) acc0 = ei::pmadd(ei::ploadu<Pk<Acc>>(a + e), load_acc<Acc>(x + e), acc0);
  Acc s = ei::predux(ei::padd(acc0, acc1));
  for (; e < n; ++e) s += a[e] * to_acc<Acc>(x[e]);
  return s;
}

// y += a * x over n contiguous elements (x In, y Acc).
template <typename Acc, typename In>
inline void axpy(Acc a, const In* x, Acc* y, index_t n) {
  constexpr index_t P = vm::packet_size<Acc>();
  const Pk<Acc> av = ei::pset1<Pk<Acc>>(a);
  index_t e = 0;
  for (; e + P <= n; e += P) ei::pstoreu(y + e, ei::pmadd(av, load_acc<Acc>(x + e), ei::ploadu<Pk<Acc>>(y + e)));
  for (; e < n; ++e) y[e] += a * to_acc<Acc>(x[e]);
}

// Decode's P V for one query row: o[0, Ev) = sum_j p[j] V[j, :] over n keys (V rows at stride
// vs, contiguous), four packets of columns at a time held in registers.
template <typename Acc, typename In>
inline void row_pv(const Acc* p, const In* v, index_t vs, index_t n, index_t Ev, Acc* o) {
  constexpr index_t P = vm::packet_size<Acc>();
  std::fill(o, o + Ev, Acc(0));
  index_t c = 0;
  for (; c + 4 * P <= Ev; c += 4 * P) {
    Pk<Acc> acc[4];
    for (int u = 0; u < 4; ++u) acc[u] = ei::pset1<Pk<Acc>>(Acc(0));
    for (index_t j = 0; j < n; ++j) {
      const Pk<Acc> pj = ei::pset1<Pk<Acc>>(p[j]);
      const In* vj = v + j * vs + c;
      for (int u = 0; u < 4; ++u) acc[u] = ei::pmadd(pj, load_acc<Acc>(vj + u * P), acc[u]);
    }
    for (int u = 0; u < 4; ++u) ei::pstoreu(o + c + u * P, acc[u]);
  }
  if (c < Ev)
    for (index_t j = 0; j < n; ++j) axpy(p[j], v + j * vs + c, o + c, Ev - c);
}

}  // namespace sdpa_detail
}  // namespace attnext
