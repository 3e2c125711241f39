// SDPA's decode path (L <= kDecodeMaxQueries, no weights). Keys are cut into fixed chunks of
// decode_chunk_keys<In>(); a unit is (batch entry, chunk) and computes every query row's partial softmax
// state (max, sum, unnormalised output) from dot products along E; the partials are merged by
// the log-sum-exp merge in chunk order. One query thus uses every core, and since the chunks
// depend only on S the result does not depend on the thread count.
// Dropout (dropout.hpp) acts on a row's probabilities after they entered its sum and before
// P V, as in the blocked path, with the same coordinates (n = b).
#pragma once

#include <algorithm>
#include <vector>

#include "../dropout.hpp"
#include "../mask.hpp"
#include "../online_softmax.hpp"
#include "../parallel.hpp"
#include "../scratch.hpp"
#include "decode_pairs.hpp"
#include "micro.hpp"
#include "problem.hpp"

namespace attnext {
namespace sdpa_detail {

// Keys per decode chunk: a chunk's K and V (2 x 64 KB at E = 64, float) stay in L2 between the
// score and the P V pass while the chunks still outnumber the cores at a few thousand keys;
// chosen from a sweep of 128/256/512 (docs/benchmarks-notes-h1.md).
constexpr index_t kDecodeChunk = 256;
// The 16-bit types take chunks of the same bytes (twice the keys): every chunk starts its K
// and V streams from memory cold, and at half the bytes per key that start-up would otherwise
// be paid twice as often per byte read.
template <typename In>
constexpr index_t decode_chunk_keys() {
  return sizeof(In) == 2 ? 2 * kDecodeChunk : kDecodeChunk;
}
// Up to this many query rows the decode path's per-row dot products beat packing Q into the
// blocked path's tiles (a block holds 64 float queries, mostly padding at a handful of rows).
constexpr index_t kDecodeMaxQueries = 16;

struct SdpaDecodeQTag {};  // scratch.hpp tags
struct SdpaDecodeSTag {};
struct SdpaDecodeKTag {};
struct SdpaDecodeVTag {};
struct SdpaDecodeQhTag {};
struct SdpaDecodePhTag {};

// s[i * n + j] = q_i . k_j for the L query rows and the nv keys of a chunk (rows at k + j * ks,
// contiguous), times scale unless folded. The bfloat16 pair path (pairs; qh: the packed query
// rows as bfloat16, exact: they are product operands already) scores every key in 16-key tiles
// (decode_pairs.hpp), those a row does not see being overwritten by mask_scores, and asks for
// each tile's value rows (at v + j * vs, Ev elements) on the way, so that V's stream runs
// beside K's instead of after the softmax, and for the key rows kDecodeKeysAhead on; otherwise
// dot on qf for the keys each row sees (range).
template <typename In, typename Acc>
void decode_scores(bool pairs, const Acc* qf, const In* qh, const In* k, index_t ks, index_t L, index_t E, index_t ja,
                   index_t nv, index_t n, const KeyRange* range, bool folded, Acc scale, Acc* s, const In* v,
                   index_t vs, index_t Ev) {
#if defined(__AVX512BF16__)
  if constexpr (std::is_same<In, bf16>::value)
    if (pairs && E > 0) {  // E = 0: every score is the empty sum, 0, which dot gives below
      for (index_t j = 0; j < nv; j += kDecodeScoreKeys) {
        const index_t nj = std::min(kDecodeScoreKeys, nv - j);
        prefetch_rows(v + j * vs, vs, nj, Ev);
        const index_t jk = j + kDecodeKeysAhead;
        if (jk < nv) prefetch_rows(k + jk * ks, ks, std::min(kDecodeScoreKeys, nv - jk), E);
        scores_pairs(qh, L, k + j * ks, ks, E, nj, s + j, n);
      }
      if (!folded)
        for (index_t i = 0; i < L; ++i)
          for (index_t j = 0; j < nv; ++j) s[i * n + j] *= scale;
      return;
    }
#endif
  for (index_t j = 0; j < nv; ++j) {
    const In* kj = k + j * ks;
    for (index_t i = 0; i < L; ++i)
      if (ja + j >= range[i].lo && ja + j < range[i].hi)
        s[i * n + j] = folded ? dot(qf + i * E, kj, E) : dot(qf + i * E, kj, E) * scale;
  }
}

// o[0, Ev) = sum_j p[j] V[j, :] over one row's n keys, p already the rounded product operands
// (V rows at v + j * vs, contiguous): on the pair path from p's bfloat16 copy ph (a scratch of
// n), else by row_pv.
template <typename In, typename Acc>
void decode_pv(bool pairs, const Acc* p, In* ph, const In* v, index_t vs, index_t n, index_t Ev, Acc* o) {
#if defined(__AVX512BF16__)
  if constexpr (std::is_same<In, bf16>::value)
    if (pairs) {
      store_row(p, n, ph);  // exact: p holds bfloat16 values
      row_pv_pairs(ph, v, vs, n, Ev, o);
      return;
    }
#endif
  row_pv(p, v, vs, n, Ev, o);
}

// Partial states of keys [c0, c1) for every query row (L <= kDecodeMaxQueries) of batch entry b.
// part: (L, Ev + 2) = unnormalised output, then the max, then the sum.
template <typename In, typename Acc>
void decode_chunk(const SdpaProblem<In>& p, index_t b, index_t c0, index_t c1, Acc* part, const Dropout& drop,
                  bool pairs) {
  const index_t L = p.q.dim(-2), E = p.q.dim(-1), S = p.k.dim(-2), Ev = p.v.dim(-1);
  const Visibility vis = visibility(p, b);
  const index_t n = c1 - c0, w = Ev + 2;
  // Keys any row may see inside the chunk.
  const index_t ja = std::max(c0, visible_keys(vis, 0, S).lo);
  const index_t jz = std::max(ja, std::min(c1, visible_keys(vis, L - 1, S).hi));
  const index_t nv = jz - ja;
  const Scratch<Acc, SdpaDecodeQTag> qs(static_cast<size_t>(L * E + 1));
  const Scratch<Acc, SdpaDecodeSTag> ss(static_cast<size_t>(2 * n + L * n + 1));
  const Scratch<In, SdpaDecodeKTag> kbuf(p.k.stride(-1) == 1 ? 0 : static_cast<size_t>(nv * E));
  const Scratch<In, SdpaDecodeVTag> vbuf(p.v.stride(-1) == 1 ? 0 : static_cast<size_t>(nv * Ev));
  Acc* qbuf = qs.data();
  Acc* s = ss.data();
  Acc* pre = s + L * n;  // a row's scores before the exponential, for a careful P V
  const Acc scale = static_cast<Acc>(p.scale);
  const bool folded = pack_q_rows(p.q.data + p.q.batch_offset(b, 2), p.q.stride(-2), p.q.stride(-1), L, E, scale, qbuf);
  const Scratch<In, SdpaDecodeQhTag> qhs(pairs ? static_cast<size_t>(L * E + 1) : 0);
  In* qh = qhs.data();
  if (pairs) store_row(qbuf, L * E, qh);
  const Scratch<In, SdpaDecodePhTag> phs(pairs ? static_cast<size_t>(n + 1) : 0);
  In* ph = phs.data();
  index_t kcs = 0, vcs = 0;
  const In* kc = contiguous_rows(p.k.data + p.k.batch_offset(b, 2) + ja * p.k.stride(-2), p.k.stride(-2),
                                 p.k.stride(-1), nv, E, kbuf.data(), kcs);
  const In* vc = contiguous_rows(p.v.data + p.v.batch_offset(b, 2) + ja * p.v.stride(-2), p.v.stride(-2),
                                 p.v.stride(-1), nv, Ev, vbuf.data(), vcs);
  KeyRange range[kDecodeMaxQueries];
  for (index_t i = 0; i < L; ++i) range[i] = visible_keys(vis, i, S);
  // s[i][j - ja]: scores of the keys row i sees (the rest are hidden by mask_scores below).
  decode_scores(pairs, qbuf, qh, kc, kcs, L, E, ja, nv, n, range, folded, scale, s, vc, vcs, Ev);
  int values_finite = -1;  // checked once, only if some row hides a key of the chunk
  for (index_t i = 0; i < L; ++i) {
    const KeyRange r = range[i];
    Acc* si = s + i * n;
    Acc* pi = part + i * w;
    const bool hidden = mask_scores(si, index_t(1), nv, ja, r, mask_row(p.mask, b * L + i, ja));
    // The row's own keys [a, z) of the chunk (relative to ja); outside them P V never looks.
    const index_t a = std::min(nv, std::max(r.lo, ja) - ja), z = std::max(a, std::min(jz, r.hi) - ja);
    Pk<Acc> m = ei::pset1<Pk<Acc>>(neg_inf<Acc>());
    const softmax_state::Step<Acc> st = softmax_state::raise_max<Acc>(
        m, ei::pset1<Pk<Acc>>(z > a ? vm::max_propagate_nan(si + a, z - a) : neg_inf<Acc>()));
    pi[Ev] = ei::pfirst(m);
    std::fill(pi, pi + Ev, Acc(0));
    pi[Ev + 1] = Acc(0);
    if (pi[Ev] == neg_inf<Acc>()) continue;  // nothing visible: the empty state
    if (hidden && values_finite < 0) values_finite = rows_finite<Acc>(vc, vcs, index_t(1), nv, Ev);
    const bool careful = hidden && values_finite == 0;
    if (careful) std::copy(si + a, si + z, pre);
    pi[Ev + 1] = ei::pfirst(softmax_state::add_sum<Acc>(ei::pset1<Pk<Acc>>(Acc(0)), st,
                                                        ei::pset1<Pk<Acc>>(vm::exp_shifted_sum(si + a, z - a,
                                                                                               ei::pfirst(st.shift)))));
    if (drop.active())  // the row's keys [ja + a, ja + z), contiguous in si
      apply_dropout_tile(drop, static_cast<std::uint64_t>(b), i, index_t(1), ja + a, z - a, si + a, index_t(0),
                         index_t(1));
    round_operands<In>(si + a, z - a);  // P as a product operand, after it entered the sum
    if (!careful) {
      decode_pv(pairs, si + a, ph, vc + a * vcs, vcs, z - a, Ev, pi);
    } else {  // hidden keys (score -inf) skipped: a NaN/inf in their value rows never enters
      for (index_t j = a; j < z; ++j)
        if (pre[j - a] != neg_inf<Acc>()) axpy(si[j], vc + j * vcs, pi, Ev);
    }
  }
}

// The decode path over all N batch entries; Out as in blocked().
template <typename In, typename Acc, typename Out>
void decode(const SdpaProblem<In>& p, index_t N, Out* out, Acc* lse, const Dropout& drop = Dropout{}) {
  const index_t L = p.q.dim(-2), S = p.k.dim(-2), Ev = p.v.dim(-1);
  constexpr index_t chunk = decode_chunk_keys<In>();
  const index_t chunks = std::max<index_t>(1, (S + chunk - 1) / chunk);
  const index_t w = Ev + 2;
  const bool pairs = pair_path<In>();
  std::vector<Acc, Eigen::aligned_allocator<Acc>> parts(static_cast<size_t>(N * chunks * L * w));
  parallel_for(N * chunks, [&](index_t u) {
    const index_t b = u / chunks, c = u % chunks;
    const index_t c0 = c * chunk, c1 = std::min(S, c0 + chunk);
    decode_chunk<In, Acc>(p, b, c0, c1, parts.data() + u * L * w, drop, pairs);
  }, true);
  // Merge the chunks of each row by log-sum-exp, in chunk order.
  parallel_for(N, [&](index_t b) {
    const Scratch<Acc, SdpaMergeTag> ws(static_cast<size_t>(Ev + 1));
    Acc* o = ws.data();
    for (index_t i = 0; i < L; ++i) {
      Acc m = neg_inf<Acc>(), l = Acc(0);
      std::fill(o, o + Ev, Acc(0));
      for (index_t c = 0; c < chunks; ++c) {
        const Acc* pc = parts.data() + ((b * chunks + c) * L + i) * w;
        const softmax_state::MergeFactorsOne<Acc> f = softmax_state::merge_one(m, l, pc[Ev], pc[Ev + 1]);
        for (index_t e = 0; e < Ev; ++e) o[e] = o[e] * f.a + pc[e] * f.b;
      }
      const Acc inv = softmax_state::inverse_sum_one(l);
      Out* dst = out + (b * L + i) * Ev;
      store_scaled(o, inv, Ev, dst);
      if (lse) lse[b * L + i] = softmax_state::lse(m, l);
    }
  });
}

}  // namespace sdpa_detail
}  // namespace attnext
