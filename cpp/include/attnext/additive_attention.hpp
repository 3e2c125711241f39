// Fused additive (Bahdanau) attention:
//   context_i = sum_j softmax_j(v . tanh(q_i W_q + bias + k_j W_k) + mask_ij) value_j
// The keys are projected once (additive_prepare_keys; a decoder keeps the result for a whole
// sentence), the queries once per block of rows, and the scores of one block of query rows
// against all keys live in a (rows, Lk) tile: the (..., Lq, Lk, U) tensor is never formed.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "additive.hpp"
#include "mask.hpp"
#include "parallel.hpp"
#include "softmax.hpp"
#include "strided.hpp"

namespace attnext {

// Keys prepared by additive_prepare_keys, seen through views (batch axes may be broadcast).
template <typename T>
struct AdditiveKeys {
  Strided<const T> raw;     // (..., Lk, U), each batch entry's rows contiguous
  Strided<const T> expo;    // (..., Lk, U), same layout
  Strided<const bool> ok;   // (...,)
};

// out_i = sum_j softmax_j(v . tanh(q_i W_q + bias + k'_j) + mask_ij) value_j
//   q       (..., Lq, Dq) any strides
//   w_query (Dq, U) contiguous; bias (U,) or nullptr; v (U,) contiguous
//   keys    (..., Lk, U) projected keys; value (..., Lk, Dv) any strides; equal batch shapes
//   mask    (..., Lq, Lk) broadcast view or none
//   lengths (...,) keys [lengths[b], Lk) of batch entry b are hidden; nullptr = none. Values in [0, Lk].
//   out     (..., Lq, Dv) C-contiguous; weights (..., Lq, Lk) C-contiguous or nullptr
// A query row with nothing visible gets zero weights and a zero context.
template <typename T>
void additive_attention(const Strided<const T>& q, const ConstMatrixMap<T>& w_query, const T* bias,
                        const AdditiveKeys<T>& keys, const Strided<const T>& value, const T* v, const Mask<T>& mask,
                        const Strided<const std::int64_t>* lengths, T* out, T* weights) {
  const index_t batches = q.batch_count(2);
  const index_t lq = q.dim(-2), lk = keys.raw.dim(-2), units = w_query.cols(), dv = value.dim(-1);
  const index_t nb = additive_row_blocks(lq);
  const bool value_rows_contiguous = value.stride(-1) == 1;
  parallel_for(batches * nb, [&](index_t task) {
    const index_t b = task / nb, r0 = (task % nb) * kAdditiveRowBlock;
    const index_t rows = std::min(kAdditiveRowBlock, lq - r0);
    std::vector<T> q_raw(static_cast<size_t>(rows * units)), q_exp(q_raw.size());
    std::vector<T> scratch(weights ? 0 : static_cast<size_t>(rows * lk));
    T* tile = weights ? weights + (b * lq + r0) * lk : scratch.data();
    project_block(q, b, r0, rows, w_query, bias, q_raw.data());

    const AdditiveRows<T> k_rows{keys.raw.data + keys.raw.batch_offset(b, 2),
                                 keys.ok.data[keys.ok.batch_offset(b, 0)]
                                     ? keys.expo.data + keys.expo.batch_offset(b, 2)
                                     : nullptr};
    const index_t visible = lengths ? lengths->data[lengths->batch_offset(b, 0)] : lk;
    for (index_t r = 0; r < rows; ++r) {
      T* qr = q_raw.data() + r * units;
      T* qe = q_exp.data() + r * units;
      const bool q_ok = k_rows.expo && additive_exp_form(qr, qe, units);
      T* s = tile + r * lk;
      additive_scores_row(AdditiveRows<T>{qr, q_ok ? qe : nullptr}, k_rows, v, units, visible, s);
      hide_tail(s, visible, lk);
      apply_mask_row(mask, b * lq + r0 + r, s, lk);
      softmax_inplace(s, lk);
    }

    // context rows = weights[:, :visible] value[:visible]
    T* o = out + (b * lq + r0) * dv;
    const auto w = ConstMatrixMap<T>(tile, rows, lk).leftCols(visible);
    auto product = [&](const auto& val) { product_rows<T>(w, val, o); };
    const T* vb = value.data + value.batch_offset(b, 2);
    if (value_rows_contiguous) {
      using RowStrided = Eigen::Map<const RowMatrix<T>, Eigen::Unaligned, Eigen::OuterStride<>>;
      product(RowStrided(vb, visible, dv, Eigen::OuterStride<>(value.stride(-2))));
    } else {
      product(StridedMatrixMap<T>(vb, visible, dv,
                                  Eigen::Stride<Eigen::Dynamic, Eigen::Dynamic>(value.stride(-2), value.stride(-1))));
    }
  });
}

}  // namespace attnext
