// SDPA's blocked path (any L): one work unit is (batch entry, block of Bq queries), the
// queries in the SIMD lanes (micro.hpp's geometry), keys visited in tiles of kBk with an
// online softmax per lane. Only Q's block is copied (packed, scale folded in when safe); K and
// V are read in place. Key tiles outside every row's visible range are skipped; masks (mask.hpp)
// are applied only to tiles that cut through some row's range or when an attn_mask is given.
// Few units and many keys: each block's keys are split into chunks whose partial states are
// merged by log-sum-exp (online_softmax.hpp). With weights requested a block makes two passes
// (row max and sum, then the final softmax, written out and multiplied by V), so the weights
// returned are exactly those the output was made from.
// The bfloat16 pair path (micro.hpp) packs each batch entry's V pairs once for all its query
// blocks (ValuePairs) and, without weights, runs two query blocks per unit over the same key
// tiles (attend_two_blocks); neither changes what a block computes. Where AMX runs, the pair
// path's two products go to tiles (amx_tiles.hpp) and ValuePairs holds V's columns instead.
// Dropout (dropout.hpp) acts on a tile's probabilities after they entered the row sums and
// before P V (and before the weights are written), so lse and the normaliser are those of the
// undropped P; its decisions depend on the element's coordinates only.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "../dropout.hpp"
#include "../mask.hpp"
#include "../online_softmax.hpp"
#include "../parallel.hpp"
#include "../scratch.hpp"
#include "amx_tiles.hpp"
#include "micro.hpp"
#include "problem.hpp"

