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
#include "score.hpp"
#include "softmax.hpp"
#include "strided.hpp"

namespace attnext {

// dst (rows, n) = a (rows, k) b (k, n), with results that depend only on the values. Eigen
// evaluates very small products (rows + n + k < EIGEN_GEMM_TO_COEFFBASED_THRESHOLD) coefficient
// by coefficient with a vectorised inner product that peels up to the first aligned address,
// so their last bits would depend on where our scratch buffers happen to start; those get a
// plain loop here. A few rows go through matrix-vector products (no packing of b, which is
// what one decoder step needs), more through a GEMM. The choice depends on the shapes only.
template <typename T, typename A, typename B>
void product_rows(const A& a, const B& b, T* dst) {
  const index_t rows = a.rows(), depth = a.cols(), n = b.cols();
  using RowVec = Eigen::Matrix<T, 1, Eigen::Dynamic>;
  if (rows + n + depth < EIGEN_GEMM_TO_COEFFBASED_THRESHOLD) {
    for (index_t r = 0; r < rows; ++r)
      for (index_t c = 0; c < n; ++c) {
        T acc = T(0);
        for (index_t d = 0; d < depth; ++d) acc += a(r, d) * b(d, c);
        dst[r * n + c] = acc;
      }
  } else if (rows < 4) {
    for (index_t r = 0; r < rows; ++r) Eigen::Map<RowVec>(dst + r * n, n).noalias() = a.row(r) * b;
  } else {
    MatrixMap<T>(dst, rows, n).noalias() = a * b;
  }
}

// Rows [r0, r0 + rows) of batch entry b of x (..., L, D) times w (D, U) (+ bias) into dst
// (rows, U) row-major.
template <typename T>
void project_block(const Strided<const T>& x, index_t b, index_t r0, index_t rows, const ConstMatrixMap<T>& w,
                   const T* bias, T* dst) {
  const index_t units = w.cols();
  using RowVec = Eigen::Matrix<T, 1, Eigen::Dynamic>;
  product_rows<T>(matrix_of(x, b, r0, rows), w, dst);
  if (bias) {
    const Eigen::Map<const RowVec> bv(bias, units);
    for (index_t r = 0; r < rows; ++r) Eigen::Map<RowVec>(dst + r * units, units) += bv;
  }
}

// Projected keys of (..., Lk, Dk) through w_key (Dk, U): raw = k W_k and expo = exp(2 raw),
// both (batches, Lk, U) C-contiguous, and ok (batches,) = whether the batch entry's values all
// lie in the factored form's range (see additive.hpp).
template <typename T>
void additive_prepare_keys(const Strided<const T>& key, const ConstMatrixMap<T>& w_key, T* raw, T* expo, bool* ok) {
  const index_t batches = key.batch_count(2), lk = key.dim(-2), units = w_key.cols();
  const index_t nb = row_blocks(lk);
  std::vector<unsigned char> block_ok(static_cast<size_t>(batches * nb), 1);
  parallel_for(batches * nb, [&](index_t task) {
    const index_t b = task / nb, r0 = (task % nb) * kScoreRowBlock;
    const index_t rows = std::min(kScoreRowBlock, lk - r0);
    T* r = raw + (b * lk + r0) * units;
    project_block(key, b, r0, rows, w_key, static_cast<const T*>(nullptr), r);
    block_ok[static_cast<size_t>(task)] = additive_exp_form(r, expo + (b * lk + r0) * units, rows * units);
  });
  for (index_t b = 0; b < batches; ++b) {
    bool all = true;
    for (index_t t = 0; t < nb; ++t) all &= block_ok[static_cast<size_t>(b * nb + t)] != 0;
    ok[b] = all;
  }
}

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
  const index_t nb = row_blocks(lq);
  const bool value_rows_contiguous = value.stride(-1) == 1;
  parallel_for(batches * nb, [&](index_t task) {
    const index_t b = task / nb, r0 = (task % nb) * kScoreRowBlock;
    const index_t rows = std::min(kScoreRowBlock, lq - r0);
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
