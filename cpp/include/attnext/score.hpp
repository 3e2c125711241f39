// The score step: compare every query with every key.
#pragma once

#include <algorithm>
#include <memory>
#include <type_traits>
#include <vector>

#include "additive.hpp"
#include "lowp.hpp"
#include "parallel.hpp"
#include "scratch.hpp"
#include "strided.hpp"

namespace attnext {

// Rows of queries handled by one parallel task. Fixed (not derived from the thread count)
// so results are bit-identical for any number of threads; 64 rows keep a task's GEMM
// large enough to run near peak while leaving enough tasks to balance two to sixteen cores.
constexpr index_t kScoreRowBlock = 64;

inline index_t row_blocks(index_t rows) { return (rows + kScoreRowBlock - 1) / kScoreRowBlock; }

// Scratch tag (scratch.hpp) of a task's tile of scores when the output type is not Acc.
struct ScoreTileTag {};

// The products of score_product and weighted_sum for 16-bit inputs: tile (M, N) row-major =
// a b^T for one batch entry, a_row(m) and b_row(n) rows of K elements (a_cs, b_cs apart),
// through packed_gemm<In, float> on the library's threads. Its packers convert a's and b's
// panels (bfloat16 pairs for vdpbf16ps while it is active): no operand is copied to float as a
// whole, as Eigen's cast<float>() would do with a batch entry's keys in every task.
template <typename In, typename ARow, typename BRow>
void product_16(index_t M, index_t N, index_t K, const ARow& a_row, index_t a_cs, const BRow& b_row, index_t b_cs,
                float* tile) {
  const auto x_rows = [&](index_t m0, index_t rows, index_t k0, index_t kc, const PanelWriter<In>& dst) {
    for (index_t r = 0; r < rows; ++r) pack_row(a_row(m0 + r) + k0 * a_cs, a_cs, kc, dst, r);
  };
  const auto x_row = [](index_t) -> const In* { return nullptr; };  // 16-bit rows are always packed
  const auto w_rows = [&](index_t n0, index_t cols, index_t k0, index_t kc, const PanelWriter<In>& dst) {
    for (index_t c = 0; c < cols; ++c) pack_row(b_row(n0 + c) + k0 * b_cs, b_cs, kc, dst, c);
  };
  packed_gemm<In, float>(M, N, K, x_rows, x_row, w_rows, static_cast<const float*>(nullptr), tile);
}

// out (rows, n) = scale * tile for one batch entry, the float tile scaled in place and stored
// as Out (a no-op store when Out is float), in row blocks on the library's threads.
template <typename Out>
void scale_and_store(float* tile, index_t rows, index_t n, float scale, Out* out) {
  parallel_for(row_blocks(rows), [&](index_t t) {
    const index_t r0 = t * kScoreRowBlock, count = std::min(kScoreRowBlock, rows - r0) * n;
    float* x = tile + r0 * n;
    if (scale != 1.0f)
      for (index_t i = 0; i < count; ++i) x[i] *= scale;
    if constexpr (!std::is_same<Out, float>::value) store_row(x, count, out + r0 * n);
  });
}

// out[b] (M, N) = scale * A_b B_b^T for every batch entry b of a and bm, one entry at a time
// (product_16, then one rounding at the store): row m of A_b at a's entry b + m * a_rs, its
// elements a_cs apart; row n of B_b likewise with b_rs, b_cs.
template <typename In, typename Out>
void batched_product_16(const Strided<const In>& a, index_t a_rs, index_t a_cs, const Strided<const In>& bm,
                        index_t b_rs, index_t b_cs, index_t M, index_t N, index_t K, float scale, Out* out) {
  const Scratch<float, ScoreTileTag> buf(std::is_same<Out, float>::value ? 0 : static_cast<size_t>(M * N));
  for (index_t b = 0; b < a.batch_count(2); ++b) {
    const In* ab = a.data + a.batch_offset(b, 2);
    const In* bb = bm.data + bm.batch_offset(b, 2);
    float* tile = staged(out + b * M * N, buf.data());
    product_16<In>(M, N, K, [&](index_t m) { return ab + m * a_rs; }, a_cs, [&](index_t n) { return bb + n * b_rs; },
                   b_cs, tile);
    scale_and_store(tile, M, N, scale, out + b * M * N);
  }
}

// score_product without a weight for 16-bit inputs: q k^T per batch entry.
template <typename In, typename Out>
void score_product_16(const Strided<const In>& q, const Strided<const In>& k, float scale, Out* out) {
  batched_product_16<In>(q, q.stride(-2), q.stride(-1), k, k.stride(-2), k.stride(-1), q.dim(-2), k.dim(-2), q.dim(-1),
                         scale, out);
}

// out = scale * q k^T (dot, scaled_dot) or scale * (q W) k^T (general, weight != nullptr).
//   q (..., Lq, Dq), k (..., Lk, Dk) with equal batch shapes (broadcast beforehand)
//   weight (Dq, Dk) or empty
//   out (..., Lq, Lk) C-contiguous, of type Out
// q, k and W are read as In and cast to Acc where Eigen reads them (a no-op for In == Acc); a
// task's tile is computed in Acc, in out itself when Out is Acc, else converted at the store.
template <typename In, typename Acc = acc_t<In>, typename Out = In>
void score_product(const Strided<const In>& q, const Strided<const In>& k, const Strided<const In>* weight, Acc scale,
                   Out* out) {
  const index_t batches = q.batch_count(2);
  const index_t lq = q.dim(-2), lk = k.dim(-2);
  if (batches == 0 || lq == 0 || lk == 0) return;
  if constexpr (is_lowp<In>::value)
    if (!weight) return score_product_16<In, Out>(q, k, scale, out);
  const index_t nb = row_blocks(lq);
  parallel_for(batches * nb, [&](index_t task) {
    const index_t b = task / nb, r0 = (task % nb) * kScoreRowBlock;
    const index_t rows = std::min(kScoreRowBlock, lq - r0);
    Out* dst = out + (b * lq + r0) * lk;
    const Scratch<Acc, ScoreTileTag> buf(std::is_same<Out, Acc>::value ? 0 : static_cast<size_t>(rows * lk));
    MatrixMap<Acc> o(staged(dst, buf.data()), rows, lk);
    const auto qb = matrix_of(q, b, r0, rows).template cast<Acc>();
    const auto kb = matrix_of(k, b).template cast<Acc>();
    if (weight) {
      const RowMatrix<Acc> qw = qb * matrix_of(*weight, 0).template cast<Acc>();
      o.noalias() = scale * (qw * kb.transpose());
    } else {
      o.noalias() = scale * (qb * kb.transpose());
    }
    if constexpr (!std::is_same<Out, Acc>::value) store_row(o.data(), rows * lk, dst);
  });
}

// out[i, j] = scale * v . tanh(q_i W_q + bias + k_j W_k)
//   q (..., Lq, Dq), k (..., Lk, Dk), equal batch shapes; w_query (Dq, U), w_key (Dk, U) contiguous
//   v (U,) contiguous, of In; bias (U,) contiguous, of Acc, or nullptr; out (..., Lq, Lk)
//   C-contiguous, of Out (a task's tile computed in Acc, converted at the store unless Out is Acc)
template <typename In, typename Acc = acc_t<In>, typename Out = In>
void score_additive(const Strided<const In>& q, const Strided<const In>& k, const ConstMatrixMap<In>& w_query,
                    const ConstMatrixMap<In>& w_key, const In* v, const Acc* bias, Acc scale, Out* out) {
  const index_t batches = q.batch_count(2);
  const index_t lq = q.dim(-2), lk = k.dim(-2), units = w_query.cols();
  if (batches == 0 || lq == 0 || lk == 0) return;
  // Keys projected once, as a GEMM, with their exponential form (additive.hpp); each task
  // projects its own block of queries. Only (B, Lq or Lk, U) projections, never (B, Lq, Lk, U).
  const size_t kn = static_cast<size_t>(batches * lk * units);
  const Scratch<Acc, AdditiveKeyRawTag> kp(kn);
  const Scratch<Acc, AdditiveKeyExpTag> ke(kn);
  std::unique_ptr<bool[]> k_ok(new bool[static_cast<size_t>(batches)]);
  additive_prepare_keys<In, Acc>(k, w_key, kp.data(), ke.data(), k_ok.get());
  const index_t nb = additive_row_blocks(lq);
  const AccVector<In, Acc> v_acc(v, units);
  const AdditiveV<Acc> v_form = additive_v(v_acc.data(), units);
  parallel_for(batches * nb, [&](index_t task) {
    const index_t b = task / nb, r0 = (task % nb) * kAdditiveRowBlock;
    const index_t rows = std::min(kAdditiveRowBlock, lq - r0);
    const AdditiveRows<Acc> keys{kp.data() + b * lk * units, k_ok[b] ? ke.data() + b * lk * units : nullptr};
    Out* dst = out + (b * lq + r0) * lk;
    const Scratch<Acc, ScoreTileTag> buf(std::is_same<Out, Acc>::value ? 0 : static_cast<size_t>(rows * lk));
    Acc* tile = staged(dst, buf.data());
    additive_score_block<In, Acc>(q, b, r0, rows, w_query, bias, keys, v_form, lk, tile, lk);
    if (scale != Acc(1))
      for (index_t i = 0; i < rows * lk; ++i) tile[i] *= scale;
    if constexpr (!std::is_same<Out, Acc>::value) store_row(tile, rows * lk, dst);
  });
}

}  // namespace attnext
