// The backward of fused additive (Bahdanau) attention (additive_attention.hpp), fused like the
// forward: the (..., Lq, Lk, U) tensor of the textbook formula is never formed.
//
// Forward: s_ij = v . t_ij + mask_ij with t_ij = tanh(qp_i + kp_j) (U,), qp = q W_q + bias,
// kp = k W_k; P = softmax_j(s); out = P V. With the output's cotangent dO (and optionally a
// cotangent gW of the returned weights P):
//   dV = P^T dO;  dP = dO V^T (+ gW);  D_i = sum_j P_ij dP_ij;  dS = P o (dP - D)
//   g_ij = dS_ij (1 - t_ij^2) (U,):  d(qp)_i = v o sum_j g_ij,  d(kp)_j = v o sum_i g_ij,
//   dv = sum_ij dS_ij t_ij,  dbias = sum_i d(qp)_i,  dmask = dS,
//   dq = d(qp) W_q^T, dW_q = q^T d(qp) (summed over the batch), the same on the key side.
// D_i = sum_j P_ij dP_ij equals rowsum(dO o out) (out = P V), so neither out nor lse is needed:
// P is recomputed from the scores by the forward's own functions (additive_score_projected,
// scores_to_weights), so it has exactly the bits of the forward's weights.
//
// 1 - t^2 comes from the forward's factored form: with inv = e^{-2 qp} and expo = e^{2 kp},
// d = inv + expo, a = inv / d, b = expo / d: t = b - a and 1 - t^2 = (1 - t)(1 + t) = 4 a b,
// one reciprocal per two units, no exp or tanh in the inner loop, a and b in [0, 1] (every
// term finite in the form's range). A row or key set outside the range uses tanh itself.
//
// Work split: one task per (batch entry, block of query rows). A task recomputes its rows'
// weights (or reads the ones the forward returned, when the caller kept them), forms dS, and
// runs one pass over (row, visible key, unit) that accumulates d(qp) of its rows and the
// block's share of sum_i g_ij for every key (block_unit_grads); the blocks' shares (and their
// shares of dV, dv, dbias) are added afterwards in block order. The blocks depend on the
// shapes only, so the gradients are bit-identical for any thread count; nothing is atomic.
// Keys hidden from a row (mask, length) have dS = 0 and are skipped: they get exactly zero,
// and a row that sees no key has zero gradients.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#include "additive.hpp"
#include "additive_attention.hpp"
#include "gemm.hpp"
#include "mask.hpp"
#include "parallel.hpp"
#include "scratch.hpp"
#include "strided.hpp"
#include "vmath.hpp"

