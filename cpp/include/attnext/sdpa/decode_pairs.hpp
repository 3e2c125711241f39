// The decode path's bfloat16 pair kernels (vdpbf16ps; micro.hpp's header describes the pair
// form). Decode reads every K and V element once, so with bfloat16's halved bytes it is
// memory bound only if the arithmetic per key stays small: these kernels spend it on products
// rather than on per-key reductions (q . k) or per-element conversions (P V).
//
//   q . k: 16 keys at a time, one vdpbf16ps accumulator per key over E (q and the key rows
//          read as pairs in memory order), the 16 accumulators reduced together by one
//          transpose-add tree into one vector of 16 scores.
//   P V:   two keys at a time: rows V[j], V[j+1] interleaved (unpacklo/hi_epi16) into pairs
//          (V[j, c], V[j+1, c]) times the broadcast pair (P[j], P[j+1]); the unpack's lane
//          order is undone once per row, at the store. An odd last key pairs with zero.
// The products are the fallback's (bfloat16 operands, exact in float32); only the order of
// the float32 additions differs.
#pragma once

#include "micro.hpp"

#if defined(__AVX512BF16__)
namespace attnext {
namespace sdpa_detail {

// Keys per q . k micro-tile: one accumulator each, reduced together by reduce16.
constexpr index_t kDecodeScoreKeys = 16;
// 32-element blocks of E per q . k pass, the query's blocks held in registers beside the 16
// accumulators (E <= 128 in one pass).
constexpr int kDecodeScoreBlocks = 4;
// 32-column blocks of V per P V pass: two accumulators each, so four blocks (Ev = 128) use 8
// registers plus 8 for the loaded and unpacked rows.
constexpr int kDecodeValueBlocks = 4;

// The mask of the first min(n, 32) of 32 16-bit lanes.
inline __mmask32 lanes32(index_t n) { return n >= 32 ? __mmask32(0xffffffffu) : __mmask32((1u << n) - 1u); }

// out[r] = the sum of the 16 lanes of a[r], r < 16: a transpose-add tree (in-lane unpacks,
// then 128-bit lane shuffles), 15 additions for 16 sums instead of 16 full reductions.
inline __m512 reduce16(__m512 a[16]) {
  __m512 b[8], c[4], d[2];
  // b[k]: per 128-bit lane, two partial sums of a[2k] (lanes 0, 2) and of a[2k+1] (1, 3).
  for (int k = 0; k < 8; ++k)
    b[k] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * k], a[2 * k + 1]), _mm512_unpackhi_ps(a[2 * k], a[2 * k + 1]));
  // c[k]: per 128-bit lane, one partial sum of each of a[4k .. 4k+3], in that order.
  for (int k = 0; k < 4; ++k) {
    const __m512d x = _mm512_castps_pd(b[2 * k]), y = _mm512_castps_pd(b[2 * k + 1]);
    c[k] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  // d[k]: 128-bit lanes (L0 + L2, L1 + L3) of c[2k], then those of c[2k+1].
  for (int k = 0; k < 2; ++k)
    d[k] = _mm512_add_ps(_mm512_shuffle_f32x4(c[2 * k], c[2 * k + 1], 0x44),
                         _mm512_shuffle_f32x4(c[2 * k], c[2 * k + 1], 0xee));
  // lane l of the result: c[l]'s four lanes summed, i.e. a[4l .. 4l+3] in order.
  return _mm512_add_ps(_mm512_shuffle_f32x4(d[0], d[1], 0x88), _mm512_shuffle_f32x4(d[0], d[1], 0xdd));
}

// s[r] = q . K[r] for n <= 16 keys (rows at k + r * ks, contiguous, E elements; q contiguous
// bfloat16), over the EB 32-element blocks of E from e0 on, held in registers: added to s when
// add, else stored. Each row is read whole before the next (the order the hardware prefetcher
// follows); lanes past n repeat key n - 1 (no read past the keys) and are not stored.
template <int EB>
inline void scores16_pairs(const bf16* q, const bf16* k, index_t ks, index_t e0, index_t E, index_t n, bool add,
                           float* s) {
  __m512bh qv[EB];
  __mmask32 m[EB];
  for (int u = 0; u < EB; ++u) {
    m[u] = lanes32(E - e0 - 32 * u);
    qv[u] = as_bh(_mm512_maskz_loadu_epi16(m[u], q + e0 + 32 * u));
  }
  __m512 acc[16];
  for (int r = 0; r < 16; ++r) {
    const bf16* row = k + std::min<index_t>(r, n - 1) * ks + e0;
    acc[r] = _mm512_setzero_ps();
    for (int u = 0; u < EB; ++u)
      acc[r] = _mm512_dpbf16_ps(acc[r], qv[u], as_bh(_mm512_maskz_loadu_epi16(m[u], row + 32 * u)));
  }
  const __mmask16 keep = __mmask16(n >= 16 ? 0xffffu : (1u << n) - 1u);
  const __m512 sum = reduce16(acc);
  _mm512_mask_storeu_ps(s, keep, add ? _mm512_add_ps(_mm512_maskz_loadu_ps(keep, s), sum) : sum);
}

// How far ahead of the tile being scored the key rows are asked for: the hardware prefetcher
// follows a stream only within a 4 KB page and starts each page late, and 32 keys are a page
// at E = 64.
constexpr index_t kDecodeKeysAhead = 32;

