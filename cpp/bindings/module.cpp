// attnext._core: the compiled kernels. Private; the public API is the Python package.
// Each area registers its own functions (see the register_* files beside this one).
#include <pybind11/pybind11.h>

namespace py = pybind11;

namespace attnext {
namespace bind {
void register_info(py::module_& m);
void register_softmax(py::module_& m);
void register_scores(py::module_& m);
void register_weighted_sum(py::module_& m);
void register_additive(py::module_& m);
void register_linear(py::module_& m);
void register_sdpa(py::module_& m);
void register_sdpa_backward(py::module_& m);
void register_probe(py::module_& m);
}  // namespace bind
}  // namespace attnext

PYBIND11_MODULE(_core, m) {
  m.doc() = "attnext's compiled kernels (private: use the attnext package)";
  attnext::bind::register_info(m);
  attnext::bind::register_softmax(m);
  attnext::bind::register_scores(m);
  attnext::bind::register_weighted_sum(m);
  attnext::bind::register_additive(m);
  attnext::bind::register_linear(m);
  attnext::bind::register_sdpa(m);
  attnext::bind::register_sdpa_backward(m);
  attnext::bind::register_probe(m);
}
