// The layers' dense maps: y = x W^T + b.
#include <attnext/linear.hpp>

#include "common.hpp"

namespace attnext {
namespace bind {

namespace {

template <typename T>
py::array linear_impl(const py::array& x, const py::array& weight, const py::object& bias) {
  require_same_dtype(x, "x", weight, "weight");
  require_ndim(x, "x", 4, 4);
  require_ndim(weight, "weight", 2, 2);
  if (weight.shape(1) != x.shape(2) * x.shape(3))
    fail_value("x has shape " + shape_str(x) + " (" + std::to_string(x.shape(2) * x.shape(3)) +
               " features per row) but weight has " + shape_str(weight) + ": weight must be (out, in)");
  const Bias<T> b = parameter_bias<T>(x, "x", bias, weight.shape(0),
                                      "weight has " + shape_str(weight) + ": bias must be (out,)");
  const Strided<const T> xv = view<T>(x, "x"), wv = view<T>(weight, "weight");
  py::array_t<T> out = new_output<T>({xv.dim(0), xv.dim(1), wv.dim(0)}, "linear output");
  if (all_empty({&out})) return std::move(out);
  T* o = out.mutable_data();
  const T* bp = b.data();
  {
    // Safe without the GIL: x, weight, bias and out are kept alive by this frame.
    py::gil_scoped_release nogil;
    linear<T>(xv, wv, bp, o);
  }
  return std::move(out);
}

}  // namespace

void register_linear(py::module_& m) {
  m.def("linear", [](const py::array& x, const py::array& weight, const py::object& bias) -> py::array {
    return dispatch(float_dtype(x, "x"), [&](auto t) { return linear_impl<decltype(t)>(x, weight, bias); });
  }, py::arg("x").noconvert(), py::arg("weight").noconvert(), py::arg("bias").none(true),
        "y = x weight^T + bias: x (B, L, C, D) any strides (C * D input features), weight (out, C * D), "
        "bias (out,) or None -> (B, L, out) C-contiguous.");
}

}  // namespace bind
}  // namespace attnext
