// Fused scaled dot-product attention: out = softmax(Q K^T * scale + masks) V, flash-style.
//
// Memory stays O(threads x tile): the (L, S) score matrix is never built (unless the caller
// asks for the weights). Two paths:
//
// * Blocked path (any L). One work unit is (batch entry, block of Bq queries); OpenMP hands
//   units out dynamically (most expensive causal blocks first). Inside a unit the queries sit
//   in the SIMD lanes: Q is packed transposed and pre-scaled once, Qt (E, Bq), so
//     S^T (keys, Bq)  += K[j, e] (broadcast) * Qt[e, :]      (K read in place, any strides)
//     O^T (Ev, Bq)    += V[j, c] (broadcast) * P^T[j, :]     (V read in place, any strides)
//   and the online softmax (running max, sum, rescale) is plain lane-wise arithmetic over key
//   rows: no horizontal reductions, no transposes of K or V, nothing copied but Q's block.
//   Key tiles outside every row's visible range (causal, window, key_lengths) are skipped;
//   range masks are applied only on tiles that cut through some row's range, and element
//   masks (attn_mask) only when one is given. When there are few (batch x query block) units
//   and many keys, each block's keys are also split into chunks whose partial states are
//   merged by log-sum-exp (split_chunks). With weights requested a block makes two passes
//   (row max and sum, then the final softmax, written out and multiplied by V), so the
//   weights returned are exactly those the output was made from.
// * Decode path (L <= 16, no weights). Keys are cut into fixed chunks of kDecodeChunk; a unit
//   is (batch entry, chunk) and computes every query row's partial (max, sum, unnormalised
//   output) from dot products along E; the partials are merged by log-sum-exp in chunk order.
//   One query thus uses every core, and the result does not depend on the thread count.
//
// Every split (query blocks, key tiles, decode chunks) depends only on the shapes, so results
// are bit-identical for any thread count.
#pragma once

#include <Eigen/Core>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "mask.hpp"
#include "parallel.hpp"
#include "strided.hpp"
#include "vmath.hpp"

