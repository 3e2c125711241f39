// The weighted-sum step: context = weights . values.
#pragma once

#include <algorithm>
#include <type_traits>

#include "lowp.hpp"
#include "parallel.hpp"
#include "scratch.hpp"
#include "score.hpp"
#include "strided.hpp"

namespace attnext {

// weighted_sum for 16-bit inputs: w v per batch entry through score.hpp's batched_product_16
// (v's columns are the product's b rows: element k of column n at v[k, n]).
template <typename In, typename Out>
void weighted_sum_16(const Strided<const In>& w, const Strided<const In>& v, Out* out) {
  batched_product_16<In>(w, w.stride(-2), w.stride(-1), v, v.stride(-1), v.stride(-2), w.dim(-2), v.dim(-1), w.dim(-1),
                         1.0f, out);
}

// out = w v
//   w (..., Lq, Lk), v (..., Lk, Dv) with equal batch shapes; out (..., Lq, Dv) C-contiguous, of Out
// Both are read as In and cast to Acc where Eigen reads them (a no-op for In == Acc); a task's
// tile is computed in Acc, in out itself when Out is Acc, else converted at the store.
template <typename In, typename Acc = acc_t<In>, typename Out = In>
void weighted_sum(const Strided<const In>& w, const Strided<const In>& v, Out* out) {
  const index_t batches = w.batch_count(2);
  const index_t lq = w.dim(-2), dv = v.dim(-1);
  if (batches == 0 || lq == 0 || dv == 0) return;
  if constexpr (is_lowp<In>::value) return weighted_sum_16<In, Out>(w, v, out);
  const index_t nb = row_blocks(lq);
  parallel_for(batches * nb, [&](index_t task) {
    const index_t b = task / nb, r0 = (task % nb) * kScoreRowBlock;
    const index_t rows = std::min(kScoreRowBlock, lq - r0);
    Out* dst = out + (b * lq + r0) * dv;
    const Scratch<Acc, ScoreTileTag> buf(std::is_same<Out, Acc>::value ? 0 : static_cast<size_t>(rows * dv));
    MatrixMap<Acc> o(staged(dst, buf.data()), rows, dv);
    o.noalias() = matrix_of(w, b, r0, rows).template cast<Acc>() * matrix_of(v, b).template cast<Acc>();
    if constexpr (!std::is_same<Out, Acc>::value) store_row(o.data(), rows * dv, dst);
  });
}

}  // namespace attnext
