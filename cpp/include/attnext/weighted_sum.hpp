// The weighted-sum step: context = weights . values.
#pragma once

#include <algorithm>

#include "parallel.hpp"
#include "score.hpp"
#include "strided.hpp"

namespace attnext {

// out = w v
//   w (..., Lq, Lk), v (..., Lk, Dv) with equal batch shapes; out (..., Lq, Dv) C-contiguous
// Both are read as In and cast to Acc where Eigen reads them (a no-op for In == Acc).
template <typename In, typename Acc = In>
void weighted_sum(const Strided<const In>& w, const Strided<const In>& v, Acc* out) {
  const index_t batches = w.batch_count(2);
  const index_t lq = w.dim(-2), dv = v.dim(-1);
  if (batches == 0 || lq == 0 || dv == 0) return;
  const index_t nb = row_blocks(lq);
  parallel_for(batches * nb, [&](index_t task) {
    const index_t b = task / nb, r0 = (task % nb) * kScoreRowBlock;
    const index_t rows = std::min(kScoreRowBlock, lq - r0);
    MatrixMap<Acc> o(out + (b * lq + r0) * dv, rows, dv);
    o.noalias() = matrix_of(w, b, r0, rows).template cast<Acc>() * matrix_of(v, b).template cast<Acc>();
  });
}

}  // namespace attnext
