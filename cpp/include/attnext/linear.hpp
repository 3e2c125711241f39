// The dense layer of the attention layers' projections: y = x W^T + b (PyTorch's Linear).
// Many rows (a forward pass) go through the packed GEMM of gemm.hpp; a few rows (a decoding
// step) through dot-product kernels in column blocks (float32 and 16-bit inputs, AVX-512), or
// else Eigen's products; both read W in place.
#pragma once

#include <algorithm>
#include <type_traits>
#include <vector>

#include "gemm.hpp"
#include "lowp.hpp"
#include "parallel.hpp"
#include "scratch.hpp"
#include "strided.hpp"

namespace attnext {

// The few-rows paths compute y in blocks of kLinearColBlock columns (each over every row). The
// blocks are fixed (not derived from the thread count) and each output element is one dot
// product computed in one block, so results are bit-identical for any number of threads. 64
// columns give a decoding step's projections (512 to 1536 columns) 8 to 24 blocks to share.
constexpr index_t kLinearColBlock = 64;
// Below this many multiply-adds (a few microseconds on one core) the blocks run on the calling
// thread. Chosen from a 2-core AVX-512 machine: two threads paid off from about 2^15 of them in
// float32 and 2^16 in bfloat16 when the machine was quiet; twice that leaves a margin for a busy
// one, where a team member may have to wait for a core. A decoding step's projections (2^18 and
// more at E = 512) run on every thread.
constexpr index_t kLinearMinParallelWork = index_t(1) << 17;

// linear() for many rows, through packed_gemm: the packers read x and W through their strides.
template <typename In, typename Acc, typename Out = Acc>
void linear_packed(const Strided<const In>& x, const Strided<const In>& weight, const Acc* bias, Out* y) {
  const index_t nl = x.dim(1), nd = x.dim(3), in = x.dim(2) * nd;
  const index_t xs0 = x.stride(0), xs1 = x.stride(1), xs2 = x.stride(2), xs3 = x.stride(3);
  const bool x_features_run = xs3 == 1 && (x.dim(2) == 1 || xs2 == nd);  // a row's features are one run
  const auto x_rows = [&](index_t m0, index_t rows, index_t k0, index_t kc, const PanelWriter<In>& dst) {
    for (index_t r = 0; r < rows; ++r) {
      const index_t m = m0 + r;
      const In* row = x.data + (m / nl) * xs0 + (m % nl) * xs1;
      if (x_features_run) {
        pack_row(row + k0, index_t(1), kc, dst, r);
      } else {  // feature f = c * nd + d at row[c * xs2 + d * xs3], walked without divisions
        index_t c = k0 / nd, d = k0 % nd;
        for (index_t k = 0; k < kc; ++k) {
          dst.put(k, r, row[c * xs2 + d * xs3]);
          if (++d == nd) d = 0, ++c;
        }
      }
    }
  };
  const index_t ws0 = weight.stride(0), ws1 = weight.stride(1);
  const auto w_rows = [&](index_t n0, index_t cols, index_t k0, index_t kc, const PanelWriter<In>& dst) {
    if (ws1 == 1) return pack_rows(weight.data + n0 * ws0 + k0, ws0, cols, kc, dst);
    for (index_t c = 0; c < cols; ++c) pack_row(weight.data + (n0 + c) * ws0 + k0 * ws1, ws1, kc, dst, c);
  };
  const auto x_row = [&](index_t m) -> const In* {
    return x_features_run ? x.data + (m / nl) * xs0 + (m % nl) * xs1 : nullptr;
  };
  packed_gemm<In, Acc>(x.dim(0) * nl, weight.dim(0), in, x_rows, x_row, w_rows, bias, y);
}

// Runs body(c0, cols) over the columns of a few-rows y in blocks [c0, c0 + cols) of
// kLinearColBlock: on the calling thread below kLinearMinParallelWork multiply-adds, else split
// statically (contiguous runs of blocks per thread), so that a decoding loop's every call gives
// each thread the same rows of W, which its core's caches still hold from the last call. The
// blocks are the same either way, and so are the results.
template <typename Body>
void for_few_rows_blocks(index_t rows, index_t in, index_t out, const Body& body) {
  const index_t blocks = (out + kLinearColBlock - 1) / kLinearColBlock;
  const auto block = [&](index_t task) {
    const index_t c0 = task * kLinearColBlock;
    body(c0, std::min(kLinearColBlock, out - c0));
  };
  if (rows * in * out < kLinearMinParallelWork) {
    for (index_t task = 0; task < blocks; ++task) block(task);
  } else {
    parallel_for(blocks, block);
  }
}

// linear() for a few rows (blocks of kLinearColBlock columns of y, each over every row): Eigen's
// products read W in place when one of its axes is unit-stride (else one copy), and x rows in
// place when a row's features are one unit-stride run (else gathered per task). x and W are
// cast to Acc where Eigen reads them (a no-op for In == Acc).
template <typename In, typename Acc>
void linear_few_rows(const Strided<const In>& x, const Strided<const In>& weight, const Acc* bias, Acc* y) {
  const index_t nb = x.dim(0), nl = x.dim(1), nc = x.dim(2), nd = x.dim(3);
  const index_t in = nc * nd, out = weight.dim(0);
  using OuterMap = Eigen::Map<const RowMatrix<In>, Eigen::Unaligned, Eigen::OuterStride<>>;
  using ColMap = Eigen::Map<const Eigen::Matrix<In, Eigen::Dynamic, Eigen::Dynamic, Eigen::ColMajor>,
                            Eigen::Unaligned, Eigen::OuterStride<>>;
  RowMatrix<In> w_copy;
  const bool w_rows = weight.stride(1) == 1, w_cols = !w_rows && weight.stride(0) == 1;
  if (!w_rows && !w_cols) w_copy = matrix_of(weight, 0);
  const bool x_direct = nd * nc == 0 || ((nc == 1 || x.stride(2) == nd) && x.stride(3) == 1);
  for_few_rows_blocks(nb * nl, in, out, [&](index_t c0, index_t cols) {
    RowMatrix<In> gathered;
    RowMatrix<Acc> block;
    for (index_t b = 0; b < nb; ++b) {
      const In* x0 = x.data + b * x.stride(0);
      const In* xp = x0;
      index_t x_stride = x.stride(1);
      if (!x_direct) {
        gathered.resize(nl, in);
        for (index_t r = 0; r < nl; ++r)
          for (index_t c = 0; c < nc; ++c) {
            const In* src = x0 + r * x.stride(1) + c * x.stride(2);
            In* dst = gathered.data() + r * in + c * nd;
            if (x.stride(3) == 1)
              std::copy(src, src + nd, dst);
            else
              for (index_t d = 0; d < nd; ++d) dst[d] = src[d * x.stride(3)];
          }
        xp = gathered.data();
        x_stride = in;
      }
      const auto xm = OuterMap(xp, nl, in, Eigen::OuterStride<>(x_stride)).template cast<Acc>();
      // The product lands in an aligned block first: Eigen's small products vectorise from the
      // destination's first aligned element, and the elements before it are summed in another
      // order, so writing into y directly made the result depend on where y was allocated.
      block.resize(nl, cols);
      if (w_rows) {
        block.noalias() =
            xm * ColMap(weight.data + c0 * weight.stride(0), in, cols, Eigen::OuterStride<>(weight.stride(0)))
                     .template cast<Acc>();
      } else if (w_cols) {
        block.noalias() =
            xm * OuterMap(weight.data + c0, in, cols, Eigen::OuterStride<>(weight.stride(1))).template cast<Acc>();
      } else {
        block.noalias() = xm * w_copy.transpose().middleCols(c0, cols).template cast<Acc>();
      }
      if (bias) block.rowwise() += Eigen::Map<const Eigen::Matrix<Acc, 1, Eigen::Dynamic>>(bias + c0, cols);
      Eigen::Map<RowMatrix<Acc>, Eigen::Unaligned, Eigen::OuterStride<>>(y + b * nl * out + c0, nl, cols,
                                                                         Eigen::OuterStride<>(out)) = block;
    }
  });
}

#if defined(__AVX512F__)
// The few-rows path for float32 and 16-bit inputs with unit-stride W rows (a decoding step's
// projections: a matrix-vector product, bound by reading W). W is read in place, a 16-bit W in
// half the bytes of a float32 one and never converted as a whole. x's rows (few) are gathered
// once per call, in the form the W loads pair with, and shared by every block. Each output
// element is one dot product in a fixed order: its own accumulator over the depth in steps of
// K::step, one horizontal sum (horizontal_sum's tree), then the depth's tail in order, then the
// bias, whichever tile computes it, so no result depends on the tiling or the thread count.
// Three forms of the inner step (the policies below): float32 and float16: 16 lanes, W widened by
// load16; bfloat16: 32 lanes split into their even and odd halves by a shift and a mask (no
// shuffles), x stored with each chunk of 32 de-interleaved to match; bfloat16 with vdpbf16ps
// active: 32 lanes of x and W multiplied in pairs by the instruction. Every product of 16-bit
// values is exact in float32 and the sums are float32 (the fallback's rule).
namespace linear_detail {

struct FewRowsInTag {};
struct FewRowsXTag {};

// One step of K::step values of an x row or a W row, as the policy's fma takes it.
struct Step {
  __m512 a, b;
};

template <typename In>
struct Lanes16 {
  using X = float;
  static constexpr index_t step = 16;
  static void load_x(const In* src, index_t n, X* dst) { load_row(src, 1, n, dst); }
  static Step x_step(const X* x) { return {_mm512_loadu_ps(x), _mm512_setzero_ps()}; }
  static Step w_step(const In* w) { return {load16(w), _mm512_setzero_ps()}; }
  static void fma(const Step& x, const Step& w, __m512& acc) { acc = _mm512_fmadd_ps(x.a, w.a, acc); }
};

struct Bf16Split {
  using X = float;
  static constexpr index_t step = 32;
  // Each full chunk of 32 as its 16 even-indexed values, then its 16 odd ones; the tail as is.
  static void load_x(const bf16* src, index_t n, X* dst) {
    index_t k = 0;
    for (; k + 32 <= n; k += 32)
      for (index_t j = 0; j < 16; ++j) dst[k + j] = src[k + 2 * j], dst[k + 16 + j] = src[k + 2 * j + 1];
    for (; k < n; ++k) dst[k] = src[k];
  }
  static Step x_step(const X* x) { return {_mm512_loadu_ps(x), _mm512_loadu_ps(x + 16)}; }
  // Lane j of a holds element 2j (its bits shifted into a float's top half), of b element 2j + 1.
  static Step w_step(const bf16* w) {
    const __m512i v = _mm512_loadu_si512(w);
    return {_mm512_castsi512_ps(_mm512_slli_epi32(v, 16)),
            _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(int(0xffff0000u))))};
  }
  static void fma(const Step& x, const Step& w, __m512& acc) {
    acc = _mm512_fmadd_ps(x.b, w.b, _mm512_fmadd_ps(x.a, w.a, acc));
  }
};

