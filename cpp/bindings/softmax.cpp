#include <attnext/softmax.hpp>

#include "common.hpp"

namespace attnext {
namespace bind {

template <typename T>
py::array softmax_impl(const py::array& x, const py::object& mask, bool causal, index_t causal_offset) {
  const Strided<const T> xv = view<T>(x, "x");
  const Mask<T> mv = mask_view<T>(mask, xv.shape, "mask");
  py::array_t<T> out = new_output<T>(xv.shape, "softmax output");
  // Nothing to compute; also keeps a huge batch of empty rows from looping over no work.
  if (out.size() == 0) return std::move(out);
  T* o = out.mutable_data();
  {
    // Safe without the GIL: x, mask and out are owned by this frame's references and the
    // kernel touches no Python object.
    py::gil_scoped_release nogil;
    softmax<T>(xv, mv, Causal{causal, causal_offset}, o);
  }
  return std::move(out);
}

void register_softmax(py::module_& m) {
  m.def("softmax", [](const py::array& x, const py::object& mask, bool causal, index_t causal_offset) -> py::array {
    require_ndim(x, "x", causal ? 2 : 1);
    return float_dtype(x, "x") == DType::f32 ? softmax_impl<float>(x, mask, causal, causal_offset)
                                             : softmax_impl<double>(x, mask, causal, causal_offset);
  }, py::arg("x").noconvert(), py::arg("mask") = py::none(), py::arg("causal") = false, py::arg("causal_offset") = 0,
        "Softmax over the last axis of x; mask broadcast to x's shape (bool True = attend, or float added); "
        "causal hides key j from query i (axis -2) when j > i + causal_offset.");
}

}  // namespace bind
}  // namespace attnext
