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
// one division per unit, no exp or tanh in the inner loop, a and b in [0, 1] (every term
// finite in the form's range). A row or key set outside the range uses tanh itself.
//
// Work split: one task per (batch entry, block of query rows). A task recomputes its rows'
// weights, forms dS, and runs one pass over (row, visible key, unit) that accumulates d(qp) of
// its rows and the block's share of sum_i g_ij for every key; the shares of the blocks (and
// their shares of dV, dv, dbias) are added afterwards in block order. The blocks depend on the
// shapes only, so the gradients are bit-identical for any thread count; nothing is atomic.
// Keys hidden from a row (mask, length) have dS = 0 and are skipped: they get exactly zero,
// and a row that sees no key has zero gradients.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
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

// Units padded to whole packets: the gradient pass runs over whole packets only.
template <typename T>
inline index_t padded_units(index_t units) {
  constexpr index_t W = vm::packet_size<T>();
  return (units + W - 1) / W * W;
}

// t and s with g = c_scale * c * s = dS (1 - t^2), for one packet of units; qa and ka are
// a query's and a key's operands in the form (factored: e^{-2 qp}, e^{2 kp}; plain: qp, kp).
template <typename T, bool factored>
struct GradTerm {
  using P = vm::Packet<T>;
  static constexpr T c_scale = factored ? T(4) : T(1);
  // The padding of the operands' tail lanes: finite terms whose gradients land in tail lanes.
  static constexpr T pad = factored ? T(1) : T(0);
  static void at(const P& qa, const P& ka, P& t, P& s) {
    namespace ei = Eigen::internal;
    if constexpr (factored) {
      const P r = ei::pdiv(ei::pset1<P>(T(1)), ei::padd(qa, ka));
      const P a = ei::pmul(qa, r), b = ei::pmul(ka, r);
      t = ei::psub(b, a);
      s = ei::pmul(a, b);
    } else {
      const P one = ei::pset1<P>(T(1));
      t = vm::tanh<T>(ei::padd(qa, ka));
      s = ei::pmul(ei::psub(one, t), ei::padd(one, t));
    }
  }
};

