// Attention scores: the product forms (dot, scaled_dot, general) and the additive form.
#include <attnext/score.hpp>

#include "common.hpp"

namespace attnext {
namespace bind {

namespace {

void check_query_key(const py::array& q, const py::array& k) {
  require_same_dtype(q, "query", k, "key");
  require_ndim(q, "query", 2);
  require_ndim(k, "key", 2);
  require_same_batch(q, "query", k, "key", 2);
}

std::vector<index_t> score_shape(const py::array& q, const py::array& k) {
  std::vector<index_t> shape = shape_of(q);
  shape.back() = k.shape(k.ndim() - 2);
  return shape;
}

// In: the inputs' type; Out: the output's (In, or float when a 16-bit call asks for float32).
template <typename In, typename Out>
py::array product_impl(const py::array& q, const py::array& k, const py::object& weight, double scale) {
  check_query_key(q, k);
  Strided<const In> wv;
  const bool general = !weight.is_none();
  if (general) {
    const py::array w = require_array(weight, "weight");
    require_same_dtype(q, "query", w, "weight");
    require_ndim(w, "weight", 2, 2);
    require_dim(q, "query", -1, w, "weight", 0, "query's last dimension and weight's first");
    require_dim(k, "key", -1, w, "weight", 1, "key's last dimension and weight's second");
    wv = view<In>(w, "weight");
  } else {
    require_dim(q, "query", -1, k, "key", -1, "query's and key's last dimensions");
  }
  const Strided<const In> qv = view<In>(q, "query"), kv = view<In>(k, "key");
  py::array out = new_output_like<Out>(q, score_shape(q, k), "scores");
  if (all_empty({&out})) return out;
  Out* o = data_of<Out>(out);
  {
    // Safe without the GIL: every array is kept alive by this frame; no Python object is used.
    py::gil_scoped_release nogil;
    score_product<In, acc_t<In>, Out>(qv, kv, general ? &wv : nullptr, static_cast<acc_t<In>>(scale), o);
  }
  return out;
}

template <typename In, typename Out>
py::array additive_impl(const py::array& q, const py::array& k, const py::object& w_query, const py::object& w_key,
                        const py::object& v, const py::object& bias, double scale) {
  using Acc = acc_t<In>;
  check_query_key(q, k);
  // Contiguous weights (copied only if they are not) let every row product run as a GEMV/GEMM.
  const auto wqc = parameter_matrix<In>(q, "query", w_query, "w_query");
  const auto wkc = parameter_matrix<In>(q, "query", w_key, "w_key");
  require_dim(q, "query", -1, wqc, "w_query", 0, "query's last dimension and w_query's first");
  require_dim(k, "key", -1, wkc, "w_key", 0, "key's last dimension and w_key's first");
  require_dim(wqc, "w_query", 1, wkc, "w_key", 1, "the number of units (second dimensions)");
  const py::ssize_t units = wqc.shape(1);
  const auto vc = parameter_vector<In>(q, "query", v, "v", units, units_are(units));
  const Bias<Acc> bc = parameter_bias<In>(q, "query", bias, units, units_are(units));
  // The kernel stores both projections, (..., Lq, U) and (..., Lk, U): refuse sizes whose
  // products overflow before it allocates them.
  std::vector<index_t> qp_shape = shape_of(q), kp_shape = shape_of(k);
  qp_shape.back() = units;
  kp_shape.back() = units;
  checked_size(qp_shape, "the query projection (..., Lq, U)");
  checked_size(kp_shape, "the key projection (..., Lk, U)");
  const Strided<const In> qv = view<In>(q, "query"), kv = view<In>(k, "key");
  py::array out = new_output_like<Out>(q, score_shape(q, k), "scores");
  // Nothing to return: no projection is built either.
  if (all_empty({&out})) return out;
  Out* o = data_of<Out>(out);
  const ConstMatrixMap<In> wq = map_matrix(wqc), wk = map_matrix(wkc);
  {
    // Safe without the GIL: every array is kept alive by this frame; no Python object is used.
    py::gil_scoped_release nogil;
    score_additive<In, Acc, Out>(qv, kv, wq, wk, vc.data(), bc.data(), static_cast<Acc>(scale), o);
  }
  return out;
}

}  // namespace

void register_scores(py::module_& m) {
  m.def("score_product", [](const py::array& q, const py::array& k, const py::object& weight, double scale,
                            bool out_float32) -> py::array {
    return dispatch_out(float_dtype(q, "query"), out_float32, [&](auto in, auto out) {
      return product_impl<decltype(in), decltype(out)>(q, k, weight, scale);
    });
  }, py::arg("query").noconvert(), py::arg("key").noconvert(), py::arg("weight") = py::none(), py::arg("scale") = 1.0,
        py::arg("out_float32") = false,
        "scale * query key^T, or scale * (query weight) key^T when weight (Dq, Dk) is given. "
        "query (..., Lq, Dq), key (..., Lk, Dk) with equal batch shapes -> (..., Lq, Lk), in query's dtype "
        "(float32 for 16-bit inputs with out_float32).");
  m.def("score_additive", [](const py::array& q, const py::array& k, const py::object& w_query,
                             const py::object& w_key, const py::object& v, const py::object& bias,
                             double scale, bool out_float32) -> py::array {
    return dispatch_out(float_dtype(q, "query"), out_float32, [&](auto in, auto out) {
      return additive_impl<decltype(in), decltype(out)>(q, k, w_query, w_key, v, bias, scale);
    });
  }, py::arg("query").noconvert(), py::arg("key").noconvert(), py::arg("w_query"), py::arg("w_key"), py::arg("v"),
        py::arg("bias") = py::none(), py::arg("scale") = 1.0, py::arg("out_float32") = false,
        "scale * v . tanh(query w_query + bias + key w_key) for every (query, key) pair -> (..., Lq, Lk). "
        "w_query, w_key and v in query's dtype, bias float32 for 16-bit inputs; output as score_product's.");
}

}  // namespace bind
}  // namespace attnext
