// SDPA backward, flash-style: the gradients of out = softmax(Q K^T * scale + masks) V with
// respect to Q, K, V (and the score + mask), recomputing the probabilities tile by tile from
// Q, K and the forward's saved lse, so the (L, S) matrix is never built (except dmask, when
// the caller asks for it).
//
// Per row i: D_i = rowsum(dO ∘ O) (+ rowsum(P ∘ (gW ∘ Z)) when the weights have a cotangent
// gW, W = P ∘ Z the weights after dropout; a dropped entry of gW ∘ Z is exactly 0, so a NaN or
// inf of gW there reaches nothing). Per tile of queries x keys:
//   S  = scale Q K^T + masks (exactly the forward's scores: sdpa_detail::score_tile),
//   P  = prob_exp(S - lse)            (a hidden key, score -inf, is exactly 0),
//   dV += (P ∘ Z)^T dO,   dP = (dO V^T (+ gW)) ∘ Z,   dS = P ∘ (dP - D)  (0 for a hidden key),
//   dK += scale dS^T Q,   dQ += scale dS K,   dmask = dS.
// Z is the dropout factor of each element (dropout.hpp's rule: 0 or 1/(1 - p)), regenerated
// from the seed and the element's coordinates, never stored.
//
// Work split, deterministic for any thread count with no atomics: a unit is (batch entry,
// chunk of keys). It owns dK and dV of its keys (summed over query blocks in order) and
// computes its chunk's part of dQ for every query; the chunk parts of dQ are added in chunk
// order afterwards. The number of chunks depends only on the shapes (backward_chunks). Inside
// a unit, query blocks (queries in the SIMD lanes, as the forward's blocked path) are packed
// once and visit the chunk's key tiles they can see; tiles outside every row's visible range
// (mask.hpp's visible_keys) are skipped, as the forward skips them.
//
// Hidden is hidden: a key hidden from a row contributes exactly nothing to that row's
// gradients and the row nothing to the key's, also when the hidden key's k or v row, or the
// row's q or grad_out, holds NaN or inf (the products then take a path that skips hidden
// entries, as the forward's careful P V does). A row with no visible key (lse -inf) gets zero
// gradients.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "../dropout.hpp"
#include "../gemm.hpp"
#include "../mask.hpp"
#include "../online_softmax.hpp"
#include "../parallel.hpp"
#include "../scratch.hpp"
#include "blocked.hpp"
#include "micro.hpp"
#include "problem.hpp"

