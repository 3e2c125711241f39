// Shared by the binding files: the one dtype dispatch, turning NumPy arrays into the core's
// Strided views, the argument checks every entry point repeats, and the copies a binding takes
// before it releases the GIL. The only header (with the .cpp files here) that includes pybind11.
//
// The shape of every entry: the registering lambda only dispatches on the dtype of its first
// array; `<entry>_impl<T>` parses and checks every argument once, takes its own copy of every
// value that decides which memory the kernel touches (key_lengths, keys_ok; shapes and strides
// are copied into the Strided views), returns at once when every output is empty, and then
// releases the GIL for the kernel.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <attnext/lowp.hpp>
#include <attnext/mask.hpp>
#include <attnext/strided.hpp>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <memory>
#include <sstream>
#include <string>
#include <type_traits>
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

enum class DType { f32, f64, bf16, f16 };

// ml_dtypes' bfloat16, recognised without importing ml_dtypes: a 2-byte dtype named "bfloat16".
// Reading the name is a Python-level property lookup, paid on every call of a decoding step, so
// the type number it was registered under, the same for the whole process, is remembered the
// first time and compared after.
inline bool is_bfloat16(const py::dtype& dt) {
  static std::atomic<int> known_number{-1};
  if (dt.itemsize() != 2 || dt.kind() == 'f') return false;
  if (dt.num() == known_number.load(std::memory_order_relaxed)) return true;
  if (std::string(py::str(dt.attr("name"))) != "bfloat16") return false;
  known_number.store(dt.num(), std::memory_order_relaxed);
  return true;
}

// The floating dtype of a kernel input; anything else is a TypeError naming the argument.
// Compared by equivalence, not identity: NumPy may hand out equal descriptors that are not
// its singletons; a non-native byte order is not equivalent and is refused.
inline DType float_dtype(const py::array& a, const char* name) {
  const py::dtype dt = a.dtype();
  if (dt.equal(py::dtype::of<float>())) return DType::f32;
  if (dt.equal(py::dtype::of<double>())) return DType::f64;
  if (is_bfloat16(dt)) return DType::bf16;
  if (dt.kind() == 'f' && dt.itemsize() == 2 && dt.byteorder() != '>') return DType::f16;
  if (dt.kind() == 'f' && (dt.itemsize() == 2 || dt.itemsize() == 4 || dt.itemsize() == 8) && dt.byteorder() == '>')
    fail_type(std::string(name) + " is " + std::string(py::str(dt)) +
              ", big-endian: the kernels read native floating types (the Python API converts)");
  fail_type(std::string(name) + " must be float32, float64, float16 or bfloat16, got " + std::string(py::str(dt)));
}

