// The attention weights times the values.
#include <attnext/weighted_sum.hpp>

#include "common.hpp"

namespace attnext {
namespace bind {

namespace {

// In: the inputs' type; Out: the output's (In, or float when a 16-bit call asks for float32).
template <typename In, typename Out>
py::array weighted_sum_impl(const py::array& w, const py::array& v) {
  require_same_dtype(w, "weights", v, "value");
  require_ndim(w, "weights", 2);
  require_ndim(v, "value", 2);
  require_same_batch(w, "weights", v, "value", 2);
  require_dim(w, "weights", -1, v, "value", -2, "the number of keys (weights' last and value's second-to-last dimension)");
  const Strided<const In> wv = view<In>(w, "weights"), vv = view<In>(v, "value");
  std::vector<index_t> shape = wv.shape;
  shape.back() = vv.dim(-1);
  py::array out = new_output_like<Out>(w, shape, "weighted sum");
  if (all_empty({&out})) return out;
  Out* o = data_of<Out>(out);
  {
    // Safe without the GIL: both inputs and out are kept alive by this frame.
    py::gil_scoped_release nogil;
    weighted_sum<In, acc_t<In>, Out>(wv, vv, o);
  }
  return out;
}

}  // namespace

void register_weighted_sum(py::module_& m) {
  m.def("weighted_sum", [](const py::array& w, const py::array& v, bool out_float32) -> py::array {
    return dispatch_out(float_dtype(w, "weights"), out_float32, [&](auto in, auto out) {
      return weighted_sum_impl<decltype(in), decltype(out)>(w, v);
    });
  }, py::arg("weights").noconvert(), py::arg("value").noconvert(), py::arg("out_float32") = false,
        "weights (..., Lq, Lk) times value (..., Lk, Dv) -> (..., Lq, Dv); equal batch shapes; in weights' dtype "
        "(float32 for 16-bit inputs with out_float32).");
}

}  // namespace bind
}  // namespace attnext
