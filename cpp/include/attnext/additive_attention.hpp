// Fused additive (Bahdanau) attention:
//   context_i = sum_j softmax_j(v . tanh(q_i W_q + bias + k_j W_k) + mask_ij) value_j
// The keys are projected once (additive_prepare_keys; a decoder keeps the result for a whole
// sentence); each task projects its own block of query rows (additive_score_block), whose
// scores against all keys live in a (rows, Lk) tile that becomes the weights of the block's
// weighted sum: the (..., Lq, Lk, U) tensor is never formed.
#pragma once

#include <algorithm>
#include <cstdint>
#include <memory>
#include <vector>

#include "additive.hpp"
#include "mask.hpp"
#include "parallel.hpp"
#include "scratch.hpp"
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

namespace detail {

// Scratch tag (scratch.hpp) of a block's score tile when the caller wants no weights back.
struct AdditiveTileTag {};

// One task's work: the context (and weights) of query rows [r0, r0 + rows) of batch entry b,
// against that entry's projected keys (Lk of them, the first `visible` not hidden by lengths).
// Arguments as for additive_attention below.
template <typename T>
void additive_attention_block(const Strided<const T>& q, const ConstMatrixMap<T>& w_query, const T* bias,
                              const AdditiveRows<T>& keys, index_t lk, index_t visible,
                              const Strided<const T>& value, const AdditiveV<T>& v, const Mask<T>& mask, index_t b,
                              index_t r0, index_t rows, T* out, T* weights) {
  const index_t lq = q.dim(-2), dv = value.dim(-1);
  const index_t value_row_stride = value.stride(-2), value_col_stride = value.stride(-1);
  // The block's scores become its weights: in the caller's weights array, or in scratch memory.
  const Scratch<T, AdditiveTileTag> scratch(weights ? 0 : static_cast<size_t>(rows * lk));
  T* tile = weights ? weights + (b * lq + r0) * lk : scratch.data();
  additive_score_block(q, b, r0, rows, w_query, bias, keys, v, visible, tile, lk);
  for (index_t r = 0; r < rows; ++r) {
    T* s = tile + r * lk;
    hide_tail(s, visible, lk);
    apply_mask_row(mask, b * lq + r0 + r, s, lk);
    softmax_inplace(s, lk);
  }

  // context rows = weights[:, :visible] value[:visible]
  T* o = out + (b * lq + r0) * dv;
  const T* vb = value.data + value.batch_offset(b, 2);
  if (rows >= kPackedGemmMinRows) {  // the same choice as project_rows: by shape only
    const auto tile_rows = [&](index_t m0, index_t n, index_t k0, index_t kc, T* dst, index_t ld) {
      for (index_t r = 0; r < n; ++r) pack_row(tile + (m0 + r) * lk + k0, index_t(1), kc, dst + r, ld);
    };
    const auto tile_row = [&](index_t m) -> const T* { return tile + m * lk; };
    const auto value_cols = [&](index_t n0, index_t cols, index_t k0, index_t kc, T* dst, index_t ld) {
      for (index_t k = 0; k < kc; ++k) {
        const T* src = vb + (k0 + k) * value_row_stride + n0 * value_col_stride;
        if (value_col_stride == 1)
          std::copy_n(src, cols, dst + k * ld);
        else
          for (index_t c = 0; c < cols; ++c) dst[k * ld + c] = src[c * value_col_stride];
      }
    };
    const InPlaceW<T> value_in_place{vb, value_row_stride};
    packed_gemm<T>(rows, dv, visible, tile_rows, tile_row, value_cols, static_cast<const T*>(nullptr), o,
                   /*parallel=*/false, value_col_stride == 1 ? &value_in_place : nullptr);
    return;
  }
  const auto w = ConstMatrixMap<T>(tile, rows, lk).leftCols(visible);
  auto product = [&](const auto& val) { product_rows<T>(w, val, o); };
  if (value_col_stride == 1) {
    using RowStrided = Eigen::Map<const RowMatrix<T>, Eigen::Unaligned, Eigen::OuterStride<>>;
    product(RowStrided(vb, visible, dv, Eigen::OuterStride<>(value_row_stride)));
  } else {
    product(StridedMatrixMap<T>(vb, visible, dv,
                                Eigen::Stride<Eigen::Dynamic, Eigen::Dynamic>(value_row_stride, value_col_stride)));
  }
}

inline index_t visible_keys(const Strided<const std::int64_t>* lengths, index_t b, index_t lk) {
  return lengths ? lengths->data[lengths->batch_offset(b, 0)] : lk;
}

}  // namespace detail

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
  const index_t lq = q.dim(-2), lk = keys.raw.dim(-2), units = w_query.cols();
  const index_t nb = additive_row_blocks(lq);
  const AdditiveV<T> v_form = additive_v(v, units);
  parallel_for(batches * nb, [&](index_t task) {
    const index_t b = task / nb, r0 = (task % nb) * kAdditiveRowBlock;
    const AdditiveRows<T> k_rows{keys.raw.data + keys.raw.batch_offset(b, 2),
                                 keys.ok.data[keys.ok.batch_offset(b, 0)]
                                     ? keys.expo.data + keys.expo.batch_offset(b, 2)
                                     : nullptr};
    detail::additive_attention_block(q, w_query, bias, k_rows, lk, detail::visible_keys(lengths, b, lk), value,
                                     v_form, mask, b, r0, std::min(kAdditiveRowBlock, lq - r0), out, weights);
  });
}

