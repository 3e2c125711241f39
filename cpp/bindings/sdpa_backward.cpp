// The backward of fused scaled dot-product attention.
#include <attnext/sdpa/backward.hpp>

#include "common.hpp"
#include "dropout_args.hpp"
#include "sdpa_args.hpp"

#include <cstdint>
#include <string>
#include <vector>

namespace attnext {
namespace bind {

namespace {

// `name` (out, lse, grad_out, grad_weights) must have dtype T and exactly `shape`.
template <typename T>
Strided<const T> saved_view(const py::object& obj, const char* name, const std::vector<index_t>& shape,
                            const char* what) {
  const py::array a = require_array(obj, name);
  if (!a.dtype().equal(py::dtype::of<T>()))
    fail_type(std::string(name) + " has dtype " + std::string(py::str(a.dtype())) + " but query has " +
              std::string(py::str(py::dtype::of<T>())));
  if (shape_of(a) != shape)
    fail_value(std::string(name) + " has shape " + shape_str(a) + " but " + what + " is " + shape_str(shape));
  return view<T>(a, name);
}

template <typename T>
py::tuple sdpa_backward_impl(const py::array& q, const py::array& k, const py::array& v, const py::object& attn_mask,
                             bool causal, const py::object& causal_offset_arg, const py::object& window_left_arg,
                             const py::object& window_right_arg, const py::object& key_lengths, double scale,
                             const py::object& out, const py::object& lse, const py::object& grad_out,
                             double dropout_p, const py::object& seed, const py::object& grad_weights,
                             bool mask_grad) {
  SdpaProblem<T> p = sdpa_problem<T>(q, k, v, attn_mask, causal, causal_offset_arg, window_left_arg,
                                     window_right_arg, scale);  // the forward's scale, rounded the same way
  const index_t L = p.q.dim(-2), S = p.k.dim(-2), E = p.q.dim(-1), Ev = p.v.dim(-1);
  const std::vector<index_t> batch = batch_shape_with(p, {});
  const std::vector<index_t> score_shape = batch_shape_with(p, {L, S});
  SdpaGradInputs<T, T> g;
  g.dropout = dropout_arg(dropout_p, seed);
  g.out = saved_view<T>(out, "out", batch_shape_with(p, {L, Ev}), "the attention output's shape");
  g.lse = saved_view<T>(lse, "lse", batch_shape_with(p, {L}), "the log-sum-exp's shape");
  g.grad_out = saved_view<T>(grad_out, "grad_out", batch_shape_with(p, {L, Ev}), "the attention output's shape");
  if (!grad_weights.is_none())
    g.grad_weights = saved_view<T>(grad_weights, "grad_weights", score_shape, "the weights' shape");
  const OwnedBatch<std::int64_t> lengths = own_key_lengths(key_lengths, batch, S);
  if (lengths.get()) p.key_lengths = lengths.view();
  py::array_t<T> dq = new_output<T>(batch_shape_with(p, {L, E}), "query gradient");
  py::array_t<T> dk = new_output<T>(batch_shape_with(p, {S, E}), "key gradient");
  py::array_t<T> dv = new_output<T>(batch_shape_with(p, {S, Ev}), "value gradient");
  py::array_t<T> dm;
  if (mask_grad) dm = new_output<T>(score_shape, "mask gradient");
  const py::object dmask = mask_grad ? py::object(dm) : py::none();
  if (all_empty({&dq, &dk, &dv, mask_grad ? &dm : nullptr})) return py::make_tuple(dq, dk, dv, dmask);
  SdpaGrads<T, T> d;
  d.dq = dq.mutable_data();
  d.dk = dk.mutable_data();
  d.dv = dv.mutable_data();
  d.dmask = mask_grad ? dm.mutable_data() : nullptr;
  {
    // Safe without the GIL: every array read or written is kept alive by this frame's
    // references (the arguments and the four outputs), key_lengths is the binding's own copy,
    // and no Python object is touched.
    py::gil_scoped_release nogil;
    scaled_dot_product_attention_backward<T, T>(p, g, d);
  }
  return py::make_tuple(dq, dk, dv, dmask);
}

}  // namespace

void register_sdpa_backward(py::module_& m) {
  m.def(
      "sdpa_backward",
      [](const py::array& q, const py::array& k, const py::array& v, const py::object& attn_mask, bool causal,
         const py::object& causal_offset, const py::object& window_left, const py::object& window_right,
         const py::object& key_lengths, double scale, const py::object& out, const py::object& lse,
         const py::object& grad_out, double dropout_p, const py::object& seed, const py::object& grad_weights,
         bool mask_grad) -> py::tuple {
        return dispatch_wide(wide_float_dtype(q, "query", "sdpa_backward"), [&](auto t) {
          return sdpa_backward_impl<decltype(t)>(q, k, v, attn_mask, causal, causal_offset, window_left, window_right,
                                                 key_lengths, scale, out, lse, grad_out, dropout_p, seed,
                                                 grad_weights, mask_grad);
        });
      },
      py::arg("query").noconvert(), py::arg("key").noconvert(), py::arg("value").noconvert(),
      py::arg("attn_mask"), py::arg("causal"), py::arg("causal_offset"), py::arg("window_left"),
      py::arg("window_right"), py::arg("key_lengths"), py::arg("scale"), py::arg("out"), py::arg("lse"),
      py::arg("grad_out"), py::arg("dropout_p") = 0.0, py::arg("seed") = 0, py::arg("grad_weights") = py::none(),
      py::arg("mask_grad") = false,
      "Gradients of sdpa (same first ten arguments and rules): out (..., L, Ev) and lse (..., L) as the forward "
      "returned them, grad_out (..., L, Ev) the cotangent of out, dropout_p and seed as the forward's, "
      "grad_weights (..., L, S) or None a cotangent of the returned weights (after dropout). "
      "Returns (dq (..., L, E), dk (..., S, E), dv (..., S, Ev), dmask (..., L, S) or None): C-contiguous, "
      "with the full batch shape of the views passed (a stride-0 broadcast key gives a full-size dk); "
      "dmask = dL/d(score + mask), only when mask_grad. Deterministic for any thread count.");
}

}  // namespace bind
}  // namespace attnext