namespace attnext {

// One attention problem. All four operands share the batch axes N... (the binding checks it;
// the Python front broadcasts them with stride-0 views, which is also how GQA reaches here).
template <typename T>
struct SdpaProblem {
  Strided<const T> q;  // (N..., L, E)
  Strided<const T> k;  // (N..., S, E)
  Strided<const T> v;  // (N..., S, Ev)
  Mask<T> mask;        // (N..., L, S) or kind none
  Causal causal;       // key j visible to query i iff j <= i + offset
  index_t window_left = -1;   // query i sees keys >= i - left; -1 = unbounded
  index_t window_right = -1;  // query i sees keys <= i + right; -1 = unbounded
  Strided<const std::int64_t> key_lengths;  // (N...) keys >= length are padding; data null = none
  T scale = T(1);
};

namespace sdpa_detail {

namespace ei = Eigen::internal;
template <typename T>
using Pk = vm::Packet<T>;
template <typename T>
using Buffer = std::vector<T, Eigen::aligned_allocator<T>>;

// Tile sizes, chosen by measurement (a temporary build knob, one core of the 2-core Zen 4 test
// machine, float32, medians/minima of repeated runs; `attnext bench --case "sdpa-*"` reruns them):
// - kC = 4 packets of queries per block (Bq = 64 floats / 32 doubles with AVX-512) and kR = 6
//   key rows (or value columns) per micro-tile: 24 accumulators + 4 query packets + a
//   broadcast fit the 32 vector registers. Bq = 64 also keeps Qt (E x Bq) in L1 for E = 64.
// - kBk = 128 keys per tile. At E = 64, Bk = 32/64/128/256 measured 94/95/95/96 GFLOP/s (flat:
//   the tile's S^T stays in L2 in every case); at E = 128, 64/128/256 gave 99/103/102, so 128.
//   Larger tiles also mean fewer O^T rescales per key.
// - kDecodeChunk = 256 keys: a chunk's K and V (2 x 64 KB at E = 64) stay in L2 between the
//   score and the P V pass. For (32, 8, 1, 4096, 64) chunks of 128/256/512 keys ran in
//   32/16/32 ms (best of 11): 256 reaches ~33 GB/s of K/V, the machine's read bandwidth.
constexpr int kC = 4;
constexpr int kR = 6;
constexpr index_t kBk = 128;
constexpr index_t kDecodeChunk = 256;
constexpr index_t kDecodeMaxQueries = 16;

template <typename T>
constexpr index_t block_queries() {
  return kC * vm::packet_size<T>();
}

template <typename T>
constexpr T neg_inf() {
  return -std::numeric_limits<T>::infinity();
}

// The max of two partial maxima, NaN if either is (a NaN score must reach the output).
template <typename T>
inline T max_nan(T a, T b) {
  return (a != a || b != b) ? std::numeric_limits<T>::quiet_NaN() : std::max(a, b);
}

// 1 / (softmax denominator): 0 for a row that saw nothing (l == 0); NaN stays NaN.
template <typename T>
inline T inverse_sum(T l) {
  return l <= T(0) ? T(0) : T(1) / l;
}

// Visible keys of query row i: [lo(i), hi(i)), both non-decreasing in i.
struct KeyRange {
  index_t S = 0;
  index_t causal_limit_offset = 0;
  bool causal = false;
  index_t left = -1, right = -1;
  index_t klen = 0;
  index_t lo(index_t i) const {
    if (left < 0) return 0;
    const index_t x = i - left;
    return x < 0 ? 0 : (x > S ? S : x);
  }
  index_t hi(index_t i) const {
    index_t h = klen;
    if (causal) h = std::min(h, i + causal_limit_offset + 1);
    if (right >= 0) h = std::min(h, i + right + 1);
    return h < 0 ? 0 : h;
  }
};

template <typename T>
KeyRange key_range(const SdpaProblem<T>& p, index_t b) {
  KeyRange r;
  r.S = p.k.dim(-2);
  r.causal = p.causal.on;
  r.causal_limit_offset = p.causal.offset;
  r.left = p.window_left;
  r.right = p.window_right;
  r.klen = r.S;
  if (p.key_lengths.data) {
    const index_t len = p.key_lengths.data[p.key_lengths.batch_offset(b, 0)];
    r.klen = std::min(r.S, std::max<index_t>(len, 0));
  }
  return r;
}

// St[r][:] = sum_e K[r, e] * Qt[e][:] for R keys (rows of K at k0 + r * ks, element stride ke).
// mx[c] is raised to the lane-wise max of the scores written.
template <typename T, int R>
inline void qk_micro(const T* k0, index_t ks, index_t ke, index_t E, const T* Qt, T* St, Pk<T>* mx) {
  constexpr index_t P = vm::packet_size<T>();
  constexpr index_t Bq = block_queries<T>();
  Pk<T> acc[R][kC];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < kC; ++c) acc[r][c] = ei::pset1<Pk<T>>(T(0));
  for (index_t e = 0; e < E; ++e) {
    const T* qrow = Qt + e * Bq;
    Pk<T> qv[kC];
    for (int c = 0; c < kC; ++c) qv[c] = ei::pload<Pk<T>>(qrow + c * P);
    const T* kcol = k0 + e * ke;
    for (int r = 0; r < R; ++r) {
      const Pk<T> kb = ei::pset1<Pk<T>>(kcol[r * ks]);
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
// at v0 + r * ve, rows at stride vs), nj keys.
template <typename T, int R>
inline void pv_micro(const T* v0, index_t vs, index_t ve, index_t nj, const T* Pt, T* Ot, const Pk<T>* alpha,
                     bool rescale) {
  constexpr index_t P = vm::packet_size<T>();
  constexpr index_t Bq = block_queries<T>();
  Pk<T> acc[R][kC];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < kC; ++c) {
      acc[r][c] = ei::pload<Pk<T>>(Ot + r * Bq + c * P);
      if (rescale) acc[r][c] = ei::pmul(acc[r][c], alpha[c]);
    }
  for (index_t j = 0; j < nj; ++j) {
    const T* prow = Pt + j * Bq;
    Pk<T> pv[kC];
    for (int c = 0; c < kC; ++c) pv[c] = ei::pload<Pk<T>>(prow + c * P);
    const T* vrow = v0 + j * vs;
    for (int r = 0; r < R; ++r) {
      const Pk<T> vb = ei::pset1<Pk<T>>(vrow[r * ve]);
      for (int c = 0; c < kC; ++c) acc[r][c] = ei::pmadd(vb, pv[c], acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < kC; ++c) ei::pstore(Ot + r * Bq + c * P, acc[r][c]);
}

// Runs f.template operator()<R>(offset) over n items in micro-tiles of kR, then the remainder.
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

// Qt[e][i] = scale * Q[i, e] for the block's nq queries (rows at qb + i * qs, element stride
// qe); lanes past nq are zero. Contiguous rows go through P x P register transposes.
template <typename T>
inline void pack_q(const T* qb, index_t qs, index_t qe, index_t nq, index_t E, T scale, T* Qt) {
  constexpr index_t P = vm::packet_size<T>();
  constexpr index_t Bq = block_queries<T>();
  for (index_t e = 0; e < E; ++e) std::fill(Qt + e * Bq + nq, Qt + (e + 1) * Bq, T(0));
  index_t i = 0;
  if (qe == 1) {
    const Pk<T> sc = ei::pset1<Pk<T>>(scale);
    for (; i + P <= nq; i += P) {
      index_t e = 0;
      for (; e + P <= E; e += P) {
        ei::PacketBlock<Pk<T>, static_cast<int>(P)> blk;
        for (index_t r = 0; r < P; ++r) blk.packet[r] = ei::ploadu<Pk<T>>(qb + (i + r) * qs + e);
        ei::ptranspose(blk);
        for (index_t r = 0; r < P; ++r) ei::pstore(Qt + (e + r) * Bq + i, ei::pmul(blk.packet[r], sc));
      }
      for (; e < E; ++e)
        for (index_t r = 0; r < P; ++r) Qt[e * Bq + i + r] = scale * qb[(i + r) * qs + e];
    }
  }
  for (; i < nq; ++i)
    for (index_t e = 0; e < E; ++e) Qt[e * Bq + i] = scale * qb[i * qs + e * qe];
}

// o[i, c] = Ot[c][i] * f[i] for the block's nq queries (o: rows of Ev, contiguous).
template <typename T>
inline void unpack_o(const T* Ot, const T* f, index_t nq, index_t Ev, T* o) {
  constexpr index_t P = vm::packet_size<T>();
  constexpr index_t Bq = block_queries<T>();
  index_t i = 0;
  for (; i + P <= nq; i += P) {
    index_t c = 0;
    for (; c + P <= Ev; c += P) {
      ei::PacketBlock<Pk<T>, static_cast<int>(P)> blk;
      for (index_t r = 0; r < P; ++r) blk.packet[r] = ei::pload<Pk<T>>(Ot + (c + r) * Bq + i);
      ei::ptranspose(blk);
      for (index_t r = 0; r < P; ++r)
        ei::pstoreu(o + (i + r) * Ev + c, ei::pmul(blk.packet[r], ei::pset1<Pk<T>>(f[i + r])));
    }
    for (; c < Ev; ++c)
      for (index_t r = 0; r < P; ++r) o[(i + r) * Ev + c] = Ot[c * Bq + i + r] * f[i + r];
  }
  for (; i < nq; ++i)
    for (index_t c = 0; c < Ev; ++c) o[i * Ev + c] = Ot[c * Bq + i] * f[i];
}

// The blocked path's exponential. With AVX-512 and float it works in base 2: Q is pre-scaled
// by log2(e) (float masks too), so softmax needs 2^x, which is a round, a degree-6 polynomial
// on [-1/2, 1/2] (relative error ~1.2e-7, about 2 ulp) and one vscalefps: about half the
// instructions of a general exp, and exp is most of the non-GEMM work. Elsewhere (double,
// or no AVX-512) it is vmath's exp in natural units. Both give exactly 0 for -inf.
template <typename T>
struct ScoreExp {
  static constexpr bool base2 = false;
  static Pk<T> exp(const Pk<T>& x) { return vm::exp<T>(x); }
};
#if defined(EIGEN_VECTORIZE_AVX512)  // Packet16f is __m512 there
template <>
struct ScoreExp<float> {
  static constexpr bool base2 = true;
  static Pk<float> exp(const Pk<float>& x) {
    // max(c, x) keeps a NaN x; -inf and anything below -200 give 2^-200 * p, which is 0.
    const __m512 xc = _mm512_max_ps(_mm512_set1_ps(-200.0f), x);
    const __m512 m = _mm512_roundscale_ps(xc, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(xc, m);
    // 2^f = sum_k (f ln 2)^k / k!, k <= 6.
    __m512 y = _mm512_set1_ps(1.5403530393381606e-4f);
    y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(1.3333558146428443e-3f));
    y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(9.6181291076284772e-3f));
    y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(5.5504108664821580e-2f));
    y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(2.4022650695910071e-1f));
    y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(6.9314718055994531e-1f));
    y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(y, m);
  }
};
#endif

template <typename T>
struct Workspace {
  Buffer<T> qt, st, ot, m, l;
};

// One unit of the blocked path: queries [i0, i0 + nq) of batch entry b.
template <typename T>
//
// Only keys in [ka, kz) are looked at. With `partial` set (no weights then), the block's raw
// state goes there instead of out/lse: O^T (Ev, Bq) unnormalised, then the running max (Bq)
// and sum (Bq), for a merge across key chunks.
void attend_block(const SdpaProblem<T>& p, index_t b, index_t i0, index_t nq, Workspace<T>& w, T* out, T* weights,
                  T* lse, index_t ka, index_t kz, T* partial) {
  constexpr index_t P = vm::packet_size<T>();
  constexpr index_t Bq = block_queries<T>();
  const index_t L = p.q.dim(-2), E = p.q.dim(-1), S = p.k.dim(-2), Ev = p.v.dim(-1);
  const KeyRange kr = key_range(p, b);

  w.qt.resize(static_cast<size_t>(std::max<index_t>(E, 1) * Bq));
  w.st.resize(static_cast<size_t>(kBk * Bq));
  w.ot.resize(static_cast<size_t>(std::max<index_t>(Ev, 1) * Bq));
  w.m.resize(Bq);
  w.l.resize(Bq);
  T* Qt = w.qt.data();
  T* St = w.st.data();
  T* Ot = w.ot.data();
  T* M = w.m.data();
  T* Lsum = w.l.data();

  // Q block, transposed and pre-scaled; lanes past the last query are zero (and discarded).
  using X = ScoreExp<T>;
  const T log2e = X::base2 ? T(1.4426950408889634) : T(1);  // scores in base-2 units when X is
  pack_q(p.q.data + p.q.batch_offset(b, 2) + i0 * p.q.stride(-2), p.q.stride(-2), p.q.stride(-1), nq, E, p.scale * log2e,
         Qt);
  std::fill(Ot, Ot + Ev * Bq, T(0));
  std::fill(M, M + Bq, neg_inf<T>());
  std::fill(Lsum, Lsum + Bq, T(0));

  const index_t i_last = i0 + nq - 1;
  const index_t kmin = std::max(kr.lo(i0), ka), kmax = std::max(kmin, std::min(kr.hi(i_last), kz));
  const index_t full_lo = kr.lo(i_last), full_hi = kr.hi(i0);

  const T* kb = p.k.data + p.k.batch_offset(b, 2);
  const T* vb = p.v.data + p.v.batch_offset(b, 2);
  const index_t ks = p.k.stride(-2), ke = p.k.stride(-1);
  const index_t vs = p.v.stride(-2), ve = p.v.stride(-1);

  // S^T for keys [j0, j0 + nj): scores of every lane with masks applied (-inf = hidden), and
  // mt, the lane-wise max over the tile (taken while storing when no mask touches the tile).
  auto score_tile = [&](index_t j0, index_t nj, Pk<T>* mt) {
    for (int c = 0; c < kC; ++c) mt[c] = ei::pset1<Pk<T>>(neg_inf<T>());
    for_micro_tiles(nj, [&](auto R, index_t r) {
      qk_micro<T, decltype(R)::value>(kb + (j0 + r) * ks, ks, ke, E, Qt, St + r * Bq, mt);
    });
    const bool boundary = !(j0 >= full_lo && j0 + nj <= full_hi);
    if (boundary) {
      for (index_t i = 0; i < nq; ++i) {
        const index_t lo = std::max(kr.lo(i0 + i), j0) - j0;
        const index_t hi = std::max(std::min(kr.hi(i0 + i), j0 + nj), j0) - j0;
        for (index_t j = 0; j < std::min(lo, nj); ++j) St[j * Bq + i] = neg_inf<T>();
        for (index_t j = std::max(hi, lo); j < nj; ++j) St[j * Bq + i] = neg_inf<T>();
      }
    }
    if (p.mask.kind == MaskKind::boolean) {
      const Strided<const bool>& mk = p.mask.keep;
      const bool* m0 = mk.data + mk.batch_offset(b, 2) + i0 * mk.stride(-2) + j0 * mk.stride(-1);
      const index_t ms = mk.stride(-2), mj = mk.stride(-1);
      for (index_t i = 0; i < nq; ++i)
        for (index_t j = 0; j < nj; ++j)
          if (!m0[i * ms + j * mj]) St[j * Bq + i] = neg_inf<T>();
    } else if (p.mask.kind == MaskKind::additive) {
      const Strided<const T>& ma = p.mask.add;
      const T* m0 = ma.data + ma.batch_offset(b, 2) + i0 * ma.stride(-2) + j0 * ma.stride(-1);
      const index_t ms = ma.stride(-2), mj = ma.stride(-1);
      for (index_t i = 0; i < nq; ++i)
        for (index_t j = 0; j < nj; ++j) St[j * Bq + i] = add_mask(St[j * Bq + i], m0[i * ms + j * mj], log2e);
    }
    if (boundary || p.mask.kind != MaskKind::none) {
      for (int c = 0; c < kC; ++c) mt[c] = ei::pset1<Pk<T>>(neg_inf<T>());
      for (index_t j = 0; j < nj; ++j)
        for (int c = 0; c < kC; ++c) mt[c] = ei::pmax(mt[c], ei::pload<Pk<T>>(St + j * Bq + c * P));
    }
  };

  const Pk<T> zero = ei::pset1<Pk<T>>(T(0));
  const Pk<T> ninf = ei::pset1<Pk<T>>(neg_inf<T>());
  // The exp shift of a running max: 0 while nothing is visible (so -inf - shift stays -inf).
  auto shift_of = [&](const Pk<T>& m) { return ei::pselect(ei::pcmp_eq(m, ninf), zero, m); };

  auto pv_tile = [&](index_t j0, index_t nj, const Pk<T>* alpha, bool rescale) {
    for_micro_tiles(Ev, [&](auto R, index_t r) {
      pv_micro<T, decltype(R)::value>(vb + j0 * vs + r * ve, vs, ve, nj, St, Ot + r * Bq, alpha, rescale);
    });
  };

  if (!weights) {
    for (index_t j0 = kmin; j0 < kmax; j0 += kBk) {
      const index_t nj = std::min(kBk, kmax - j0);
      Pk<T> mt[kC], shift[kC], alpha[kC], sum[kC];
      score_tile(j0, nj, mt);
      for (int c = 0; c < kC; ++c) {
        const Pk<T> m_old = ei::pload<Pk<T>>(M + c * P);
        const Pk<T> m_new = ei::pmax<Eigen::PropagateNaN>(m_old, mt[c]);
        shift[c] = shift_of(m_new);
        alpha[c] = X::exp(ei::psub(m_old, shift[c]));
        ei::pstore(M + c * P, m_new);
        sum[c] = zero;
      }
      for (index_t j = 0; j < nj; ++j)
        for (int c = 0; c < kC; ++c) {
          T* s = St + j * Bq + c * P;
          const Pk<T> e = X::exp(ei::psub(ei::pload<Pk<T>>(s), shift[c]));
          ei::pstore(s, e);
          sum[c] = ei::padd(sum[c], e);
        }
      for (int c = 0; c < kC; ++c)
        ei::pstore(Lsum + c * P, ei::pmadd(ei::pload<Pk<T>>(Lsum + c * P), alpha[c], sum[c]));
      pv_tile(j0, nj, alpha, true);
    }
  } else {
    // Weights wanted: pass 1 finds each row's max and sum; pass 2 forms the final softmax
    // P = exp(s - max) / sum once, writes it out and accumulates O = P V with it, so the
    // returned weights are exactly the ones the output was made from.
    for (index_t j0 = kmin; j0 < kmax; j0 += kBk) {
      const index_t nj = std::min(kBk, kmax - j0);
      Pk<T> mt[kC];
      score_tile(j0, nj, mt);
      for (int c = 0; c < kC; ++c) {
        const Pk<T> m_old = ei::pload<Pk<T>>(M + c * P);
        const Pk<T> m_new = ei::pmax<Eigen::PropagateNaN>(m_old, mt[c]);
        const Pk<T> shift = shift_of(m_new);
        Pk<T> sum = zero;
        for (index_t j = 0; j < nj; ++j)
          sum = ei::padd(sum, X::exp(ei::psub(ei::pload<Pk<T>>(St + j * Bq + c * P), shift)));
        const Pk<T> alpha = X::exp(ei::psub(m_old, shift));
        ei::pstore(Lsum + c * P, ei::pmadd(ei::pload<Pk<T>>(Lsum + c * P), alpha, sum));
        ei::pstore(M + c * P, m_new);
      }
    }
    Pk<T> shift[kC], inv[kC];
    for (int c = 0; c < kC; ++c) {
      shift[c] = shift_of(ei::pload<Pk<T>>(M + c * P));
      const Pk<T> l = ei::pload<Pk<T>>(Lsum + c * P);
      // 1/l, 0 for an empty row (l == 0); a NaN sum (a NaN score) stays NaN.
      inv[c] = ei::pselect(ei::pcmp_le(l, zero), zero, ei::pdiv(ei::pset1<Pk<T>>(T(1)), l));
    }
    for (index_t i = 0; i < nq; ++i) std::fill(weights + (b * L + i0 + i) * S, weights + (b * L + i0 + i + 1) * S, T(0));
    for (index_t j0 = kmin; j0 < kmax; j0 += kBk) {
      const index_t nj = std::min(kBk, kmax - j0);
      Pk<T> mt[kC];
      score_tile(j0, nj, mt);
      for (index_t j = 0; j < nj; ++j)
        for (int c = 0; c < kC; ++c) {
          T* s = St + j * Bq + c * P;
          const Pk<T> sc = ei::pload<Pk<T>>(s);
          // A hidden key (-inf) weighs exactly 0, even in a row a NaN score made NaN.
          ei::pstore(s, ei::pselect(ei::pcmp_eq(sc, ninf), zero, ei::pmul(X::exp(ei::psub(sc, shift[c])), inv[c])));
        }
      for (index_t i = 0; i < nq; ++i) {
        T* wrow = weights + (b * L + i0 + i) * S + j0;
        for (index_t j = 0; j < nj; ++j) wrow[j] = St[j * Bq + i];
      }
      pv_tile(j0, nj, nullptr, false);
    }
  }
  if (partial) {
    std::copy(Ot, Ot + Ev * Bq, partial);
    std::copy(M, M + Bq, partial + Ev * Bq);
    std::copy(Lsum, Lsum + Bq, partial + (Ev + 1) * Bq);
    return;
  }
  if (lse) {
    for (index_t i = 0; i < nq; ++i)
      lse[b * L + i0 + i] = Lsum[i] <= T(0)  ? neg_inf<T>()
                             : X::base2 ? (M[i] + std::log2(Lsum[i])) * T(0.69314718055994531)
                                        : M[i] + std::log(Lsum[i]);
  }
  // Normalise (the weighted pass already divided by the sum) and write the block out.
  for (index_t i = 0; i < nq; ++i) Lsum[i] = weights ? T(1) : inverse_sum(Lsum[i]);
  unpack_o(Ot, Lsum, nq, Ev, out + (b * L + i0) * Ev);
}

// Dot product of two contiguous vectors, packet-wise with a fixed lane order.
template <typename T>
inline T dot(const T* a, const T* x, index_t n) {
  constexpr index_t P = vm::packet_size<T>();
  Pk<T> acc0 = ei::pset1<Pk<T>>(T(0)), acc1 = acc0;
  index_t e = 0;
  for (; e + 2 * P <= n; e += 2 * P) {
    acc0 = ei::pmadd(ei::ploadu<Pk<T>>(a + e), ei::ploadu<Pk<T>>(x + e), acc0);
    acc1 = ei::pmadd(ei::ploadu<Pk<T>>(a + e + P), ei::ploadu<Pk<T>>(x + e + P), acc1);
  }
  for (; e + P <= n; e += P) acc0 = ei::pmadd(ei::ploadu<Pk<T>>(a + e), ei::ploadu<Pk<T>>(x + e), acc0);
  T s = ei::predux(ei::padd(acc0, acc1));
  for (; e < n; ++e) s += a[e] * x[e];
  return s;
}

// y += a * x over n contiguous elements.
template <typename T>
inline void axpy(T a, const T* x, T* y, index_t n) {
  constexpr index_t P = vm::packet_size<T>();
  const Pk<T> av = ei::pset1<Pk<T>>(a);
  index_t e = 0;
  for (; e + P <= n; e += P) ei::pstoreu(y + e, ei::pmadd(av, ei::ploadu<Pk<T>>(x + e), ei::ploadu<Pk<T>>(y + e)));
  for (; e < n; ++e) y[e] += a * x[e];
}

// Scratch of one decode unit, kept per thread.
template <typename T>
struct DecodeWorkspace {
  Buffer<T> q, s, k, v;
};

// Decode path: partial results of keys [c0, c1) for every query row of batch entry b.
// part: (L, Ev + 2) = unnormalised output, then the max, then the sum.
template <typename T>
void decode_chunk(const SdpaProblem<T>& p, index_t b, index_t c0, index_t c1, T* part, DecodeWorkspace<T>& ws) {
  constexpr index_t P = vm::packet_size<T>();
  const index_t L = p.q.dim(-2), E = p.q.dim(-1), Ev = p.v.dim(-1);
  const KeyRange kr = key_range(p, b);
  const index_t n = c1 - c0;
  const index_t w = Ev + 2;
  ws.q.resize(static_cast<size_t>(L * E + 1));
  ws.s.resize(static_cast<size_t>(L * n + 1));
  T* qbuf = ws.q.data();
  T* s = ws.s.data();
  const T* qb = p.q.data + p.q.batch_offset(b, 2);
  for (index_t i = 0; i < L; ++i)
    for (index_t e = 0; e < E; ++e) qbuf[i * E + e] = p.scale * qb[i * p.q.stride(-2) + e * p.q.stride(-1)];
  // Keys any row may see inside the chunk.
  const index_t ja = std::max(c0, kr.lo(0)), jz = std::max(ja, std::min(c1, kr.hi(L - 1)));
  const index_t nv = jz - ja;
  // K and V rows of the visible keys, in place when their rows are contiguous, else packed.
  const T* kc = p.k.data + p.k.batch_offset(b, 2) + ja * p.k.stride(-2);
  index_t kcs = p.k.stride(-2);
  if (p.k.stride(-1) != 1 && nv > 0) {
    ws.k.resize(static_cast<size_t>(nv * E));
    for (index_t j = 0; j < nv; ++j)
      for (index_t e = 0; e < E; ++e) ws.k[j * E + e] = kc[j * kcs + e * p.k.stride(-1)];
    kc = ws.k.data();
    kcs = E;
  }
  const T* vc = p.v.data + p.v.batch_offset(b, 2) + ja * p.v.stride(-2);
  index_t vcs = p.v.stride(-2);
  if (p.v.stride(-1) != 1 && nv > 0) {
    ws.v.resize(static_cast<size_t>(nv * Ev));
    for (index_t j = 0; j < nv; ++j)
      for (index_t e = 0; e < Ev; ++e) ws.v[j * Ev + e] = vc[j * vcs + e * p.v.stride(-1)];
    vc = ws.v.data();
    vcs = Ev;
  }
  // s[i][j - ja]: scores of the visible keys, -inf where row i may not look.
  for (index_t i = 0; i < L; ++i) std::fill(s + i * n, s + i * n + nv, neg_inf<T>());
  for (index_t j = 0; j < nv; ++j) {
    const T* kj = kc + j * kcs;
    for (index_t i = 0; i < L; ++i)
      if (ja + j >= kr.lo(i) && ja + j < kr.hi(i)) s[i * n + j] = dot(qbuf + i * E, kj, E);
  }
  if (p.mask.kind == MaskKind::boolean) {
    const Strided<const bool>& mk = p.mask.keep;
    const bool* m0 = mk.data + mk.batch_offset(b, 2) + ja * mk.stride(-1);
    for (index_t i = 0; i < L; ++i)
      for (index_t j = 0; j < nv; ++j)
        if (!m0[i * mk.stride(-2) + j * mk.stride(-1)]) s[i * n + j] = neg_inf<T>();
  } else if (p.mask.kind == MaskKind::additive) {
    const Strided<const T>& ma = p.mask.add;
    const T* m0 = ma.data + ma.batch_offset(b, 2) + ja * ma.stride(-1);
    for (index_t i = 0; i < L; ++i)
      for (index_t j = 0; j < nv; ++j) s[i * n + j] = add_mask(s[i * n + j], m0[i * ma.stride(-2) + j * ma.stride(-1)]);
  }
  for (index_t i = 0; i < L; ++i) {
    T* si = s + i * n;
    T* pi = part + i * w;
    const T m = nv > 0 ? vm::max_propagate_nan(si, nv) : neg_inf<T>();
    pi[Ev] = m;
    std::fill(pi, pi + Ev, T(0));
    if (m == neg_inf<T>()) {
      pi[Ev + 1] = T(0);
      continue;
    }
    pi[Ev + 1] = vm::exp_shifted_sum(si, nv, m);
    // o = sum_j p_j v_j, four packets of columns at a time held in registers.
    index_t c = 0;
    for (; c + 4 * P <= Ev; c += 4 * P) {
      Pk<T> acc[4];
      for (int u = 0; u < 4; ++u) acc[u] = ei::pset1<Pk<T>>(T(0));
      for (index_t j = 0; j < nv; ++j) {
        const Pk<T> pj = ei::pset1<Pk<T>>(si[j]);
        const T* vj = vc + j * vcs + c;
        for (int u = 0; u < 4; ++u) acc[u] = ei::pmadd(pj, ei::ploadu<Pk<T>>(vj + u * P), acc[u]);
      }
      for (int u = 0; u < 4; ++u) ei::pstoreu(pi + c + u * P, acc[u]);
    }
    if (c < Ev)
      for (index_t j = 0; j < nv; ++j) axpy(si[j], vc + j * vcs + c, pi + c, Ev - c);
  }
}

template <typename T>
void decode(const SdpaProblem<T>& p, index_t N, T* out, T* lse) {
  const index_t L = p.q.dim(-2), S = p.k.dim(-2), Ev = p.v.dim(-1);
  const index_t chunks = std::max<index_t>(1, (S + kDecodeChunk - 1) / kDecodeChunk);
  const index_t w = Ev + 2;
  Buffer<T> parts(static_cast<size_t>(N * chunks * L * w));
  parallel_for(N * chunks, [&](index_t u) {
    thread_local DecodeWorkspace<T> ws;
    const index_t b = u / chunks, c = u % chunks;
    const index_t c0 = c * kDecodeChunk, c1 = std::min(S, c0 + kDecodeChunk);
    decode_chunk(p, b, c0, c1, parts.data() + u * L * w, ws);
  }, true);
  // Merge the chunks of each row by log-sum-exp, in chunk order.
  parallel_for(N, [&](index_t b) {
    for (index_t i = 0; i < L; ++i) {
      T mx = neg_inf<T>();
      for (index_t c = 0; c < chunks; ++c) mx = max_nan(mx, parts[((b * chunks + c) * L + i) * w + Ev]);
      T* o = out + (b * L + i) * Ev;
      std::fill(o, o + Ev, T(0));
      T l = T(0);
      if (mx != neg_inf<T>()) {
        for (index_t c = 0; c < chunks; ++c) {
          const T* pc = parts.data() + ((b * chunks + c) * L + i) * w;
          if (pc[Ev] == neg_inf<T>()) continue;
          const T f = std::exp(pc[Ev] - mx);
          l += f * pc[Ev + 1];
          axpy(f, pc, o, Ev);
        }
        const T inv = inverse_sum(l);
        for (index_t c = 0; c < Ev; ++c) o[c] *= inv;
      }
      if (lse) lse[b * L + i] = l <= T(0) ? neg_inf<T>() : mx + std::log(l);
    }
  });
}

}  // namespace sdpa_detail

