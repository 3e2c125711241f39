// The one mask convention of the library, in one place.
//
// - A boolean mask says True = may attend.
// - An additive (float) mask is added to the scores; -inf hides a key (its score becomes -inf
//   even when it was NaN or +inf, exactly as a False in a boolean mask).
// - Causal visibility: key j is visible to query i iff j <= i + offset, where offset = 0 is
//   PyTorch's top-left alignment and offset = Lk - Lq aligns the last query with the last key.
// Masks arrive already broadcast to the scores' shape (stride 0 where they repeat).
#pragma once

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
  index_t offset = 0;  // key j visible to query i iff j <= i + offset

  // Number of leading keys query i (0 <= i) may see, i + offset + 1 clamped to [0, lk];
  // compared before adding so that no offset, however large, overflows.
  index_t visible_keys(index_t i, index_t lk) const {
    if (!on || offset >= lk) return lk;
    if (offset < -i) return 0;
    const index_t v = i + offset + 1;
    return v > lk ? lk : v;
  }
};

// A score plus an additive mask entry; -inf hides the key whatever its score (NaN, +inf).
// `unit` scales the mask for kernels that keep scores in another unit (log2 e for base 2).
template <typename T>
inline T add_mask(T score, T mask, T unit = T(1)) {
  return mask == -std::numeric_limits<T>::infinity() ? mask : score + unit * mask;
}

// Applies the mask of row `row` (a flat index over all axes but the last) to scores s[0, n)
// in place; keys hidden by a boolean mask become -inf.
template <typename T>
inline void apply_mask_row(const Mask<T>& mask, index_t row, T* s, index_t n) {
  if (mask.kind == MaskKind::boolean) {
    const bool* m = mask.keep.data + mask.keep.batch_offset(row, 1);
    const index_t ms = mask.keep.stride(-1);
    for (index_t j = 0; j < n; ++j)
      if (!m[j * ms]) s[j] = -std::numeric_limits<T>::infinity();
  } else if (mask.kind == MaskKind::additive) {
    const T* m = mask.add.data + mask.add.batch_offset(row, 1);
    const index_t ms = mask.add.stride(-1);
    // -inf hides the key whatever its score (a NaN or +inf score included); others are added.
    for (index_t j = 0; j < n; ++j) s[j] = add_mask(s[j], m[j * ms]);
  }
}

// Hides keys [visible, n) of a row.
template <typename T>
inline void hide_tail(T* s, index_t visible, index_t n) {
  for (index_t j = visible; j < n; ++j) s[j] = -std::numeric_limits<T>::infinity();
}

}  // namespace attnext
