// The blocked path's two products on AMX tiles (bfloat16 inputs, while amx_active()), in the
// pair path's geometry (micro.hpp): queries in the columns, Bq = 64 of them per block.
//   S^T (keys, Bq) = K (keys, E) . Q^T    A: K rows as they are;   B: Qp, Q's pairs over e
//   O^T (Ev, Bq)  += V^T (Ev, keys) . P^T  A: V's columns (Vt);     B: Pp, P's pairs over keys
// Qp and Pp are already the pair-interleaved B operand tdpbf16ps reads, so only V changes
// layout: its columns are packed once per batch entry (pack_value_columns) or per tile.
// Every tile is 16 rows x 64 bytes (one configuration for a whole unit): operands are padded
// with zeros to whole tiles (E to 32, keys to 32, Ev to 16) where they are copied, and read in
// place only where the extra elements a full tile reads are real, finite-or-not values that
// land in rows the caller ignores (never multiplied into a kept result).
// Products of bfloat16 are exact in float32 and sums are float32, as on the other paths;
// the summation order is the tiles' own, so results differ from vdpbf16ps's in the last bits.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "../amx.hpp"
#include "micro.hpp"

namespace attnext {
namespace sdpa_detail {

constexpr index_t round_up(index_t n, index_t m) { return (n + m - 1) / m * m; }

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)

// Tiles (full_tiles()) 0-3: C (float32 accumulators), 4-5: A, 6-7: B.

// One step of a 2 x 2 block of C tiles: A row halves a0, a1 (a_ld bytes per row) times B
// column halves b0, b1 (b_ld bytes per pair row) into C tiles 0 (a0 b0), 1 (a0 b1), 2 (a1 b0),
// 3 (a1 b1).
inline void dot_2x2(const void* a0, const void* a1, index_t a_ld, const void* b0, const void* b1, index_t b_ld) {
  _tile_loadd(4, a0, a_ld);
  _tile_loadd(5, a1, a_ld);
  _tile_loadd(6, b0, b_ld);
  _tile_loadd(7, b1, b_ld);
  _tile_dpbf16ps(0, 4, 6);
  _tile_dpbf16ps(1, 4, 7);
  _tile_dpbf16ps(2, 5, 6);
  _tile_dpbf16ps(3, 5, 7);
}

// St rows [0, rows) (rows a multiple of 32) = K rows (k, row stride ks elements, E32 columns
// read, a multiple of 32) times Q^T from Qp (E32 / 2 pair rows of Bq, zero past E).
inline void qk_tiles(const bf16* k, index_t ks, index_t rows, index_t E32, const std::uint32_t* Qp, float* St) {
  constexpr index_t Bq = block_queries<float>();
  constexpr index_t ld = Bq * 4;  // bytes per row of St and Qp
  const index_t kb = ks * 2;
  for (index_t r = 0; r < rows; r += 32)
    for (index_t g = 0; g < Bq; g += 32) {
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      for (index_t e = 0; e < E32; e += 32)
        dot_2x2(k + r * ks + e, k + (r + 16) * ks + e, kb, Qp + (e / 2) * Bq + g, Qp + (e / 2) * Bq + g + 16, ld);
      float* s = St + r * Bq + g;
      _tile_stored(0, s, ld);
      _tile_stored(1, s + 16, ld);
      _tile_stored(2, s + 16 * Bq, ld);
      _tile_stored(3, s + 16 * Bq + 16, ld);
    }
}

// Ot rows [0, Ev16) += Vt (Ev16 rows of keys32 keys, row stride vts elements) times P^T from Pp
// (keys32 / 2 pair rows of Bq). Two value rows of 16 at a time share each Pp tile; an odd last
// group of 16 runs alone.
inline void pv_tiles(const bf16* vt, index_t vts, index_t keys32, const std::uint32_t* Pp, float* Ot, index_t Ev16) {
  constexpr index_t Bq = block_queries<float>();
  constexpr index_t ld = Bq * 4;
  const index_t vb = vts * 2;
  index_t e = 0;
  for (; e + 32 <= Ev16; e += 32)
    for (index_t g = 0; g < Bq; g += 32) {
      float* o = Ot + e * Bq + g;
      _tile_loadd(0, o, ld);
      _tile_loadd(1, o + 16, ld);
      _tile_loadd(2, o + 16 * Bq, ld);
      _tile_loadd(3, o + 16 * Bq + 16, ld);
      for (index_t j = 0; j < keys32; j += 32)
        dot_2x2(vt + e * vts + j, vt + (e + 16) * vts + j, vb, Pp + (j / 2) * Bq + g, Pp + (j / 2) * Bq + g + 16, ld);
      _tile_stored(0, o, ld);
      _tile_stored(1, o + 16, ld);
      _tile_stored(2, o + 16 * Bq, ld);
      _tile_stored(3, o + 16 * Bq + 16, ld);
    }
  if (e == Ev16) return;
  for (index_t g = 0; g < Bq; g += 32) {
    float* o = Ot + e * Bq + g;
    _tile_loadd(0, o, ld);
    _tile_loadd(1, o + 16, ld);
    for (index_t j = 0; j < keys32; j += 32) {
      _tile_loadd(4, vt + e * vts + j, vb);
      _tile_loadd(6, Pp + (j / 2) * Bq + g, ld);
      _tile_loadd(7, Pp + (j / 2) * Bq + g + 16, ld);
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 4, 7);
    }
    _tile_stored(0, o, ld);
    _tile_stored(1, o + 16, ld);
  }
}

