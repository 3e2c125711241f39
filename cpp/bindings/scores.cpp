#include <attnext/score.hpp>

#include "common.hpp"

namespace attnext {
namespace bind {

namespace {

void check_query_key(const py::array& q, const py::array& k) {
  float_dtype(q, "query");
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

// A parameter vector of `length` entries as a contiguous, aligned array of T.
template <typename T>
py::array_t<T, py::array::c_style> contiguous_vector(const py::array& a, const char* name, py::ssize_t length,
                                                     const char* length_name) {
  require_ndim(a, name, 1, 1);
  if (a.shape(0) != length)
    fail_value(std::string(name) + " has shape " + shape_str(a) + " but " + length_name + " is " +
               std::to_string(length));
  return contiguous_parameter<T>(a, name);
}

template <typename T>
py::array product_impl(const py::array& q, const py::array& k, const py::object& weight, double scale) {
  const Strided<const T> qv = view<T>(q, "query"), kv = view<T>(k, "key");
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
  py::array_t<T> out = new_output<T>(score_shape(q, k), "scores");
  // Nothing to compute; also keeps a huge batch of empty rows from looping over no work.
  if (out.size() == 0) return std::move(out);
  T* o = out.mutable_data();
  {
    // Safe without the GIL: every array is kept alive by this frame; no Python object is used.
    py::gil_scoped_release nogil;
    score_product<T>(qv, kv, general ? &wv : nullptr, static_cast<T>(scale), o);
  }
  return std::move(out);
}

template <typename T>
py::array additive_impl(const py::array& q, const py::array& k, const py::array& w_query, const py::array& w_key,
                        const py::array& v, const py::object& bias, double scale) {
  require_same_dtype(q, "query", w_query, "w_query");
  require_same_dtype(q, "query", w_key, "w_key");
  require_same_dtype(q, "query", v, "v");
  require_ndim(w_query, "w_query", 2, 2);
  require_ndim(w_key, "w_key", 2, 2);
  // Contiguous weights (copied only if they are not) let every row product run as a GEMV/GEMM.
  const auto wqc = contiguous_parameter<T>(w_query, "w_query");
  const auto wkc = contiguous_parameter<T>(w_key, "w_key");
  require_dim(q, "query", -1, w_query, "w_query", 0, "query's last dimension and w_query's first");
  require_dim(k, "key", -1, w_key, "w_key", 0, "key's last dimension and w_key's first");
  require_dim(w_query, "w_query", 1, w_key, "w_key", 1, "the number of units (second dimensions)");
  const py::ssize_t units = w_query.shape(1);
  const auto vc = contiguous_vector<T>(v, "v", units, "the number of units");
  py::array bc;
  if (!bias.is_none()) {
    const py::array b = require_array(bias, "bias");
    require_same_dtype(q, "query", b, "bias");
    bc = contiguous_vector<T>(b, "bias", units, "the number of units");
  }
  // The kernel stores both projections, (..., Lq, U) and (..., Lk, U): refuse sizes whose
  // products overflow before it allocates them.
  std::vector<index_t> qp_shape = shape_of(q), kp_shape = shape_of(k);
  qp_shape.back() = units;
  kp_shape.back() = units;
  checked_size(qp_shape, "the query projection (..., Lq, U)");
  checked_size(kp_shape, "the key projection (..., Lk, U)");
  const Strided<const T> qv = view<T>(q, "query"), kv = view<T>(k, "key");
  const ConstMatrixMap<T> wq(wqc.data(), wqc.shape(0), wqc.shape(1)), wk(wkc.data(), wkc.shape(0), wkc.shape(1));
  py::array_t<T> out = new_output<T>(score_shape(q, k), "scores");
  // Nothing to compute; also keeps a huge batch of empty rows from looping over no work.
  if (out.size() == 0) return std::move(out);
  T* o = out.mutable_data();
  const T* bp = bias.is_none() ? nullptr : static_cast<const T*>(bc.data());
  {
    // Safe without the GIL: every array is kept alive by this frame; no Python object is used.
    py::gil_scoped_release nogil;
    score_additive<T>(qv, kv, wq, wk, static_cast<const T*>(vc.data()), bp, static_cast<T>(scale), o);
  }
  return std::move(out);
}

}  // namespace

void register_scores(py::module_& m) {
  m.def("score_product", [](const py::array& q, const py::array& k, const py::object& weight, double scale) -> py::array {
    check_query_key(q, k);
    return float_dtype(q, "query") == DType::f32 ? product_impl<float>(q, k, weight, scale)
                                                 : product_impl<double>(q, k, weight, scale);
  }, py::arg("query").noconvert(), py::arg("key").noconvert(), py::arg("weight") = py::none(), py::arg("scale") = 1.0,
        "scale * query key^T, or scale * (query weight) key^T when weight (Dq, Dk) is given. "
        "query (..., Lq, Dq), key (..., Lk, Dk) with equal batch shapes -> (..., Lq, Lk).");
  m.def("score_additive", [](const py::array& q, const py::array& k, const py::array& w_query, const py::array& w_key,
                             const py::array& v, const py::object& bias, double scale) -> py::array {
    check_query_key(q, k);
    return float_dtype(q, "query") == DType::f32 ? additive_impl<float>(q, k, w_query, w_key, v, bias, scale)
                                                 : additive_impl<double>(q, k, w_query, w_key, v, bias, scale);
  }, py::arg("query").noconvert(), py::arg("key").noconvert(), py::arg("w_query").noconvert(),
        py::arg("w_key").noconvert(), py::arg("v").noconvert(), py::arg("bias") = py::none(), py::arg("scale") = 1.0,
        "scale * v . tanh(query w_query + bias + key w_key) for every (query, key) pair -> (..., Lq, Lk).");
}

}  // namespace bind
}  // namespace attnext