namespace attnext {

// At most this many row blocks per batch entry: each block keeps its own (Lk, U) and (Lk, Dv)
// shares of the key and value gradients until they are added in order, so the count bounds
// that memory (B8 Lq=Lk=1024 U=Dv=256 float: 4 blocks keep 64 MB) while B x 4 tasks still
// feed the threads of a batch.
constexpr index_t kAdditiveBackwardMaxBlocks = 4;

// Query rows per backward block: the forward's block, or more when Lq would need more than
// kAdditiveBackwardMaxBlocks blocks. A function of Lq only.
inline index_t additive_backward_rows(index_t lq) {
  const index_t spread = (lq + kAdditiveBackwardMaxBlocks - 1) / kAdditiveBackwardMaxBlocks;
  return std::max(kAdditiveRowBlock, spread);
}

// Where the gradients go, every array C-contiguous (batches = the flat batch entries):
template <typename T>
struct AdditiveGradients {
  T* query = nullptr;     // (batches, Lq, Dq)
  T* w_query = nullptr;   // (Dq, U)
  T* bias = nullptr;      // (U,): the gradient at the bias given (zero bias when there was none)
  T* v = nullptr;         // (U,)
  T* keys_raw = nullptr;  // (batches, Lk, U): d(key W_k)
  T* value = nullptr;     // (batches, Lk, Dv)
  T* mask = nullptr;      // (batches, Lq, Lk) = dS = dL/d(score + mask), or nullptr (not wanted)
  T* key = nullptr;       // (batches, Lk, Dk), raw-key entry only
  T* w_key = nullptr;     // (Dk, U), raw-key entry only
};

namespace detail {

struct AdditiveGradQueryTag {};
struct AdditiveGradTileTag {};
struct AdditiveGradKeysTag {};
struct AdditiveGradRowTag {};
struct AdditiveGradKeyListTag {};
struct AdditiveGradQueryProjTag {};
struct AdditiveGradKeyShareTag {};
struct AdditiveGradValueShareTag {};
struct AdditiveGradUnitShareTag {};
struct AdditiveGradKeyRawTag {};
struct AdditiveGradKeyExpTag {};

// Units padded to whole pairs of packets: the gradient pass runs over pairs of packets only.
template <typename T>
inline index_t padded_units(index_t units) {
  constexpr index_t W2 = 2 * vm::packet_size<T>();
  return (units + W2 - 1) / W2 * W2;
}

// One key's terms on two packets of units [u, u + 2W) of one row, for the row's sums rs and rt
// and the key's share ks[u..]: rs and ks get g_u = dS (1 - t_u^2); rt gets what dv needs. qa
// and ka are the query's and the key's operands in the row's form; c = dS broadcast.
//   Factored (qa = e^{-2 qp}, ka = e^{2 kp}): with d = qa + ka, a = qa / d, b = ka / d (both in
//   [0, 1]), t = b - a = 1 - 2a and 1 - t^2 = 4ab. rt gets 4 c a, and the row's dv is then
//   sum_j c_j - rt / 2 (= sum_j c_j t_j); 4c is folded into a, so g = (4c a) b. The two packets
//   share one reciprocal: 1/d1 = d2 / (d1 d2), 1/d2 = d1 / (d1 d2). In range d lies in
//   [2e^-2L, 2e^2L] (L = exp_form_limit), so d1 d2 stays a normal finite number (as in the
//   forward's add_pair).
//   Plain (qa = qp, ka = kp): t = tanh(qp + kp), g = c (1 - t)(1 + t), rt gets c t.
template <typename T, bool factored>
struct GradTerm {
  using P = vm::Packet<T>;
  // The padding of the operands' tail lanes: finite terms whose gradients land in tail lanes.
  static constexpr T pad = factored ? T(1) : T(0);
  // 1 / x for the normal positive x of the factored form. With AVX-512 and float: the 14-bit
  // estimate and one Newton step (about 1 ulp, two FMAs instead of a division); elsewhere the
  // division.
  static P reciprocal(const P& x) {
    namespace ei = Eigen::internal;
#if defined(EIGEN_VECTORIZE_AVX512)
    if constexpr (std::is_same<P, __m512>::value) {
      const __m512 r = _mm512_rcp14_ps(x);
      return _mm512_fmadd_ps(r, _mm512_fnmadd_ps(x, r, _mm512_set1_ps(1.0f)), r);
    }
#endif
    return ei::pdiv(ei::pset1<P>(T(1)), x);
  }
  // The row's dv on one unit from its rt and the sum of its dS.
  static T row_dv(T rt, T c_sum) { return factored ? c_sum - rt / T(2) : rt; }