// The dtype of an entry without a 16-bit form (the backward entries, testing hooks): float32
// or float64; a 16-bit input is a TypeError that says what to do.
inline DType wide_float_dtype(const py::array& a, const char* name, const char* entry) {
  const DType dt = float_dtype(a, name);
  if (dt == DType::bf16 || dt == DType::f16)
    fail_type(std::string(entry) + " takes float32 or float64 (bfloat16 training is not supported); " +
              "cast with .astype(np.float32) (" + name + " is " + std::string(py::str(a.dtype())) + ")");
  return dt;
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

// The NumPy dtype of element type T in an entry whose input is `like`, and a fresh output of
// it: a 16-bit type is like's own dtype object (bfloat16 is ml_dtypes' type, which this file does not import),
// float32 and float64 their NumPy types.
template <typename T>
py::dtype dtype_for(const py::array& like) {
  if constexpr (is_lowp<T>::value)
    return like.dtype();
  else
    return py::dtype::of<T>();
}
template <typename T>
py::array new_output_like(const py::array& like, const std::vector<index_t>& shape, const char* what) {
  checked_size(shape, what);
  return py::array(dtype_for<T>(like), std::vector<py::ssize_t>(shape.begin(), shape.end()));
}

// The data of an array known to hold T (its dtype checked by the caller).
template <typename T>
T* data_of(py::array& a) {
  return static_cast<T*>(a.mutable_data());
}
template <typename T>
const T* data_of(const py::array& a) {
  return static_cast<const T*>(a.data());
}

// A mask for scores of shape `score_shape`: None, a bool array (True = may attend) or an
// array of the scores' accumulation dtype T (added: float32 for a 16-bit call), already
// broadcast to exactly that shape.
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

// The one dtype dispatch: f(In{}) with In the kernel's reading type for `dt` (float, double,
// bf16, f16), so an entry reads
//   return dispatch(float_dtype(q, "query"), [&](auto t) { return impl<decltype(t)>(...); });
template <typename F>
decltype(auto) dispatch(DType dt, F&& f) {
  switch (dt) {
    case DType::f32: return f(float{});
    case DType::f64: return f(double{});
    case DType::bf16: return f(bf16{});
    case DType::f16: break;
  }
  return f(f16{});
}

// The dispatch of the entries without a 16-bit form (wide_float_dtype's): float and double only.
template <typename F>
decltype(auto) dispatch_wide(DType dt, F&& f) {
  if (dt == DType::f32) return f(float{});
  return f(double{});
}

// The output type of a forward entry reading In, by its out_float32 argument: with bf16/f16
// inputs float (written from the accumulators) when asked, else In; float32 inputs ignore it;
// float64 inputs refuse it (it would round their results).
template <typename In>
inline bool wants_float32_output(bool out_float32) {
  if (std::is_same<In, double>::value && out_float32)
    fail_value("out_float32=True is for bfloat16 and float16 inputs: float64 inputs return float64");
  return is_lowp<In>::value && out_float32;
}

// dispatch, then the output type: f(In{}, Out{}).
template <typename F>
decltype(auto) dispatch_out(DType dt, bool out_float32, F&& f) {
  return dispatch(dt, [&](auto in) -> decltype(auto) {
    using In = decltype(in);
    if constexpr (is_lowp<In>::value) {
      if (wants_float32_output<In>(out_float32)) return f(in, float{});
    } else {
      wants_float32_output<In>(out_float32);
    }
    return f(in, in);
  });
}

// True when every array an entry would return has no element: the entry then returns them at
// once, without touching its inputs' data (a broadcast input may be huge behind an empty output).
inline bool all_empty(std::initializer_list<const py::array*> outputs) {
  for (const py::array* a : outputs)
    if (a && a->size() != 0) return false;
  return true;
}

// A C-contiguous, aligned array of element type T, as parameter() hands it out (a py::array:
// pybind11's array_t has no form for bf16 and f16); data() is typed.
template <typename T>
struct CArray : py::array {
  CArray() = default;
  explicit CArray(py::array a) : py::array(std::move(a)) {}
  const T* data() const { return data_of<T>(static_cast<const py::array&>(*this)); }
};

// A parameter array (weights, a unit vector, a bias) as C-contiguous, aligned data of T, with
// `ndim` dimensions. Its dtype: that of `ref` when T is ref's element type (a weight: one dtype
// per call), float32 when T is the accumulation type of a 16-bit call on ref (a bias). Copied,
// through NumPy so that a failed allocation raises MemoryError (array_t::ensure would hand back
// a null array), only when it is not C-contiguous; misaligned data is refused as in view().
template <typename T>
CArray<T> parameter(const py::array& ref, const char* ref_name, const py::object& obj, const char* name,
                    py::ssize_t ndim) {
  const py::array a = require_array(obj, name);
  const py::dtype expected = dtype_for<T>(ref);
  if (expected.equal(ref.dtype()))
    require_same_dtype(ref, ref_name, a, name);
  else if (!a.dtype().equal(expected))
    fail_type(std::string(name) + " has dtype " + std::string(py::str(a.dtype())) + " but " + ref_name + " has " +
              std::string(py::str(ref.dtype())) + ": with 16-bit inputs " + name + " is " +
              std::string(py::str(expected)) + " (the accumulation type; the Python API converts)");
  require_ndim(a, name, ndim, ndim);
  if (!(a.flags() & py::detail::npy_api::NPY_ARRAY_ALIGNED_))
    fail_value(std::string(name) + " of shape " + shape_str(a) +
               " is not aligned to its item size (pass a copy: a.copy())");
  if (a.flags() & py::array::c_style) return CArray<T>(a);
  return CArray<T>(py::reinterpret_borrow<py::array>(py::module_::import("numpy").attr("ascontiguousarray")(a)));
}

// A weight matrix (rows, cols) and its Eigen map (the map reads the contiguous array it is made from).
template <typename T>
CArray<T> parameter_matrix(const py::array& ref, const char* ref_name, const py::object& w, const char* name) {
  return parameter<T>(ref, ref_name, w, name, 2);
}
template <typename T>
ConstMatrixMap<T> map_matrix(const CArray<T>& w) {
  return ConstMatrixMap<T>(w.data(), w.shape(0), w.shape(1));
}

// A vector of exactly `length` entries; `expected` ends the error ("<name> has shape (4,) but
// <expected>"), saying where the length comes from.
template <typename T>
CArray<T> parameter_vector(const py::array& ref, const char* ref_name, const py::object& a, const char* name,
                           py::ssize_t length, const std::string& expected) {
  CArray<T> c = parameter<T>(ref, ref_name, a, name, 1);
  if (c.shape(0) != length) fail_value(std::string(name) + " has shape " + shape_str(c) + " but " + expected);
  return c;
}

// The usual `expected` of parameter_vector: "the number of units is 6".
inline std::string units_are(py::ssize_t units) { return "the number of units is " + std::to_string(units); }

// An optional bias, added to accumulators of type T = acc_t<In>: None, a parameter_vector of
// T, or, in a 16-bit call, one of the inputs' own type In (as a 16-bit layer stores it), read
// exactly into T here so that no caller converts it. data() is null for None.
template <typename T>
struct Bias {
  CArray<T> array;
  std::vector<T> widened;
  bool present = false, is_widened = false;
  const T* data() const { return !present ? nullptr : is_widened ? widened.data() : array.data(); }
};
template <typename In>
Bias<acc_t<In>> parameter_bias(const py::array& ref, const char* ref_name, const py::object& bias,
                               py::ssize_t length, const std::string& expected) {
  using T = acc_t<In>;
  Bias<T> b;
  if (bias.is_none()) return b;
  b.present = true;
  if constexpr (is_lowp<In>::value) {
    if (py::isinstance<py::array>(bias) && py::reinterpret_borrow<py::array>(bias).dtype().equal(ref.dtype())) {
      const CArray<In> given = parameter_vector<In>(ref, ref_name, bias, "bias", length, expected);
      b.widened.resize(static_cast<std::size_t>(length));
      load_row(given.data(), 1, length, b.widened.data());
      b.is_widened = true;
      return b;
    }
  }
  b.array = parameter_vector<T>(ref, ref_name, bias, "bias", length, expected);
  return b;
}

// A small per-batch-entry array (key_lengths, keys_ok) copied into memory the binding owns.
// Taken while the GIL is held and checked on the copy: another Python thread writing the
// caller's array while the kernel runs without the GIL can then change nothing the kernel
// reads to decide which memory it touches. Axes the caller broadcasts (stride 0, or length 1)
// stay broadcast in the copy, so it is never larger than the memory behind the caller's array.
template <typename I>
class OwnedBatch {
 public:
  OwnedBatch() = default;
  OwnedBatch(OwnedBatch&&) = default;
  OwnedBatch& operator=(OwnedBatch&&) = default;

  // `arr` has exactly the batch shape and dtype I (checked by the caller).
  explicit OwnedBatch(const py::array& arr) : present_(true) {
    const std::vector<index_t> shape = shape_of(arr);
    std::vector<index_t> strides(shape.size(), 0);
    std::vector<py::ssize_t> walk_shape, walk_src;  // the axes holding distinct values
    std::vector<std::size_t> walk_axis;
    index_t n = 1;
    for (std::size_t ax = shape.size(); ax-- > 0;) {
      if (shape[ax] == 0) n = 0;
      if (shape[ax] > 1 && arr.strides(static_cast<py::ssize_t>(ax)) != 0) {
        strides[ax] = n;
        n *= shape[ax];
        walk_shape.insert(walk_shape.begin(), shape[ax]);
        walk_src.insert(walk_src.begin(), arr.strides(static_cast<py::ssize_t>(ax)));
        walk_axis.insert(walk_axis.begin(), ax);
      }
    }
    count_ = static_cast<std::size_t>(n);
    values_.reset(new I[std::max<std::size_t>(count_, 1)]);
    const char* base = static_cast<const char*>(arr.data());
    std::vector<py::ssize_t> idx(walk_shape.size(), 0);
    for (std::size_t k = 0; k < count_; ++k) {  // row-major over the walked axes = the copy's order
      py::ssize_t off = 0;
      for (std::size_t i = 0; i < idx.size(); ++i) off += idx[i] * walk_src[i];
      values_[k] = read(base + off);
      std::size_t i = idx.size();
      while (i > 0 && ++idx[i - 1] == walk_shape[i - 1]) idx[--i] = 0;
    }
    view_ = Strided<const I>(values_.get(), shape, strides);
  }

  // The view handed to a kernel: null when the argument was None.
  const Strided<const I>* get() const { return present_ ? &view_ : nullptr; }
  const Strided<const I>& view() const { return view_; }
  const I* begin() const { return values_.get(); }
  const I* end() const { return values_.get() + count_; }

 private:
  // A bool is read as its byte, so a value other than 0 or 1 (written through another view of
  // the same memory) becomes true rather than an invalid bool.
  static I read(const char* p) {
    if constexpr (std::is_same_v<I, bool>) {
      unsigned char c;
      std::memcpy(&c, p, 1);
      return c != 0;
    } else {
      I v;
      std::memcpy(&v, p, sizeof v);
      return v;
    }
  }

  bool present_ = false;
  std::size_t count_ = 0;
  std::unique_ptr<I[]> values_;
  Strided<const I> view_;
};

// An array of dtype I with exactly the batch shape, owned (see OwnedBatch).
template <typename I>
OwnedBatch<I> own_batch_array(const py::array& a, const char* name, const std::vector<index_t>& batch) {
  if (!a.dtype().equal(py::dtype::of<I>()))
    fail_type(std::string(name) + " must be " + std::string(py::str(py::dtype::of<I>())) + ", got " +
              std::string(py::str(a.dtype())));
  if (shape_of(a) != batch)
    fail_value(std::string(name) + " has shape " + shape_str(a) + " but the batch shape is " + shape_str(batch));
  return OwnedBatch<I>(a);
}

// key_lengths: None, or an int64 array of exactly the batch shape, owned, with every value of
// the copy in [0, num_keys].
inline OwnedBatch<std::int64_t> own_key_lengths(const py::object& obj, const std::vector<index_t>& batch,
                                                index_t num_keys) {
  if (obj.is_none()) return {};
  if (!py::isinstance<py::array>(obj)) fail_type("key_lengths must be a NumPy int64 array or None");
  OwnedBatch<std::int64_t> lengths =
      own_batch_array<std::int64_t>(py::reinterpret_borrow<py::array>(obj), "key_lengths", batch);
  for (const std::int64_t value : lengths)
    if (value < 0 || value > num_keys)
      fail_value("key_lengths must lie in [0, " + std::to_string(num_keys) + "] (the number of keys), got " +
                 std::to_string(value));
  return lengths;
}

// A Python integer (int, np.integer: anything with __index__, except bool) as int64, values
// beyond int64 saturated to its bounds: an offset or window side that large means the same as
// the bound (everything visible or hidden), and the kernels' range function is overflow-safe
// for every int64.
inline index_t saturating_index(const py::handle& obj, const char* name) {
  if (PyBool_Check(obj.ptr()) || !PyIndex_Check(obj.ptr()))
    fail_type(std::string(name) + " must be an int, got " + std::string(py::str(py::type::of(obj).attr("__name__"))));
  const py::object as_int = py::reinterpret_steal<py::object>(PyNumber_Index(obj.ptr()));
  if (!as_int) throw py::error_already_set();
  int overflow = 0;
  const long long v = PyLong_AsLongLongAndOverflow(as_int.ptr(), &overflow);
  if (overflow > 0) return std::numeric_limits<index_t>::max();
  if (overflow < 0) return std::numeric_limits<index_t>::min();
  if (v == -1 && PyErr_Occurred()) throw py::error_already_set();
  return static_cast<index_t>(v);
}

}  // namespace bind
}  // namespace attnext