namespace attnext {
namespace sdpa_detail {

// Keys per tile: a tile's S^T (kBk x Bq) stays in L2 next to Qt and the tile's K rows, and a
// longer tile means fewer rescales of O^T per key. Chosen by sweeping 32..256 at E = 64 and
// 128 (flat at 64, best at 128; docs/benchmarks-notes-h1.md).
constexpr index_t kBk = 128;

// Split of a block's keys into chunks (split_chunks): only with fewer than kSplitMinUnits
// (batch x query block) units, which would leave threads idle; chunks of at least
// kSplitMinKeys keys (a chunk must amortise its merge) and at most kSplitMaxChunks of them
// (bounds the partials' memory). Decided from the shapes alone, so results do not depend on
// the thread count.
constexpr index_t kSplitMinUnits = 16;
constexpr index_t kSplitMinKeys = 1024;
constexpr index_t kSplitMaxChunks = 32;

inline index_t split_chunks(index_t units, index_t S, bool weights) {
  if (weights || units >= kSplitMinUnits) return 1;
  return std::max<index_t>(1, std::min(kSplitMaxChunks, S / kSplitMinKeys));
}

// The products a call runs, chosen once per call (so a call never mixes paths while
// _core.set_bf16_path switches): the generic micro-kernels, the bfloat16 pair path
// (vdpbf16ps), or the pair path on AMX tiles.
enum class Products { generic, pairs, amx };

template <typename In>
inline Products products_of() {
  if (!pair_path<In>()) return Products::generic;
  return amx_active() ? Products::amx : Products::pairs;
}

struct SdpaBlockTag {};  // scratch.hpp tags
struct SdpaMergeTag {};

// One work unit: queries [i0, i0 + nq) of batch entry b, Q packed, and its softmax state
// (one lane per query): O^T (Ev, Bq) unnormalised, running max M and sum Lsum (Bq each).
// On the bfloat16 pair path (pairs) also Q's pairs Qp, a tile's P and V pairs (Pp, Vp) and,
// for K rows that are not contiguous, the tile's K rows copied contiguous (Kc). On AMX (amx,
// with pairs) Vp holds a tile's V columns instead, Kc K rows padded to whole tiles, and Vtail
// the columns of a tile's last partial 32 keys, zero past the tile.
template <typename In, typename Acc>
struct Block {
  const SdpaProblem<In>* p = nullptr;
  index_t b = 0, i0 = 0, nq = 0;
  index_t L = 0, E = 0, S = 0, Ev = 0;
  Visibility vis;
  KeyRange common;  // keys every row of the block sees
  bool folded = true;  // scale folded into Qt; else scores are scaled after the dot products
  Acc scale = Acc(1);
  Dropout drop;  // inactive unless the caller sets it after make_block
  Acc *Qt = nullptr, *St = nullptr, *Sh = nullptr, *Ot = nullptr, *M = nullptr, *Lsum = nullptr;
  bool pairs = false;
  std::uint32_t *Qp = nullptr, *Pp = nullptr, *Vp = nullptr;
  In* Kc = nullptr;
  index_t vps = 0;  // Vp's row stride: Ev rounded up to 16
  const std::uint32_t* Vpre = nullptr;  // entry b's value pairs packed once (ValuePairs), or null
  bool amx = false;
  index_t E32 = 0, Ev16 = 0;  // E and Ev rounded up to whole tiles
  index_t vcs = 0;            // AMX: the row stride of Vpre's columns, in bfloat16
  In* Vtail = nullptr;
};

// The pair path's buffers, in Acc (4-byte) units, each a multiple of 16 so that all stay
// 64-byte aligned: Qp (E32/2 x Bq), Pp (kBk/2 x Bq), Vp (kBk/2 x vps), Kc (kBk x E32 halves),
// Vtail (Ev16 x 32 halves); E32 = E rounded up to 32, vps = Ev16 = Ev rounded up to 16.
inline index_t pair_scratch_size(index_t E, index_t Ev) {
  constexpr index_t Bq = block_queries<float>();
  const index_t vps = round_up(Ev, 16), E32 = round_up(E, 32);
  return (E32 / 2) * Bq + (kBk / 2) * Bq + (kBk / 2) * vps + kBk * E32 / 2 + vps * 16;
}

// Rows of O^T: the pair path's are whole tiles of 16 (AMX stores them whole).
inline index_t ot_rows(index_t Ev, bool pairs) {
  return pairs ? std::max<index_t>(round_up(Ev, 16), 16) : std::max<index_t>(Ev, 1);
}

// The unit's buffers (make_block), then the pair path's when it takes it.
template <typename Acc>
inline index_t block_scratch_size(index_t E, index_t Ev, bool pairs = false) {
  return block_queries<Acc>() * (std::max<index_t>(E, 1) + 2 * kBk + ot_rows(Ev, pairs) + 2) +
         (pairs ? pair_scratch_size(E, Ev) : 0);
}

// Carves the pair path's buffers out of ws (pair_scratch_size) and packs Q's pairs.
template <typename In, typename Acc>
void start_pairs(Block<In, Acc>& k, Acc* ws) {
#if defined(__AVX512BF16__)
  if constexpr (std::is_same<In, bf16>::value) {
    constexpr index_t Bq = block_queries<float>();
    k.vps = k.Ev16 = round_up(k.Ev, 16);
    k.E32 = round_up(k.E, 32);
    k.Qp = reinterpret_cast<std::uint32_t*>(ws);
    k.Pp = k.Qp + (k.E32 / 2) * Bq;
    k.Vp = k.Pp + (kBk / 2) * Bq;
    k.Kc = reinterpret_cast<In*>(k.Vp + (kBk / 2) * k.vps);
    k.Vtail = k.Kc + kBk * k.E32;
    pack_lane_pairs(k.Qt, k.E, k.Qp);
    const index_t packed = (k.E + 1) / 2;  // AMX reads whole tiles of pairs: zeros past E
    std::fill(k.Qp + packed * Bq, k.Qp + (k.E32 / 2) * Bq, 0u);
  }
#endif
}

// Carves the unit's buffers out of ws (block_scratch_size), packs Q, starts an empty state.
template <typename In, typename Acc>
Block<In, Acc> make_block(const SdpaProblem<In>& p, index_t b, index_t i0, index_t nq, Acc* ws,
                          Products products = Products::generic) {
  const bool pairs = products != Products::generic;
  constexpr index_t Bq = block_queries<Acc>();
  Block<In, Acc> k;
  k.p = &p;
  k.b = b, k.i0 = i0, k.nq = nq;
  k.L = p.q.dim(-2), k.E = p.q.dim(-1), k.S = p.k.dim(-2), k.Ev = p.v.dim(-1);
  k.vis = visibility(p, b);
  k.common = {visible_keys(k.vis, i0 + nq - 1, k.S).lo, visible_keys(k.vis, i0, k.S).hi};
  k.scale = static_cast<Acc>(p.scale);
  k.Qt = ws;
  k.St = k.Qt + std::max<index_t>(k.E, 1) * Bq;
  k.Sh = k.St + kBk * Bq;
  k.Ot = k.Sh + kBk * Bq;
  k.M = k.Ot + ot_rows(k.Ev, pairs) * Bq;
  k.Lsum = k.M + Bq;
  k.folded = pack_q_scaled(p.q.data + p.q.batch_offset(b, 2) + i0 * p.q.stride(-2), p.q.stride(-2), p.q.stride(-1), nq,
                           k.E, k.scale, k.Qt);
  std::fill(k.Ot, k.Ot + ot_rows(k.Ev, pairs) * Bq, Acc(0));
  std::fill(k.M, k.M + Bq, neg_inf<Acc>());
  std::fill(k.Lsum, k.Lsum + Bq, Acc(0));
  k.pairs = pairs;
  k.amx = products == Products::amx;
  if (pairs) start_pairs(k, k.Lsum + Bq);
  return k;
}

// S^T of the tile's nj keys (rows from kt, key j0 of S) on AMX tiles, into St; mt the lane-wise
// max. K is read in place when whole tiles of it are real keys with unit-stride rows of whole
// 32s (the rows past nj are computed and ignored), else copied padded (Kc).
template <typename In, typename Acc>
void score_amx(Block<In, Acc>& k, const In* kt, index_t j0, index_t nj, Pk<Acc>* mt) {
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
  if constexpr (std::is_same<In, bf16>::value) {
    constexpr index_t Bq = block_queries<Acc>();
    const index_t rows = round_up(nj, 32), ks = k.p->k.stride(-2), ke = k.p->k.stride(-1);
    const bool in_place = ke == 1 && k.E == k.E32 && j0 + rows <= k.S;
    if (!in_place) copy_key_rows(kt, ks, ke, nj, k.E, rows, k.E32, k.Kc);
    qk_tiles(in_place ? kt : k.Kc, in_place ? ks : k.E32, rows, k.E32, k.Qp, k.St);
    for (index_t j = 0; j < nj; ++j)
      for (int c = 0; c < kC; ++c) mt[c] = _mm512_max_ps(mt[c], _mm512_load_ps(k.St + j * Bq + c * 16));
  }
#endif
}

// S^T of the tile's nj keys (rows from kt) on the pair path, into St; mt the lane-wise max.
template <typename In, typename Acc>
void score_pairs(Block<In, Acc>& k, const In* kt, index_t j0, index_t nj, Pk<Acc>* mt) {
#if defined(__AVX512BF16__)
  if constexpr (std::is_same<In, bf16>::value) {
    constexpr index_t Bq = block_queries<Acc>();
    if (k.amx) return score_amx(k, kt, j0, nj, mt);
    index_t ks = 0;
    const In* rows = contiguous_rows(kt, k.p->k.stride(-2), k.p->k.stride(-1), nj, k.E, k.Kc, ks);
    for_micro_tiles(nj, [&](auto R, index_t r) {
      qk_micro_pairs<decltype(R)::value>(rows + r * ks, ks, k.E, k.Qp, k.St + r * Bq, mt);
    });
  }
#endif
}

// S^T of keys [j0, j0 + nj) with masks applied (hidden = -inf) and mt, its lane-wise max.
// Returns whether the tile's P V must take the careful path: some key of the tile is hidden
// from some row and some value of the tile's keys is not finite; Sh then holds the scores.
template <typename In, typename Acc>
bool score_tile(Block<In, Acc>& k, index_t j0, index_t nj, Pk<Acc>* mt) {
  constexpr index_t P = vm::packet_size<Acc>();
  constexpr index_t Bq = block_queries<Acc>();
  const SdpaProblem<In>& p = *k.p;
  const In* kb = p.k.data + p.k.batch_offset(k.b, 2);
  for (int c = 0; c < kC; ++c) mt[c] = ei::pset1<Pk<Acc>>(neg_inf<Acc>());
  if (k.pairs) {
    score_pairs(k, kb + j0 * p.k.stride(-2), j0, nj, mt);
  } else {
    for_micro_tiles(nj, [&](auto R, index_t r) {
      qk_micro<In, Acc, decltype(R)::value>(kb + (j0 + r) * p.k.stride(-2), p.k.stride(-2), p.k.stride(-1), k.E,
                                            k.Qt, k.St + r * Bq, mt);
    });
  }
  const bool boundary = !k.common.covers(j0, j0 + nj);
  const bool masked = boundary || p.mask.kind != MaskKind::none;
  if (!k.folded) {
    const Pk<Acc> sc = ei::pset1<Pk<Acc>>(k.scale);
    for (index_t x = 0; x < nj * Bq; x += P) ei::pstore(k.St + x, ei::pmul(ei::pload<Pk<Acc>>(k.St + x), sc));
  }
  const bool hidden = masked && mask_tile(p.mask, k.vis, k.S, k.L, k.b, k.i0, k.nq, j0, nj, k.St, index_t(1), Bq);
  if (masked || !k.folded) {  // the max taken while storing no longer holds
    for (int c = 0; c < kC; ++c) mt[c] = ei::pset1<Pk<Acc>>(neg_inf<Acc>());
    for (index_t j = 0; j < nj; ++j)
      for (int c = 0; c < kC; ++c) mt[c] = ei::pmax(mt[c], ei::pload<Pk<Acc>>(k.St + j * Bq + c * P));
  }
  if (!hidden) return false;
  const In* vb = p.v.data + p.v.batch_offset(k.b, 2) + j0 * p.v.stride(-2);
  if (rows_finite<Acc>(vb, p.v.stride(-2), p.v.stride(-1), nj, k.Ev)) return false;
  std::copy(k.St, k.St + nj * Bq, k.Sh);
  return true;
}

// O^T = O^T * alpha (if rescale) + P^T V for keys [j0, j0 + nj) on AMX tiles, P^T in Pp (its
// pair rows past the tile zeroed here up to whole tiles). V's columns come from the entry's
// packed ones (Vpre: zero past S) where every key a tile reads is the tile's own or padding,
// with the last partial 32 keys copied zero-padded (Vtail) when real keys follow them; else
// the tile's columns are packed here.
template <typename In, typename Acc>
void pv_amx(Block<In, Acc>& k, const In* vb, index_t j0, index_t nj, const Pk<Acc>* alpha, bool rescale) {
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
  if constexpr (std::is_same<In, bf16>::value) {
    constexpr index_t Bq = block_queries<Acc>();
    const index_t keys32 = round_up(nj, 32), vs = k.p->v.stride(-2), ve = k.p->v.stride(-1);
    std::fill(k.Pp + ((nj + 1) / 2) * Bq, k.Pp + (keys32 / 2) * Bq, 0u);
    if (rescale) rescale_rows(k.Ot, k.Ev, alpha);
    if (!k.Vpre) {
      In* cols = reinterpret_cast<In*>(k.Vp);
      pack_value_columns(vb, vs, ve, nj, k.Ev, keys32, cols, kBk);
      pv_tiles(cols, kBk, keys32, k.Pp, k.Ot, k.Ev16);
      return;
    }
    const In* cols = reinterpret_cast<const In*>(k.Vpre) + j0;
    const index_t whole = nj / 32 * 32;
    if (whole == nj || j0 + nj == k.S) {
      pv_tiles(cols, k.vcs, keys32, k.Pp, k.Ot, k.Ev16);
      return;
    }
    if (whole) pv_tiles(cols, k.vcs, whole, k.Pp, k.Ot, k.Ev16);
    pack_value_columns(vb + whole * vs, vs, ve, nj - whole, k.Ev, 32, k.Vtail, 32);
    pv_tiles(k.Vtail, 32, 32, k.Pp + (whole / 2) * Bq, k.Ot, k.Ev16);
  }
#endif
}

// The pair path's P V of keys [j0, j0 + nj) (not careful): P^T (St) rounded into pairs over
// keys unless packed already (Pp, by online_tile's fused pass); the values as pairs over keys,
// from the entry's pre-packed pairs when the tile's pairs are theirs (it starts on an even key
// and, if its count is odd, ends at S, where they too pad with zero), else packed here.
template <typename In, typename Acc>
void pv_pairs(Block<In, Acc>& k, const In* vb, index_t j0, index_t nj, const Pk<Acc>* alpha, bool rescale,
              bool packed) {
#if defined(__AVX512BF16__)
  if constexpr (std::is_same<In, bf16>::value) {
    constexpr index_t Bq = block_queries<Acc>();
    if (!packed) pack_lane_pairs(k.St, nj, k.Pp);
    if (k.amx) return pv_amx(k, vb, j0, nj, alpha, rescale);
    const std::uint32_t* vp = k.Vp;
    if (k.Vpre && j0 % 2 == 0 && (nj % 2 == 0 || j0 + nj == k.S))
      vp = k.Vpre + (j0 / 2) * k.vps;
    else
      pack_value_pairs(vb, k.p->v.stride(-2), k.p->v.stride(-1), nj, k.Ev, k.Vp, k.vps);
    for_micro_tiles(k.Ev, [&](auto R, index_t r) {
      pv_micro_pairs<decltype(R)::value>(vp + r, k.vps, (nj + 1) / 2, k.Pp, k.Ot + r * Bq, alpha, rescale);
    });
  }
#endif
}

// O^T = O^T * alpha (if rescale) + P^T V for keys [j0, j0 + nj), P^T in St (rounded to product
// operands of In first: the pair packing rounds by the same rule), or already in Pp (packed:
// the pair path only).
template <typename In, typename Acc>
void pv_tile(Block<In, Acc>& k, index_t j0, index_t nj, const Pk<Acc>* alpha, bool rescale, bool careful,
             bool packed = false) {
  constexpr index_t Bq = block_queries<Acc>();
  const SdpaProblem<In>& p = *k.p;
  const index_t vs = p.v.stride(-2), ve = p.v.stride(-1);
  const In* vb = p.v.data + p.v.batch_offset(k.b, 2) + j0 * vs;
  if (k.pairs && !careful) {
    pv_pairs(k, vb, j0, nj, alpha, rescale, packed);
    return;
  }
  round_operands<In>(k.St, nj * Bq);
  for_micro_tiles(k.Ev, [&](auto R, index_t r) {
    constexpr int Rv = decltype(R)::value;
    if (careful)
      pv_micro<In, Acc, Rv, true>(vb + r * ve, vs, ve, nj, k.St, k.Sh, k.Ot + r * Bq, alpha, rescale);
    else
      pv_micro<In, Acc, Rv, false>(vb + r * ve, vs, ve, nj, k.St, k.Sh, k.Ot + r * Bq, alpha, rescale);
  });
}

// Dropout on the tile's probabilities P^T (St, queries in the lanes) of keys [j0, j0 + nj).
template <typename In, typename Acc>
void drop_tile(Block<In, Acc>& k, index_t j0, index_t nj) {
  if (k.drop.active())
    apply_dropout_tile(k.drop, static_cast<std::uint64_t>(k.b), k.i0, k.nq, j0, nj, k.St, index_t(1),
                       block_queries<Acc>());
}

// The pair path's probabilities of a tile's nj scores (St): exp_lane_pairs into Pp, the
// same values, sums and rounding as the unfused exp then pack_lane_pairs.
template <typename In, typename Acc>
void exp_pack_tile(Block<In, Acc>& k, index_t nj, const softmax_state::Step<Acc>* st, Pk<Acc>* sum) {
#if defined(__AVX512BF16__)
  if constexpr (std::is_same<In, bf16>::value) {
    __m512 shift[kC];
    for (int c = 0; c < kC; ++c) shift[c] = st[c].shift;
    exp_lane_pairs(k.St, nj, shift, sum, k.Pp);
  }
#endif
}

// One tile of the online pass: scores, the online-softmax update, probabilities, P V.
template <typename In, typename Acc>
void online_tile(Block<In, Acc>& k, index_t j0, index_t nj) {
  constexpr index_t P = vm::packet_size<Acc>();
  constexpr index_t Bq = block_queries<Acc>();
  Pk<Acc> mt[kC], alpha[kC], sum[kC];
  softmax_state::Step<Acc> st[kC];
  const bool careful = score_tile(k, j0, nj, mt);
  for (int c = 0; c < kC; ++c) {
    Pk<Acc> m = ei::pload<Pk<Acc>>(k.M + c * P);
    st[c] = softmax_state::raise_max<Acc>(m, mt[c]);
    ei::pstore(k.M + c * P, m);
    alpha[c] = st[c].alpha;
    sum[c] = ei::pset1<Pk<Acc>>(Acc(0));
  }
  // The pair path without dropout or care packs P for P V as it forms it (exp_pack_tile).
  const bool fused = k.pairs && !careful && !k.drop.active();
  if (fused) {
    exp_pack_tile(k, nj, st, sum);
  } else {
    for (index_t j = 0; j < nj; ++j)
      for (int c = 0; c < kC; ++c) {
        Acc* s = k.St + j * Bq + c * P;
        const Pk<Acc> e = vm::prob_exp<Acc>(ei::psub(ei::pload<Pk<Acc>>(s), st[c].shift));
        ei::pstore(s, e);
        sum[c] = ei::padd(sum[c], e);
      }
  }
  for (int c = 0; c < kC; ++c)
    ei::pstore(k.Lsum + c * P, softmax_state::add_sum<Acc>(ei::pload<Pk<Acc>>(k.Lsum + c * P), st[c], sum[c]));
  drop_tile(k, j0, nj);
  pv_tile(k, j0, nj, alpha, true, careful, fused);
}

// A weight normalised late (weights_passes): hidden keys carry the mark -0 in P, so they
// stay exactly 0 even in a row whose sum is NaN, while a visible key whose exponential
// underflowed to +0 turns NaN there, as the reference's e / sum does.
template <typename Acc>
inline Acc late_weight(Acc e, Acc inv) {
  return e == Acc(0) && std::signbit(e) ? Acc(0) : e * inv;
}

// Weights wanted: pass 1 finds each row's max and sum; pass 2 forms the final softmax
// P = exp(s - max) / sum once, writes it to w (the block's rows of the weights, row stride S)
// and accumulates O = P V with it. For inputs whose products round P (bfloat16), O
// accumulates exp(s - max) instead, rounded before P V as on the online path, and is divided
// by the sum at the store: the rounding point then holds exactly, the final max being known.
// Returns whether O is already normalised.
template <typename In, typename Acc>
bool weights_passes(Block<In, Acc>& k, index_t kmin, index_t kmax, Acc* w) {
  constexpr index_t P = vm::packet_size<Acc>();
  constexpr index_t Bq = block_queries<Acc>();
  const Pk<Acc> zero = ei::pset1<Pk<Acc>>(Acc(0));
  for (index_t j0 = kmin; j0 < kmax; j0 += kBk) {
    const index_t nj = std::min(kBk, kmax - j0);
    Pk<Acc> mt[kC];
    score_tile(k, j0, nj, mt);
    for (int c = 0; c < kC; ++c) {
      Pk<Acc> m = ei::pload<Pk<Acc>>(k.M + c * P);
      const softmax_state::Step<Acc> st = softmax_state::raise_max<Acc>(m, mt[c]);
      ei::pstore(k.M + c * P, m);
      Pk<Acc> sum = zero;
      for (index_t j = 0; j < nj; ++j)
        sum = ei::padd(sum, vm::prob_exp<Acc>(ei::psub(ei::pload<Pk<Acc>>(k.St + j * Bq + c * P), st.shift)));
      ei::pstore(k.Lsum + c * P, softmax_state::add_sum<Acc>(ei::pload<Pk<Acc>>(k.Lsum + c * P), st, sum));
    }
  }
  Pk<Acc> shift[kC], inv[kC];
  for (int c = 0; c < kC; ++c) {
    shift[c] = softmax_state::shift_of<Acc>(ei::pload<Pk<Acc>>(k.M + c * P));
    inv[c] = softmax_state::inverse_sum<Acc>(ei::pload<Pk<Acc>>(k.Lsum + c * P));
  }
  constexpr bool late = rounds_operands<In>();  // normalised at the store
  alignas(64) Acc invs[Bq];
  for (int c = 0; c < kC; ++c) ei::pstore(invs + c * P, inv[c]);
  for (index_t i = 0; i < k.nq; ++i) std::fill(w + i * k.S, w + (i + 1) * k.S, Acc(0));
  const Pk<Acc> ninf = ei::pset1<Pk<Acc>>(neg_inf<Acc>());
  const Pk<Acc> hidden_mark = ei::pset1<Pk<Acc>>(-Acc(0));
  for (index_t j0 = kmin; j0 < kmax; j0 += kBk) {
    const index_t nj = std::min(kBk, kmax - j0);
    Pk<Acc> mt[kC];
    const bool careful = score_tile(k, j0, nj, mt);
    for (index_t j = 0; j < nj; ++j)
      for (int c = 0; c < kC; ++c) {
        Acc* s = k.St + j * Bq + c * P;
        const Pk<Acc> sc = ei::pload<Pk<Acc>>(s);
        // A hidden key (-inf) weighs exactly 0, even in a row a NaN score made NaN.
        const Pk<Acc> e = vm::prob_exp<Acc>(ei::psub(sc, shift[c]));
        const Pk<Acc> pr = late ? e : ei::pmul(e, inv[c]);
        ei::pstore(s, ei::pselect(ei::pcmp_eq(sc, ninf), late ? hidden_mark : zero, pr));
      }
    for (index_t i = 0; i < k.nq; ++i)
      for (index_t j = 0; j < nj; ++j) {
        const Acc e = k.St[j * Bq + i];
        w[i * k.S + j0 + j] = late ? late_weight(e, invs[i]) : e;
      }
    drop_tile(k, j0, nj);
    if (k.drop.active())  // the same decisions as drop_tile's, on the weights' own layout
      apply_dropout_tile(k.drop, static_cast<std::uint64_t>(k.b), k.i0, k.nq, j0, nj, w + j0, k.S, index_t(1));
    pv_tile(k, j0, nj, static_cast<const Pk<Acc>*>(nullptr), false, careful);
  }
  return !late;
}

// The pair path's values of batch entries [b0, b0 + n), packed once for all their query blocks
// (each block would otherwise pack every key tile's values again). Per entry: ceil(S / 2) rows
// of vps pairs, pack_value_pairs' layout over all S keys; on AMX, Ev16 rows of V's columns
// (pack_value_columns), each of S keys and zeros up to vps pairs (a tile of 32 keys starting
// at any key reads padding, never past the row). Only taken while a group of entries fits
// kValuePairsMaxBytes (the same bytes as V, so about V's share of the cache either way).
constexpr index_t kValuePairsMaxBytes = index_t(64) << 20;

struct ValuePairs {
  std::vector<std::uint32_t, Eigen::aligned_allocator<std::uint32_t>> data;
  index_t b0 = 0, rows = 0, vps = 0;
  const std::uint32_t* entry(index_t b) const { return data.data() + (b - b0) * rows * vps; }
  std::uint32_t* entry(index_t b) { return data.data() + (b - b0) * rows * vps; }
};

// A unit's view of its entry's packed values (vpre: the group's ValuePairs, or null).
template <typename In, typename Acc>
void use_value_pairs(Block<In, Acc>& k, const ValuePairs* vpre) {
  k.Vpre = vpre ? vpre->entry(k.b) : nullptr;
  k.vcs = vpre ? 2 * vpre->vps : 0;
}

// Where a unit's results go: the final rows (out, and weights/lse when given) or, for a key
// chunk of a split block, its raw state (partial: O^T, then M, then Lsum).
template <typename Out, typename Acc>
struct BlockOut {
  Out* out = nullptr;      // (N..., L, Ev)
  Acc* weights = nullptr;  // (N..., L, S) or null
  Acc* lse = nullptr;      // (N..., L) or null
  Acc* partial = nullptr;  // ((Ev + 2) * Bq) or null
};

// Writes a finished unit's rows: out normalised (unless the weights pass already divided by
// the sum), lse by the one formula.
template <typename In, typename Acc, typename Out>
void write_rows(Block<In, Acc>& k, const BlockOut<Out, Acc>& o, bool normalised) {
  constexpr index_t P = vm::packet_size<Acc>();
  const index_t row0 = k.b * k.L + k.i0;
  if (o.lse)
    for (index_t i = 0; i < k.nq; ++i) o.lse[row0 + i] = softmax_state::lse(k.M[i], k.Lsum[i]);
  for (int c = 0; c < kC; ++c)
    ei::pstore(k.Lsum + c * P, normalised ? ei::pset1<Pk<Acc>>(Acc(1))
                                          : softmax_state::inverse_sum<Acc>(ei::pload<Pk<Acc>>(k.Lsum + c * P)));
  unpack_o(k.Ot, k.Lsum, k.nq, k.Ev, o.out + row0 * k.Ev);
}

// One unit of the blocked path: queries [i0, i0 + nq) of batch entry b against keys [ka, kz),
// dropout drop applied to its probabilities.
template <typename In, typename Acc, typename Out>
void attend_block(const SdpaProblem<In>& p, index_t b, index_t i0, index_t nq, index_t ka, index_t kz,
                  const BlockOut<Out, Acc>& o, const Dropout& drop, Products products,
                  const ValuePairs* vpre = nullptr) {
  constexpr index_t Bq = block_queries<Acc>();
  const bool pairs = products != Products::generic;
  const Scratch<Acc, SdpaBlockTag> ws(
      static_cast<size_t>(block_scratch_size<Acc>(p.q.dim(-1), p.v.dim(-1), pairs)));
  Block<In, Acc> k = make_block<In, Acc>(p, b, i0, nq, ws.data(), products);
  const TileUse tiles(k.amx);
  k.drop = drop;
  use_value_pairs(k, vpre);
  const KeyRange span = block_keys(k.vis, i0, nq, k.S, ka, kz);
  const index_t kmin = span.lo, kmax = span.hi;
  bool normalised = false;
  if (o.weights) {
    normalised = weights_passes(k, kmin, kmax, o.weights + (b * k.L + i0) * k.S);
  } else {
    for (index_t j0 = kmin; j0 < kmax; j0 += kBk) online_tile(k, j0, std::min(kBk, kmax - j0));
  }
  if (o.partial) {
    std::copy(k.Ot, k.Ot + k.Ev * Bq, o.partial);
    std::copy(k.M, k.M + Bq, o.partial + k.Ev * Bq);
    std::copy(k.Lsum, k.Lsum + Bq, o.partial + (k.Ev + 1) * Bq);
    return;
  }
  write_rows(k, o, normalised);
}

// Two query blocks of batch entry b as one unit (the pair path without weights): their key
// tiles interleaved, so each tile's K rows and V pairs, just read for the first block, are
// still in the cache for the second. Each block computes exactly what attend_block computes
// for it alone (same tiles in the same order), so the results do not change.
template <typename In, typename Acc, typename Out>
void attend_two_blocks(const SdpaProblem<In>& p, index_t b, const index_t (&i0)[2], const index_t (&nq)[2],
                       const BlockOut<Out, Acc>& o, const Dropout& drop, Products products, const ValuePairs* vpre) {
  const index_t size = block_scratch_size<Acc>(p.q.dim(-1), p.v.dim(-1), true);
  const Scratch<Acc, SdpaBlockTag> ws(static_cast<size_t>(2 * size));
  Block<In, Acc> k[2] = {make_block<In, Acc>(p, b, i0[0], nq[0], ws.data(), products),
                         make_block<In, Acc>(p, b, i0[1], nq[1], ws.data() + size, products)};
  const TileUse tiles(products == Products::amx);
  index_t kmin[2], kmax[2];
  for (int h = 0; h < 2; ++h) {
    k[h].drop = drop;
    use_value_pairs(k[h], vpre);
    const KeyRange span = block_keys(k[h].vis, i0[h], nq[h], k[h].S);
    kmin[h] = span.lo, kmax[h] = span.hi;
  }
  for (index_t t = 0;; ++t) {
    bool any = false;
    for (int h = 0; h < 2; ++h) {
      const index_t j0 = kmin[h] + t * kBk;
      if (j0 >= kmax[h]) continue;
      online_tile(k[h], j0, std::min(kBk, kmax[h] - j0));
      any = true;
    }
    if (!any) break;
  }
  for (int h = 0; h < 2; ++h) write_rows(k[h], o, false);
}

// Merges a query block's chunk partials (each O^T (Ev, Bq), M (Bq), Lsum (Bq)) in chunk order
// by the log-sum-exp merge; writes the normalised rows (nq, Ev) and their lse.
template <typename Out, typename Acc>
void merge_chunks(const Acc* parts, index_t chunks, index_t Ev, index_t nq, Out* out, Acc* lse) {
  constexpr index_t P = vm::packet_size<Acc>();
  constexpr index_t Bq = block_queries<Acc>();
  const index_t part = (Ev + 2) * Bq;
  const Scratch<Acc, SdpaMergeTag> ws(static_cast<size_t>((Ev + 2) * Bq));
  Acc* acc = ws.data();
  Acc* M = acc + Ev * Bq;
  Acc* Lsum = M + Bq;
  std::fill(acc, acc + Ev * Bq, Acc(0));
  std::fill(M, M + Bq, neg_inf<Acc>());
  std::fill(Lsum, Lsum + Bq, Acc(0));
  for (index_t c = 0; c < chunks; ++c) {
    const Acc* pc = parts + c * part;
    for (int g = 0; g < kC; ++g) {
      Pk<Acc> m = ei::pload<Pk<Acc>>(M + g * P), l = ei::pload<Pk<Acc>>(Lsum + g * P);
      const softmax_state::MergeFactors<Acc> f = softmax_state::merge<Acc>(
          m, l, ei::pload<Pk<Acc>>(pc + Ev * Bq + g * P), ei::pload<Pk<Acc>>(pc + (Ev + 1) * Bq + g * P));
      ei::pstore(M + g * P, m);
      ei::pstore(Lsum + g * P, l);
      for (index_t e = 0; e < Ev; ++e) {
        Acc* a = acc + e * Bq + g * P;
        ei::pstore(a, ei::pmadd(ei::pload<Pk<Acc>>(a), f.a, ei::pmul(ei::pload<Pk<Acc>>(pc + e * Bq + g * P), f.b)));
      }
    }
  }
  if (lse)
    for (index_t i = 0; i < nq; ++i) lse[i] = softmax_state::lse(M[i], Lsum[i]);
  for (int g = 0; g < kC; ++g)
    ei::pstore(Lsum + g * P, softmax_state::inverse_sum<Acc>(ei::pload<Pk<Acc>>(Lsum + g * P)));
  unpack_o(acc, Lsum, nq, Ev, out);
}

// ValuePairs' rows and pairs per row for S keys and Ev columns.
inline void value_pairs_shape(bool amx, index_t S, index_t Ev, index_t& rows, index_t& vps) {
  rows = amx ? round_up(Ev, 16) : (S + 1) / 2;
  vps = amx ? (round_up(S, 32) + 32) / 2 : round_up(Ev, 16);
}

// Entries per ValuePairs group: 0 (pack per tile) unless the pair path runs and some entry
// has more than one query block to share its packing.
inline index_t value_pair_group(Products products, index_t N, index_t blocks, index_t S, index_t Ev) {
  index_t rows = 0, vps = 0;
  value_pairs_shape(products == Products::amx, S, Ev, rows, vps);
  const index_t bytes = S > 0 && Ev > 0 ? rows * vps * 4 : 0;
  if (products == Products::generic || blocks < 2 || bytes == 0 || bytes > kValuePairsMaxBytes) return 0;
  return std::min(N, kValuePairsMaxBytes / bytes);
}

// Packs ValuePairs for entries [b0, b0 + n), tiles of kBk keys (even: pairs never straddle)
// spread over the threads.
template <typename In>
void pack_values(const SdpaProblem<In>& p, Products products, index_t b0, index_t n, ValuePairs& vp) {
#if defined(__AVX512BF16__)
  if constexpr (std::is_same<In, bf16>::value) {
    static_assert(kBk % 2 == 0, "value tiles must hold whole pairs");
    const bool amx = products == Products::amx;
    const index_t S = p.k.dim(-2), Ev = p.v.dim(-1), vs = p.v.stride(-2), ve = p.v.stride(-1);
    const index_t tiles = (S + kBk - 1) / kBk;
    vp.b0 = b0;
    value_pairs_shape(amx, S, Ev, vp.rows, vp.vps);
    vp.data.resize(static_cast<size_t>(n * vp.rows * vp.vps));
    parallel_for(n * tiles, [&](index_t u) {
      const index_t b = b0 + u / tiles, j0 = (u % tiles) * kBk, nj = std::min(kBk, S - j0);
      const In* v = p.v.data + p.v.batch_offset(b, 2) + j0 * vs;
      if (amx)  // the last tile writes the padding too
        pack_value_columns(v, vs, ve, nj, Ev, j0 + nj == S ? 2 * vp.vps - j0 : nj,
                           reinterpret_cast<In*>(vp.entry(b)) + j0, 2 * vp.vps);
      else
        pack_value_pairs(v, vs, ve, nj, Ev, vp.entry(b) + (j0 / 2) * vp.vps, vp.vps);
    });
  }
#endif
}


// The blocked path over all N batch entries (n = b, the flat batch index, for dropout). Out:
// the output's type (In, or float for a 16-bit call's float32 output), written by store_as.
template <typename In, typename Acc, typename Out>
void blocked(const SdpaProblem<In>& p, index_t N, Out* out, Acc* weights, Acc* lse, const Dropout& drop = Dropout{}) {
  constexpr index_t Bq = block_queries<Acc>();
  const Products products = products_of<In>();
  const bool pairs = products != Products::generic;
  const index_t L = p.q.dim(-2), S = p.k.dim(-2), Ev = p.v.dim(-1);
  const index_t blocks = (L + Bq - 1) / Bq;
  const index_t chunks = split_chunks(N * blocks, S, weights != nullptr);
  if (chunks == 1) {
    const index_t group = value_pair_group(products, N, blocks, S, Ev);
    ValuePairs vp;
    for (index_t b0 = 0; b0 < N; b0 += group ? group : N) {
      const index_t n = group ? std::min(group, N - b0) : N;
      if (group) pack_values(p, products, b0, n, vp);
      const BlockOut<Out, Acc> o{out, weights, lse, nullptr};
      if (pairs && !weights) {  // units of two query blocks (the last one alone when odd)
        const index_t twos = (blocks + 1) / 2;
        parallel_for(n * twos, [&](index_t u) {
          // Later query blocks see more keys under a causal mask: hand them out first.
          const index_t b = b0 + u / twos, hi = blocks - 1 - 2 * (u % twos);
          const ValuePairs* vpre = group ? &vp : nullptr;
          if (hi == 0) {
            attend_block<In, Acc, Out>(p, b, 0, std::min(Bq, L), 0, S, o, drop, products, vpre);
            return;
          }
          const index_t i0[2] = {hi * Bq, (hi - 1) * Bq};
          const index_t nq[2] = {std::min(Bq, L - i0[0]), Bq};
          attend_two_blocks<In, Acc, Out>(p, b, i0, nq, o, drop, products, vpre);
        }, true);
        continue;
      }
      parallel_for(n * blocks, [&](index_t u) {
        // Later query blocks see more keys under a causal mask: hand them out first.
        const index_t b = b0 + u / blocks, i0 = (blocks - 1 - u % blocks) * Bq;
        attend_block<In, Acc, Out>(p, b, i0, std::min(Bq, L - i0), 0, S, o, drop, products,
                                   group ? &vp : nullptr);
      }, true);
    }
    return;
  }
  // Few query blocks and many keys: every (block, key chunk) is a unit, merged afterwards.
  const index_t chunk = (S + chunks - 1) / chunks;
  const index_t part = (Ev + 2) * Bq;
  std::vector<Acc, Eigen::aligned_allocator<Acc>> parts(static_cast<size_t>(N * blocks * chunks * part));
  parallel_for(N * blocks * chunks, [&](index_t u) {
    const index_t c = u % chunks, bq = u / chunks;
    const index_t b = bq / blocks, i0 = (bq % blocks) * Bq;
    BlockOut<Out, Acc> o;
    o.partial = parts.data() + u * part;
    attend_block<In, Acc, Out>(p, b, i0, std::min(Bq, L - i0), c * chunk, std::min(S, (c + 1) * chunk), o, drop,
                               products);
  }, true);
  parallel_for(N * blocks, [&](index_t bq) {
    const index_t b = bq / blocks, i0 = (bq % blocks) * Bq, nq = std::min(Bq, L - i0);
    merge_chunks<Out, Acc>(parts.data() + bq * chunks * part, chunks, Ev, nq, out + (b * L + i0) * Ev,
                          lse ? lse + b * L + i0 : nullptr);
  });
}

}  // namespace sdpa_detail
}  // namespace attnext