  static void add(const P& q1, const P& q2, const T* kr, T* ks, const P& c, P* rs, P* rt) {
    namespace ei = Eigen::internal;
    constexpr index_t W = vm::packet_size<T>();
    const P k1 = ei::ploadu<P>(kr), k2 = ei::ploadu<P>(kr + W);
    P g1, g2;
    if constexpr (factored) {
      const P d1 = ei::padd(q1, k1), d2 = ei::padd(q2, k2);
      const P inv = reciprocal(ei::pmul(d1, d2));
      const P r1 = ei::pmul(d2, inv), r2 = ei::pmul(d1, inv);
      const P c4 = ei::pmul(ei::pset1<P>(T(4)), c);
      const P a1 = ei::pmul(q1, ei::pmul(c4, r1)), a2 = ei::pmul(q2, ei::pmul(c4, r2));  // 4c a
      g1 = ei::pmul(a1, ei::pmul(k1, r1)), g2 = ei::pmul(a2, ei::pmul(k2, r2));
      rt[0] = ei::padd(rt[0], a1), rt[1] = ei::padd(rt[1], a2);
    } else {
      const P one = ei::pset1<P>(T(1));
      const P t1 = vm::tanh<T>(ei::padd(q1, k1)), t2 = vm::tanh<T>(ei::padd(q2, k2));
      g1 = ei::pmul(c, ei::pmul(ei::psub(one, t1), ei::padd(one, t1)));
      g2 = ei::pmul(c, ei::pmul(ei::psub(one, t2), ei::padd(one, t2)));
      rt[0] = ei::pmadd(c, t1, rt[0]), rt[1] = ei::pmadd(c, t2, rt[1]);
    }
    rs[0] = ei::padd(rs[0], g1), rs[1] = ei::padd(rs[1], g2);
    ei::pstoreu(ks, ei::padd(ei::ploadu<P>(ks), g1));
    ei::pstoreu(ks + W, ei::padd(ei::ploadu<P>(ks + W), g2));
  }
};

// Keys per chunk of the gradient pass: a chunk's operands and shares on one pair of packets
// (128 keys x 2 packets x 2 arrays = 32 KB) stay in L1 while every row of the block passes
// over them; the rows' sums on that pair stay in registers across the chunk's keys.
constexpr index_t kGradKeyChunk = 128;

// One row's terms on one pair of packets (qa, row_s, row_t, k_op and key_s all point at the
// pair's first unit) for its keys key[0, n) with nonzero dS c[0, n), in key order: g is added
// to row_s and to each key's share key_s[key * ldk ...], the dv terms to row_t (GradTerm::add).
template <typename T, bool factored>
inline void row_pair_terms(const T* qa, const T* k_op, T* key_s, index_t ldk, const index_t* key, const T* c,
                           index_t n, T* row_s, T* row_t) {
  namespace ei = Eigen::internal;
  using P = vm::Packet<T>;
  constexpr index_t W = vm::packet_size<T>();
  const P q1 = ei::ploadu<P>(qa), q2 = ei::ploadu<P>(qa + W);
  P rs[2] = {ei::ploadu<P>(row_s), ei::ploadu<P>(row_s + W)};
  P rt[2] = {ei::ploadu<P>(row_t), ei::ploadu<P>(row_t + W)};
  for (index_t k = 0; k < n; ++k)
    GradTerm<T, factored>::add(q1, q2, k_op + key[k] * ldk, key_s + key[k] * ldk, ei::pset1<P>(c[k]), rs, rt);
  ei::pstoreu(row_s, rs[0]), ei::pstoreu(row_s + W, rs[1]);
  ei::pstoreu(row_t, rt[0]), ei::pstoreu(row_t + W, rt[1]);
}

// The operands of one call that do not change from task to task.
template <typename T>
struct AdditiveBackwardCall {
  const Strided<const T>& q;
  const ConstMatrixMap<T>& w_query;
  const T* bias;
  const AdditiveKeys<T>& keys;
  const Strided<const T>& value;
  const AdditiveV<T>& v;
  const Mask<T>& mask;
  const Strided<const std::int64_t>* lengths;
  const Strided<const T>& grad_out;      // (..., Lq, Dv)
  const Strided<const T>* grad_weights;  // (..., Lq, Lk) or nullptr
  const Strided<const T>* saved_weights;  // (..., Lq, Lk): the forward's weights, or nullptr
  index_t lq, lk, units, dv, rows_per_block, blocks;
  T* q_grad;      // d(qp) (batches, Lq, U)
  T* key_share;   // (batches, blocks, Lk, U_pad): each block's sum_i dS_ij (1 - t_ij^2) (v comes last)
  T* value_share; // (batches, blocks, Lk, Dv): each block's P^T dO
  bool direct;    // key_share and value_share are the outputs g.keys_raw and g.value themselves
  T* unit_share;  // (batches, blocks, 2, U): each block's sum_ij dS_ij t_ij and sum_i d(qp)_i
  T* mask_grad;   // (batches, Lq, Lk) or nullptr
};

// dS of one row in place over dp[0, visible) (dP, with the weights' cotangent added): P_ij
// (dP_ij - D_i) where P_ij != 0, else exactly 0 (a hidden or underflowed key: its dP, maybe
// NaN from a hidden value row, is never read into D).
template <typename T>
inline void row_score_grad(const T* p, T* dp, index_t visible) {
  T d = T(0);
  for (index_t j = 0; j < visible; ++j)
    if (p[j] != T(0)) d += p[j] * dp[j];
  for (index_t j = 0; j < visible; ++j) dp[j] = p[j] != T(0) ? p[j] * (dp[j] - d) : T(0);
}

// A key operand (raw or expo) of one batch entry, rows [0, visible) copied to ldk-padded rows
// with the form's tail padding.
template <typename T>
inline void pad_key_rows(const T* src, index_t visible, index_t units, index_t ldk, T pad, T* dst) {
  for (index_t j = 0; j < visible; ++j) {
    std::memcpy(dst + j * ldk, src + j * units, sizeof(T) * units);
    std::fill(dst + j * ldk + units, dst + (j + 1) * ldk, pad);
  }
}

// dP rows (rows, visible) = dO rows (rows, Dv) V[:visible]^T (+ gW rows), dst row stride
// visible, and the block's share of dV: value_share (Lk, Dv) = P[:, :visible]^T dO rows (rows
// past visible 0), on the calling thread. From kPackedGemmMinRows rows on through the packed
// GEMM; below (a decoding step), packing V would cost more than the products themselves (at
// B32 Lq=1 Lk=50 Dv=256 it was a quarter of the backward), so Eigen's products read V and dO in
// place. The choice depends on the shapes only, as the forward's block_context.
template <typename T>
void block_value_grads(const AdditiveBackwardCall<T>& c, index_t b, index_t r0, index_t rows, index_t visible,
                       const T* weights, T* dp, T* value_share) {
  const index_t lk = c.lk, dv = c.dv;
  const bool packed = rows >= kPackedGemmMinRows;
  const T* go = c.grad_out.data + c.grad_out.batch_offset(b, 2) + r0 * c.grad_out.stride(-2);
  const T* val = c.value.data + c.value.batch_offset(b, 2);
  const index_t go_rs = c.grad_out.stride(-2), go_cs = c.grad_out.stride(-1);
  const index_t val_rs = c.value.stride(-2), val_cs = c.value.stride(-1);
  const auto go_row = [&](index_t r) { return go + r * go_rs; };
  const auto val_row = [&](index_t j) { return val + j * val_rs; };
  const auto weight_row = [&](index_t r) { return weights + r * lk; };
  if (visible > 0) {
    if (packed)
      gemm_rows_times_transposed<T>(rows, visible, dv, go_row, go_cs, val_row, val_cs, dp, /*parallel=*/false);
    else
      MatrixMap<T>(dp, rows, visible).noalias() =
          matrix_of(c.grad_out, b, r0, rows) * matrix_of(c.value, b, 0, visible).transpose();
    if (c.grad_weights)
      for (index_t r = 0; r < rows; ++r) {
        const Strided<const T>& gw = *c.grad_weights;
        const T* row = gw.data + gw.batch_offset(b, 2) + (r0 + r) * gw.stride(-2);
        for (index_t j = 0; j < visible; ++j) dp[r * visible + j] += row[j * gw.stride(-1)];
      }
    const InPlaceW<T> go_in_place{go, go_rs};
    if (packed)
      gemm_transposed_rows<T>(rows, visible, dv, weight_row, 1, go_row, go_cs, value_share,
                              go_cs == 1 ? &go_in_place : nullptr, /*parallel=*/false);
    else
      MatrixMap<T>(value_share, visible, dv).noalias() =
          ConstMatrixMap<T>(weights, rows, lk).leftCols(visible).transpose() * matrix_of(c.grad_out, b, r0, rows);
  }
  std::fill(value_share + visible * dv, value_share + lk * dv, T(0));
}

// The gradient pass of one block: every row's d(qp), the block's key shares and unit shares.
// q_proj (rows, U); ds (rows, visible) = dS. Loops: key chunks, pairs of packets, rows, the
// row's keys in the chunk; each sum still runs in key order (a row's) or row order (a key's).
template <typename T>
void block_unit_grads(const AdditiveBackwardCall<T>& c, index_t b, index_t r0, index_t rows, index_t visible,
                      const T* q_proj, const T* ds, T* key_share, T* unit_share) {
  const index_t units = c.units, up = padded_units<T>(units);
  const AdditiveRows<T> keys = entry_rows(c.keys, b);
  // Per row: its operand (padded), its sums, its keys with nonzero dS (capacity visible each).
  const Scratch<T, AdditiveGradRowTag> row_buf(static_cast<size_t>(3 * rows * up + rows * visible));
  T* const qa = row_buf.data();
  T* const row_s = qa + rows * up;
  T* const row_t = row_s + rows * up;
  T* const cs = row_t + rows * up;
  const Scratch<index_t, AdditiveGradKeyListTag> list_buf(static_cast<size_t>(rows * visible + 4 * rows));
  index_t* const key_list = list_buf.data();
  index_t* const count = key_list + rows * visible;
  index_t* const cursor = count + rows;
  index_t* const chunk_begin = cursor + rows;
  std::unique_ptr<bool[]> factored(new bool[static_cast<size_t>(std::max<index_t>(rows, 1))]);
  bool any_factored = false, any_plain = false;
  for (index_t r = 0; r < rows; ++r) {
    index_t n = 0;
    for (index_t j = 0; j < visible; ++j) {
      const T d = ds[r * visible + j];
      if (d != T(0)) key_list[r * visible + n] = j, cs[r * visible + n++] = d;
    }
    count[r] = n, cursor[r] = 0;
    const T* qr = q_proj + r * units;
    T* q_op = qa + r * up;
    factored[r] = keys.expo && additive_exp_form(qr, q_op, units, T(-2));
    if (!factored[r]) std::copy(qr, qr + units, q_op);
    std::fill(q_op + units, q_op + up, factored[r] ? GradTerm<T, true>::pad : GradTerm<T, false>::pad);
    any_factored |= n > 0 && factored[r];
    any_plain |= n > 0 && !factored[r];
  }
  std::fill(row_s, row_s + 2 * rows * up, T(0));  // row_s and row_t
  std::fill(key_share, key_share + c.lk * up, T(0));
  // The keys' operands: expo for factored rows, raw for plain rows; read in place (each batch
  // entry's rows are contiguous) when the units fill whole pairs of packets, else copied to
  // padded rows.
  const bool in_place = up == units;
  const Scratch<T, AdditiveGradKeysTag> key_ops(in_place ? 0 : static_cast<size_t>(2 * visible * up));
  const T* expo_op = in_place ? keys.expo : key_ops.data();
  const T* raw_op = in_place ? keys.raw : key_ops.data() + visible * up;
  if (!in_place && any_factored) pad_key_rows(keys.expo, visible, units, up, GradTerm<T, true>::pad, key_ops.data());
  if (!in_place && any_plain)
    pad_key_rows(keys.raw, visible, units, up, GradTerm<T, false>::pad, key_ops.data() + visible * up);
  constexpr index_t W2 = 2 * vm::packet_size<T>();
  for (index_t j0 = 0; j0 < visible; j0 += kGradKeyChunk) {
    const index_t j1 = std::min(visible, j0 + kGradKeyChunk);
    for (index_t r = 0; r < rows; ++r) {  // each row's keys in [j0, j1): list entries [chunk_begin, cursor)
      chunk_begin[r] = cursor[r];
      while (cursor[r] < count[r] && key_list[r * visible + cursor[r]] < j1) ++cursor[r];
    }
    for (index_t u = 0; u < up; u += W2)
      for (index_t r = 0; r < rows; ++r) {
        const index_t first = r * visible + chunk_begin[r], n = cursor[r] - chunk_begin[r];
        if (n == 0) continue;
        if (factored[r])
          row_pair_terms<T, true>(qa + r * up + u, expo_op + u, key_share + u, up, key_list + first, cs + first, n,
                                  row_s + r * up + u, row_t + r * up + u);
        else
          row_pair_terms<T, false>(qa + r * up + u, raw_op + u, key_share + u, up, key_list + first, cs + first, n,
                                   row_s + r * up + u, row_t + r * up + u);
      }
  }
  T* const dv_sum = unit_share;
  T* const bias_sum = unit_share + units;
  std::fill(unit_share, unit_share + 2 * units, T(0));
  for (index_t r = 0; r < rows; ++r) {
    T* const q_grad = c.q_grad + (b * c.lq + r0 + r) * units;
    if (count[r] == 0) {
      std::fill(q_grad, q_grad + units, T(0));
      continue;
    }
    T c_sum = T(0);
    for (index_t k = 0; k < count[r]; ++k) c_sum += cs[r * visible + k];
    for (index_t u = 0; u < units; ++u) {
      q_grad[u] = c.v.v[u] * row_s[r * up + u];
      const T rt = row_t[r * up + u];
      dv_sum[u] += factored[r] ? GradTerm<T, true>::row_dv(rt, c_sum) : GradTerm<T, false>::row_dv(rt, c_sum);
      bias_sum[u] += q_grad[u];
    }
  }
}

// One task: query rows [r0, r0 + rows) of batch entry b, block `blk` of that entry.
template <typename T>
void additive_backward_block(const AdditiveBackwardCall<T>& c, index_t b, index_t blk) {
  const index_t r0 = blk * c.rows_per_block, rows = std::min(c.rows_per_block, c.lq - r0);
  const index_t lk = c.lk, units = c.units, up = padded_units<T>(units);
  const index_t visible = keys_within_length(c.lengths, b, lk);
  const index_t share = b * c.blocks + blk;
  T* const key_share = c.key_share + share * lk * up;
  T* const value_share = c.value_share + share * lk * c.dv;
  T* const unit_share = c.unit_share + share * 2 * units;
  // The weights, recomputed as the forward computes them.
  const Scratch<T, AdditiveGradQueryTag> q_proj(static_cast<size_t>(rows * units));
  additive_project_query_block<T, T>(c.q, b, r0, rows, c.w_query, c.bias, q_proj.data());
  const Scratch<T, AdditiveGradTileTag> tiles(static_cast<size_t>(rows * lk + rows * visible));
  T* const weights = tiles.data();
  T* const ds = weights + rows * lk;  // dP, then dS in place: (rows, visible)
  const AdditiveRows<T> keys = entry_rows(c.keys, b);
  if (c.saved_weights) {
    const Strided<const T>& w = *c.saved_weights;
    for (index_t r = 0; r < rows; ++r) {
      const T* src = w.data + w.batch_offset(b, 2) + (r0 + r) * w.stride(-2);
      for (index_t j = 0; j < lk; ++j) weights[r * lk + j] = src[j * w.stride(-1)];
    }
  } else {
    additive_score_projected<T>(q_proj.data(), rows, units, keys, c.v, lk, weights, lk);
    scores_to_weights(c.mask, c.lq, b, r0, rows, visible, weights, lk);
  }
  block_value_grads(c, b, r0, rows, visible, weights, ds, value_share);
  for (index_t r = 0; r < rows; ++r) row_score_grad(weights + r * lk, ds + r * visible, visible);
  if (c.mask_grad)
    for (index_t r = 0; r < rows; ++r) {
      T* dst = c.mask_grad + (b * c.lq + r0 + r) * lk;
      std::copy(ds + r * visible, ds + (r + 1) * visible, dst);
      std::fill(dst + visible, dst + lk, T(0));
    }
  block_unit_grads(c, b, r0, rows, visible, q_proj.data(), ds, key_share, unit_share);
}

// The blocks' shares added in block order: d(kp) = v o sum of key shares, dV = sum of value shares.
template <typename T>
void add_key_shares(const AdditiveBackwardCall<T>& c, index_t batches, const AdditiveGradients<T>& g) {
  const index_t lk = c.lk, units = c.units, up = padded_units<T>(units), dv = c.dv;
  const index_t key_blocks = additive_row_blocks(lk);
  parallel_for(batches * key_blocks, [&](index_t task) {
    const index_t b = task / key_blocks, j0 = (task % key_blocks) * kAdditiveRowBlock;
    const index_t j1 = std::min(lk, j0 + kAdditiveRowBlock);
    for (index_t j = j0; j < j1; ++j) {
      T* kp = g.keys_raw + (b * lk + j) * units;
      T* vr = g.value + (b * lk + j) * dv;
      const T* ks = c.key_share + (b * c.blocks * lk + j) * up;
      const T* vs = c.value_share + (b * c.blocks * lk + j) * dv;
      if (!c.direct) {
        std::copy(ks, ks + units, kp);
        std::copy(vs, vs + dv, vr);
      }
      for (index_t blk = 1; blk < c.blocks; ++blk) {
        const T* ksb = ks + blk * lk * up;
        const T* vsb = vs + blk * lk * dv;
        for (index_t u = 0; u < units; ++u) kp[u] += ksb[u];
        for (index_t d = 0; d < dv; ++d) vr[d] += vsb[d];
      }
      for (index_t u = 0; u < units; ++u) kp[u] *= c.v.v[u];
    }
  });
}

// The rows of a (..., L, D) view in flat order: row m = (batch entry m / L, position m % L).
template <typename T>
struct FlatRows {
  const Strided<const T>& x;
  const T* operator()(index_t m) const {
    const index_t len = x.dim(-2);
    return x.data + x.batch_offset(m / len, 2) + (m % len) * x.stride(-2);
  }
};

// Through a projection p = x W (x (rows, D), W (D, U), dp (rows, U) contiguous):
// dx = dp W^T (rows, D) and dW = x^T dp (D, U).
template <typename T>
void projection_grads(const Strided<const T>& x, const ConstMatrixMap<T>& w, const T* dp, T* dx, T* dw) {
  const index_t rows = x.batch_count(2) * x.dim(-2), depth = w.rows(), units = w.cols();
  const RowMatrix<T> w_t = w.transpose();  // (U, D), read in place by the GEMM
  const auto dp_row = [&](index_t m) { return dp + m * units; };
  gemm_rows_times<T>(rows, depth, units, dp_row, 1, w_t.data(), depth, dx);
  const InPlaceW<T> dp_in_place{dp, units};
  gemm_transposed_rows<T>(rows, depth, units, FlatRows<T>{x}, x.stride(-1), dp_row, 1, dw, &dp_in_place);
}

}  // namespace detail

// Gradients of additive_attention (additive_attention.hpp) on prepared keys:
//   q (..., Lq, Dq), w_query (Dq, U), bias (U,) or nullptr, keys (..., Lk, U) prepared,
//   value (..., Lk, Dv), v (U,), mask, lengths: exactly as the forward took them (equal batch
//   shapes, broadcast views allowed);
//   grad_out (..., Lq, Dv) any strides: dL/d(context); grad_weights (..., Lq, Lk) any strides or
//   nullptr: dL/d(weights); saved_weights (..., Lq, Lk) any strides: the weights the forward
//   returned for these arguments (saves recomputing the scores), or nullptr: recomputed.
// Fills g.query, g.w_query, g.bias, g.v, g.keys_raw, g.value and (when given) g.mask; g.key and
// g.w_key are the raw-key overload's. Bit-identical for any thread count.
template <typename T>
void additive_attention_backward(const Strided<const T>& q, const ConstMatrixMap<T>& w_query, const T* bias,
                                 const AdditiveKeys<T>& keys, const Strided<const T>& value, const T* v,
                                 const Mask<T>& mask, const Strided<const std::int64_t>* lengths,
                                 const Strided<const T>& grad_out, const Strided<const T>* grad_weights,
                                 const AdditiveGradients<T>& g, const Strided<const T>* saved_weights = nullptr) {
  const index_t batches = q.batch_count(2), lq = q.dim(-2), lk = keys.raw.dim(-2), units = w_query.cols();
  const index_t dv = value.dim(-1), up = detail::padded_units<T>(units);
  const index_t rows_per_block = additive_backward_rows(lq);
  const index_t blocks = lq == 0 ? 0 : (lq + rows_per_block - 1) / rows_per_block;
  // One block per batch entry and unpadded units: the block's shares are the gradients
  // themselves, written in place (no share buffers, nothing to add or copy afterwards).
  const bool direct = blocks == 1 && up == units;
  // Scratch (reused between calls, no initialisation): every element is written by the task
  // owning it before it is read.
  const Scratch<T, detail::AdditiveGradQueryProjTag> q_grad(static_cast<size_t>(batches * lq * units));
  const size_t shares = direct ? 0 : static_cast<size_t>(batches * blocks * lk);
  const Scratch<T, detail::AdditiveGradKeyShareTag> key_share(shares * static_cast<size_t>(up));
  const Scratch<T, detail::AdditiveGradValueShareTag> value_share(shares * static_cast<size_t>(dv));
  const Scratch<T, detail::AdditiveGradUnitShareTag> unit_share(static_cast<size_t>(batches * blocks * 2 * units));
  const AdditiveV<T> v_form = additive_v(v, units);
  const detail::AdditiveBackwardCall<T> call{q, w_query, bias, keys, value, v_form, mask, lengths, grad_out,
                                             grad_weights, saved_weights, lq, lk, units, dv, rows_per_block, blocks,
                                             q_grad.data(), direct ? g.keys_raw : key_share.data(),
                                             direct ? g.value : value_share.data(), direct, unit_share.data(), g.mask};
  parallel_for(batches * blocks,
               [&](index_t task) { detail::additive_backward_block(call, task / blocks, task % blocks); });
  if (blocks > 0) {
    detail::add_key_shares(call, batches, g);
  } else {
    std::fill(g.keys_raw, g.keys_raw + batches * lk * units, T(0));
    std::fill(g.value, g.value + batches * lk * dv, T(0));
  }
  std::fill(g.v, g.v + units, T(0));
  std::fill(g.bias, g.bias + units, T(0));
  for (index_t s = 0; s < batches * blocks; ++s)  // the blocks' unit shares, in block order
    for (index_t u = 0; u < units; ++u) {
      g.v[u] += unit_share.data()[s * 2 * units + u];
      g.bias[u] += unit_share.data()[s * 2 * units + units + u];
    }
  detail::projection_grads<T>(q, w_query, q_grad.data(), g.query, g.w_query);
}

// The same with raw keys (..., Lk, Dk) (the query's batch shape) and w_key (Dk, U), projected
// inside the call as the forward does; also fills g.key (..., Lk, Dk) and g.w_key (Dk, U).
template <typename T>
void additive_attention_backward(const Strided<const T>& q, const ConstMatrixMap<T>& w_query, const T* bias,
                                 const Strided<const T>& key, const ConstMatrixMap<T>& w_key,
                                 const Strided<const T>& value, const T* v, const Mask<T>& mask,
                                 const Strided<const std::int64_t>* lengths, const Strided<const T>& grad_out,
                                 const Strided<const T>* grad_weights, const AdditiveGradients<T>& g,
                                 const Strided<const T>* saved_weights = nullptr) {
  const index_t batches = key.batch_count(2), lk = key.dim(-2), units = w_key.cols();
  const size_t n = static_cast<size_t>(batches * lk * units);
  const Scratch<T, detail::AdditiveGradKeyRawTag> raw(n);
  const Scratch<T, detail::AdditiveGradKeyExpTag> expo(n);
  std::unique_ptr<bool[]> ok(new bool[static_cast<size_t>(std::max<index_t>(batches, 1))]);
  additive_prepare_keys<T, T>(key, w_key, raw.data(), expo.data(), ok.get());
  const AdditiveKeys<T> keys = contiguous_keys<T>(key.shape, units, raw.data(), expo.data(), ok.get());
  additive_attention_backward<T>(q, w_query, bias, keys, value, v, mask, lengths, grad_out, grad_weights, g,
                                 saved_weights);
  detail::projection_grads<T>(key, w_key, g.keys_raw, g.key, g.w_key);
}

}  // namespace attnext
