// The normalize step: a numerically stable softmax with masks.
#pragma once

#include <cstring>
#include <limits>
#include <type_traits>

#include "lowp.hpp"
#include "mask.hpp"
#include "online_softmax.hpp"
#include "parallel.hpp"
#include "scratch.hpp"
#include "strided.hpp"
#include "vmath.hpp"

namespace attnext {

// Softmax of one contiguous row in place: prob_exp(x - max) / sum, the online-softmax state
// of one tile (online_softmax.hpp). A row whose every entry is -inf (nothing to attend)
// becomes zeros, never NaN; a NaN anywhere makes the row's visible entries NaN, as the plain
// formula would, while hidden (-inf) entries stay 0.
template <typename T>
inline void softmax_inplace(T* x, index_t n) {
  if (n == 0) return;  // x may be null then (an empty buffer), which memset must not see
  constexpr T ninf = -std::numeric_limits<T>::infinity();
  const T m = vm::max_propagate_nan(x, n);
  if (m == ninf) {
    std::memset(x, 0, sizeof(T) * n);
    return;
  }
  if (m != m || m == -ninf) {  // a NaN or +inf score makes the visible entries NaN (inf - inf);
                               // hidden ones (-inf) still weigh 0
    for (index_t j = 0; j < n; ++j) x[j] = x[j] == ninf ? T(0) : std::numeric_limits<T>::quiet_NaN();
    return;
  }
  const T sum = vm::exp_shifted_sum(x, n, m);
  vm::scale(x, n, softmax_state::inverse_sum_one(sum));
}

// Scratch tag (scratch.hpp) of softmax's row when the output type is not the accumulation type.
struct SoftmaxRowTag {};

// out = softmax(x + mask) over the last axis.
//   x    (..., N) any strides, read as In and computed in Acc (float for bf16/f16)
//   mask broadcast to x's shape (or none); a float mask is of type Acc
//   causal: rows are queries (axis -2), entries keys (axis -1); needs ndim >= 2 when on. Keys
//   causal hides are hidden before the mask is read (mask.hpp's rule).
//   out  (..., N) C-contiguous, same shape as x, of type Out: each row is computed in Acc in
//   place when Out is Acc, else in one row of scratch converted at the store (lowp.hpp's rule)
template <typename In, typename Acc = acc_t<In>, typename Out = In>
void softmax(const Strided<const In>& x, const Mask<Acc>& mask, const Causal& causal, Out* out) {
  const index_t n = x.dim(-1);
  const index_t rows = x.batch_count(1);
  const index_t queries = causal.on ? x.dim(-2) : 1;
  const index_t xs = x.stride(-1);
  Visibility vis;
  vis.causal = causal;
  // Rows are independent; blocks of rows keep scheduling overhead low for short rows.
  const index_t block = n >= 256 ? 1 : 256 / (n + 1) + 1;
  const index_t blocks = (rows + block - 1) / block;
  parallel_for(blocks, [&](index_t bi) {
    const Scratch<Acc, SoftmaxRowTag> buf(std::is_same<Out, Acc>::value ? 0 : static_cast<size_t>(n));
    const index_t r_end = std::min(rows, (bi + 1) * block);
    for (index_t r = bi * block; r < r_end; ++r) {
      Out* dst = out + r * n;
      Acc* row = staged(dst, buf.data());
      load_row(x.data + x.batch_offset(r, 1), xs, n, row);
      mask_scores(row, index_t(1), n, index_t(0), visible_keys(vis, r % queries, n), mask_row(mask, r));
      softmax_inplace(row, n);
      if constexpr (!std::is_same<Out, Acc>::value) store_row(row, n, dst);
    }
  });
}

}  // namespace attnext
