// SDPA's micro-kernels and packers: the only places that read the input element type In and
// turn it into the accumulation type Acc (nothing outside this file reads In).
//
// Tile geometry of the blocked path: a block of Bq = kC packets of queries sits in the SIMD
// lanes, Q packed transposed, Qt (E, Bq), so that
//   S^T (keys, Bq)  += K[j, e] (broadcast) * Qt[e, :]      (K read in place, any strides)
//   O^T (Ev, Bq)    += V[j, c] (broadcast) * P^T[j, :]     (V read in place, any strides)
// and kR key rows (or value columns) make one micro-tile.
//
// 16-bit inputs (In = bf16 or f16, Acc = float). The rounding points, the same on every path:
// bfloat16's products take bfloat16 operands, so Q * scale (when folded) and P (after it
// entered the row sum, before P V) are rounded to bfloat16 by lowp.hpp's rule
// (round_operands); float16 is read as float16 and nothing is rounded before the store. The
// output is rounded once, at the store (lowp.hpp's store_as, store_packet its vector form).
// With AVX512_BF16 and bf16_dot_active(), the blocked path takes the pair form of the same
// geometry (vdpbf16ps multiplies two bfloat16 pairs per float lane and adds both products):
//   S^T += (K[j, e], K[j, e+1]) (broadcast pair)   . Qp[e/2][:]   (Q pairs over e per lane)
//   O^T += (V[j, c], V[j+1, c]) (broadcast pair)   . Pp[j/2][:]   (P pairs over j per lane)
// K pairs read in place (contiguous rows) and V pairs from a per-tile packed copy; an odd E or
// key count pads the last pair with zero. Otherwise the float32 fallback computes with float
// FMAs on the same rounded values.
#pragma once

#include <Eigen/Core>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <cstdint>
#include <type_traits>

#include "../lowp.hpp"
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
#if defined(__AVX512F__)
  } else if constexpr (is_lowp<In>::value && std::is_same<Acc, float>::value && vm::packet_size<Acc>() == 16) {
    return load16(x);  // the 16-bit types' vector conversion (lowp.hpp)
#endif
  } else {
    alignas(64) Acc tmp[vm::packet_size<Acc>()];
    for (index_t k = 0; k < vm::packet_size<Acc>(); ++k) tmp[k] = static_cast<Acc>(x[k]);
    return ei::pload<Pk<Acc>>(tmp);
  }
}

// --- 16-bit operands and outputs ---------------------------------------------------------

// Whether In's products take operands rounded to In: bfloat16's do (Q * scale and P); float16
// is computed in float32 (and float, double in themselves).
template <typename In>
constexpr bool rounds_operands() {
  return std::is_same<In, bf16>::value;
}

// One value as a product operand of In: rounded to bfloat16 for bf16 (THE operand rounding),
// unchanged otherwise.
template <typename In, typename Acc>
inline Acc operand(Acc x) {
  if constexpr (rounds_operands<In>())
    return static_cast<float>(to_bf16(x));
  else
    return x;
}

// x[0, n) as product operands of In, in place (operand's rule, 16 lanes at a time).
template <typename In, typename Acc>
inline void round_operands(Acc* x, index_t n) {
  if constexpr (rounds_operands<In>()) {
    index_t i = 0;
#if defined(__AVX512F__)
    alignas(32) bf16 tmp[16];
    for (; i + 16 <= n; i += 16) {  // lowp.hpp's vector rounding, and back
      store16(x + i, tmp);
      _mm512_storeu_ps(x + i, load16(tmp));
    }
#endif
    for (; i < n; ++i) x[i] = operand<In>(x[i]);
  }
}

// Whether a packet of Acc can be stored as P consecutive Out by store_packet.
template <typename Out, typename Acc>
constexpr bool packet_store() {
#if defined(__AVX512F__)
  if constexpr (is_lowp<Out>::value) return std::is_same<Acc, float>::value && vm::packet_size<Acc>() == 16;
#endif
  return std::is_same<Out, Acc>::value;
}

