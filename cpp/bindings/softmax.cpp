// Masked softmax over the last axis.
#include <attnext/softmax.hpp>

#include "common.hpp"

namespace attnext {
namespace bind {

namespace {

// In: the input's type; Out: the output's (In, or float when a 16-bit call asks for float32).
template <typename In, typename Out>
py::array softmax_impl(const py::array& x, const py::object& mask, bool causal, const py::object& causal_offset_arg) {
  using Acc = acc_t<In>;
  require_ndim(x, "x", causal ? 2 : 1);
  const index_t causal_offset = saturating_index(causal_offset_arg, "causal_offset");
  const Strided<const In> xv = view<In>(x, "x");
  const Mask<Acc> mv = mask_view<Acc>(mask, xv.shape, "mask");
  py::array out = new_output_like<Out>(x, xv.shape, "softmax output");
  if (all_empty({&out})) return out;
  Out* o = data_of<Out>(out);
  {
    // Safe without the GIL: x, mask and out are owned by this frame's references and the
    // kernel touches no Python object.
    py::gil_scoped_release nogil;
    softmax<In, Acc, Out>(xv, mv, Causal{causal, causal_offset}, o);
  }
  return out;
}

}  // namespace

void register_softmax(py::module_& m) {
  m.def("softmax", [](const py::array& x, const py::object& mask, bool causal, const py::object& causal_offset,
                      bool out_float32) -> py::array {
    return dispatch_out(float_dtype(x, "x"), out_float32, [&](auto in, auto out) {
      return softmax_impl<decltype(in), decltype(out)>(x, mask, causal, causal_offset);
    });
  }, py::arg("x").noconvert(), py::arg("mask") = py::none(), py::arg("causal") = false, py::arg("causal_offset") = 0,
        py::arg("out_float32") = false,
        "Softmax over the last axis of x; mask broadcast to x's shape (bool True = attend, or float added: "
        "float32 for 16-bit x); causal hides key j from query i (axis -2) when j > i + causal_offset (an int of "
        "any size). Output in x's dtype, or float32 for 16-bit x with out_float32.");
}

}  // namespace bind
}  // namespace attnext
