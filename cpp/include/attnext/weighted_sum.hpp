// The weighted-sum step: context = weights . values.
#pragma once

#include <algorithm>

#include "parallel.hpp"
#include "score.hpp"
#include "strided.hpp"

namespace attnext {

// out = w v
//   w (..., Lq, Lk), v (..., Lk, Dv) with equal batch shapes; out (..., Lq, Dv) C-contiguous
template <typename T>
void weighted_sum(const Strided<const T>& w, const Strided<const T>& v, T* out) {
  const index_t batches = w.batch_count(2);
  const index_t lq = w.dim(-2), dv = v.dim(-1);
  const index_t nb = row_blocks(lq);
  parallel_for(batches * nb, [&](index_t task) {
    const index_t b = task / nb, r0 = (task % nb) * kScoreRowBlock;
    const index_t rows = std::min(kScoreRowBlock, lq - r0);
    MatrixMap<T> o(out + (b * lq + r0) * dv, rows, dv);
    o.noalias() = matrix_of(w, b, r0, rows) * matrix_of(v, b);
  });
}

}  // namespace attnext