// P consecutive Out from a packet (lowp.hpp's store_as rule per lane, by its store16).
template <typename Out, typename Acc>
inline void store_packet(Out* dst, const Pk<Acc>& x) {
  static_assert(packet_store<Out, Acc>(), "no packet store for this pair of types");
  if constexpr (std::is_same<Out, Acc>::value) {
    ei::pstoreu(dst, x);
#if defined(__AVX512F__)
  } else {
    alignas(64) float tmp[16];
    _mm512_store_ps(tmp, x);
    store16(tmp, dst);  // lowp.hpp's vector form of store_as
#endif
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
// qe), as product operands of In (round_operands); lanes past nq are zero. Contiguous rows go
// through P x P register transposes.
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
  round_operands<In>(Qt, E * Bq);
}

// Whether q * scale can overflow where q is finite: only for |scale| > 1 (the default
// 1/sqrt(E) never does); then the packed values are checked.
template <typename Acc>
inline bool scale_may_overflow(Acc scale) {
  return !(std::abs(scale) <= Acc(1));
}

// Packs Q with the scale folded in when that cannot overflow (|scale| <= 1, or every packed
// value finite, after its rounding to an operand); otherwise packs it unscaled and returns false: the caller then scales the
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
        const Acc x = operand<In>(f * to_acc<Acc>(qb[i * qs + e * qe]));
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
  for (index_t c = 0; c < n; ++c) dst[c] = store_as<Out>(o[c] * f);
}

// o[i, c] = Ot[c][i] * f[i] for the block's nq queries (o: rows of Ev, contiguous).
template <typename Acc, typename Out>
inline void unpack_o(const Acc* Ot, const Acc* f, index_t nq, index_t Ev, Out* o) {
  constexpr index_t P = vm::packet_size<Acc>();
  constexpr index_t Bq = block_queries<Acc>();
  index_t i = 0;
  if constexpr (packet_store<Out, Acc>()) {
    for (; i + P <= nq; i += P) {
      index_t c = 0;
      for (; c + P <= Ev; c += P) {
        ei::PacketBlock<Pk<Acc>, static_cast<int>(P)> blk;
        for (index_t r = 0; r < P; ++r) blk.packet[r] = ei::pload<Pk<Acc>>(Ot + (c + r) * Bq + i);
        ei::ptranspose(blk);
        for (index_t r = 0; r < P; ++r)
          store_packet<Out, Acc>(o + (i + r) * Ev + c, ei::pmul(blk.packet[r], ei::pset1<Pk<Acc>>(f[i + r])));
      }
      for (; c < Ev; ++c)
        for (index_t r = 0; r < P; ++r) o[(i + r) * Ev + c] = store_as<Out>(Ot[c * Bq + i + r] * f[i + r]);
    }
  }
  for (; i < nq; ++i)
    for (index_t c = 0; c < Ev; ++c) o[i * Ev + c] = store_as<Out>(Ot[c * Bq + i] * f[i]);
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

// Rows [0, n) of a strided (n, cols) matrix of In, contiguous: in place when they already are,
// else copied into buf (a scratch of n * cols). Returns the rows and sets their stride.
template <typename In>
const In* contiguous_rows(const In* x, index_t rs, index_t cs, index_t n, index_t cols, In* buf, index_t& stride) {
  stride = rs;
  if (cs == 1 || n == 0) return x;
  for (index_t j = 0; j < n; ++j)
    for (index_t e = 0; e < cols; ++e) buf[j * cols + e] = x[j * rs + e * cs];
  stride = cols;
  return buf;
}

// Whether a call with input In takes the bfloat16 pair path: read once per call, so that one
// call never mixes paths while _core.set_bf16_path switches.
template <typename In>
inline bool pair_path() {
#if defined(__AVX512BF16__)
  if constexpr (std::is_same<In, bf16>::value) return bf16_dot_active();
#endif
  return false;
}

#if defined(__AVX512BF16__)
// --- The bfloat16 pair path (vdpbf16ps; see the header) -------------------------------------
// A pair is one 32-bit lane: the even-indexed bfloat16 in the low half, the odd one in the high
// half (memory order, so two consecutive bfloat16 read as one uint32 are a pair).

inline __m512bh as_bh(__m512i x) { return reinterpret_cast<__m512bh>(x); }

// The pair of consecutive bfloat16 at p.
inline std::uint32_t pair_at(const bf16* p) {
  std::uint32_t w;
  std::memcpy(&w, p, sizeof w);
  return w;
}

// 16 pairs (lo[i], hi[i]), each rounded by to_bf16's rule (exact for values already rounded).
inline __m512i pair16(__m512 lo, __m512 hi) {
  // vcvtne2ps2bf16 gives lo's 16 bfloat16 then hi's; word 2i <- i, word 2i+1 <- 16 + i.
  alignas(64) static const std::uint16_t kInterleave[32] = {0, 16, 1, 17, 2,  18, 3,  19, 4,  20, 5,
                                                            21, 6, 22, 7, 23, 8,  24, 9,  25, 10, 26,
                                                            11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i both = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo));
  return _mm512_permutexvar_epi16(_mm512_load_si512(kInterleave), both);
}

