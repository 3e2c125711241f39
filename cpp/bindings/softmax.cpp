// Masked softmax over the last axis.
#include <attnext/softmax.hpp>

#include "common.hpp"

namespace attnext {
namespace bind {

namespace {

template <typename T>
py::array softmax_impl(const py::array& x, const py::object& mask, bool causal, const py::object& causal_offset_arg) {
  require_ndim(x, "x", causal ? 2 : 1);
  const index_t causal_offset = saturating_index(causal_offset_arg, "causal_offset");
  const Strided<const T> xv = view<T>(x, "x");
  const Mask<T> mv = mask_view<T>(mask, xv.shape, "mask");
  py::array_t<T> out = new_output<T>(xv.shape, "softmax output");
  if (all_empty({&out})) return std::move(out);
  T* o = out.mutable_data();
  {
    // Safe without the GIL: x, mask and out are owned by this frame's references and the
    // kernel touches no Python object.
    py::gil_scoped_release nogil;
    softmax<T>(xv, mv, Causal{causal, causal_offset}, o);
  }
  return std::move(out);
}

}  // namespace

void register_softmax(py::module_& m) {
  m.def("softmax", [](const py::array& x, const py::object& mask, bool causal, const py::object& causal_offset) -> py::array {
    return dispatch(float_dtype(x, "x"),
                    [&](auto t) { return softmax_impl<decltype(t)>(x, mask, causal, causal_offset); });
  }, py::arg("x").noconvert(), py::arg("mask") = py::none(), py::arg("causal") = false, py::arg("causal_offset") = 0,
        "Softmax over the last axis of x; mask broadcast to x's shape (bool True = attend, or float added); "
        "causal hides key j from query i (axis -2) when j > i + causal_offset (an int of any size).");
}

}  // namespace bind
}  // namespace attnext