// An SDPA unit's tiles: full_tiles() loaded on the calling thread while the unit runs on
// AMX (on), released when it ends.
class TileUse {
 public:
  explicit TileUse(bool on) : on_(on) {
    if (on_) _tile_loadconfig(&full_tiles());
  }
  ~TileUse() {
    if (on_) _tile_release();
  }
  TileUse(const TileUse&) = delete;
  TileUse& operator=(const TileUse&) = delete;

 private:
  bool on_;
};

// O^T's rows [0, Ev) times alpha (one factor per query lane) before the tiles add a key
// tile's P V; nothing to do when every factor is 1 (no row's max moved: most tiles after the
// first), and x * 1 is x.
inline void rescale_rows(float* Ot, index_t Ev, const __m512* alpha) {
  constexpr index_t Bq = block_queries<float>();
  const __m512 one = _mm512_set1_ps(1.0f);
  __mmask16 moved = 0;
  for (int c = 0; c < kC; ++c) moved |= _mm512_cmp_ps_mask(alpha[c], one, _CMP_NEQ_UQ);
  if (!moved) return;
  for (index_t e = 0; e < Ev; ++e)
    for (int c = 0; c < kC; ++c) {
      float* o = Ot + e * Bq + c * 16;
      _mm512_store_ps(o, _mm512_mul_ps(_mm512_load_ps(o), alpha[c]));
    }
}

#else
struct TileUse {  // no AMX in this build: no unit ever runs on tiles
  explicit TileUse(bool) {}
};
#endif  // AMX

// K rows [0, nj) (row stride ks, element stride ke) copied to dst as rows32 rows of E32, zeros
// past nj and past E: the A operand of qk_tiles where K cannot be read in place.
inline void copy_key_rows(const bf16* k, index_t ks, index_t ke, index_t nj, index_t E, index_t rows32, index_t E32,
                          bf16* dst) {
  std::memset(static_cast<void*>(dst), 0, sizeof(bf16) * static_cast<size_t>(rows32 * E32));
  for (index_t j = 0; j < nj; ++j) {
    const bf16* src = k + j * ks;
    bf16* row = dst + j * E32;
    if (ke == 1)
      std::copy(src, src + E, row);
    else
      for (index_t e = 0; e < E; ++e) row[e] = src[e * ke];
  }
}