namespace attnext {

// What the backward reads besides the forward's problem. All strided views with the batch
// axes N... of the problem.
template <typename In, typename Acc = In>
struct SdpaGradInputs {
  Strided<const In> out;            // (N..., L, Ev): the forward's output
  Strided<const Acc> lse;           // (N..., L): the forward's log-sum-exp
  Strided<const In> grad_out;       // (N..., L, Ev): cotangent of out
  Strided<const Acc> grad_weights;  // (N..., L, S): cotangent of the returned weights; data null = none
  Dropout dropout;                  // the forward's dropout (inactive when p = 0)
};

// Where the gradients go: C-contiguous arrays with the full batch shape N... .
template <typename In, typename Acc = In>
struct SdpaGrads {
  In* dq = nullptr;      // (N..., L, E)
  In* dk = nullptr;      // (N..., S, E)
  In* dv = nullptr;      // (N..., S, Ev)
  Acc* dmask = nullptr;  // (N..., L, S) = dL/d(score + mask), or null
};

namespace sdpa_bwd_detail {

namespace ei = Eigen::internal;
using sdpa_detail::block_queries;
using sdpa_detail::Block;
using sdpa_detail::kBk;
using sdpa_detail::kC;
using sdpa_detail::neg_inf;
using sdpa_detail::Pk;
using sdpa_detail::to_acc;

// Key chunks per batch entry: more than one only when there are fewer than kMinUnits batch
// entries (threads would idle), chunks of at least kMinChunkKeys keys (a chunk repacks every
// query block it sees: Q and grad_out twice each, a few percent of one tile's products, so two
// tiles amortise it), and the chunks' partial dQ (chunks x N x L x E accumulators) within
// kPartsBudgetBytes: the backward's extra memory is then those parts plus about 1 MB per
// thread (L = S = 4096, E = 64 float32: 8 chunks; L = S = 16384: 2). Shapes only: results do
// not depend on the thread count.
constexpr index_t kMinUnits = 16;
constexpr index_t kMinChunkKeys = 2 * kBk;
constexpr index_t kPartsBudgetBytes = index_t(8) << 20;

template <typename Acc>
index_t backward_chunks(index_t N, index_t L, index_t S, index_t E) {
  if (N >= kMinUnits) return 1;
  const index_t blocks = (L + block_queries<Acc>() - 1) / block_queries<Acc>();
  const index_t part_bytes = N * blocks * block_queries<Acc>() * std::max<index_t>(E, 1) * index_t(sizeof(Acc));
  index_t c = (kMinUnits + N - 1) / N;
  c = std::min(c, S / kMinChunkKeys);
  c = std::min(c, kPartsBudgetBytes / std::max<index_t>(part_bytes, 1));
  return std::max<index_t>(c, 1);
}

// x rounded up to whole GEMM panels (the width the packed micro-kernel writes).
template <typename Acc>
index_t panel_round(index_t x) {
  constexpr index_t Nr = gemm_detail::panel_width<Acc>();
  return (x + Nr - 1) / Nr * Nr;
}

// The whole call: the problem, its gradient inputs and outputs, and the split.
template <typename In, typename Acc>
struct Backward {
  const SdpaProblem<In>* p = nullptr;
  const SdpaGradInputs<In, Acc>* g = nullptr;
  const SdpaGrads<In, Acc>* d = nullptr;
  index_t N = 0, L = 0, S = 0, E = 0, Ev = 0;
  index_t Ep = 0, Evp = 0;     // E, Ev rounded up to whole panels
  index_t blocks = 0;          // query blocks per batch entry
  index_t chunks = 1, chunk_keys = 0;  // key chunks per batch entry and keys per chunk (whole tiles)
  Acc scale = Acc(1);
  const Acc* D = nullptr;      // (N, L): D_i
  Acc* shift = nullptr;        // (N, L): P = prob_exp(s - shift) * inv (row_normalisers)
  Acc* inv = nullptr;          // (N, L)
  Acc* parts = nullptr;        // (N, chunks, blocks, E, Bq) chunk parts of dQ^T, when chunks > 1
};

// One unit's buffers (carved from one scratch block; every offset a multiple of Bq elements,
// so every buffer is aligned).
template <typename Acc>
struct Workspace {
  Acc* block = nullptr;  // sdpa_detail::Block's buffers (Qt, St, ...)
  Acc* Qr = nullptr;     // (Bq, Ep) the block's queries, rows, unscaled
  Acc* dOt = nullptr;    // (Ev, Bq) grad_out transposed
  Acc* dOr = nullptr;    // (Bq, Evp) grad_out rows
  Acc* lse = nullptr;    // (Bq) the rows' shift (+inf for padding and empty rows: P = 0)
  Acc* inv = nullptr;    // (Bq) the rows' normaliser
  Acc* D = nullptr;      // (Bq) the rows' D
  Acc* Pt = nullptr;     // (kBk, Bq) P^T of a tile
  Acc* PZt = nullptr;    // (kBk, Bq) (P ∘ Z)^T of a tile, with dropout
  Acc* dSt = nullptr;    // (kBk, Bq) dP^T, then dS^T
  Acc* dQt = nullptr;    // (E, Bq) the block's dQ^T (this chunk's part, unscaled)
  Acc* dK = nullptr;     // (chunk_keys, Ep) the chunk's dK, unscaled
  Acc* dV = nullptr;     // (chunk_keys, Evp) the chunk's dV
};

template <typename In, typename Acc>
index_t workspace_size(const Backward<In, Acc>& c, index_t keys) {
  constexpr index_t Bq = block_queries<Acc>();
  const index_t E1 = std::max<index_t>(c.E, 1), Ev1 = std::max<index_t>(c.Ev, 1);
  return sdpa_detail::block_scratch_size<Acc>(c.E, c.Ev) + Bq * (c.Ep + Ev1 + c.Evp + 3 + 3 * kBk + E1) +
         keys * (c.Ep + c.Evp);
}

template <typename In, typename Acc>
Workspace<Acc> carve(const Backward<In, Acc>& c, index_t keys, Acc* base) {
  constexpr index_t Bq = block_queries<Acc>();
  Workspace<Acc> w;
  w.block = base;
  w.Qr = base + sdpa_detail::block_scratch_size<Acc>(c.E, c.Ev);
  w.dOt = w.Qr + Bq * c.Ep;
  w.dOr = w.dOt + Bq * std::max<index_t>(c.Ev, 1);
  w.lse = w.dOr + Bq * c.Evp;
  w.inv = w.lse + Bq;
  w.D = w.inv + Bq;
  w.Pt = w.D + Bq;
  w.PZt = w.Pt + kBk * Bq;
  w.dSt = w.PZt + kBk * Bq;
  w.dQt = w.dSt + kBk * Bq;
  w.dK = w.dQt + Bq * std::max<index_t>(c.E, 1);
  w.dV = w.dK + keys * c.Ep;
  return w;
}

struct BackwardTag {};  // scratch.hpp tag

// dst (n, width) = rows [0, n) of a strided (n, cols) matrix of In as Acc, columns past cols 0.
template <typename In, typename Acc>
void pack_rows(const In* x, index_t rs, index_t cs, index_t n, index_t cols, index_t width, Acc* dst) {
  for (index_t i = 0; i < n; ++i) {
    Acc* row = dst + i * width;
    for (index_t e = 0; e < cols; ++e) row[e] = to_acc<Acc>(x[i * rs + e * cs]);
    std::fill(row + cols, row + width, Acc(0));
  }
}

// Whether the n x cols leading block of a row-major Acc matrix (row stride width) is finite.
template <typename Acc>
bool packed_rows_finite(const Acc* x, index_t width, index_t n, index_t cols) {
  return sdpa_detail::rows_finite<Acc>(x, width, index_t(1), n, cols);
}

// A query block's packed operands and what decides its careful products.
struct QueryBlockFlags {
  bool q_finite = true;   // the block's q rows are finite
  bool do_finite = true;  // the block's grad_out rows are finite
};

// The lse lanes of a block: +inf where P must be 0 (padding lanes, and rows that saw nothing:
// lse -inf), so that prob_exp(s - lse) is 0 there for every finite score.
template <typename Acc>
void load_lse_lanes(const Strided<const Acc>& lse, index_t b, index_t i0, index_t nq, Acc* lanes) {
  const Acc* lb = lse.data + lse.batch_offset(b, 1) + i0 * lse.stride(-1);
  for (index_t i = 0; i < block_queries<Acc>(); ++i) {
    const Acc x = i < nq ? lb[i * lse.stride(-1)] : neg_inf<Acc>();
    lanes[i] = x == neg_inf<Acc>() ? std::numeric_limits<Acc>::infinity() : x;
  }
}

// P^T of a tile from its scores St (the forward's, masked): prob_exp(s - shift) * inv (shift
// the lse, inv 1, but for rows row_normalisers recomputes), exactly 0 for a hidden key (score
// -inf), whatever the shift.
template <typename Acc>
void tile_probabilities(const Acc* St, const Acc* lse, const Acc* inv, index_t nj, Acc* Pt) {
  constexpr index_t P = vm::packet_size<Acc>();
  constexpr index_t Bq = block_queries<Acc>();
  const Pk<Acc> ninf = ei::pset1<Pk<Acc>>(neg_inf<Acc>()), zero = ei::pzero(ninf);
  Pk<Acc> shift[kC], norm[kC];
  for (int q = 0; q < kC; ++q) shift[q] = ei::pload<Pk<Acc>>(lse + q * P), norm[q] = ei::pload<Pk<Acc>>(inv + q * P);
  for (index_t j = 0; j < nj; ++j)
    for (int q = 0; q < kC; ++q) {
      const Pk<Acc> s = ei::pload<Pk<Acc>>(St + j * Bq + q * P);
      const Pk<Acc> pr = ei::pmul(vm::prob_exp<Acc>(ei::psub(s, shift[q])), norm[q]);
      ei::pstore(Pt + j * Bq + q * P, ei::pselect(ei::pcmp_eq(s, ninf), zero, pr));
    }
}

// PZt = Pt ∘ Z, and (when dPt is given) dPt ∘ Z: the tile's dropout (dropout.hpp's rule), one
// set of decisions for both tiles.
template <typename Acc>
void tile_dropout(const Dropout& drop, index_t b, index_t i0, index_t nq, index_t j0, index_t nj, const Acc* Pt,
                  Acc* PZt, Acc* dPt) {
  constexpr index_t Bq = block_queries<Acc>();
  std::copy(Pt, Pt + nj * Bq, PZt);
  apply_dropout_tiles<Acc>(drop, static_cast<std::uint64_t>(b), i0, nq, j0, nj, PZt, dPt, index_t(1), Bq);
}

// The (k, r) operand of the packed micro-kernel read from a transposed tile: element
// (query k, key r) of a (keys, Bq) tile whose key r0 is at `base`.
template <typename Acc>
struct TileColumns {
  const Acc* base;
  Acc at(index_t k, int r) const { return base[r * block_queries<Acc>() + k]; }
};

// dst (nj, W) += T^T rows: T a (nj, Bq) tile, rows (nq, W) row-major, W whole panels; through
// the packed GEMM's register micro-kernel. Careful: entries whose score St is -inf (hidden)
// are skipped instead of adding 0 * row, for rows that are not all finite.
template <typename Acc>
void add_tile_t_rows(const Acc* T, const Acc* St, bool careful, index_t nj, index_t nq, const Acc* rows, index_t W,
                     Acc* dst) {
  constexpr index_t Bq = block_queries<Acc>();
  if (careful) {
    for (index_t j = 0; j < nj; ++j)
      for (index_t i = 0; i < nq; ++i) {
        if (St[j * Bq + i] == neg_inf<Acc>()) continue;
        const Acc t = T[j * Bq + i];
        for (index_t e = 0; e < W; ++e) dst[j * W + e] += t * rows[i * W + e];
      }
    return;
  }
  constexpr index_t Nr = gemm_detail::panel_width<Acc>();
  for (index_t r0 = 0; r0 < nj; r0 += gemm_detail::kMr) {
    const int R = static_cast<int>(std::min<index_t>(gemm_detail::kMr, nj - r0));
    const TileColumns<Acc> a{T + r0 * Bq};
    for (index_t n0 = 0; n0 < W; n0 += Nr)
      gemm_detail::micro_kernel_rows<Acc, Acc>(R, a, rows + n0, W, nq, dst + r0 * W + n0, W, true, nullptr);
  }
}

// dP^T of a tile: V rows j0.. (in place, any strides) times dO^T (Ev, Bq).
template <typename In, typename Acc>
void tile_dp(const SdpaProblem<In>& p, index_t b, index_t j0, index_t nj, const Acc* dOt, Acc* dPt) {
  const index_t vs = p.v.stride(-2), ve = p.v.stride(-1), Ev = p.v.dim(-1);
  const In* vb = p.v.data + p.v.batch_offset(b, 2) + j0 * vs;
  Pk<Acc> unused[kC];
  sdpa_detail::for_micro_tiles(nj, [&](auto R, index_t r) {
    sdpa_detail::qk_micro<In, Acc, decltype(R)::value>(vb + r * vs, vs, ve, Ev, dOt, dPt + r * block_queries<Acc>(),
                                                       unused);
  });
}

// dPt += gW^T for the tile (gW rows i0.., keys j0..; queries past nq untouched).
template <typename Acc>
void add_grad_weights(const Strided<const Acc>& gw, index_t b, index_t i0, index_t nq, index_t j0, index_t nj,
                      Acc* dPt) {
  constexpr index_t Bq = block_queries<Acc>();
  const index_t rs = gw.stride(-2), cs = gw.stride(-1);
  const Acc* base = gw.data + gw.batch_offset(b, 2) + i0 * rs + j0 * cs;
  for (index_t i = 0; i < nq; ++i)
    for (index_t j = 0; j < nj; ++j) dPt[j * Bq + i] += base[i * rs + j * cs];
}

// dS^T = P^T ∘ (dP^T - D), in place over dPt (dP already dropped); exactly 0 where the score
// is -inf.
template <typename Acc>
void tile_ds(const Acc* St, const Acc* Pt, const Acc* D, index_t nj, Acc* dSt) {
  constexpr index_t P = vm::packet_size<Acc>();
  constexpr index_t Bq = block_queries<Acc>();
  const Pk<Acc> ninf = ei::pset1<Pk<Acc>>(neg_inf<Acc>()), zero = ei::pzero(ninf);
  Pk<Acc> dv[kC];
  for (int q = 0; q < kC; ++q) dv[q] = ei::pload<Pk<Acc>>(D + q * P);
  for (index_t j = 0; j < nj; ++j)
    for (int q = 0; q < kC; ++q) {
      const index_t x = j * Bq + q * P;
      const Pk<Acc> dp = ei::pload<Pk<Acc>>(dSt + x);
      const Pk<Acc> ds = ei::pmul(ei::pload<Pk<Acc>>(Pt + x), ei::psub(dp, dv[q]));
      ei::pstore(dSt + x, ei::pselect(ei::pcmp_eq(ei::pload<Pk<Acc>>(St + x), ninf), zero, ds));
    }
}

// dQ^T (E, Bq) += K rows j0.. ^T dS^T (K in place, any strides); careful skips hidden lanes.
template <typename In, typename Acc>
void tile_dq(const SdpaProblem<In>& p, index_t b, index_t j0, index_t nj, const Acc* dSt, const Acc* St, bool careful,
             Acc* dQt) {
  constexpr index_t Bq = block_queries<Acc>();
  const index_t ks = p.k.stride(-2), ke = p.k.stride(-1);
  const In* kb = p.k.data + p.k.batch_offset(b, 2) + j0 * ks;
  sdpa_detail::for_micro_tiles(p.k.dim(-1), [&](auto R, index_t r) {
    constexpr int Rk = decltype(R)::value;
    if (careful)
      sdpa_detail::pv_micro<In, Acc, Rk, true>(kb + r * ke, ks, ke, nj, dSt, St, dQt + r * Bq, nullptr, false);
    else
      sdpa_detail::pv_micro<In, Acc, Rk, false>(kb + r * ke, ks, ke, nj, dSt, St, dQt + r * Bq, nullptr, false);
  });
}

// dmask rows i0.., keys j0.. = dS (the tile's transpose).
template <typename Acc>
void store_dmask(const Acc* dSt, index_t nq, index_t nj, Acc* dst, index_t row_stride) {
  constexpr index_t Bq = block_queries<Acc>();
  for (index_t i = 0; i < nq; ++i)
    for (index_t j = 0; j < nj; ++j) dst[i * row_stride + j] = dSt[j * Bq + i];
}

// One query block of a unit, packed: the forward's Block (Qt, scores) plus the rows.
template <typename In, typename Acc>
struct QueryBlock {
  Block<In, Acc> k;
  QueryBlockFlags flags;
};

template <typename In, typename Acc>
QueryBlock<In, Acc> pack_query_block(const Backward<In, Acc>& c, index_t b, index_t i0, index_t nq,
                                     const Workspace<Acc>& w) {
  constexpr index_t Bq = block_queries<Acc>();
  const SdpaProblem<In>& p = *c.p;
  QueryBlock<In, Acc> qb;
  qb.k = sdpa_detail::make_block<In, Acc>(p, b, i0, nq, w.block);
  const In* qrows = p.q.data + p.q.batch_offset(b, 2) + i0 * p.q.stride(-2);
  pack_rows(qrows, p.q.stride(-2), p.q.stride(-1), nq, c.E, c.Ep, w.Qr);
  const Strided<const In>& go = c.g->grad_out;
  const In* grows = go.data + go.batch_offset(b, 2) + i0 * go.stride(-2);
  sdpa_detail::pack_q(grows, go.stride(-2), go.stride(-1), nq, c.Ev, Acc(1), w.dOt);
  pack_rows(grows, go.stride(-2), go.stride(-1), nq, c.Ev, c.Evp, w.dOr);
  for (index_t i = 0; i < Bq; ++i) {
    const index_t r = b * c.L + i0 + i;
    w.lse[i] = i < nq ? c.shift[r] : std::numeric_limits<Acc>::infinity();
    w.inv[i] = i < nq ? c.inv[r] : Acc(0);
    w.D[i] = i < nq ? c.D[r] : Acc(0);
  }
  qb.flags.q_finite = packed_rows_finite(w.Qr, c.Ep, nq, c.E);
  qb.flags.do_finite = packed_rows_finite(w.dOr, c.Evp, nq, c.Ev);
  std::fill(w.dQt, w.dQt + c.E * Bq, Acc(0));
  return qb;
}

// One tile of a unit: keys [j0, j0 + nj) (row kr of the chunk's dK/dV) against the block.
template <typename In, typename Acc>
void backward_tile(const Backward<In, Acc>& c, QueryBlock<In, Acc>& qb, index_t j0, index_t nj, index_t kr,
                   bool k_finite, const Workspace<Acc>& w) {
  const SdpaProblem<In>& p = *c.p;
  const SdpaGradInputs<In, Acc>& g = *c.g;
  Block<In, Acc>& k = qb.k;
  Pk<Acc> unused[kC];
  sdpa_detail::score_tile(k, j0, nj, unused);  // k.St: the forward's scores, masked
  const bool masked = !k.common.covers(j0, j0 + nj) || p.mask.kind != MaskKind::none;
  tile_probabilities(k.St, w.lse, w.inv, nj, w.Pt);
  tile_dp(p, k.b, j0, nj, w.dOt, w.dSt);
  if (g.grad_weights.data) add_grad_weights(g.grad_weights, k.b, k.i0, k.nq, j0, nj, w.dSt);
  const bool drop = g.dropout.active();
  if (drop) tile_dropout(g.dropout, k.b, k.i0, k.nq, j0, nj, w.Pt, w.PZt, w.dSt);
  add_tile_t_rows(drop ? w.PZt : w.Pt, k.St, masked && !qb.flags.do_finite, nj, k.nq, w.dOr, c.Evp,
                  w.dV + kr * c.Evp);
  tile_ds(k.St, w.Pt, w.D, nj, w.dSt);
  if (c.d->dmask) store_dmask(w.dSt, k.nq, nj, c.d->dmask + (k.b * c.L + k.i0) * c.S + j0, c.S);
  add_tile_t_rows(w.dSt, k.St, masked && !qb.flags.q_finite, nj, k.nq, w.Qr, c.Ep, w.dK + kr * c.Ep);
  tile_dq(p, k.b, j0, nj, w.dSt, k.St, masked && !k_finite, w.dQt);
}

// The block's dQ (this chunk's part): final rows (times scale) when there is one chunk, else
// its place among the parts.
template <typename In, typename Acc>
void finish_query_block(const Backward<In, Acc>& c, index_t b, index_t chunk, index_t qb, index_t nq,
                        const Workspace<Acc>& w) {
  constexpr index_t Bq = block_queries<Acc>();
  if (c.chunks > 1) {
    std::copy(w.dQt, w.dQt + c.E * Bq, c.parts + ((b * c.chunks + chunk) * c.blocks + qb) * c.E * Bq);
    return;
  }
  alignas(64) Acc f[Bq];
  std::fill(f, f + Bq, c.scale);
  sdpa_detail::unpack_o(w.dQt, f, nq, c.E, c.d->dq + (b * c.L + qb * Bq) * c.E);
}

// One unit: batch entry b, keys [j_lo, j_hi) (chunk `chunk`).
template <typename In, typename Acc>
void backward_unit(const Backward<In, Acc>& c, index_t b, index_t chunk) {
  constexpr index_t Bq = block_queries<Acc>();
  const SdpaProblem<In>& p = *c.p;
  const index_t j_lo = chunk * c.chunk_keys, j_hi = std::min(c.S, j_lo + c.chunk_keys), keys = j_hi - j_lo;
  const Scratch<Acc, BackwardTag> ws(static_cast<size_t>(workspace_size(c, c.chunk_keys)));
  const Workspace<Acc> w = carve(c, c.chunk_keys, ws.data());
  std::fill(w.dK, w.dK + keys * c.Ep, Acc(0));
  std::fill(w.dV, w.dV + keys * c.Evp, Acc(0));
  const Visibility vis = visibility(p, b);
  // Whether each key tile's k rows are finite (decides the careful dQ product), checked once.
  std::vector<char> k_finite(static_cast<size_t>((keys + kBk - 1) / kBk));
  const In* kb = p.k.data + p.k.batch_offset(b, 2);
  for (index_t t = 0; t * kBk < keys; ++t)
    k_finite[t] = sdpa_detail::rows_finite<Acc>(kb + (j_lo + t * kBk) * p.k.stride(-2), p.k.stride(-2),
                                                p.k.stride(-1), std::min(kBk, keys - t * kBk), c.E);
  for (index_t qi = 0; qi < c.blocks; ++qi) {
    const index_t i0 = qi * Bq, nq = std::min(Bq, c.L - i0);
    const index_t kmin = std::max(visible_keys(vis, i0, c.S).lo, j_lo);
    const index_t kmax = std::min(visible_keys(vis, i0 + nq - 1, c.S).hi, j_hi);
    if (kmin >= kmax) {  // the block sees none of the chunk's keys: its part of dQ is 0
      std::fill(w.dQt, w.dQt + c.E * Bq, Acc(0));
    } else {
      QueryBlock<In, Acc> qb = pack_query_block(c, b, i0, nq, w);
      for (index_t t = (kmin - j_lo) / kBk; j_lo + t * kBk < kmax; ++t) {
        const index_t j0 = j_lo + t * kBk;
        backward_tile(c, qb, j0, std::min(kBk, j_hi - j0), t * kBk, k_finite[t] != 0, w);
      }
    }
    finish_query_block(c, b, chunk, qi, nq, w);
  }
  for (index_t j = 0; j < keys; ++j) {
    In* dk = c.d->dk + (b * c.S + j_lo + j) * c.E;
    In* dv = c.d->dv + (b * c.S + j_lo + j) * c.Ev;
    for (index_t e = 0; e < c.E; ++e) dk[e] = static_cast<In>(c.scale * w.dK[j * c.Ep + e]);
    for (index_t e = 0; e < c.Ev; ++e) dv[e] = static_cast<In>(w.dV[j * c.Evp + e]);
  }
}

// Above this |lse| the probabilities are not taken as prob_exp(s - lse): lse = m + log(l)
// carries the rounding of m (ulp(64) ~ 8e-6 in float32), which exp(s - lse) turns into a
// relative error of P (a row whose every key has a mask of -1e9 or finfo.min would lose
// everything). Such rows get the forward's exact form prob_exp(s - m) / l instead.
constexpr double kExactLseAbove = 64.0;

// The shift and normaliser of the block's rows (into c.shift, c.inv and the lanes of w): the
// lse and 1, or for rows whose |lse| exceeds kExactLseAbove the row max m and 1 / l of their
// visible scores, recomputed as the forward's first weights pass does (online_softmax.hpp).
template <typename In, typename Acc>
void row_normalisers(const Backward<In, Acc>& c, Block<In, Acc>& k, const Workspace<Acc>& w) {
  constexpr index_t P = vm::packet_size<Acc>();
  constexpr index_t Bq = block_queries<Acc>();
  load_lse_lanes(c.g->lse, k.b, k.i0, k.nq, w.lse);
  bool large = false;
  for (index_t i = 0; i < Bq; ++i) {
    w.inv[i] = i < k.nq ? Acc(1) : Acc(0);
    large |= i < k.nq && std::abs(w.lse[i]) > Acc(kExactLseAbove) && std::isfinite(w.lse[i]);
  }
  if (large) {
    const KeyRange span = block_keys(k.vis, k.i0, k.nq, c.S);
    const index_t kmin = span.lo, kmax = span.hi;
    for (index_t j0 = kmin; j0 < kmax; j0 += kBk) {
      const index_t nj = std::min(kBk, kmax - j0);
      Pk<Acc> mt[kC];
      sdpa_detail::score_tile(k, j0, nj, mt);
      for (int q = 0; q < kC; ++q) {
        Pk<Acc> m = ei::pload<Pk<Acc>>(k.M + q * P);
        const softmax_state::Step<Acc> st = softmax_state::raise_max<Acc>(m, mt[q]);
        ei::pstore(k.M + q * P, m);
        Pk<Acc> sum = ei::pset1<Pk<Acc>>(Acc(0));
        for (index_t j = 0; j < nj; ++j)
          sum = ei::padd(sum, vm::prob_exp<Acc>(ei::psub(ei::pload<Pk<Acc>>(k.St + j * Bq + q * P), st.shift)));
        ei::pstore(k.Lsum + q * P, softmax_state::add_sum<Acc>(ei::pload<Pk<Acc>>(k.Lsum + q * P), st, sum));
      }
    }
    for (index_t i = 0; i < k.nq; ++i)
      if (std::abs(w.lse[i]) > Acc(kExactLseAbove) && std::isfinite(w.lse[i])) {
        w.lse[i] = k.M[i] == neg_inf<Acc>() ? Acc(0) : k.M[i];
        w.inv[i] = softmax_state::inverse_sum_one(k.Lsum[i]);
      }
  }
  for (index_t i = 0; i < k.nq; ++i) {
    c.shift[k.b * c.L + k.i0 + i] = w.lse[i];
    c.inv[k.b * c.L + k.i0 + i] = w.inv[i];
  }
}

// D_i for the rows of query block [i0, i0 + nq) of batch entry b, into D (nq): rowsum(dO ∘ O)
// (+ rowsum(P ∘ (gW ∘ Z)), the block's probabilities recomputed over the keys it sees, in tile
// order; a dropped entry adds exactly 0, also where gW is NaN or inf).
// Where rowsum(dO ∘ O) is not finite (an out row made NaN by a value only dropped entries
// reach), D is the sum it stands for, rowsum(P ∘ dP) with dP = (dO V^T + gW) ∘ Z, hidden and
// dropped entries exactly 0, so that such a NaN reaches no gradient the formula keeps finite.
template <typename In, typename Acc>
void row_deltas(const Backward<In, Acc>& c, index_t b, index_t i0, index_t nq, Acc* D) {
  constexpr index_t Bq = block_queries<Acc>();
  const SdpaGradInputs<In, Acc>& g = *c.g;
  const Strided<const In>&o = g.out, &go = g.grad_out;
  const In* grows = go.data + go.batch_offset(b, 2) + i0 * go.stride(-2);
  bool exact = false;
  for (index_t i = 0; i < nq; ++i) {
    const In* orow = o.data + o.batch_offset(b, 2) + (i0 + i) * o.stride(-2);
    const In* grow = grows + i * go.stride(-2);
    Acc s = Acc(0);
    for (index_t e = 0; e < c.Ev; ++e)
      s += to_acc<Acc>(grow[e * go.stride(-1)]) * to_acc<Acc>(orow[e * o.stride(-1)]);
    D[i] = s;
    exact |= !(s - s == Acc(0));  // s is NaN or inf
  }
  const Scratch<Acc, BackwardTag> ws(static_cast<size_t>(workspace_size(c, 0)));
  const Workspace<Acc> w = carve(c, index_t(0), ws.data());
  Block<In, Acc> k = sdpa_detail::make_block<In, Acc>(*c.p, b, i0, nq, w.block);
  row_normalisers(c, k, w);
  if (!g.grad_weights.data && !exact) return;
  if (exact) {
    sdpa_detail::pack_q(grows, go.stride(-2), go.stride(-1), nq, c.Ev, Acc(1), w.dOt);
    std::fill(D, D + nq, Acc(0));
  }
  const KeyRange span = block_keys(k.vis, i0, nq, c.S);
  const index_t kmin = span.lo, kmax = span.hi;
  const Strided<const Acc>& gw = g.grad_weights;
  const Acc* gb = gw.data ? gw.data + gw.batch_offset(b, 2) + i0 * gw.stride(-2) : nullptr;
  for (index_t j0 = kmin; j0 < kmax; j0 += kBk) {
    const index_t nj = std::min(kBk, kmax - j0);
    Pk<Acc> unused[kC];
    sdpa_detail::score_tile(k, j0, nj, unused);
    tile_probabilities(k.St, w.lse, w.inv, nj, w.Pt);
    // The factor of P, dropped as the gradient tiles drop it (a dropped entry exactly 0, also
    // where gW or dO V^T is NaN or inf: P ∘ (gW ∘ Z), never (P ∘ Z) ∘ gW, whose 0 * NaN would
    // reach the whole row): exact, dP = (dO V^T + gW) ∘ Z; else gW ∘ Z.
    if (exact)
      tile_dp(*c.p, b, j0, nj, w.dOt, w.dSt);
    else
      std::fill(w.dSt, w.dSt + nj * Bq, Acc(0));
    if (gb) add_grad_weights(gw, b, i0, nq, j0, nj, w.dSt);
    if (g.dropout.active())
      apply_dropout_tile<Acc>(g.dropout, static_cast<std::uint64_t>(b), i0, nq, j0, nj, w.dSt, index_t(1), Bq);
    for (index_t i = 0; i < nq; ++i)
      for (index_t j = 0; j < nj; ++j) {
        if (k.St[j * Bq + i] == neg_inf<Acc>()) continue;
        D[i] += w.Pt[j * Bq + i] * w.dSt[j * Bq + i];
      }
  }
}

// dq rows of query block qb of batch entry b: the chunk parts added in chunk order, times scale.
template <typename In, typename Acc>
void reduce_dq(const Backward<In, Acc>& c, index_t b, index_t qb) {
  constexpr index_t Bq = block_queries<Acc>();
  const index_t n = c.E * Bq, nq = std::min(Bq, c.L - qb * Bq);
  const Scratch<Acc, BackwardTag> ws(static_cast<size_t>(std::max<index_t>(n, 1) + Bq));
  Acc* acc = ws.data();
  Acc* f = acc + std::max<index_t>(n, 1);
  std::fill(acc, acc + n, Acc(0));
  std::fill(f, f + Bq, c.scale);
  for (index_t ch = 0; ch < c.chunks; ++ch) {
    const Acc* part = c.parts + ((b * c.chunks + ch) * c.blocks + qb) * n;
    for (index_t x = 0; x < n; ++x) acc[x] += part[x];
  }
  sdpa_detail::unpack_o(acc, f, nq, c.E, c.d->dq + (b * c.L + qb * Bq) * c.E);
}

template <typename T>
void fill_zero(T* x, index_t n) {
  if (x && n > 0) std::fill(x, x + n, T(0));
}

}  // namespace sdpa_bwd_detail

// The gradients of scaled_dot_product_attention (sdpa.hpp) for the problem p, given the
// forward's out and lse, the output cotangent and optionally the weights' cotangent.
template <typename In, typename Acc = In>
void scaled_dot_product_attention_backward(const SdpaProblem<In>& p, const SdpaGradInputs<In, Acc>& g,
                                           const SdpaGrads<In, Acc>& d) {
  using namespace sdpa_bwd_detail;
  constexpr index_t Bq = block_queries<Acc>();
  Backward<In, Acc> c;
  c.p = &p, c.g = &g, c.d = &d;
  c.N = p.q.batch_count(2);
  c.L = p.q.dim(-2), c.S = p.k.dim(-2), c.E = p.q.dim(-1), c.Ev = p.v.dim(-1);
  if (c.N == 0) return;
  if (c.L == 0 || c.S == 0) {  // no query or no key: every gradient is 0
    fill_zero(d.dq, c.N * c.L * c.E);
    fill_zero(d.dk, c.N * c.S * c.E);
    fill_zero(d.dv, c.N * c.S * c.Ev);
    fill_zero(d.dmask, c.N * c.L * c.S);
    return;
  }
  c.Ep = panel_round<Acc>(c.E), c.Evp = panel_round<Acc>(c.Ev);
  c.blocks = (c.L + Bq - 1) / Bq;
  c.scale = static_cast<Acc>(p.scale);
  const index_t tiles = (c.S + kBk - 1) / kBk;
  c.chunks = backward_chunks<Acc>(c.N, c.L, c.S, c.E);
  c.chunk_keys = (tiles + c.chunks - 1) / c.chunks * kBk;
  c.chunks = (c.S + c.chunk_keys - 1) / c.chunk_keys;  // no empty chunk
  std::vector<Acc, Eigen::aligned_allocator<Acc>> D(static_cast<size_t>(c.N * c.L)), shift(D.size()), inv(D.size());
  c.shift = shift.data(), c.inv = inv.data();
  parallel_for(c.N * c.blocks, [&](index_t u) {
    const index_t b = u / c.blocks, i0 = (u % c.blocks) * Bq;
    row_deltas(c, b, i0, std::min(Bq, c.L - i0), D.data() + b * c.L + i0);
  }, g.grad_weights.data != nullptr);
  c.D = D.data();
  if (d.dmask)  // tiles no row sees are skipped: their dS is 0
    parallel_for(c.N * c.L, [&](index_t r) { fill_zero(d.dmask + r * c.S, c.S); });
  std::vector<Acc, Eigen::aligned_allocator<Acc>> parts(
      c.chunks > 1 ? static_cast<size_t>(c.N * c.chunks * c.blocks * c.E * Bq) : 0);
  c.parts = parts.data();
  parallel_for(c.N * c.chunks, [&](index_t u) { backward_unit(c, u / c.chunks, u % c.chunks); }, true);
  if (c.chunks > 1) parallel_for(c.N * c.blocks, [&](index_t u) { reduce_dq(c, u / c.blocks, u % c.blocks); });
}

}  // namespace attnext