namespace sdpa_detail {

// How many key chunks the blocked path splits each query block into: 1 unless there are too
// few (batch x query block) units to keep the threads busy (decided from the shapes alone, so
// results stay independent of the thread count). Chunks hold at least kSplitMinKeys keys and
// there are at most kSplitMaxChunks of them, which bounds the partials' memory.
constexpr index_t kSplitMinUnits = 16;
constexpr index_t kSplitMinKeys = 1024;
constexpr index_t kSplitMaxChunks = 32;
inline index_t split_chunks(index_t units, index_t S, bool weights) {
  if (weights || units >= kSplitMinUnits) return 1;
  return std::max<index_t>(1, std::min(kSplitMaxChunks, S / kSplitMinKeys));
}

// Merges a query block's chunk partials (each O^T (Ev, Bq), max (Bq), sum (Bq)) in chunk order
// by log-sum-exp; writes the normalised rows (nq, Ev) and their lse.
template <typename T>
void merge_chunks(const T* parts, index_t chunks, index_t Ev, index_t nq, T* out, T* lse) {
  constexpr index_t Bq = block_queries<T>();
  using X = ScoreExp<T>;
  const index_t part = (Ev + 2) * Bq;
  Buffer<T> acc(static_cast<size_t>(std::max<index_t>(Ev, 1) * Bq), T(0)), f(Bq);
  for (index_t i = 0; i < nq; ++i) {
    T mx = neg_inf<T>();
    for (index_t c = 0; c < chunks; ++c) mx = max_nan(mx, parts[c * part + Ev * Bq + i]);
    T l = T(0);
    if (mx != neg_inf<T>()) {
      for (index_t c = 0; c < chunks; ++c) {
        const T* pc = parts + c * part;
        const T m = pc[Ev * Bq + i];
        if (m == neg_inf<T>()) continue;
        const T g = X::base2 ? std::exp2(m - mx) : std::exp(m - mx);
        l += g * pc[(Ev + 1) * Bq + i];
        for (index_t e = 0; e < Ev; ++e) acc[e * Bq + i] += g * pc[e * Bq + i];
      }
    }
    f[i] = inverse_sum(l);
    if (lse)
      lse[i] = l <= T(0)     ? neg_inf<T>()
               : X::base2 ? (mx + std::log2(l)) * T(0.69314718055994531)
                          : mx + std::log(l);
  }
  unpack_o(acc.data(), f.data(), nq, Ev, out);
}

}  // namespace sdpa_detail