// Lane pairs of n rows of Bq floats (Qt over e, P^T over keys): dst row r/2 lane i =
// (src[r][i], src[r + 1][i]), the high half zero after an odd last row.
inline void pack_lane_pairs(const float* src, index_t n, std::uint32_t* dst) {
  constexpr index_t Bq = block_queries<float>();
  const __m512 zero = _mm512_setzero_ps();
  for (index_t r = 0; r < n; r += 2)
    for (int c = 0; c < kC; ++c) {
      const __m512 lo = _mm512_load_ps(src + r * Bq + c * 16);
      const __m512 hi = r + 1 < n ? _mm512_load_ps(src + (r + 1) * Bq + c * 16) : zero;
      _mm512_store_si512(dst + (r / 2) * Bq + c * 16, pair16(lo, hi));
    }
}

// The probabilities of a tile on the pair path, in one pass over S^T (St, n rows of Bq):
// P = prob_exp(s - shift[c]) for lane packet c, added to sum[c] in key order (unrounded), and
// stored as lane pairs over keys into Pp (pack_lane_pairs' layout and rounding). One pass
// instead of exp-then-pack saves writing P back to St and reading it again.
inline void exp_lane_pairs(const float* St, index_t n, const __m512* shift, __m512* sum, std::uint32_t* Pp) {
  constexpr index_t Bq = block_queries<float>();
  const __m512 zero = _mm512_setzero_ps();
  for (index_t r = 0; r < n; r += 2)
    for (int c = 0; c < kC; ++c) {
      const __m512 lo = vm::prob_exp<float>(_mm512_sub_ps(_mm512_load_ps(St + r * Bq + c * 16), shift[c]));
      sum[c] = _mm512_add_ps(sum[c], lo);
      __m512 hi = zero;
      if (r + 1 < n) {
        hi = vm::prob_exp<float>(_mm512_sub_ps(_mm512_load_ps(St + (r + 1) * Bq + c * 16), shift[c]));
        sum[c] = _mm512_add_ps(sum[c], hi);
      }
      _mm512_store_si512(Pp + (r / 2) * Bq + c * 16, pair16(lo, hi));
    }
}

