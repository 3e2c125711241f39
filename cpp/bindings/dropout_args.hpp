// The dropout arguments every attention binding with dropout takes (dropout_p, seed), parsed
// once here: the forward and the backward must read the same seed the same way.
#pragma once

#include <attnext/dropout.hpp>

#include "common.hpp"

#include <cstdint>
#include <string>

namespace attnext {
namespace bind {

// A uint64 from a Python int (or any object with __index__, such as a NumPy integer). Bools
// are refused (TypeError), as are values outside [0, 2**64 - 1] (ValueError): a seed or a
// batch index is never reduced modulo 2**64 behind the caller's back.
inline std::uint64_t uint64_arg(const py::handle& obj, const char* name) {
  if (PyBool_Check(obj.ptr()) || !PyIndex_Check(obj.ptr()))
    fail_type(std::string(name) + " must be an int in [0, 2**64 - 1], got " +
              std::string(py::str(py::type::of(obj).attr("__name__"))));
  const py::object as_int = py::reinterpret_steal<py::object>(PyNumber_Index(obj.ptr()));
  if (!as_int) throw py::error_already_set();
  const unsigned long long v = PyLong_AsUnsignedLongLong(as_int.ptr());
  if (v == static_cast<unsigned long long>(-1) && PyErr_Occurred()) {
    PyErr_Clear();  // OverflowError for a negative or too large value: say it as a ValueError
    fail_value(std::string(name) + " must lie in [0, 2**64 - 1], got " + std::string(py::repr(as_int)));
  }
  return static_cast<std::uint64_t>(v);
}

// dropout_p in [0, 1] (NaN refused) and the seed, as the kernels' Dropout.
inline Dropout dropout_arg(double dropout_p, const py::handle& seed) {
  if (!(dropout_p >= 0.0 && dropout_p <= 1.0))
    fail_value("dropout_p must lie in [0, 1], got " + std::string(py::repr(py::float_(dropout_p))));
  return make_dropout(dropout_p, uint64_arg(seed, "seed"));
}

}  // namespace bind
}  // namespace attnext