// out (N..., L, Ev), weights (N..., L, S) or null, lse (N..., L) or null: all C-contiguous.
template <typename T>
void scaled_dot_product_attention(const SdpaProblem<T>& p, T* out, T* weights, T* lse) {
  using namespace sdpa_detail;
  const index_t N = p.q.batch_count(2);
  const index_t L = p.q.dim(-2), Ev = p.v.dim(-1);
  if (N == 0 || L == 0) return;
  if (L <= kDecodeMaxQueries && !weights) {
    decode(p, N, out, lse);
    return;
  }
  constexpr index_t Bq = block_queries<T>();
  const index_t blocks = (L + Bq - 1) / Bq;
  const index_t S = p.k.dim(-2);
  const index_t chunks = split_chunks(N * blocks, S, weights != nullptr);
  if (chunks == 1) {
    parallel_for(N * blocks, [&](index_t u) {
      thread_local Workspace<T> w;
      // Later query blocks see more keys under a causal mask: hand them out first.
      const index_t b = u / blocks, qb = blocks - 1 - u % blocks;
      const index_t i0 = qb * Bq;
      attend_block(p, b, i0, std::min(Bq, L - i0), w, out, weights, lse, 0, S, static_cast<T*>(nullptr));
    }, true);
    return;
  }
  // Few query blocks and many keys: every (block, key chunk) is a unit, merged afterwards.
  const index_t chunk = (S + chunks - 1) / chunks;
  const index_t part = (Ev + 2) * Bq;
  Buffer<T> parts(static_cast<size_t>(N * blocks * chunks * part));
  parallel_for(N * blocks * chunks, [&](index_t u) {
    thread_local Workspace<T> w;
    const index_t c = u % chunks, bq = u / chunks;
    const index_t b = bq / blocks, i0 = (bq % blocks) * Bq;
    attend_block(p, b, i0, std::min(Bq, L - i0), w, out, weights, lse, c * chunk, std::min(S, (c + 1) * chunk),
                 parts.data() + u * part);
  }, true);
  parallel_for(N * blocks, [&](index_t bq) {
    const index_t b = bq / blocks, i0 = (bq % blocks) * Bq, nq = std::min(Bq, L - i0);
    merge_chunks(parts.data() + bq * chunks * part, chunks, Ev, nq, out + (b * L + i0) * Ev,
                 lse ? lse + b * L + i0 : nullptr);
  });
}

}  // namespace attnext
