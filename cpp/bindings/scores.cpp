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

template <typename T>
py::array product_impl(const py::array& q, const py::array& k, const py::object& weight, double scale) {
  check_query_key(q, k);
  Strided<const T> wv;
  const bool general = !weight.is_none();
  if (general) {
    const py::array w = require_array(weight, "weight");
    require_same_dtype(q, "query", w, "weight");
    require_ndim(w, "weight", 2, 2);
    require_dim(q, "query", -1, w, "weight", 0, "query's last dimension and weight's first");
    require_dim(k, "key", -1, w, "weight", 1, "key's last dimension and weight's second");
    wv = view<T>(w, "weight");
  } else {
    require_dim(q, "query", -1, k, "key", -1, "query's and key's last dimensions");
  }
  const Strided<const T> qv = view<T>(q, "query"), kv = view<T>(k, "key");
  py::array_t<T> out = new_output<T>(score_shape(q, k), "scores");
  if (all_empty({&out})) return std::move(out);
  T* o = out.mutable_data();
  {
    // Safe without the GIL: every array is kept alive by this frame; no Python object is used.
    py::gil_scoped_release nogil;
    score_product<T>(qv, kv, general ? &wv : nullptr, static_cast<T>(scale), o);
  }
  return std::move(out);
}

template <typename T>
py::array additive_impl(const py::array& q, const py::array& k, const py::object& w_query, const py::object& w_key,
                        const py::object& v, const py::object& bias, double scale) {
  check_query_key(q, k);
  // Contiguous weights (copied only if they are not) let every row product run as a GEMV/GEMM.
  const auto wqc = parameter_matrix<T>(q, "query", w_query, "w_query");
  const auto wkc = parameter_matrix<T>(q, "query", w_key, "w_key");
  require_dim(q, "query", -1, wqc, "w_query", 0, "query's last dimension and w_query's first");
  require_dim(k, "key", -1, wkc, "w_key", 0, "key's last dimension and w_key's first");
  require_dim(wqc, "w_query", 1, wkc, "w_key", 1, "the number of units (second dimensions)");
  const py::ssize_t units = wqc.shape(1);
  const auto vc = parameter_vector<T>(q, "query", v, "v", units, units_are(units));
  const Bias<T> bc = parameter_bias<T>(q, "query", bias, units, units_are(units));
  // The kernel stores both projections, (..., Lq, U) and (..., Lk, U): refuse sizes whose
  // products overflow before it allocates them.
  std::vector<index_t> qp_shape = shape_of(q), kp_shape = shape_of(k);
  qp_shape.back() = units;
  kp_shape.back() = units;
  checked_size(qp_shape, "the query projection (..., Lq, U)");
  checked_size(kp_shape, "the key projection (..., Lk, U)");
  const Strided<const T> qv = view<T>(q, "query"), kv = view<T>(k, "key");
  py::array_t<T> out = new_output<T>(score_shape(q, k), "scores");
  // Nothing to return: no projection is built either.
  if (all_empty({&out})) return std::move(out);
  T* o = out.mutable_data();
  const ConstMatrixMap<T> wq = map_matrix(wqc), wk = map_matrix(wkc);
  {
    // Safe without the GIL: every array is kept alive by this frame; no Python object is used.
    py::gil_scoped_release nogil;
    score_additive<T>(qv, kv, wq, wk, vc.data(), bc.data(), static_cast<T>(scale), o);
  }
  return std::move(out);
}

}  // namespace

void register_scores(py::module_& m) {
  m.def("score_product", [](const py::array& q, const py::array& k, const py::object& weight, double scale) -> py::array {
    return dispatch(float_dtype(q, "query"), [&](auto t) { return product_impl<decltype(t)>(q, k, weight, scale); });
  }, py::arg("query").noconvert(), py::arg("key").noconvert(), py::arg("weight") = py::none(), py::arg("scale") = 1.0,
        "scale * query key^T, or scale * (query weight) key^T when weight (Dq, Dk) is given. "
        "query (..., Lq, Dq), key (..., Lk, Dk) with equal batch shapes -> (..., Lq, Lk).");
  m.def("score_additive", [](const py::array& q, const py::array& k, const py::object& w_query,
                             const py::object& w_key, const py::object& v, const py::object& bias,
                             double scale) -> py::array {
    return dispatch(float_dtype(q, "query"),
                    [&](auto t) { return additive_impl<decltype(t)>(q, k, w_query, w_key, v, bias, scale); });
  }, py::arg("query").noconvert(), py::arg("key").noconvert(), py::arg("w_query"), py::arg("w_key"), py::arg("v"),
        py::arg("bias") = py::none(), py::arg("scale") = 1.0,
        "scale * v . tanh(query w_query + bias + key w_key) for every (query, key) pair -> (..., Lq, Lk).");
}

}  // namespace bind
}  // namespace attnext