#if defined(__AVX512F__)
// r[c] = column c of the 16 x 16 matrix of 32-bit elements whose rows were r[0..15]: pairs
// within 128-bit lanes, then pairs of pairs, then the 4 x 4 transpose of 128-bit lanes.
inline void transpose16x16_epi32(__m512i r[16]) {
  __m512i t[16];
  for (int k = 0; k < 8; ++k) {
    t[2 * k] = _mm512_unpacklo_epi32(r[2 * k], r[2 * k + 1]);
    t[2 * k + 1] = _mm512_unpackhi_epi32(r[2 * k], r[2 * k + 1]);
  }
  // s[4g + m], lane L: column 4L + m of rows 4g .. 4g + 3.
  __m512i s[16];
  for (int g = 0; g < 4; ++g) {
    s[4 * g] = _mm512_unpacklo_epi64(t[4 * g], t[4 * g + 2]);
    s[4 * g + 1] = _mm512_unpackhi_epi64(t[4 * g], t[4 * g + 2]);
    s[4 * g + 2] = _mm512_unpacklo_epi64(t[4 * g + 1], t[4 * g + 3]);
    s[4 * g + 3] = _mm512_unpackhi_epi64(t[4 * g + 1], t[4 * g + 3]);
  }
  // Column 4L + m: lane L of s[m], s[4 + m], s[8 + m], s[12 + m], in that order.
  for (int m = 0; m < 4; ++m) {
    const __m512i ab02 = _mm512_shuffle_i32x4(s[m], s[4 + m], 0x44), ab13 = _mm512_shuffle_i32x4(s[m], s[4 + m], 0xee);
    const __m512i cd02 = _mm512_shuffle_i32x4(s[8 + m], s[12 + m], 0x44);
    const __m512i cd13 = _mm512_shuffle_i32x4(s[8 + m], s[12 + m], 0xee);
    r[m] = _mm512_shuffle_i32x4(ab02, cd02, 0x88);
    r[4 + m] = _mm512_shuffle_i32x4(ab02, cd02, 0xdd);
    r[8 + m] = _mm512_shuffle_i32x4(ab13, cd13, 0x88);
    r[12 + m] = _mm512_shuffle_i32x4(ab13, cd13, 0xdd);
  }
}

// dst[c * ds + j] = V[j, c] for 32 keys j and 16 columns c (rows at v + j * vs, contiguous):
// the key pairs (V[j, c], V[j + 1, c]) are 32-bit elements, so the 32 x 16 transpose of
// 16-bit values is the 16 x 16 transpose of the pairs.
inline void transpose_value_block(const bf16* v, index_t vs, bf16* dst, index_t ds) {
  __m512i r[16];
  for (int k = 0; k < 16; ++k) {
    const bf16* a = v + 2 * k * vs;
    const __m512i lo = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(a)));
    const __m512i hi = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + vs)));
    r[k] = _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16));
  }
  transpose16x16_epi32(r);
  for (int c = 0; c < 16; ++c) _mm512_storeu_si512(dst + c * ds, r[c]);
}
#endif

// V's columns for keys [0, nj) (rows at v + j * vs, element stride ve): dst[c * ds + j] =
// V[j, c] for c < Ev16 and j < cols, zero for c >= Ev or j >= nj. Whole blocks of 32 keys and
// 16 columns of unit-stride rows go through transpose_value_block; the rest one element at a
// time, one pass per column (the tile's rows stay in L1 while they are walked Ev times).
inline void pack_value_columns(const bf16* v, index_t vs, index_t ve, index_t nj, index_t Ev, index_t cols,
                               bf16* dst, index_t ds) {
  const index_t Ev16 = round_up(Ev, 16);
  index_t jv = 0, cv = 0;  // keys [0, jv) of columns [0, cv) are done by blocks
#if defined(__AVX512F__)
  if (ve == 1) {
    jv = nj / 32 * 32, cv = Ev / 16 * 16;
    for (index_t j = 0; j < jv; j += 32)
      for (index_t c = 0; c < cv; c += 16) transpose_value_block(v + j * vs + c, vs, dst + c * ds + j, ds);
  }
#endif
  for (index_t c = 0; c < Ev16; ++c) {
    bf16* row = dst + c * ds;
    if (c >= Ev) {
      std::memset(static_cast<void*>(row), 0, sizeof(bf16) * static_cast<size_t>(cols));
      continue;
    }
    const bf16* src = v + c * ve;
    for (index_t j = c < cv ? jv : 0; j < nj; ++j) row[j] = src[j * vs];
    std::memset(static_cast<void*>(row + nj), 0, sizeof(bf16) * static_cast<size_t>(cols - nj));
  }
}

}  // namespace sdpa_detail
}  // namespace attnext
