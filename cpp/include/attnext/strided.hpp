// Strided n-d views and the Eigen maps the kernels use on them.
//
// The binding layer hands every kernel a Strided<T>: a data pointer, a shape and strides in
// elements. Strides may be 0 on broadcast axes (NumPy's broadcast_to), which is how masks and
// batch-broadcast operands are read without being copied.
#pragma once

#include <Eigen/Core>

#include <cstdint>
#include <utility>
#include <vector>

namespace attnext {

using index_t = std::int64_t;

template <typename T>
struct Strided {
  T* data = nullptr;
  std::vector<index_t> shape;    // any rank
  std::vector<index_t> strides;  // in elements, same rank as shape; 0 on broadcast axes

  Strided() = default;
  Strided(T* d, std::vector<index_t> sh, std::vector<index_t> st)
      : data(d), shape(std::move(sh)), strides(std::move(st)) {}

  int ndim() const { return static_cast<int>(shape.size()); }
  // Negative axes count from the end, as in NumPy.
  index_t dim(int axis) const { return shape[axis < 0 ? axis + ndim() : axis]; }
  index_t stride(int axis) const { return strides[axis < 0 ? axis + ndim() : axis]; }

  // Number of batch entries: the product of all axes but the last `trailing` ones.
  index_t batch_count(int trailing) const {
    index_t n = 1;
    for (int ax = 0; ax < ndim() - trailing; ++ax) n *= shape[ax];
    return n;
  }

  // Element offset of batch entry b, counting the leading axes in row-major order.
  index_t batch_offset(index_t b, int trailing) const {
    index_t off = 0;
    for (int ax = ndim() - trailing - 1; ax >= 0; --ax) {
      off += (b % shape[ax]) * strides[ax];
      b /= shape[ax];
    }
    return off;
  }
};

template <typename T>
using RowMatrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
template <typename T>
using Vector = Eigen::Matrix<T, Eigen::Dynamic, 1>;

// A row-major matrix read through arbitrary (row, column) strides.
template <typename T>
using StridedMatrixMap =
    Eigen::Map<const RowMatrix<T>, Eigen::Unaligned, Eigen::Stride<Eigen::Dynamic, Eigen::Dynamic>>;
template <typename T>
using MatrixMap = Eigen::Map<RowMatrix<T>, Eigen::Unaligned>;
template <typename T>
using ConstMatrixMap = Eigen::Map<const RowMatrix<T>, Eigen::Unaligned>;

// The last two axes of batch entry b as a matrix; rows [row0, row0 + rows).
template <typename T>
StridedMatrixMap<T> matrix_of(const Strided<const T>& a, index_t b, index_t row0 = 0, index_t rows = -1) {
  const index_t r = rows < 0 ? a.dim(-2) - row0 : rows;
  const T* p = a.data + a.batch_offset(b, 2) + row0 * a.stride(-2);
  // Eigen's Stride for a row-major matrix is (outer = between rows, inner = between columns).
  return StridedMatrixMap<T>(p, r, a.dim(-1), Eigen::Stride<Eigen::Dynamic, Eigen::Dynamic>(a.stride(-2), a.stride(-1)));
}

// A vector (last axis) of batch entry b.
template <typename T>
Eigen::Map<const Vector<T>, Eigen::Unaligned, Eigen::InnerStride<Eigen::Dynamic>> vector_of(
    const Strided<const T>& a, index_t b = 0) {
  return {a.data + a.batch_offset(b, 1), a.dim(-1), Eigen::InnerStride<Eigen::Dynamic>(a.stride(-1))};
}

}  // namespace attnext
