// The attention weights times the values.
#include <attnext/weighted_sum.hpp>

#include "common.hpp"

namespace attnext {
namespace bind {

namespace {

template <typename T>
py::array weighted_sum_impl(const py::array& w, const py::array& v) {
  require_same_dtype(w, "weights", v, "value");
  require_ndim(w, "weights", 2);
  require_ndim(v, "value", 2);
  require_same_batch(w, "weights", v, "value", 2);
  require_dim(w, "weights", -1, v, "value", -2, "the number of keys (weights' last and value's second-to-last dimension)");
  const Strided<const T> wv = view<T>(w, "weights"), vv = view<T>(v, "value");
  std::vector<index_t> shape = wv.shape;
  shape.back() = vv.dim(-1);
  py::array_t<T> out = new_output<T>(shape, "weighted sum");
  if (all_empty({&out})) return std::move(out);
  T* o = out.mutable_data();
  {
    // Safe without the GIL: both inputs and out are kept alive by this frame.
    py::gil_scoped_release nogil;
    weighted_sum<T>(wv, vv, o);
  }
  return std::move(out);
}

}  // namespace

void register_weighted_sum(py::module_& m) {
  m.def("weighted_sum", [](const py::array& w, const py::array& v) -> py::array {
    return dispatch(float_dtype(w, "weights"), [&](auto t) { return weighted_sum_impl<decltype(t)>(w, v); });
  }, py::arg("weights").noconvert(), py::arg("value").noconvert(),
        "weights (..., Lq, Lk) times value (..., Lk, Dv) -> (..., Lq, Dv); equal batch shapes.");
}

}  // namespace bind
}  // namespace attnext
