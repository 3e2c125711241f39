#include <attnext/linear.hpp>

#include "common.hpp"

namespace attnext {
namespace bind {

template <typename T>
py::array linear_impl(const py::array& x, const py::array& weight, const py::object& bias) {
  const Strided<const T> xv = view<T>(x, "x"), wv = view<T>(weight, "weight");
  py::array_t<T, py::array::c_style | py::array::forcecast> b;
  if (!bias.is_none()) b = py::reinterpret_borrow<py::array>(bias);  // contiguous (copied only if strided)
  const T* bp = bias.is_none() ? nullptr : b.data();
  py::array_t<T> out = new_output<T>({xv.dim(0), xv.dim(1), wv.dim(0)}, "linear output");
  T* o = out.mutable_data();
  {
    // Safe without the GIL: x, weight, b and out are kept alive by this frame.
    py::gil_scoped_release nogil;
    linear<T>(xv, wv, bp, o);
  }
  return std::move(out);
}

void register_linear(py::module_& m) {
  m.def("linear", [](const py::array& x, const py::array& weight, const py::object& bias) -> py::array {
    const DType dt = float_dtype(x, "x");
    require_same_dtype(x, "x", weight, "weight");
    require_ndim(x, "x", 4, 4);
    require_ndim(weight, "weight", 2, 2);
    if (weight.shape(1) != x.shape(2) * x.shape(3))
      fail_value("x has shape " + shape_str(x) + " (" + std::to_string(x.shape(2) * x.shape(3)) +
                 " features per row) but weight has " + shape_str(weight) + ": weight must be (out, in)");
    if (!bias.is_none()) {
      if (!py::isinstance<py::array>(bias)) fail_type("bias must be a NumPy array or None");
      const py::array b = py::reinterpret_borrow<py::array>(bias);
      require_same_dtype(x, "x", b, "bias");
      if (b.ndim() != 1 || b.shape(0) != weight.shape(0))
        fail_value("bias has shape " + shape_str(b) + " but weight has " + shape_str(weight) +
                   ": bias must be (out,)");
    }
    return dt == DType::f32 ? linear_impl<float>(x, weight, bias) : linear_impl<double>(x, weight, bias);
  }, py::arg("x").noconvert(), py::arg("weight").noconvert(), py::arg("bias").none(true),
        "y = x weight^T + bias: x (B, L, C, D) any strides (C * D input features), weight (out, C * D), "
        "bias (out,) or None -> (B, L, out) C-contiguous.");
}

}  // namespace bind
}  // namespace attnext
