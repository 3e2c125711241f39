// The one mask convention of the library, in one place: which keys a query sees, and how a
// mask hits a row or a tile of scores. Every kernel (SDPA's blocked and decode paths, softmax,
// additive attention) calls these functions; none writes its own copy.
//
// - A boolean mask says True = may attend.
// - An additive (float) mask is added to the scores; -inf hides a key (its score becomes -inf
//   even when it was NaN or +inf, exactly as a False in a boolean mask).
// - Causal visibility: key j is visible to query i iff j <= i + offset, where offset = 0 is
//   PyTorch's top-left alignment and offset = Lk - Lq aligns the last query with the last key.
// - A window (left, right) lets query i see keys [i - left, i + right]; -1 = unbounded side.
// - A key length hides keys at positions >= length.
// - "Hidden is hidden": a key hidden by causal, window or length is hidden before any mask
//   entry is read, so its score, its mask entry (NaN included) and its value never matter.
// Masks arrive already broadcast to the scores' shape (stride 0 where they repeat).
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>

#include "strided.hpp"

namespace attnext {

enum class MaskKind { none, boolean, additive };

template <typename T>
struct Mask {
  MaskKind kind = MaskKind::none;
  Strided<const bool> keep;  // kind == boolean: (..., Lq, Lk), True = may attend
  Strided<const T> add;      // kind == additive: (..., Lq, Lk), added to the scores
};

struct Causal {
  bool on = false;
  index_t offset = 0;  // key j visible to query i iff j <= i + offset; any int64
};

// Everything that hides keys by position, for one batch entry. Every field takes any int64:
// the range function below never overflows, so callers pass raw user values.
struct Visibility {
  Causal causal;
  index_t window_left = -1;   // query i sees keys >= i - left; negative = unbounded
  index_t window_right = -1;  // query i sees keys <= i + right; negative = unbounded
  index_t length = std::numeric_limits<index_t>::max();  // keys >= length are padding
};

// The keys [lo, hi) a query sees; empty when hi <= lo.
struct KeyRange {
  index_t lo = 0;
  index_t hi = 0;
  bool empty() const { return hi <= lo; }
  bool covers(index_t j0, index_t j1) const { return lo <= j0 && j1 <= hi; }
};

namespace mask_detail {
// Number of keys j in [0, n) with j <= i + d, i.e. clamp(i + d + 1, 0, n), for i >= 0, n >= 0
// and any d: compared before adding, so nothing overflows.
inline index_t keys_up_to(index_t i, index_t d, index_t n) {
  if (d >= n - 1 - i) return n;  // n - 1 - i >= -1 - i: no overflow for i, n >= 0
  if (d < -i) return 0;
  return i + d + 1;
}
}  // namespace mask_detail

// THE visible-key rule: the keys [lo, hi) of `keys` keys that query i (0 <= i) sees under
// causal, window and length. lo and hi are both non-decreasing in i, so a block of queries
// [i0, i1] sees at most [range(i0).lo, range(i1).hi) and all of them see
// [range(i1).lo, range(i0).hi). Overflow-safe for every int64 field.
inline KeyRange visible_keys(const Visibility& v, index_t i, index_t keys) {
  using mask_detail::keys_up_to;
  index_t hi = std::min(keys, std::max<index_t>(v.length, 0));
  if (v.causal.on) hi = std::min(hi, keys_up_to(i, v.causal.offset, keys));
  if (v.window_right >= 0) hi = std::min(hi, keys_up_to(i, v.window_right, keys));
  index_t lo = 0;
  if (v.window_left >= 0) lo = i - v.window_left < 0 ? 0 : std::min(i - v.window_left, keys);  // i, left >= 0
  return {lo, std::max(lo, hi)};
}

// The keys some query of the block [i0, i0 + nq) sees (nq >= 1), within [ka, kz): the span its
// key tiles walk.
inline KeyRange block_keys(const Visibility& v, index_t i0, index_t nq, index_t keys, index_t ka = 0,
                           index_t kz = std::numeric_limits<index_t>::max()) {
  const index_t lo = std::max(visible_keys(v, i0, keys).lo, ka);
  return {lo, std::max(lo, std::min(visible_keys(v, i0 + nq - 1, keys).hi, kz))};
}

// A score plus an additive mask entry; -inf hides the key whatever its score (NaN, +inf).
// The entry is added as it is: a finite score and mask are never rescaled (no overflow).
template <typename T, typename M>
inline T add_mask(T score, M mask) {
  return mask == -std::numeric_limits<M>::infinity() ? -std::numeric_limits<T>::infinity()
                                                     : score + static_cast<T>(mask);
}

// The mask entries of one query row, starting at some key: entry j at keep/add[j * stride].
template <typename M>
struct MaskRow {
  MaskKind kind = MaskKind::none;
  // NumPy's bool storage read as bytes (nonzero = True, as NumPy reads it): a byte another
  // thread or a view wrote outside {0, 1} must not be loaded as a C++ bool, which would be UB.
  const unsigned char* keep = nullptr;
  const M* add = nullptr;
  index_t stride = 0;
};

// Row `row` (a flat index over all axes but the last) of the mask, from key j0 on.
template <typename M>
inline MaskRow<M> mask_row(const Mask<M>& mask, index_t row, index_t j0 = 0) {
  MaskRow<M> r;
  r.kind = mask.kind;
  if (mask.kind == MaskKind::boolean) {
    r.stride = mask.keep.stride(-1);
    r.keep = reinterpret_cast<const unsigned char*>(mask.keep.data + mask.keep.batch_offset(row, 1) + j0 * r.stride);
  } else if (mask.kind == MaskKind::additive) {
    r.stride = mask.add.stride(-1);
    r.add = mask.add.data + mask.add.batch_offset(row, 1) + j0 * r.stride;
  }
  return r;
}

// THE mask application. Scores s[j * ss], j in [0, n), belong to keys j0 + j of one query row
// whose visible keys are `vis` and whose mask entries are m (entry j for key j0 + j). Keys
// outside vis become -inf without their mask entry being read; inside, a False or a -inf
// entry makes the score -inf and a float entry is added. Returns whether any of the n keys
// is hidden (a caller uses it to know that some probability is a hidden 0).
template <typename T, typename M>
inline bool mask_scores(T* s, index_t ss, index_t n, index_t j0, KeyRange vis, const MaskRow<M>& m) {
  constexpr T ninf = -std::numeric_limits<T>::infinity();
  const index_t a = std::min(n, std::max<index_t>(vis.lo - j0, 0));  // [a, z): visible part
  const index_t z = std::max(a, std::min(n, vis.hi - j0));
  bool hidden = a > 0 || z < n;
  for (index_t j = 0; j < a; ++j) s[j * ss] = ninf;
  for (index_t j = z; j < n; ++j) s[j * ss] = ninf;
  if (m.kind == MaskKind::boolean) {
    for (index_t j = a; j < z; ++j)
      if (m.keep[j * m.stride] == 0) s[j * ss] = ninf, hidden = true;
  } else if (m.kind == MaskKind::additive) {
    for (index_t j = a; j < z; ++j) {
      const M e = m.add[j * m.stride];
      hidden |= e == -std::numeric_limits<M>::infinity();
      s[j * ss] = add_mask(s[j * ss], e);
    }
  }
  return hidden;
}

// The same for a tile: rows i in [0, nq) are queries i0 + i of batch entry b (mask rows
// b * Lq + i0 + i; the mask has the query axis, ndim >= 2), scores s[i * s_query + j * s_key] for keys j0 + j, j in [0, nj). A row is a
// 1-row tile. Returns whether any score of the tile is hidden.
template <typename T, typename M>
inline bool mask_tile(const Mask<M>& mask, const Visibility& vis, index_t keys, index_t lq, index_t b, index_t i0,
                      index_t nq, index_t j0, index_t nj, T* s, index_t s_query, index_t s_key) {
  // Row i0's entries, then one step along the query axis per row (no per-row batch_offset).
  MaskRow<M> m = mask_row(mask, b * lq + i0, j0);
  const index_t m_query = mask.kind == MaskKind::boolean  ? mask.keep.stride(-2)
                          : mask.kind == MaskKind::additive ? mask.add.stride(-2)
                                                             : 0;
  bool hidden = false;
  for (index_t i = 0; i < nq; ++i) {
    hidden |= mask_scores(s + i * s_query, s_key, nj, j0, visible_keys(vis, i0 + i, keys), m);
    if (m.keep) m.keep += m_query;
    if (m.add) m.add += m_query;
  }
  return hidden;
}

}  // namespace attnext