#if defined(__AVX512BF16__)
struct Bf16Dot {
  using X = bf16;
  static constexpr index_t step = 32;
  static void load_x(const bf16* src, index_t n, X* dst) { std::copy(src, src + n, dst); }
  static Step x_step(const X* x) { return {_mm512_castsi512_ps(_mm512_loadu_si512(x)), _mm512_setzero_ps()}; }
  static Step w_step(const bf16* w) { return {_mm512_castsi512_ps(_mm512_loadu_si512(w)), _mm512_setzero_ps()}; }
  static void fma(const Step& x, const Step& w, __m512& acc) {
    acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_castps_si512(x.a), (__m512bh)_mm512_castps_si512(w.a));
  }
};
#endif

// The one horizontal sum of the few-rows kernels, a fixed tree: lanes i and i + 8, then i and
// i + 4, i and i + 2, i and i + 1.
inline float horizontal_sum(__m512 a) {
  const __m256 s8 = _mm256_add_ps(_mm512_castps512_ps256(a),
                                  _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1)));
  const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
  const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  return _mm_cvtss_f32(_mm_add_ss(s2, _mm_movehdup_ps(s2)));
}

// horizontal_sum of eight accumulators at once (the same additions, so the same bits), stored
// to sums[0..8): the eight trees share their shuffles, a quarter of the instructions of eight
// separate sums.
inline void horizontal_sums8(const __m512* a, float* sums) {
  __m512 s8[4];  // [lanes i + (i + 8) of a[2j] | of a[2j + 1]]
  for (int j = 0; j < 4; ++j)
    s8[j] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * j], a[2 * j + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                          _mm512_shuffle_f32x4(a[2 * j], a[2 * j + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  __m512 s4[2];  // 128-bit lane j: lanes i + (i + 4) of a[4h + j]
  for (int h = 0; h < 2; ++h)
    s4[h] = _mm512_add_ps(_mm512_shuffle_f32x4(s8[2 * h], s8[2 * h + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                          _mm512_shuffle_f32x4(s8[2 * h], s8[2 * h + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  // 128-bit lane j: [i + (i + 2) of a[j], of a[4 + j]] for i = 0, 1
  const __m512 s2 = _mm512_add_ps(_mm512_shuffle_ps(s4[0], s4[1], _MM_SHUFFLE(1, 0, 1, 0)),
                                  _mm512_shuffle_ps(s4[0], s4[1], _MM_SHUFFLE(3, 2, 3, 2)));
  // 128-bit lane j: [sum of a[j], sum of a[4 + j], (the same again)]
  const __m512 s1 = _mm512_add_ps(_mm512_shuffle_ps(s2, s2, _MM_SHUFFLE(2, 0, 2, 0)),
                                  _mm512_shuffle_ps(s2, s2, _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512 order = _mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 0, 0, 0, 0, 0, 0, 0, 0), s1);
  _mm256_storeu_ps(sums, _mm512_castps512_ps256(order));
}

// y[r * ldy + c] = bias[c] + sum_k x_r[k] w[c * ldw + k] for an R x C tile (C = 8 or 1): each W
// step is loaded once and shared by the R rows of x (the policy's layout, row stride ldx).
template <typename K, int R, int C, typename In>
inline void dot_tile(const typename K::X* x, index_t ldx, const In* w, index_t ldw, index_t depth, const float* bias,
                     float* y, index_t ldy) {
  static_assert(C == 8 || C == 1, "horizontal sums come in eights or ones");
  __m512 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
  index_t k = 0;
  for (; k + K::step <= depth; k += K::step) {
    Step xv[R];
    for (int r = 0; r < R; ++r) xv[r] = K::x_step(x + r * ldx + k);
    for (int c = 0; c < C; ++c) {
      const Step wv = K::w_step(w + c * ldw + k);
      for (int r = 0; r < R; ++r) K::fma(xv[r], wv, acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r) {
    float sums[C];
    if constexpr (C == 8)
      horizontal_sums8(acc[r], sums);
    else
      sums[0] = horizontal_sum(acc[r][0]);
    for (int c = 0; c < C; ++c) {
      float sum = sums[c];
      for (index_t t = k; t < depth; ++t) sum += static_cast<float>(x[r * ldx + t]) * static_cast<float>(w[c * ldw + t]);
      y[r * ldy + c] = bias ? sum + bias[c] : sum;
    }
  }
}

// C columns of W (one tile) against every row of x, two rows at a time (16 accumulators at most).
template <typename K, int C, typename In>
inline void tile_rows(const typename K::X* x, index_t rows, index_t ldx, const In* w, index_t ldw, index_t depth,
                      const float* bias, float* y, index_t ldy) {
  index_t r = 0;
  for (; r + 2 <= rows; r += 2) dot_tile<K, 2, C>(x + r * ldx, ldx, w, ldw, depth, bias, y + r * ldy, ldy);
  if (r < rows) dot_tile<K, 1, C>(x + r * ldx, ldx, w, ldw, depth, bias, y + r * ldy, ldy);
}

// y (rows, cols) = x (rows, depth) w^T + bias, x in the policy's layout (row stride ldx), w rows
// of In (stride ldw, unit columns): eight W rows at a time, then one (eight independent sums
// per x row hide the latency of the multiply-add).
template <typename K, typename In>
inline void few_rows_block(const typename K::X* x, index_t rows, index_t ldx, const In* w, index_t ldw, index_t depth,
                           index_t cols, const float* bias, float* y, index_t ldy) {
  index_t c = 0;
  for (; c + 8 <= cols; c += 8)
    tile_rows<K, 8>(x, rows, ldx, w + c * ldw, ldw, depth, bias ? bias + c : nullptr, y + c, ldy);
  for (; c < cols; ++c) tile_rows<K, 1>(x, rows, ldx, w + c * ldw, ldw, depth, bias ? bias + c : nullptr, y + c, ldy);
}

// linear_few_rows_simd's work with policy K.
template <typename K, typename In>
void few_rows_simd(const Strided<const In>& x, const Strided<const In>& weight, const float* bias, float* y) {
  const index_t nb = x.dim(0), nl = x.dim(1), nc = x.dim(2), nd = x.dim(3);
  const index_t rows = nb * nl, in = nc * nd, out = weight.dim(0);
  // x rows gathered as In (features c * nd + d, any strides), then in the policy's layout; the
  // other threads only read them while this thread waits in for_few_rows_blocks.
  const Scratch<In, FewRowsInTag> row(static_cast<size_t>(in));
  const Scratch<typename K::X, FewRowsXTag> xs(static_cast<size_t>(rows * in));
  for (index_t m = 0; m < rows; ++m) {
    const In* src_row = x.data + (m / nl) * x.stride(0) + (m % nl) * x.stride(1);
    for (index_t c = 0; c < nc; ++c) {
      const In* src = src_row + c * x.stride(2);
      for (index_t d = 0; d < nd; ++d) row.data()[c * nd + d] = src[d * x.stride(3)];
    }
    K::load_x(row.data(), in, xs.data() + m * in);
  }
  for_few_rows_blocks(rows, in, out, [&](index_t c0, index_t cols) {
    few_rows_block<K>(xs.data(), rows, in, weight.data + c0 * weight.stride(0), weight.stride(0), in, cols,
                      bias ? bias + c0 : nullptr, y + c0, out);
  });
}

}  // namespace linear_detail

// linear_few_rows for float32 or 16-bit x and W with unit-stride W rows (weight.stride(1) == 1):
// float32 and float16 through load16, bfloat16 through vdpbf16ps while bf16_dot_active(), else
// the even/odd split.
template <typename In>
void linear_few_rows_simd(const Strided<const In>& x, const Strided<const In>& weight, const float* bias, float* y) {
  using namespace linear_detail;
  if constexpr (std::is_same<In, bf16>::value) {
#if defined(__AVX512BF16__)
    if (bf16_dot_active()) return few_rows_simd<Bf16Dot>(x, weight, bias, y);
#endif
    few_rows_simd<Bf16Split>(x, weight, bias, y);
  } else {
    few_rows_simd<Lanes16<In>>(x, weight, bias, y);
  }
}
#endif

// Scratch tag (scratch.hpp) of y in the accumulation type when the output type is not Acc.
struct LinearAccTag {};

// y = x W^T + b, in Acc, written as Acc (linear_packed or linear_few_rows by shape).
template <typename In, typename Acc>
void linear_acc(const Strided<const In>& x, const Strided<const In>& weight, const Acc* bias, Acc* y) {
  if (x.dim(0) * x.dim(1) >= kPackedGemmMinRows) {  // the choice depends on the shapes only
    linear_packed<In, Acc>(x, weight, bias, y);
    return;
  }
#if defined(__AVX512F__)
  if constexpr (is_lowp<In>::value || std::is_same<In, float>::value)
    if (weight.stride(1) == 1) return linear_few_rows_simd<In>(x, weight, bias, y);
#endif
  linear_few_rows<In, Acc>(x, weight, bias, y);
}

// y = x W^T + b
//   x (B, L, C, D) any strides: row (b, l) has C * D features, feature c * D + d at x[b, l, c, d]
//     (C > 1 reads a (B, H, L, D) attention output through a (B, L, H, D) view, no copy first)
//   weight (O, C * D) any strides, of In; bias (O,) of Acc or null (contiguous)
//   y (B, L, O) C-contiguous, of Out
// With Out != Acc (a 16-bit output) the packed GEMM rounds each task's float tile at its store;
// a few rows are computed into a float32 buffer of y's size and then converted. Operands are
// never copied whole.
template <typename In, typename Acc = acc_t<In>, typename Out = In>
void linear(const Strided<const In>& x, const Strided<const In>& weight, const Acc* bias, Out* y) {
  if constexpr (std::is_same<Out, Acc>::value) {
    linear_acc<In, Acc>(x, weight, bias, y);
  } else if (x.dim(0) * x.dim(1) >= kPackedGemmMinRows) {
    linear_packed<In, Acc>(x, weight, bias, y);  // the GEMM rounds each task's float tile at its store
  } else {
    const index_t rows = x.dim(0) * x.dim(1), out = weight.dim(0);
    const Scratch<Acc, LinearAccTag> acc(static_cast<size_t>(rows * out));
    linear_acc<In, Acc>(x, weight, bias, acc.data());
    store_row(acc.data(), rows * out, y);  // rows < kPackedGemmMinRows: small beside the product
  }
}

// Gradients of y = x W^T + b (linear above), through the packed GEMM:
//   grad (B, L, O) any strides: dL/dy; x (B, L, C, D) any strides, as linear took it;
//   weight (O, C * D) row-major contiguous;
//   dx (B, L, C * D) C-contiguous = grad W; dweight (O, C * D) = grad^T x, summed over all rows;
//   dbias (O,) = the sum of grad's rows, or null (not wanted).
// Every sum over rows runs in a fixed order (the GEMM's K blocks, or row order for dbias), so
// the results are bit-identical for any thread count.
template <typename T>
void linear_backward(const Strided<const T>& grad, const Strided<const T>& x, const T* weight, T* dx, T* dweight,
                     T* dbias) {
  const index_t nl = x.dim(1), rows = x.dim(0) * nl, nc = x.dim(2), nd = x.dim(3), in = nc * nd, out = grad.dim(2);
  const auto dy_row = [&](index_t m) { return grad.data + (m / nl) * grad.stride(0) + (m % nl) * grad.stride(1); };
  gemm_rows_times<T>(rows, in, out, dy_row, grad.stride(2), weight, in, dx);
  // x's rows for dweight: read where they are when a row's features lie one stride apart, else gathered.
  index_t x_cs = 0;
  if (nd == 1)
    x_cs = x.stride(2);
  else if (nc == 1 || x.stride(2) == nd * x.stride(3))
    x_cs = x.stride(3);
  std::vector<T> gathered;
  if (x_cs == 0 && rows * in > 0) {
    gathered.resize(static_cast<size_t>(rows * in));
    for (index_t m = 0; m < rows; ++m)
      for (index_t c = 0; c < nc; ++c)
        for (index_t d = 0; d < nd; ++d)
          gathered[static_cast<size_t>(m * in + c * nd + d)] =
              x.data[(m / nl) * x.stride(0) + (m % nl) * x.stride(1) + c * x.stride(2) + d * x.stride(3)];
  }
  const bool use_gathered = !gathered.empty();
  const auto x_row = [&](index_t m) -> const T* {
    return use_gathered ? gathered.data() + m * in : x.data + (m / nl) * x.stride(0) + (m % nl) * x.stride(1);
  };
  const index_t row_cs = use_gathered ? 1 : x_cs;
  // x rows as one row-major matrix (unit features, one row stride): read in place by the GEMM
  const bool uniform_rows = x.dim(0) <= 1 || x.stride(0) == nl * x.stride(1);
  InPlaceW<T> x_in_place{use_gathered ? gathered.data() : x.data, use_gathered ? in : x.stride(1)};
  const bool in_place = row_cs == 1 && (use_gathered || uniform_rows);
  gemm_transposed_rows<T>(rows, out, in, dy_row, grad.stride(2), x_row, row_cs, dweight,
                          in_place ? &x_in_place : nullptr);
  if (!dbias) return;
  std::fill(dbias, dbias + out, T(0));
  for (index_t m = 0; m < rows; ++m) {
    const T* row = dy_row(m);
    for (index_t o = 0; o < out; ++o) dbias[o] += row[o * grad.stride(2)];
  }
}

}  // namespace attnext
