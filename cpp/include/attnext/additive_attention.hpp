// Fused additive (Bahdanau) attention:
//   context_i = sum_j softmax_j(v . tanh(q_i W_q + bias + k_j W_k) + mask_ij) value_j
// The keys are projected once (additive_prepare_keys; a decoder keeps the result for a whole
// sentence); each task projects its own block of query rows (additive_score_block), whose
// scores against all keys live in a (rows, Lk) tile that becomes the weights of the block's
// weighted sum: the (..., Lq, Lk, U) tensor is never formed.
//
// Hidden is hidden: a key hidden by key_lengths or by the mask (False, -inf) never reaches
// the output. Its score becomes -inf before the softmax (so its weight is exactly 0), the
// weighted sum runs over the keys before the length only, and a value row of a masked key
// inside that range that holds NaN or inf (where 0 x NaN would leak) sends the rows that hide
// it through a product that skips it (context_fixup). A row that sees no key gets zeros.
//
// Which of the two execution strategies runs (one task per batch entry, or shared key
// projection then query blocks) is decided here and only here (see the raw-keys overload);
// both give the same bits.
//
// Types: q, the values, w_query, w_key and v are read as `In`; bias, the prepared keys, the
// projections, scores, weights and the context are `Acc` (float for bf16/f16); the context is
// stored as `Out` (In, or Acc when a 16-bit call asks for float32), converted per block at the
// store (lowp.hpp's rule).
#pragma once

#include <algorithm>
#include <cstdint>
#include <memory>
#include <type_traits>
#include <vector>

#include "additive.hpp"
#include "lowp.hpp"
#include "mask.hpp"
#include "parallel.hpp"
#include "scratch.hpp"
#include "softmax.hpp"
#include "strided.hpp"