// One row's pass over its keys with nonzero dS: key[n] (padded operand rows of ldk, up to
// units_pad), c[n] = dS of that key. Adds c s into row_s (U_pad, summed over keys) and into
// key_s[key * ldk ...] (each key's share), and c t into row_t. Four keys share each load of
// the row's operand and accumulators.
template <typename T, bool factored>
void grad_row_pass(const T* qa, const T* k_op, index_t ldk, const index_t* key, const T* c, index_t n, index_t units_pad,
                   T* row_s, T* row_t, T* key_s) {
  namespace ei = Eigen::internal;
  using P = vm::Packet<T>;
  using Term = GradTerm<T, factored>;
  constexpr index_t W = vm::packet_size<T>();
  index_t j = 0;
  for (; j + 4 <= n; j += 4) {
    const T* k0 = k_op + key[j] * ldk;
    const T* k1 = k_op + key[j + 1] * ldk;
    const T* k2 = k_op + key[j + 2] * ldk;
    const T* k3 = k_op + key[j + 3] * ldk;
    T* s0 = key_s + key[j] * ldk;
    T* s1 = key_s + key[j + 1] * ldk;
    T* s2 = key_s + key[j + 2] * ldk;
    T* s3 = key_s + key[j + 3] * ldk;
    const P c0 = ei::pset1<P>(c[j]), c1 = ei::pset1<P>(c[j + 1]), c2 = ei::pset1<P>(c[j + 2]),
            c3 = ei::pset1<P>(c[j + 3]);
    const P g0 = ei::pset1<P>(Term::c_scale * c[j]), g1 = ei::pset1<P>(Term::c_scale * c[j + 1]),
            g2 = ei::pset1<P>(Term::c_scale * c[j + 2]), g3 = ei::pset1<P>(Term::c_scale * c[j + 3]);
    for (index_t u = 0; u < units_pad; u += W) {
      const P q = ei::ploadu<P>(qa + u);
      P rs = ei::ploadu<P>(row_s + u), rt = ei::ploadu<P>(row_t + u);
      P t, s;
      Term::at(q, ei::ploadu<P>(k0 + u), t, s);
      s = ei::pmul(g0, s);
      rs = ei::padd(rs, s), rt = ei::pmadd(c0, t, rt);
      ei::pstoreu(s0 + u, ei::padd(ei::ploadu<P>(s0 + u), s));
      Term::at(q, ei::ploadu<P>(k1 + u), t, s);
      s = ei::pmul(g1, s);
      rs = ei::padd(rs, s), rt = ei::pmadd(c1, t, rt);
      ei::pstoreu(s1 + u, ei::padd(ei::ploadu<P>(s1 + u), s));
      Term::at(q, ei::ploadu<P>(k2 + u), t, s);
      s = ei::pmul(g2, s);
      rs = ei::padd(rs, s), rt = ei::pmadd(c2, t, rt);
      ei::pstoreu(s2 + u, ei::padd(ei::ploadu<P>(s2 + u), s));
      Term::at(q, ei::ploadu<P>(k3 + u), t, s);
      s = ei::pmul(g3, s);
      rs = ei::padd(rs, s), rt = ei::pmadd(c3, t, rt);
      ei::pstoreu(s3 + u, ei::padd(ei::ploadu<P>(s3 + u), s));
      ei::pstoreu(row_s + u, rs);
      ei::pstoreu(row_t + u, rt);
    }
  }
  for (; j < n; ++j) {
    const T* kr = k_op + key[j] * ldk;
    T* sr = key_s + key[j] * ldk;
    const P cj = ei::pset1<P>(c[j]), gj = ei::pset1<P>(Term::c_scale * c[j]);
    for (index_t u = 0; u < units_pad; u += W) {
      P t, s;
      Term::at(ei::ploadu<P>(qa + u), ei::ploadu<P>(kr + u), t, s);
      s = ei::pmul(gj, s);
      ei::pstoreu(row_s + u, ei::padd(ei::ploadu<P>(row_s + u), s));
      ei::pstoreu(row_t + u, ei::pmadd(cj, t, ei::ploadu<P>(row_t + u)));
      ei::pstoreu(sr + u, ei::padd(ei::ploadu<P>(sr + u), s));
    }
  }
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
  index_t lq, lk, units, dv, rows_per_block, blocks;
  T* q_grad;      // d(qp) (batches, Lq, U)
  T* key_share;   // (batches, blocks, Lk, U_pad): each block's sum_i c_ij s_ij
  T* value_share; // (batches, blocks, Lk, Dv): each block's P^T dO
  T* unit_share;  // (batches, blocks, 2, U): each block's sum_i dv_i and sum_i d(qp)_i
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

// dP rows (rows, visible) = dO rows (rows, Dv) V[:visible]^T (+ gW rows), dst row stride visible.
template <typename T>
void block_value_grads(const AdditiveBackwardCall<T>& c, index_t b, index_t r0, index_t rows, index_t visible,
                       const T* weights, T* dp, T* value_share) {
  const auto d_out = matrix_of(c.grad_out, b, r0, rows);
  if (visible > 0) {
    product_rows<T>(d_out, matrix_of(c.value, b, 0, visible).transpose(), dp);
    if (c.grad_weights)
      for (index_t r = 0; r < rows; ++r) {
        const T* gw = c.grad_weights->data + c.grad_weights->batch_offset(b, 2) + (r0 + r) * c.grad_weights->stride(-2);
        for (index_t j = 0; j < visible; ++j) dp[r * visible + j] += gw[j * c.grad_weights->stride(-1)];
      }
    product_rows<T>(ConstMatrixMap<T>(weights, rows, c.lk).leftCols(visible).transpose(), d_out, value_share);
  }
  std::fill(value_share + visible * c.dv, value_share + c.lk * c.dv, T(0));
}

// The gradient pass of one block: every row's d(qp), the block's key shares and unit shares.
// q_proj (rows, U); ds (rows, visible) = dS.
template <typename T>
void block_unit_grads(const AdditiveBackwardCall<T>& c, index_t b, index_t r0, index_t rows, index_t visible,
                      const T* q_proj, const T* ds, T* key_share, T* unit_share) {
  const index_t units = c.units, up = padded_units<T>(units);
  const AdditiveRows<T> keys{c.keys.raw.data + c.keys.raw.batch_offset(b, 2),
                             c.keys.ok.data[c.keys.ok.batch_offset(b, 0)] ? c.keys.expo.data + c.keys.expo.batch_offset(b, 2)
                                                                         : nullptr};
  // The keys' operands, padded: expo (factored rows) and raw (plain rows), each made when first needed.
  const Scratch<T, AdditiveGradKeysTag> key_ops(static_cast<size_t>(2 * visible * up));
  T* const expo_op = key_ops.data();
  T* const raw_op = expo_op + visible * up;
  bool have_expo = false, have_raw = false;
  // A row's operand, accumulators and list of keys with nonzero dS.
  const Scratch<T, AdditiveGradRowTag> row(static_cast<size_t>(3 * up + 2 * visible));
  T* const qa = row.data();
  T* const row_s = qa + up;
  T* const row_t = row_s + up;
  T* const cs = row_t + up;
  std::unique_ptr<index_t[]> key_list(new index_t[static_cast<size_t>(std::max<index_t>(visible, 1))]);
  std::fill(key_share, key_share + c.lk * up, T(0));
  T* const dv_sum = unit_share;
  T* const bias_sum = unit_share + units;
  std::fill(unit_share, unit_share + 2 * units, T(0));
  for (index_t r = 0; r < rows; ++r) {
    T* const q_grad = c.q_grad + (b * c.lq + r0 + r) * units;
    index_t n = 0;
    for (index_t j = 0; j < visible; ++j)
      if (ds[r * visible + j] != T(0)) key_list[n] = j, cs[n++] = ds[r * visible + j];
    if (n == 0) {
      std::fill(q_grad, q_grad + units, T(0));
      continue;
    }
    const T* qr = q_proj + r * units;
    const bool factored = keys.expo && additive_exp_form(qr, qa, units, T(-2));
    std::fill(row_s, row_s + up, T(0));
    std::fill(row_t, row_t + up, T(0));
    if (factored) {
      if (!have_expo) pad_key_rows(keys.expo, visible, units, up, GradTerm<T, true>::pad, expo_op), have_expo = true;
      std::fill(qa + units, qa + up, GradTerm<T, true>::pad);
      grad_row_pass<T, true>(qa, expo_op, up, key_list.get(), cs, n, up, row_s, row_t, key_share);
    } else {
      if (!have_raw) pad_key_rows(keys.raw, visible, units, up, GradTerm<T, false>::pad, raw_op), have_raw = true;
      std::copy(qr, qr + units, qa);
      std::fill(qa + units, qa + up, GradTerm<T, false>::pad);
      grad_row_pass<T, false>(qa, raw_op, up, key_list.get(), cs, n, up, row_s, row_t, key_share);
    }
    for (index_t u = 0; u < units; ++u) {
      q_grad[u] = c.v.v[u] * row_s[u];
      dv_sum[u] += row_t[u];
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
  const AdditiveRows<T> keys{c.keys.raw.data + c.keys.raw.batch_offset(b, 2),
                             c.keys.ok.data[c.keys.ok.batch_offset(b, 0)] ? c.keys.expo.data + c.keys.expo.batch_offset(b, 2)
                                                                         : nullptr};
  additive_score_projected<T>(q_proj.data(), rows, units, keys, c.v, lk, weights, lk);
  scores_to_weights(c.mask, c.lq, b, r0, rows, visible, weights, lk);
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
      std::copy(ks, ks + units, kp);
      std::copy(vs, vs + dv, vr);
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
//   nullptr: dL/d(weights).
// Fills g.query, g.w_query, g.bias, g.v, g.keys_raw, g.value and (when given) g.mask; g.key and
// g.w_key are the raw-key overload's. Bit-identical for any thread count.
template <typename T>
void additive_attention_backward(const Strided<const T>& q, const ConstMatrixMap<T>& w_query, const T* bias,
                                 const AdditiveKeys<T>& keys, const Strided<const T>& value, const T* v,
                                 const Mask<T>& mask, const Strided<const std::int64_t>* lengths,
                                 const Strided<const T>& grad_out, const Strided<const T>* grad_weights,
                                 const AdditiveGradients<T>& g) {
  const index_t batches = q.batch_count(2), lq = q.dim(-2), lk = keys.raw.dim(-2), units = w_query.cols();
  const index_t dv = value.dim(-1), up = detail::padded_units<T>(units);
  const index_t rows_per_block = additive_backward_rows(lq);
  const index_t blocks = lq == 0 ? 0 : (lq + rows_per_block - 1) / rows_per_block;
  // Every element is written by the task owning it before it is read: no initialisation.
  const auto buffer = [](index_t n) { return std::unique_ptr<T[]>(new T[static_cast<size_t>(n)]); };
  const std::unique_ptr<T[]> q_grad = buffer(batches * lq * units), key_share = buffer(batches * blocks * lk * up),
                             value_share = buffer(batches * blocks * lk * dv),
                             unit_share = buffer(batches * blocks * 2 * units);
  const AdditiveV<T> v_form = additive_v(v, units);
  const detail::AdditiveBackwardCall<T> call{q, w_query, bias, keys, value, v_form, mask, lengths, grad_out,
                                             grad_weights, lq, lk, units, dv, rows_per_block, blocks,
                                             q_grad.get(), key_share.get(), value_share.get(), unit_share.get(),
                                             g.mask};
  parallel_for(batches * blocks, [&](index_t task) { detail::additive_backward_block(call, task / blocks, task % blocks); });
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
      g.v[u] += unit_share[s * 2 * units + u];
      g.bias[u] += unit_share[s * 2 * units + units + u];
    }
  detail::projection_grads<T>(q, w_query, q_grad.get(), g.query, g.w_query);
}

// The same with raw keys (..., Lk, Dk) (the query's batch shape) and w_key (Dk, U), projected
// inside the call as the forward does; also fills g.key (..., Lk, Dk) and g.w_key (Dk, U).
template <typename T>
void additive_attention_backward(const Strided<const T>& q, const ConstMatrixMap<T>& w_query, const T* bias,
                                 const Strided<const T>& key, const ConstMatrixMap<T>& w_key,
                                 const Strided<const T>& value, const T* v, const Mask<T>& mask,
                                 const Strided<const std::int64_t>* lengths, const Strided<const T>& grad_out,
                                 const Strided<const T>* grad_weights, const AdditiveGradients<T>& g) {
  const index_t batches = key.batch_count(2), lk = key.dim(-2), units = w_key.cols();
  const size_t n = static_cast<size_t>(batches * lk * units);
  std::vector<T> raw(n), expo(n);
  std::unique_ptr<bool[]> ok(new bool[static_cast<size_t>(std::max<index_t>(batches, 1))]);
  additive_prepare_keys<T, T>(key, w_key, raw.data(), expo.data(), ok.get());
  const AdditiveKeys<T> keys = contiguous_keys<T>(key.shape, units, raw.data(), expo.data(), ok.get());
  additive_attention_backward<T>(q, w_query, bias, keys, value, v, mask, lengths, grad_out, grad_weights, g);
  detail::projection_grads<T>(key, w_key, g.keys_raw, g.key, g.w_key);
}

}  // namespace attnext
