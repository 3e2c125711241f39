// The benchmark's machine probes (probe.hpp): peak multiply-add rates and read bandwidth.
#include <attnext/probe.hpp>

#include "common.hpp"

#include <cstdint>
#include <string>
#include <tuple>

namespace attnext {
namespace bind {

namespace {

void check_counts(int threads, int runs) {
  if (threads < 1) fail_value("threads must be at least 1, got " + std::to_string(threads));
  if (runs < 1) fail_value("runs must be at least 1, got " + std::to_string(runs));
}

std::tuple<double, std::string> fma_peak(const std::string& dtype, int threads, int runs) {
  if (dtype != "float32" && dtype != "float64" && dtype != "bfloat16")
    fail_value("dtype must be 'float32', 'float64' or 'bfloat16', got '" + dtype + "'");
  check_counts(threads, runs);
  probe::Peak p;
  {
    // The loops touch no Python object.
    py::gil_scoped_release release;
    p = dtype == "bfloat16" ? probe::bf16_peak(threads, runs) : probe::fma_peak(dtype, threads, runs);
  }
  return {p.gflops, p.isa};
}

double read_bandwidth(std::int64_t nbytes, int threads, int runs) {
  if (nbytes < probe::kMinReadBytes)
    fail_value("nbytes must be at least " + std::to_string(probe::kMinReadBytes) + ", got " + std::to_string(nbytes));
  check_counts(threads, runs);
  py::gil_scoped_release release;  // our own buffer, no Python object
  return probe::read_bandwidth(nbytes, threads, runs);
}

}  // namespace

void register_probe(py::module_& m) {
  m.def("probe_peak_gflops", &fma_peak, py::arg("dtype"), py::arg("threads"), py::arg("runs") = 3,
        "Peak GFLOP/s of a register-only multiply-add loop on `threads` threads (best of `runs`): "
        "the widest FMA the CPU has for float32/float64; for bfloat16 AMX tdpbf16ps or vdpbf16ps, "
        "whichever the kernels use, else the float32 fallback's peak. Returns (gflops, what ran).");
  m.def("probe_read_gbs", &read_bandwidth, py::arg("nbytes"), py::arg("threads"), py::arg("runs") = 3,
        "Read bandwidth in GB/s: `threads` threads summing an `nbytes` buffer, each its part as 1, 2, 4 "
        "and 8 sequential streams side by side; the best stream count, best of `runs`.");
  m.attr("probe_read_min_bytes") = probe::kMinReadBytes;
}

}  // namespace bind
}  // namespace attnext