// Value pairs over keys for nj keys (rows at v + j * vs, element stride ve) and Ev columns:
// Vp[j/2][c] = (V[j, c], V[j + 1, c]) with row stride vps (Ev rounded up to 16), the high
// half zero after an odd last key (never reading past the tile).
inline void pack_value_pairs(const bf16* v, index_t vs, index_t ve, index_t nj, index_t Ev, std::uint32_t* Vp,
                             index_t vps) {
  for (index_t j = 0; j < nj; j += 2) {
    const bf16* a = v + j * vs;
    const bf16* b = j + 1 < nj ? a + vs : nullptr;
    std::uint32_t* dst = Vp + (j / 2) * vps;
    if (ve != 1) {
      for (index_t c = 0; c < Ev; ++c) dst[c] = a[c * ve].bits | (b ? std::uint32_t(b[c * ve].bits) << 16 : 0u);
      continue;
    }
    for (index_t c = 0; c < Ev; c += 16) {
      const __mmask16 m = Ev - c >= 16 ? __mmask16(0xffff) : __mmask16((1u << (Ev - c)) - 1u);
      const __m512i lo = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, a + c));
      const __m512i hi = b ? _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, b + c)) : _mm512_setzero_si512();
      _mm512_storeu_si512(dst + c, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
    }
  }
}

// St[r][:] = sum_e K[r, e] Q[:, e] for R keys (rows at k0 + r * ks, contiguous), from Qp
// (Q pairs, ceil(E / 2) rows of Bq); mx[c] raised to the lane-wise max (qk_micro's pair form).
template <int R>
inline void qk_micro_pairs(const bf16* k0, index_t ks, index_t E, const std::uint32_t* Qp, float* St, __m512* mx) {
  constexpr index_t Bq = block_queries<float>();
  __m512 acc[R][kC];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < kC; ++c) acc[r][c] = _mm512_setzero_ps();
  auto step = [&](index_t e2, auto pair_of_row) {
    __m512bh qv[kC];
    for (int c = 0; c < kC; ++c) qv[c] = as_bh(_mm512_load_si512(Qp + e2 * Bq + c * 16));
    for (int r = 0; r < R; ++r) {
      const __m512bh kb = as_bh(_mm512_set1_epi32(int(pair_of_row(k0 + r * ks))));
      for (int c = 0; c < kC; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], qv[c], kb);
    }
  };
  const index_t E2 = E / 2;
  for (index_t e2 = 0; e2 < E2; ++e2) step(e2, [&](const bf16* row) { return pair_at(row + 2 * e2); });
  if (E & 1) step(E2, [&](const bf16* row) { return std::uint32_t(row[E - 1].bits); });  // (K[E-1], 0)
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < kC; ++c) {
      _mm512_store_ps(St + r * Bq + c * 16, acc[r][c]);
      mx[c] = _mm512_max_ps(mx[c], acc[r][c]);
    }
}

// Ot[r][:] = Ot[r][:] * alpha + sum_j V[j, r] P[:, j] for R value columns, from Pp (P pairs,
// np2 rows of Bq) and Vp (value pairs, rows at stride vps, column r at Vp[r]) (pv_micro's
// pair form, not careful: the caller takes pv_micro for tiles needing care).
template <int R>
inline void pv_micro_pairs(const std::uint32_t* Vp, index_t vps, index_t np2, const std::uint32_t* Pp, float* Ot,
                           const __m512* alpha, bool rescale) {
  constexpr index_t Bq = block_queries<float>();
  __m512 acc[R][kC];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < kC; ++c) {
      acc[r][c] = _mm512_load_ps(Ot + r * Bq + c * 16);
      if (rescale) acc[r][c] = _mm512_mul_ps(acc[r][c], alpha[c]);
    }
  for (index_t j2 = 0; j2 < np2; ++j2) {
    __m512bh pv[kC];
    for (int c = 0; c < kC; ++c) pv[c] = as_bh(_mm512_load_si512(Pp + j2 * Bq + c * 16));
    const std::uint32_t* vrow = Vp + j2 * vps;
    for (int r = 0; r < R; ++r) {
      const __m512bh vb = as_bh(_mm512_set1_epi32(int(vrow[r])));
      for (int c = 0; c < kC; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], pv[c], vb);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < kC; ++c) _mm512_store_ps(Ot + r * Bq + c * 16, acc[r][c]);
}
#endif  // __AVX512BF16__

}  // namespace sdpa_detail
}  // namespace attnext