// Asks the caches for rows [0, n) of x (row stride xs, cols elements each) into L2: the decode
// chunk's value rows, read by P V after the scores and the softmax, which leave the memory
// idle unless its stream was started while the keys were read.
inline void prefetch_rows(const bf16* x, index_t xs, index_t n, index_t cols) {
  constexpr index_t line = 64 / sizeof(bf16);
  for (index_t r = 0; r < n; ++r)
    for (index_t c = 0; c < cols; c += line) _mm_prefetch(reinterpret_cast<const char*>(x + r * xs + c), _MM_HINT_T1);
}

// s[i * ss + j] = q_i . K[j] for L query rows (q_i at q + i * E) and keys j in [0, n)
// (scores16_pairs over the keys, and over E in passes of kDecodeScoreBlocks blocks); each
// 16-key tile is scored for every row while it is in L1.
inline void scores_pairs(const bf16* q, index_t L, const bf16* k, index_t ks, index_t E, index_t n, float* s,
                         index_t ss) {
  for (index_t j = 0; j < n; j += kDecodeScoreKeys) {
    const index_t nj = std::min(kDecodeScoreKeys, n - j);
    const bf16* kj = k + j * ks;
    for (index_t i = 0; i < L; ++i) {
      const bf16* qi = q + i * E;
      float* si = s + i * ss + j;
      index_t e = 0;
      for (; e + 32 * kDecodeScoreBlocks < E; e += 32 * kDecodeScoreBlocks)
        scores16_pairs<kDecodeScoreBlocks>(qi, kj, ks, e, E, nj, e > 0, si);
      switch ((E - e + 31) / 32) {
        case 1: scores16_pairs<1>(qi, kj, ks, e, E, nj, e > 0, si); break;
        case 2: scores16_pairs<2>(qi, kj, ks, e, E, nj, e > 0, si); break;
        case 3: scores16_pairs<3>(qi, kj, ks, e, E, nj, e > 0, si); break;
        case 4: scores16_pairs<4>(qi, kj, ks, e, E, nj, e > 0, si); break;
        default: break;
      }
    }
  }
  static_assert(kDecodeScoreBlocks == 4, "the remainder switch above covers kDecodeScoreBlocks cases");
}

// o[c] = sum_j P[j] V[j, c] for the columns c in [c0, c0 + 32 NB) below Ev and n keys: P as
// bfloat16 operands in p, read in pairs (P[j], P[j+1]) (an odd n's last key pairs with zero);
// V rows at v + j * vs, contiguous.
template <int NB>
inline void pv_pairs_block(const bf16* p, const bf16* v, index_t vs, index_t n, index_t c0, index_t Ev,
                           float* o) {
  __m512 lo[NB], hi[NB];
  __mmask32 m[NB];
  for (int u = 0; u < NB; ++u) {
    lo[u] = hi[u] = _mm512_setzero_ps();
    m[u] = lanes32(Ev - c0 - 32 * u);
  }
  auto step = [&](index_t j, const bf16* b) {  // keys j and j + 1 (rows at b; zero when null)
    const __m512bh pj = as_bh(_mm512_set1_epi32(int(b ? pair_at(p + j) : std::uint32_t(p[j].bits))));
    const bf16* a = v + j * vs + c0;
    for (int u = 0; u < NB; ++u) {
      const __m512i x = _mm512_maskz_loadu_epi16(m[u], a + 32 * u);
      const __m512i y = b ? _mm512_maskz_loadu_epi16(m[u], b + c0 + 32 * u) : _mm512_setzero_si512();
      lo[u] = _mm512_dpbf16_ps(lo[u], as_bh(_mm512_unpacklo_epi16(x, y)), pj);
      hi[u] = _mm512_dpbf16_ps(hi[u], as_bh(_mm512_unpackhi_epi16(x, y)), pj);
    }
  };
  index_t j = 0;
  for (; j + 2 <= n; j += 2) step(j, v + (j + 1) * vs);
  if (j < n) step(j, nullptr);
  // lo holds columns 8l + (0..3) in 128-bit lane l, hi 8l + (4..7): back to column order.
  alignas(64) static const int kFirst[16] = {0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23};
  alignas(64) static const int kSecond[16] = {8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31};
  const __m512i first = _mm512_load_si512(kFirst), second = _mm512_load_si512(kSecond);
  for (int u = 0; u < NB; ++u) {
    const index_t c = c0 + 32 * u;
    const __mmask32 mu = m[u];
    _mm512_mask_storeu_ps(o + c, __mmask16(mu), _mm512_permutex2var_ps(lo[u], first, hi[u]));
    _mm512_mask_storeu_ps(o + c + 16, __mmask16(mu >> 16), _mm512_permutex2var_ps(lo[u], second, hi[u]));
  }
}

// Decode's P V for one query row on the pair path: o[0, Ev) = sum_j P[j] V[j, :] over n keys,
// P as bfloat16 operands in p[0, n).
inline void row_pv_pairs(const bf16* p, const bf16* v, index_t vs, index_t n, index_t Ev, float* o) {
  constexpr index_t cols = 32 * kDecodeValueBlocks;
  index_t c = 0;
  for (; c + cols <= Ev; c += cols) pv_pairs_block<kDecodeValueBlocks>(p, v, vs, n, c, Ev, o);
  switch ((Ev - c + 31) / 32) {
    case 1: pv_pairs_block<1>(p, v, vs, n, c, Ev, o); break;
    case 2: pv_pairs_block<2>(p, v, vs, n, c, Ev, o); break;
    case 3: pv_pairs_block<3>(p, v, vs, n, c, Ev, o); break;
    default: break;
  }
  static_assert(kDecodeValueBlocks == 4, "the remainder switch above covers kDecodeValueBlocks - 1 cases");
}

}  // namespace sdpa_detail
}  // namespace attnext
#endif  // __AVX512BF16__
