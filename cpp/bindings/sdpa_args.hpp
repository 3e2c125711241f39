// The arguments the SDPA bindings share (query, key, value, attn_mask, causal, causal_offset,
// window_left, window_right, scale), parsed and checked once here: the forward and the backward
// must read one problem the same way, with the same errors.
#pragma once

#include <attnext/sdpa/problem.hpp>

#include "common.hpp"

#include <initializer_list>
#include <vector>

namespace attnext {
namespace bind {

// The batch axes (N...) of the problem, followed by `tail`.
template <typename T>
std::vector<index_t> batch_shape_with(const SdpaProblem<T>& p, std::initializer_list<index_t> tail) {
  std::vector<index_t> shape(p.q.shape.begin(), p.q.shape.end() - 2);
  shape.insert(shape.end(), tail);
  return shape;
}

// Everything but key_lengths, which the caller copies with own_key_lengths: that copy must live
// as long as the call that reads it.
template <typename T>
SdpaProblem<T> sdpa_problem(const py::array& q, const py::array& k, const py::array& v, const py::object& attn_mask,
                            bool causal, const py::object& causal_offset_arg, const py::object& window_left_arg,
                            const py::object& window_right_arg, double scale) {
  require_same_dtype(q, "query", k, "key");
  require_same_dtype(q, "query", v, "value");
  require_ndim(q, "query", 2);
  require_ndim(k, "key", 2);
  require_ndim(v, "value", 2);
  require_same_batch(q, "query", k, "key", 2);
  require_same_batch(q, "query", v, "value", 2);
  require_dim(q, "query", -1, k, "key", -1, "the last (embedding) dimensions");
  require_dim(k, "key", -2, v, "value", -2, "the number of keys (second-to-last dimensions)");
  // Raw values: the kernels' visible-key rule (mask.hpp) is overflow-safe for any int64.
  const index_t causal_offset = saturating_index(causal_offset_arg, "causal_offset");
  const index_t window_left = saturating_index(window_left_arg, "window_left");
  const index_t window_right = saturating_index(window_right_arg, "window_right");
  if (window_left < -1 || window_right < -1)
    fail_value("window_left and window_right must be >= 0, or -1 for an unbounded side");
  SdpaProblem<T> p;
  p.q = view<T>(q, "query");
  p.k = view<T>(k, "key");
  p.v = view<T>(v, "value");
  p.mask = mask_view<acc_t<T>>(attn_mask, batch_shape_with(p, {p.q.dim(-2), p.k.dim(-2)}), "attn_mask");
  p.causal = Causal{causal, causal_offset};
  p.window_left = window_left;
  p.window_right = window_right;
  p.scale = static_cast<acc_t<T>>(scale);  // the scale as the kernels accumulate it
  return p;
}

}  // namespace bind
}  // namespace attnext