// The same with raw keys (..., Lk, Dk) (batch shape equal to the query's) and w_key (Dk, U):
// the keys are projected into per-thread scratch memory (scratch.hpp). A call that is not
// kept for later steps thus allocates no projection arrays for its keys.
// With at least two batch entries per thread, each task takes one entry: it projects the
// entry's keys and then attends with all of its query rows, so nothing waits between the two
// stages and the keys are scored while they are in this core's cache. With fewer, all threads
// project all keys first (additive_prepare_keys), then share the query blocks. Both give the
// same bits: from kPackedGemmMinRows keys on both project through the packed GEMM, whose
// results do not depend on how its rows are split, and below that only the second runs.
template <typename T>
void additive_attention(const Strided<const T>& q, const ConstMatrixMap<T>& w_query, const T* bias,
                        const Strided<const T>& key, const ConstMatrixMap<T>& w_key, const Strided<const T>& value,
                        const T* v, const Mask<T>& mask, const Strided<const std::int64_t>* lengths, T* out,
                        T* weights) {
  const index_t batches = key.batch_count(2), lk = key.dim(-2), units = w_key.cols();
  if (batches >= 2 * index_t(get_num_threads()) && lk >= kPackedGemmMinRows) {
    const index_t lq = q.dim(-2);
    const AdditiveV<T> v_form = additive_v(v, units);
    parallel_for(batches, [&](index_t b) {
      const size_t n = static_cast<size_t>(lk * units);
      const Scratch<T, AdditiveKeyRawTag> raw(n);
      const Scratch<T, AdditiveKeyExpTag> expo(n);
      const Strided<const T> entry_keys(key.data + key.batch_offset(b, 2), {lk, key.dim(-1)},
                                        {key.stride(-2), key.stride(-1)});
      bool ok = false;
      additive_prepare_keys(entry_keys, w_key, raw.data(), expo.data(), &ok, /*parallel=*/false);
      const AdditiveRows<T> k_rows{raw.data(), ok ? expo.data() : nullptr};
      const index_t visible = detail::visible_keys(lengths, b, lk);
      for (index_t r0 = 0; r0 < lq; r0 += kAdditiveRowBlock)
        detail::additive_attention_block(q, w_query, bias, k_rows, lk, visible, value, v_form, mask, b, r0,
                                         std::min(kAdditiveRowBlock, lq - r0), out, weights);
    });
    return;
  }
  const size_t n = static_cast<size_t>(batches * lk * units);
  const Scratch<T, AdditiveKeyRawTag> raw(n);
  const Scratch<T, AdditiveKeyExpTag> expo(n);
  std::unique_ptr<bool[]> ok(new bool[static_cast<size_t>(std::max<index_t>(batches, 1))]);
  additive_prepare_keys(key, w_key, raw.data(), expo.data(), ok.get());
  // raw and expo as (..., Lk, U) C-contiguous views, ok as (...,)
  const int nd = key.ndim();
  std::vector<index_t> shape(key.shape), strides(nd);
  shape.back() = units;
  const std::vector<index_t> batch(shape.begin(), shape.end() - 2);
  std::vector<index_t> batch_strides(batch.size());
  index_t step = 1;
  for (int ax = nd - 1; ax >= 0; --ax) strides[ax] = step, step *= shape[ax];
  step = 1;
  for (int ax = nd - 3; ax >= 0; --ax) batch_strides[ax] = step, step *= batch[ax];
  const AdditiveKeys<T> keys{Strided<const T>(raw.data(), shape, strides), Strided<const T>(expo.data(), shape, strides),
                             Strided<const bool>(ok.get(), batch, batch_strides)};
  additive_attention(q, w_query, bias, keys, value, v, mask, lengths, out, weights);
}

}  // namespace attnext
