// The layers' dense maps: y = x W^T + b.
#include <attnext/linear.hpp>

#include "common.hpp"

namespace attnext {
namespace bind {

namespace {

// In: the inputs' type; Out: the output's (In, or float when a 16-bit call asks for float32).
// weight is of In, bias of the accumulation type (float32 for 16-bit inputs) or of In.
template <typename In, typename Out>
py::array linear_impl(const py::array& x, const py::array& weight, const py::object& bias) {
  using Acc = acc_t<In>;
  require_same_dtype(x, "x", weight, "weight");
  require_ndim(x, "x", 4, 4);
  require_ndim(weight, "weight", 2, 2);
  if (weight.shape(1) != x.shape(2) * x.shape(3))
    fail_value("x has shape " + shape_str(x) + " (" + std::to_string(x.shape(2) * x.shape(3)) +
               " features per row) but weight has " + shape_str(weight) + ": weight must be (out, in)");
  const Bias<Acc> b = parameter_bias<In>(x, "x", bias, weight.shape(0),
                                         "weight has " + shape_str(weight) + ": bias must be (out,)");
  const Strided<const In> xv = view<In>(x, "x"), wv = view<In>(weight, "weight");
  py::array out = new_output_like<Out>(x, {xv.dim(0), xv.dim(1), wv.dim(0)}, "linear output");
  if (all_empty({&out})) return out;
  Out* o = data_of<Out>(out);
  {
    // Safe without the GIL: x, weight, the bias and out are kept alive by this frame.
    py::gil_scoped_release nogil;
    linear<In, Acc, Out>(xv, wv, b.data(), o);
  }
  return out;
}

template <typename T>
py::tuple linear_backward_impl(const py::array& grad, const py::array& x, const py::object& weight, bool want_bias) {
  require_same_dtype(x, "x", grad, "grad");
  require_ndim(x, "x", 4, 4);
  require_ndim(grad, "grad", 3, 3);
  // weight as C-contiguous data (copied when it is not): the GEMM reads its rows in place
  const auto w = parameter_matrix<T>(x, "x", weight, "weight");
  if (w.shape(1) != x.shape(2) * x.shape(3))
    fail_value("x has shape " + shape_str(x) + " (" + std::to_string(x.shape(2) * x.shape(3)) +
               " features per row) but weight has " + shape_str(w) + ": weight must be (out, in)");
  if (grad.shape(0) != x.shape(0) || grad.shape(1) != x.shape(1) || grad.shape(2) != w.shape(0))
    fail_value("grad has shape " + shape_str(grad) + " but x has " + shape_str(x) + " and weight " + shape_str(w) +
               ": grad must be (B, L, out)");
  const Strided<const T> gv = view<T>(grad, "grad"), xv = view<T>(x, "x");
  py::array_t<T> dx = new_output<T>(shape_of(x), "x gradient");
  py::array_t<T> dw = new_output<T>(shape_of(w), "weight gradient");
  py::array_t<T> db;
  if (want_bias) db = new_output<T>({w.shape(0)}, "bias gradient");
  T* dxp = dx.mutable_data();
  T* dwp = dw.mutable_data();
  T* dbp = want_bias ? db.mutable_data() : nullptr;
  const T* wp = w.data();
  {
    // Safe without the GIL: grad, x, the weight's data and the outputs are kept alive by this frame.
    py::gil_scoped_release nogil;
    linear_backward<T>(gv, xv, wp, dxp, dwp, dbp);
  }
  return py::make_tuple(dx, dw, want_bias ? py::object(db) : py::none());
}

}  // namespace

void register_linear(py::module_& m) {
  m.def("linear", [](const py::array& x, const py::array& weight, const py::object& bias,
                     bool out_float32) -> py::array {
    return dispatch_out(float_dtype(x, "x"), out_float32, [&](auto in, auto out) {
      return linear_impl<decltype(in), decltype(out)>(x, weight, bias);
    });
  }, py::arg("x").noconvert(), py::arg("weight").noconvert(), py::arg("bias").none(true),
        py::arg("out_float32") = false,
        "y = x weight^T + bias: x (B, L, C, D) any strides (C * D input features), weight (out, C * D) in x's "
        "dtype, bias (out,) or None (float32 or x's dtype for 16-bit x) -> (B, L, out) C-contiguous, in x's dtype (float32 "
        "for 16-bit x with out_float32).");
  m.def("linear_backward", [](const py::array& grad, const py::array& x, const py::object& weight,
                              bool want_bias) -> py::tuple {
    return dispatch_wide(wide_float_dtype(x, "x", "linear_backward"),
                         [&](auto t) { return linear_backward_impl<decltype(t)>(grad, x, weight, want_bias); });
  }, py::arg("grad").noconvert(), py::arg("x").noconvert(), py::arg("weight"), py::arg("want_bias"),
        "Gradients of y = x weight^T + bias (linear): grad (B, L, out) = dL/dy, x (B, L, C, D) as linear took it, "
        "weight (out, C * D) -> (dx (B, L, C, D), dweight (out, C * D), dbias (out,) or None unless want_bias), "
        "C-contiguous, bit-identical for any thread count.");
}

}  // namespace bind
}  // namespace attnext
