#include <attnext/build_info.hpp>
#include <attnext/parallel.hpp>

#include "common.hpp"

namespace attnext {
namespace bind {

constexpr int kMaxThreads = 1024;

void register_info(py::module_& m) {
  m.def("set_num_threads", [](int n) {
    // More threads than this would only exhaust the process's thread limit, and an OpenMP
    // runtime that cannot start its threads aborts the process.
    if (n < 1 || n > kMaxThreads)
      fail_value("set_num_threads: n must be in [1, " + std::to_string(kMaxThreads) + "], got " + std::to_string(n));
    set_num_threads(n);
  }, py::arg("n"));
  m.def("get_num_threads", &get_num_threads);
  m.def("build_info", [] {
    py::dict d;
    d["version"] = ATTNEXT_VERSION;
    d["compiler"] = compiler();
    d["simd"] = simd_level();
    d["eigen_simd"] = eigen_simd();
    d["openmp"] = openmp_enabled();
    d["eigen_version"] = ATTNEXT_EIGEN_VERSION;
    d["native"] = bool(ATTNEXT_NATIVE);
    d["max_threads"] = get_num_threads();
    return d;
  });
}

}  // namespace bind
}  // namespace attnext
