#include <attnext/sdpa.hpp>

#include "common.hpp"

#include <cstdint>
#include <limits>

namespace attnext {
namespace bind {

template <typename T>
py::tuple sdpa_impl(const py::array& q, const py::array& k, const py::array& v, const py::object& attn_mask,
                    bool causal, index_t causal_offset, index_t window_left, index_t window_right,
                    const py::object& key_lengths, double scale, bool return_weights, bool return_lse) {
  SdpaProblem<T> p;
  p.q = view<T>(q, "query");
  p.k = view<T>(k, "key");
  p.v = view<T>(v, "value");
  const index_t L = p.q.dim(-2), S = p.k.dim(-2);
  std::vector<index_t> batch(p.q.shape.begin(), p.q.shape.end() - 2);
  std::vector<index_t> score_shape = batch;
  score_shape.push_back(L);
  score_shape.push_back(S);
  p.mask = mask_view<T>(attn_mask, score_shape, "attn_mask");
  // Raw values: the kernels' visible-key rule (mask.hpp) is overflow-safe for any int64.
  p.causal = Causal{causal, causal_offset};
  p.window_left = window_left;
  p.window_right = window_right;
  p.scale = static_cast<T>(scale);
  py::array lengths;
  p.key_lengths = key_lengths_view(key_lengths, batch, S, lengths);
  std::vector<index_t> out_shape = batch;
  out_shape.push_back(L);
  out_shape.push_back(p.v.dim(-1));
  py::array_t<T> out = new_output<T>(out_shape, "attention output");
  py::object weights = py::none(), lse = py::none();
  T* wp = nullptr;
  T* lp = nullptr;
  if (return_weights) {
    py::array_t<T> w = new_output<T>(score_shape, "attention weights");
    wp = w.mutable_data();
    weights = std::move(w);
  }
  if (return_lse) {
    std::vector<index_t> lse_shape = batch;
    lse_shape.push_back(L);
    py::array_t<T> l = new_output<T>(lse_shape, "log-sum-exp");
    lp = l.mutable_data();
    lse = std::move(l);
  }
  T* op = out.mutable_data();
  {
    // Safe without the GIL: every array read or written is kept alive by this frame's
    // references (q, k, v, attn_mask, lengths, out, weights, lse) and no Python object is touched.
    py::gil_scoped_release nogil;
    scaled_dot_product_attention<T>(p, op, wp, lp);
  }
  return py::make_tuple(out, weights, lse);
}

void register_sdpa(py::module_& m) {
  m.def(
      "sdpa",
      [](const py::array& q, const py::array& k, const py::array& v, const py::object& attn_mask, bool causal,
         index_t causal_offset, index_t window_left, index_t window_right, const py::object& key_lengths, double scale,
         bool return_weights, bool return_lse) -> py::tuple {
        const DType dt = float_dtype(q, "query");
        require_same_dtype(q, "query", k, "key");
        require_same_dtype(q, "query", v, "value");
        require_ndim(q, "query", 2);
        require_ndim(k, "key", 2);
        require_ndim(v, "value", 2);
        require_same_batch(q, "query", k, "key", 2);
        require_same_batch(q, "query", v, "value", 2);
        require_dim(q, "query", -1, k, "key", -1, "the last (embedding) dimensions");
        require_dim(k, "key", -2, v, "value", -2, "the number of keys (second-to-last dimensions)");
        if (window_left < -1 || window_right < -1)
          fail_value("window_left and window_right must be >= 0, or -1 for an unbounded side");
        return dt == DType::f32 ? sdpa_impl<float>(q, k, v, attn_mask, causal, causal_offset, window_left,
                                                   window_right, key_lengths, scale, return_weights, return_lse)
                                : sdpa_impl<double>(q, k, v, attn_mask, causal, causal_offset, window_left,
                                                    window_right, key_lengths, scale, return_weights, return_lse);
      },
      py::arg("query").noconvert(), py::arg("key").noconvert(), py::arg("value").noconvert(),
      py::arg("attn_mask") = py::none(), py::arg("causal") = false, py::arg("causal_offset") = 0,
      py::arg("window_left") = -1, py::arg("window_right") = -1, py::arg("key_lengths") = py::none(),
      py::arg("scale") = 1.0, py::arg("return_weights") = false, py::arg("return_lse") = false,
      "Fused attention softmax(query key^T * scale + masks) value: query (..., L, E), key (..., S, E), "
      "value (..., S, Ev) with equal batch shapes; attn_mask (..., L, S) bool (True = attend) or float (added); "
      "causal hides key j from query i when j > i + causal_offset; window_left/right bound i - j and j - i "
      "(-1 = unbounded); key_lengths (...,) int64. Returns (out, weights or None, lse or None).");
}

}  // namespace bind
}  // namespace attnext