namespace attnext {

// Keys prepared by additive_prepare_keys, seen through views (batch axes may be broadcast).
template <typename Acc>
struct AdditiveKeys {
  Strided<const Acc> raw;   // (..., Lk, U), each batch entry's rows contiguous
  Strided<const Acc> expo;  // (..., Lk, U), same layout
  Strided<const bool> ok;   // (...,)
};

// Keys prepared by additive_prepare_keys into C-contiguous buffers, as views: raw and expo
// (batches, Lk, U) with the batch shape of key_shape (..., Lk, Dk), ok (...,).
template <typename Acc>
AdditiveKeys<Acc> contiguous_keys(const std::vector<index_t>& key_shape, index_t units, const Acc* raw,
                                  const Acc* expo, const bool* ok) {
  std::vector<index_t> shape(key_shape), strides(shape.size()), batch_strides(shape.size() - 2);
  shape.back() = units;
  const std::vector<index_t> batch(shape.begin(), shape.end() - 2);
  index_t step = 1;
  for (int ax = int(shape.size()) - 1; ax >= 0; --ax) strides[ax] = step, step *= shape[ax];
  step = 1;
  for (int ax = int(batch.size()) - 1; ax >= 0; --ax) batch_strides[ax] = step, step *= batch[ax];
  return AdditiveKeys<Acc>{Strided<const Acc>(raw, shape, strides), Strided<const Acc>(expo, shape, strides),
                           Strided<const bool>(ok, batch, batch_strides)};
}

// Batch entry b's projected key rows: raw, and expo when the entry may use the factored form.
template <typename Acc>
inline AdditiveRows<Acc> entry_rows(const AdditiveKeys<Acc>& keys, index_t b) {
  const bool ok = keys.ok.data[keys.ok.batch_offset(b, 0)];
  return {keys.raw.data + keys.raw.batch_offset(b, 2), ok ? keys.expo.data + keys.expo.batch_offset(b, 2) : nullptr};
}

namespace detail {

// Scratch tags (scratch.hpp) of a block's score tile when the caller wants no weights back,
// and of the rare hidden-value fix-up.
struct AdditiveTileTag {};
struct AdditiveFixupTag {};
struct AdditiveContextTag {};

// One call's operands that do not change from task to task (arguments as for
// additive_attention below; v already in the accumulation type).
template <typename In, typename Acc, typename Out>
struct AdditiveCall {
  const Strided<const In>& q;
  const ConstMatrixMap<In>& w_query;
  const Acc* bias;
  const Strided<const In>& value;
  const AdditiveV<Acc>& v;
  const Mask<Acc>& mask;
  Out* out;
  Acc* weights;
};

// Masks one query row of scores s[0, lk) (mask.hpp's rule): keys outside `range` (the
// length) become -inf without their mask entries being read, the mask applies to the rest.
// Returns whether a key inside the range may be hidden (its value row must not leak).
template <typename Acc>
inline bool mask_scores_row(const Mask<Acc>& mask, index_t row, KeyRange range, Acc* s, index_t lk) {
  return mask_scores(s, index_t(1), lk, index_t(0), range, mask_row(mask, row)) && mask.kind != MaskKind::none;
}

// Scores tile (rows, Lk) of query rows [r0, r0 + rows) of batch entry b become their weights
// in place: masked (mask_scores_row, keys [visible, Lk) hidden by length), then softmax. The
// forward and the backward (which recomputes the weights) both go through here. Returns
// whether a key inside the length may be hidden.
template <typename Acc>
inline bool scores_to_weights(const Mask<Acc>& mask, index_t lq, index_t b, index_t r0, index_t rows, index_t visible,
                              Acc* tile, index_t lk) {
  bool may_hide = false;
  for (index_t r = 0; r < rows; ++r) {
    Acc* s = tile + r * lk;
    may_hide |= mask_scores_row(mask, b * lq + r0 + r, KeyRange{0, visible}, s, lk);
    softmax_inplace(s, lk);
  }
  return may_hide;
}

// Whether value rows [0, visible) of one batch entry (vb, row/col strides) are all finite.
// The magnitude-bits scan is for float and double; 16-bit values are tested as floats.
template <typename In>
inline bool value_rows_finite(const In* vb, index_t rs, index_t cs, index_t visible, index_t dv) {
  for (index_t j = 0; j < visible; ++j) {
    const In* row = vb + j * rs;
    if constexpr (!is_lowp<In>::value) {
      if (cs == 1) {
        if (max_magnitude_bits(row, dv) >= magnitude_bits(std::numeric_limits<In>::infinity())) return false;
        continue;
      }
    }
    for (index_t d = 0; d < dv; ++d)
      if (!std::isfinite(static_cast<acc_t<In>>(row[d * cs]))) return false;
  }
  return true;
}

// The careful path of hidden-value rows: for each row of the block that hides a key whose
// value row is not finite, the context is recomputed over its unhidden keys only. Which keys
// a row hides comes from the same mask rule, applied to a row of zeros (a hidden key becomes
// -inf, any other entry stays finite or NaN). ctx: the block's context rows (rows, Dv), in Acc.
template <typename In, typename Acc, typename Out>
void context_fixup(const AdditiveCall<In, Acc, Out>& c, const Acc* tile, index_t lk, index_t visible, index_t b,
                   index_t r0, index_t rows, Acc* ctx) {
  const index_t lq = c.q.dim(-2), dv = c.value.dim(-1);
  const index_t rs = c.value.stride(-2), cs = c.value.stride(-1);
  const In* vb = c.value.data + c.value.batch_offset(b, 2);
  const Scratch<Acc, AdditiveFixupTag> scratch(static_cast<size_t>(2 * lk + dv));
  Acc* finite = scratch.data();  // 1 where value row j is finite, else 0
  Acc* hidden = finite + lk;     // the mask rule applied to zeros
  Acc* acc = hidden + lk;
  for (index_t j = 0; j < visible; ++j) finite[j] = value_rows_finite(vb + j * rs, rs, cs, 1, dv) ? Acc(1) : Acc(0);
  for (index_t r = 0; r < rows; ++r) {
    std::fill(hidden, hidden + lk, Acc(0));
    mask_scores_row(c.mask, b * lq + r0 + r, KeyRange{0, visible}, hidden, lk);
    bool leaks = false;
    for (index_t j = 0; j < visible && !leaks; ++j) leaks = hidden[j] == -std::numeric_limits<Acc>::infinity() && !finite[j];
    if (!leaks) continue;
    std::fill(acc, acc + dv, Acc(0));
    const Acc* w = tile + r * lk;
    for (index_t j = 0; j < visible; ++j) {
      if (hidden[j] == -std::numeric_limits<Acc>::infinity()) continue;
      for (index_t d = 0; d < dv; ++d) acc[d] += w[j] * static_cast<Acc>(vb[j * rs + d * cs]);
    }
    std::copy(acc, acc + dv, ctx + r * dv);
  }
}

// context rows (rows, Dv) = tile[:, :visible] (rows, Lk) value[:visible] of batch entry b.
template <typename In, typename Acc>
void block_context(const Strided<const In>& value, index_t b, const Acc* tile, index_t lk, index_t visible,
                   index_t rows, Acc* o) {
  const index_t dv = value.dim(-1);
  const index_t value_row_stride = value.stride(-2), value_col_stride = value.stride(-1);
  const In* vb = value.data + value.batch_offset(b, 2);
  if (rows >= kPackedGemmMinRows) {  // the same choice as project_rows: by shape only
    // An Acc product: the weights (Acc) are read in place, the values converted to Acc by their
    // packer, panel by panel (read in place too when In == Acc): the weights are never rounded.
    const auto tile_rows = [&](index_t m0, index_t n, index_t k0, index_t kc, const PanelWriter<Acc>& dst) {
      for (index_t r = 0; r < n; ++r) pack_row(tile + (m0 + r) * lk + k0, index_t(1), kc, dst, r);
    };
    const auto tile_row = [&](index_t m) -> const Acc* { return tile + m * lk; };
    const auto value_cols = [&](index_t n0, index_t cols, index_t k0, index_t kc, const PanelWriter<Acc>& dst) {
      for (index_t k = 0; k < kc; ++k) {
        const In* src = vb + (k0 + k) * value_row_stride + n0 * value_col_stride;
        if constexpr (std::is_same<In, Acc>::value)
          if (value_col_stride == 1) {
            dst.put_run(k, 0, src, cols);
            continue;
          }
        for (index_t c = 0; c < cols; ++c) dst.put(k, c, static_cast<Acc>(src[c * value_col_stride]));
      }
    };
    InPlaceW<Acc> value_in_place;
    if constexpr (std::is_same<In, Acc>::value) value_in_place = InPlaceW<Acc>{vb, value_row_stride};
    const bool in_place = std::is_same<In, Acc>::value && value_col_stride == 1;
    packed_gemm<Acc, Acc>(rows, dv, visible, tile_rows, tile_row, value_cols, static_cast<const Acc*>(nullptr), o,
                          /*parallel=*/false, in_place ? &value_in_place : nullptr);
    return;
  }
  const auto w = ConstMatrixMap<Acc>(tile, rows, lk).leftCols(visible);
  auto product = [&](const auto& val) { product_rows<Acc>(w, val.template cast<Acc>(), o); };
  if (value_col_stride == 1) {
    using RowStrided = Eigen::Map<const RowMatrix<In>, Eigen::Unaligned, Eigen::OuterStride<>>;
    product(RowStrided(vb, visible, dv, Eigen::OuterStride<>(value_row_stride)));
  } else {
    product(StridedMatrixMap<In>(vb, visible, dv,
                                 Eigen::Stride<Eigen::Dynamic, Eigen::Dynamic>(value_row_stride, value_col_stride)));
  }
}

// One task's work: the context (and weights) of query rows [r0, r0 + rows) of batch entry b,
// against that entry's projected keys (lk of them, the first `visible` not hidden by length).
template <typename In, typename Acc, typename Out>
void additive_attention_block(const AdditiveCall<In, Acc, Out>& c, const AdditiveRows<Acc>& keys, index_t lk,
                              index_t visible, index_t b, index_t r0, index_t rows) {
  const index_t lq = c.q.dim(-2), dv = c.value.dim(-1);
  // The block's scores become its weights: in the caller's weights array, or in scratch memory.
  const Scratch<Acc, AdditiveTileTag> scratch(c.weights ? 0 : static_cast<size_t>(rows * lk));
  Acc* tile = c.weights ? c.weights + (b * lq + r0) * lk : scratch.data();
  additive_score_block<In, Acc>(c.q, b, r0, rows, c.w_query, c.bias, keys, c.v, lk, tile, lk);
  const bool may_hide = scores_to_weights(c.mask, lq, b, r0, rows, visible, tile, lk);
  if (dv == 0) return;
  // The block's context in Acc: in out itself when it is of that type, else in scratch memory
  // converted at the store.
  Out* dst = c.out + (b * lq + r0) * dv;
  const Scratch<Acc, AdditiveContextTag> ctx_buf(std::is_same<Out, Acc>::value ? 0 : static_cast<size_t>(rows * dv));
  Acc* ctx = staged(dst, ctx_buf.data());
  block_context<In, Acc>(c.value, b, tile, lk, visible, rows, ctx);
  if (may_hide && !value_rows_finite(c.value.data + c.value.batch_offset(b, 2), c.value.stride(-2),
                                     c.value.stride(-1), visible, dv))
    context_fixup(c, tile, lk, visible, b, r0, rows, ctx);
  if constexpr (!std::is_same<Out, Acc>::value) store_row(ctx, rows * dv, dst);
}

// Keys of batch entry b not hidden by its length (mask.hpp's visible-key rule: any int64
// length, clamped to [0, lk]); additive attention has no causal or window, so the range is
// [0, visible) for every query.
inline index_t keys_within_length(const Strided<const std::int64_t>* lengths, index_t b, index_t lk) {
  Visibility vis;
  if (lengths) vis.length = lengths->data[lengths->batch_offset(b, 0)];
  return attnext::visible_keys(vis, 0, lk).hi;
}

// Whether the call has nothing to compute: no output element, or (without weights) a context
// of width 0. A call without keys gets a zero context (no row sees a key).
template <typename Out>
inline bool additive_nothing_to_do(index_t batches, index_t lq, index_t lk, index_t dv, Out* out, bool weights) {
  if (batches == 0 || lq == 0 || (dv == 0 && !weights)) return true;
  if (lk > 0) return false;
  std::fill(out, out + batches * lq * dv, store_as<Out>(0.0f));
  return true;
}

}  // namespace detail

// out_i = sum_j softmax_j(v . tanh(q_i W_q + bias + k'_j) + mask_ij) value_j
//   q       (..., Lq, Dq) any strides
//   w_query (Dq, U) contiguous; bias (U,) of Acc or nullptr; v (U,) contiguous
//   keys    (..., Lk, U) projected keys; value (..., Lk, Dv) any strides; equal batch shapes
//   mask    (..., Lq, Lk) broadcast view or none
//   lengths (...,) keys [lengths[b], Lk) of batch entry b are hidden; nullptr = none. Any int64
//           (clamped to [0, Lk]); the caller owns the values for the whole call.
//   out     (..., Lq, Dv) C-contiguous, of Out; weights (..., Lq, Lk) C-contiguous (Acc) or nullptr
// A query row with nothing visible gets zero weights and a zero context.
template <typename In, typename Acc = acc_t<In>, typename Out = In>
void additive_attention(const Strided<const In>& q, const ConstMatrixMap<In>& w_query, const Acc* bias,
                        const AdditiveKeys<Acc>& keys, const Strided<const In>& value, const In* v,
                        const Mask<Acc>& mask, const Strided<const std::int64_t>* lengths, Out* out, Acc* weights) {
  const index_t batches = q.batch_count(2);
  const index_t lq = q.dim(-2), lk = keys.raw.dim(-2), units = w_query.cols();
  if (detail::additive_nothing_to_do(batches, lq, lk, value.dim(-1), out, weights != nullptr)) return;
  const index_t nb = additive_row_blocks(lq);
  const AccVector<In, Acc> v_acc(v, units);
  const AdditiveV<Acc> v_form = additive_v(v_acc.data(), units);
  const detail::AdditiveCall<In, Acc, Out> call{q, w_query, bias, value, v_form, mask, out, weights};
  parallel_for(batches * nb, [&](index_t task) {
    const index_t b = task / nb, r0 = (task % nb) * kAdditiveRowBlock;
    detail::additive_attention_block(call, entry_rows(keys, b), lk, detail::keys_within_length(lengths, b, lk), b, r0,
                                     std::min(kAdditiveRowBlock, lq - r0));
  });
}

// The same with raw keys (..., Lk, Dk) (batch shape equal to the query's) and w_key (Dk, U):
// the keys are projected into per-thread scratch memory (scratch.hpp). A call that is not
// kept for later steps thus allocates no projection arrays for its keys.
// The strategy: with at least two batch entries per thread, each task takes one entry: it
// projects the entry's keys and then attends with all of its query rows, so nothing waits
// between the two stages and the keys are scored while they are in this core's cache. With
// fewer, all threads project all keys first (additive_prepare_keys), then share the query
// blocks. Both give the same bits: from kPackedGemmMinRows keys on both project through the
// packed GEMM, whose results do not depend on how its rows are split, and below that only the
// second runs.
template <typename In, typename Acc = acc_t<In>, typename Out = In>
void additive_attention(const Strided<const In>& q, const ConstMatrixMap<In>& w_query, const Acc* bias,
                        const Strided<const In>& key, const ConstMatrixMap<In>& w_key, const Strided<const In>& value,
                        const In* v, const Mask<Acc>& mask, const Strided<const std::int64_t>* lengths, Out* out,
                        Acc* weights) {
  const index_t batches = key.batch_count(2), lk = key.dim(-2), units = w_key.cols(), lq = q.dim(-2);
  if (detail::additive_nothing_to_do(batches, lq, lk, value.dim(-1), out, weights != nullptr)) return;
  if (batches >= 2 * index_t(get_num_threads()) && lk >= kPackedGemmMinRows) {
    const AccVector<In, Acc> v_acc(v, units);
    const AdditiveV<Acc> v_form = additive_v(v_acc.data(), units);
    const detail::AdditiveCall<In, Acc, Out> call{q, w_query, bias, value, v_form, mask, out, weights};
    parallel_for(batches, [&](index_t b) {
      const size_t n = static_cast<size_t>(lk * units);
      const Scratch<Acc, AdditiveKeyRawTag> raw(n);
      const Scratch<Acc, AdditiveKeyExpTag> expo(n);
      const Strided<const In> entry_keys(key.data + key.batch_offset(b, 2), {lk, key.dim(-1)},
                                         {key.stride(-2), key.stride(-1)});
      bool ok = false;
      additive_prepare_keys<In, Acc>(entry_keys, w_key, raw.data(), expo.data(), &ok, /*parallel=*/false);
      const AdditiveRows<Acc> k_rows{raw.data(), ok ? expo.data() : nullptr};
      const index_t visible = detail::keys_within_length(lengths, b, lk);
      for (index_t r0 = 0; r0 < lq; r0 += kAdditiveRowBlock)
        detail::additive_attention_block(call, k_rows, lk, visible, b, r0, std::min(kAdditiveRowBlock, lq - r0));
    });
    return;
  }
  const size_t n = static_cast<size_t>(batches * lk * units);
  const Scratch<Acc, AdditiveKeyRawTag> raw(n);
  const Scratch<Acc, AdditiveKeyExpTag> expo(n);
  std::unique_ptr<bool[]> ok(new bool[static_cast<size_t>(batches)]);
  additive_prepare_keys<In, Acc>(key, w_key, raw.data(), expo.data(), ok.get());
  const AdditiveKeys<Acc> keys = contiguous_keys<Acc>(key.shape, units, raw.data(), expo.data(), ok.get());
  additive_attention<In, Acc, Out>(q, w_query, bias, keys, value, v, mask, lengths, out, weights);
}

}  // namespace attnext
