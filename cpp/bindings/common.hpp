// Shared by the binding files: turning NumPy arrays into the core's Strided views, and the
// argument checks every entry point repeats. The only headers (with the .cpp files here)
// that include pybind11.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <attnext/mask.hpp>
#include <attnext/strided.hpp>

#include <cstdint>
#include <cstring>
#include <sstream>
#include <string>
#include <vector>

namespace attnext {
namespace bind {

namespace py = pybind11;

inline std::string shape_str(const py::array& a) {
  std::ostringstream s;
  s << "(";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) s << (i ? ", " : "") << a.shape(i) << (a.ndim() == 1 ? "," : "");
  s << ")";
  return s.str();
}

inline std::string shape_str(const std::vector<index_t>& shape) {
  std::ostringstream s;
  s << "(";
  for (size_t i = 0; i < shape.size(); ++i) s << (i ? ", " : "") << shape[i] << (shape.size() == 1 ? "," : "");
  s << ")";
  return s.str();
}

[[noreturn]] inline void fail_value(const std::string& msg) { throw py::value_error(msg); }
[[noreturn]] inline void fail_type(const std::string& msg) { throw py::type_error(msg); }

enum class DType { f32, f64 };

// The floating dtype of a kernel input; anything else is a TypeError naming the argument.
// Compared by equivalence, not identity: NumPy may hand out equal descriptors that are not
// its singletons; a non-native byte order is not equivalent and is refused.
inline DType float_dtype(const py::array& a, const char* name) {
  if (a.dtype().equal(py::dtype::of<float>())) return DType::f32;
  if (a.dtype().equal(py::dtype::of<double>())) return DType::f64;
  fail_type(std::string(name) + " must be float32 or float64, got " + std::string(py::str(a.dtype())));
}

inline void require_same_dtype(const py::array& a, const char* an, const py::array& b, const char* bn) {
  if (!a.dtype().equal(b.dtype()))
    fail_type(std::string(bn) + " has dtype " + std::string(py::str(b.dtype())) + " but " + an + " has " +
              std::string(py::str(a.dtype())) + "; the kernels need one dtype (the Python API promotes)");
}

inline void require_ndim(const py::array& a, const char* name, py::ssize_t min_ndim, py::ssize_t max_ndim = 64) {
  if (a.ndim() < min_ndim || a.ndim() > max_ndim) {
    std::ostringstream s;
    s << name << " must have ";
    if (min_ndim == max_ndim)
      s << min_ndim;
    else if (max_ndim == 64)
      s << "at least " << min_ndim;
    else
      s << min_ndim << " to " << max_ndim;
    s << " dimensions, got shape " << shape_str(a);
    fail_value(s.str());
  }
}

// Element strides of an array of T; byte strides that are not a multiple of the item size
// (possible with views of structured arrays) are rejected rather than read misaligned.
template <typename T>
std::vector<index_t> element_strides(const py::array& a, const char* name) {
  std::vector<index_t> st(static_cast<size_t>(a.ndim()));
  for (py::ssize_t i = 0; i < a.ndim(); ++i) {
    if (a.strides(i) % static_cast<py::ssize_t>(sizeof(T)) != 0)
      fail_value(std::string(name) + " has a stride that is not a multiple of its item size");
    st[static_cast<size_t>(i)] = a.strides(i) / static_cast<py::ssize_t>(sizeof(T));
  }
  return st;
}

inline std::vector<index_t> shape_of(const py::array& a) {
  return std::vector<index_t>(a.shape(), a.shape() + a.ndim());
}

// Arrays whose data is not aligned to the item size (np.frombuffer at an odd offset, fields
// of packed structured arrays) are refused: reading them is undefined behaviour in C++. The
// Python front copies such arrays before calling in.
template <typename T>
Strided<const T> view(const py::array& a, const char* name) {
  if (!(a.flags() & py::detail::npy_api::NPY_ARRAY_ALIGNED_))
    fail_value(std::string(name) + " of shape " + shape_str(a) +
               " is not aligned to its item size (pass a copy: a.copy())");
  return Strided<const T>(static_cast<const T*>(a.data()), shape_of(a), element_strides<T>(a, name));
}

// A small parameter array (weights, a unit vector) as C-contiguous, aligned data of T; the
// caller has checked its dtype is T. It is copied, through NumPy so that a failed allocation
// raises MemoryError (array_t::ensure would hand back a null array), only when it is not
// C-contiguous; misaligned data is refused as in view().
template <typename T>
py::array_t<T, py::array::c_style> contiguous_parameter(const py::array& a, const char* name) {
  if (!(a.flags() & py::detail::npy_api::NPY_ARRAY_ALIGNED_))
    fail_value(std::string(name) + " of shape " + shape_str(a) +
               " is not aligned to its item size (pass a copy: a.copy())");
  if (a.flags() & py::array::c_style) return py::reinterpret_borrow<py::array_t<T, py::array::c_style>>(a);
  const py::object copy = py::module_::import("numpy").attr("ascontiguousarray")(a);
  return py::reinterpret_borrow<py::array_t<T, py::array::c_style>>(copy);
}

// Leading (batch) axes of a and b must agree exactly; the Python front broadcasts them
// (as stride-0 views) before calling in.
inline void require_same_batch(const py::array& a, const char* an, const py::array& b, const char* bn, int trailing) {
  const py::ssize_t na = a.ndim() - trailing, nb = b.ndim() - trailing;
  bool same = na == nb;
  for (py::ssize_t i = 0; same && i < na; ++i) same = a.shape(i) == b.shape(i);
  if (!same)
    fail_value(std::string(an) + " has shape " + shape_str(a) + " but " + bn + " has " + shape_str(b) +
               ": their leading (batch) dimensions must match");
}

inline void require_dim(const py::array& a, const char* an, int axis_a, const py::array& b, const char* bn, int axis_b,
                        const char* what) {
  const py::ssize_t da = a.shape(axis_a < 0 ? a.ndim() + axis_a : axis_a);
  const py::ssize_t db = b.shape(axis_b < 0 ? b.ndim() + axis_b : axis_b);
  if (da != db)
    fail_value(std::string(an) + " has shape " + shape_str(a) + " but " + bn + " has " + shape_str(b) + ": " + what +
               " must match");
}

// Product of a shape, refusing sizes that overflow 64-bit arithmetic.
// Every value of the int64 array `a` lies in [0, limit] (ValueError naming `name` otherwise).
// Walks only the axes that hold distinct values (stride-0 broadcast axes are read once), so a
// huge broadcast view costs no more than the memory behind it.
inline void require_in_range(const py::array& a, const char* name, std::int64_t limit) {
  std::vector<py::ssize_t> shape, strides;
  for (py::ssize_t i = 0; i < a.ndim(); ++i) {
    if (a.shape(i) == 0) return;
    if (a.shape(i) > 1 && a.strides(i) != 0) {
      shape.push_back(a.shape(i));
      strides.push_back(a.strides(i));
    }
  }
  const char* base = static_cast<const char*>(a.data());
  std::vector<py::ssize_t> idx(shape.size(), 0);
  for (;;) {
    py::ssize_t off = 0;
    for (std::size_t i = 0; i < idx.size(); ++i) off += idx[i] * strides[i];
    std::int64_t value;
    std::memcpy(&value, base + off, sizeof value);
    if (value < 0 || value > limit)
      fail_value(std::string(name) + " must lie in [0, " + std::to_string(limit) + "] (the number of keys), got " +
                 std::to_string(value));
    std::size_t i = idx.size();
    while (i > 0 && ++idx[i - 1] == shape[i - 1]) idx[--i] = 0;
    if (i == 0) return;
  }
}

// key_lengths for kernels that take them: None, or an int64 array of exactly the batch shape
// with every value in [0, num_keys]. `holder` keeps the array alive for the returned view.
inline Strided<const std::int64_t> key_lengths_view(const py::object& obj, const std::vector<index_t>& batch,
                                                    index_t num_keys, py::array& holder) {
  if (obj.is_none()) return {};
  if (!py::isinstance<py::array>(obj)) fail_type("key_lengths must be a NumPy int64 array or None");
  holder = py::reinterpret_borrow<py::array>(obj);
  if (!holder.dtype().is(py::dtype::of<std::int64_t>()))
    fail_type("key_lengths must be int64, got " + std::string(py::str(holder.dtype())));
  if (shape_of(holder) != batch)
    fail_value("key_lengths has shape " + shape_str(holder) + " but the batch shape is " + shape_str(batch));
  require_in_range(holder, "key_lengths", num_keys);
  return view<std::int64_t>(holder, "key_lengths");
}

inline index_t checked_size(const std::vector<index_t>& shape, const char* what) {
  index_t n = 1;
  for (index_t d : shape) {
    if (d < 0) fail_value(std::string(what) + " would have a negative dimension: " + shape_str(shape));
    if (d != 0 && n > (index_t(1) << 62) / d)
      fail_value(std::string(what) + " of shape " + shape_str(shape) + " is too large (its size overflows 64 bits)");
    n *= d;
  }
  return n;
}

// `obj` as an array (for optional arguments typed py::object); anything else is a TypeError.
inline py::array require_array(const py::object& obj, const char* name) {
  if (!py::isinstance<py::array>(obj))
    fail_type(std::string(name) + " must be a NumPy array, got " + std::string(py::str(py::type::of(obj).attr("__name__"))));
  return py::reinterpret_borrow<py::array>(obj);
}

// A fresh C-contiguous output array (NumPy raises MemoryError when it cannot be had).
template <typename T>
py::array_t<T> new_output(const std::vector<index_t>& shape, const char* what) {
  checked_size(shape, what);
  return py::array_t<T>(std::vector<py::ssize_t>(shape.begin(), shape.end()));
}

// A mask for scores of shape `score_shape`: None, a bool array (True = may attend) or an
// array of the scores' dtype (added), already broadcast to exactly that shape.
template <typename T>
Mask<T> mask_view(const py::object& obj, const std::vector<index_t>& score_shape, const char* name) {
  Mask<T> m;
  if (obj.is_none()) return m;
  if (!py::isinstance<py::array>(obj)) fail_type(std::string(name) + " must be a NumPy array or None");
  const py::array a = py::reinterpret_borrow<py::array>(obj);
  if (shape_of(a) != score_shape)
    fail_value(std::string(name) + " has shape " + shape_str(a) + " but the scores have " + shape_str(score_shape) +
               " (masks are broadcast to the scores' shape before the kernel)");
  if (a.dtype().equal(py::dtype::of<bool>())) {
    m.kind = MaskKind::boolean;
    m.keep = view<bool>(a, name);
  } else if (a.dtype().equal(py::dtype::of<T>())) {
    m.kind = MaskKind::additive;
    m.add = view<T>(a, name);
  } else {
    fail_type(std::string(name) + " must be bool (True = may attend) or " + std::string(py::str(py::dtype::of<T>())) +
              " (added to the scores), got " + std::string(py::str(a.dtype())));
  }
  return m;
}

}  // namespace bind
}  // namespace attnext
