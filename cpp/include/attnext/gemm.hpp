// A packed matrix product for the layers' projections: y (M, N) = x (M, K) W^T, W (N, K).
//
// Eigen's GEMM reached ~160 GFLOP/s on the (2048 x 512) x (512 x 1536) projection of a
// transformer layer on the 2-core Zen 4 test machine, where OpenBLAS and PyTorch reach ~190;
// the projections are two thirds of a multi-head attention forward pass, so they get their
// own kernel, in the classic packed form:
// - W is packed once per call into panels of kNr = 4 packets of output columns, each panel
//   (K, kNr) row after row (the vector operand, streamed from L2), unless the caller has it
//   as a row-major (K, N) matrix already (InPlaceW: a projection's weights, attention values),
//   whose full panels are then read in place with the row stride;
// - each task packs its block of x rows into micro-panels of kMr rows, (Kc, kMr) (the
//   broadcast operand, 6 KB in L1), once per K block, and reuses them for all its columns;
//   rows whose k-run is contiguous are read in place instead (the packing was a scalar
//   transpose, ~9% of a (1024 x 256) x (256 x 256) projection);
// - a register micro-kernel keeps a kMr x kNr tile of y in 24 vector registers.
// Every element of y is one micro-kernel accumulation over k in blocks of kKc whose bounds
// depend only on K, so results are bit-identical whatever the task split or thread count.
#pragma once

#include <algorithm>
#include <cstring>
#include <vector>

#include <Eigen/Core>

#include "parallel.hpp"
#include "scratch.hpp"
#include "strided.hpp"
#include "vmath.hpp"

namespace attnext {
namespace gemm_detail {

namespace ei = Eigen::internal;
template <typename T>
using Pk = vm::Packet<T>;
struct PackedWTag {};
struct PackedXTag {};

// Register tile: kMr rows x kNp packets. With 32 vector registers (AVX-512) 6 x 4 uses 24
// accumulators, 4 packets of W and a broadcast; with 16 (AVX2, SSE) 3 x 4 avoids spills.
#if defined(EIGEN_VECTORIZE_AVX512)
constexpr int kMr = 6;
#else
constexpr int kMr = 3;
#endif
constexpr int kNp = 4;
template <typename T>
constexpr index_t panel_width() {
  return kNp * vm::packet_size<T>();
}

// Block sizes, measured on the Zen 4 test machine (float32, 2 threads, x (2048, 512) times
// W^T (512, 1536), medians; PyTorch ~187 and OpenBLAS ~193 GFLOP/s in the same runs):
// kKc = 128 / 256 / 512 gave 205 / 200 / 211 GFLOP/s (one K block for the usual embed sizes:
// y is written once); kMc = 48 / 96 / 144 rows per task gave 213 / 210 / 206 (48 also gives
// 43 tasks for 2048 rows, enough for 16 threads); kNc = 128 / 256 / 512 columns per inner
// block gave 206 / 213 / 213, and 256 keeps the packed W block (kKc x kNc = 512 KB) in L2.
constexpr index_t kKc = 512;
constexpr index_t kMc = 8 * kMr;
constexpr index_t kNc = 256;

// The x operand of one micro-kernel call, up to kMr rows from column k0 on: a packed
// micro-panel (kc, kMr), or the rows where they are (each a contiguous run along k).
template <typename T>
struct PackedRows {
  const T* panel;
  T at(index_t k, int r) const { return panel[k * kMr + r]; }
};
template <typename T>
struct RowsInPlace {
  const T* row[kMr];
  T at(index_t k, int r) const { return row[r][k]; }
};

// tile (R x kNr, row stride ldc) (+)= a (kc, R)^T b_panel (kc, kNr, row stride ldb) for the
// first R <= kMr rows of a (+ bias (kNr,) on every row when given: the last K block adds it
// while the tile is still in registers). A micro-row of fewer than kMr rows (the end of a
// block) runs an R-row kernel rather than computing padding: 128 rows are 21 full micro-rows
// and one of 2, which padded would cost 3% more.
template <typename T, int R, typename A>
inline void micro_kernel(const A& a, const T* b, index_t ldb, index_t kc, T* c, index_t ldc, bool accumulate,
                         const T* bias) {
  constexpr index_t P = vm::packet_size<T>();
  Pk<T> acc[R][kNp];
  for (int r = 0; r < R; ++r)
    for (int p = 0; p < kNp; ++p)
      acc[r][p] = accumulate ? ei::ploadu<Pk<T>>(c + r * ldc + p * P) : ei::pset1<Pk<T>>(T(0));
  for (index_t k = 0; k < kc; ++k) {
    Pk<T> bv[kNp];
    for (int p = 0; p < kNp; ++p) bv[p] = ei::ploadu<Pk<T>>(b + k * ldb + p * P);
    for (int r = 0; r < R; ++r) {
      const Pk<T> ab = ei::pset1<Pk<T>>(a.at(k, r));
      for (int p = 0; p < kNp; ++p) acc[r][p] = ei::pmadd(ab, bv[p], acc[r][p]);
    }
  }
  if (bias)
    for (int p = 0; p < kNp; ++p) {
      const Pk<T> bp = ei::pload<Pk<T>>(bias + p * P);
      for (int r = 0; r < R; ++r) acc[r][p] = ei::padd(acc[r][p], bp);
    }
  for (int r = 0; r < R; ++r)
    for (int p = 0; p < kNp; ++p) ei::pstoreu(c + r * ldc + p * P, acc[r][p]);
}

// micro_kernel with R = rows (1 <= rows <= kMr), chosen at run time.
template <typename T, int R = kMr, typename A>
inline void micro_kernel_rows(int rows, const A& a, const T* b, index_t ldb, index_t kc, T* c, index_t ldc,
                              bool accumulate, const T* bias) {
  if constexpr (R > 1)
    if (rows < R) return micro_kernel_rows<T, R - 1>(rows, a, b, ldb, kc, c, ldc, accumulate, bias);
  micro_kernel<T, R>(a, b, ldb, kc, c, ldc, accumulate, bias);
}

}  // namespace gemm_detail

// The usual x-side packing step: x(r, k0 + k) = row[k * stride] for k < kc, into dst[k * ld + r]
// (row already points at element k0; stride 1 is the common case and gets its own loop).
template <typename T>
inline void pack_row(const T* row, index_t stride, index_t kc, T* dst, index_t ld) {
  if (stride == 1)
    for (index_t k = 0; k < kc; ++k) dst[k * ld] = row[k];
  else
    for (index_t k = 0; k < kc; ++k) dst[k * ld] = row[k * stride];
}

// From this many rows on, callers use packed_gemm; below, packing W would cost as much as the
// product itself (a decoding step), and Eigen's matrix-vector products read W in place.
constexpr index_t kPackedGemmMinRows = 32;

// W already laid out as a row-major (K, N) matrix: w(n, k) = data[k * ld + n].
template <typename T>
struct InPlaceW {
  const T* data = nullptr;
  index_t ld = 0;
};

// y[m, n] (+ bias[n]) = sum_k x(m, k) w(n, k) for m < M, n < N, y row-major with row stride N.
//   x_rows(m0, rows, k0, kc, dst, ld): writes x(m0 + r, k0 + k) to dst[k * ld + r]
//   x_row(m): &x(m, 0) when row m's elements are contiguous along k, else nullptr
//   w_rows(n0, cols, k0, kc, dst, ld): writes w(n0 + c, k0 + k) to dst[k * ld + c]
// (the packers; they let each caller read its operands through any layout). A micro-row whose
// x rows are all contiguous is read in place, the others are packed through x_rows.
// `parallel` = false runs everything on the calling thread (a caller already inside a task).
// `in_place`, when given, is w itself: its full panels are read where they are (no copy) and
// only a partial last panel goes through w_rows. The products are the same either way.
template <typename T, typename XRows, typename XRow, typename WRows>
void packed_gemm(index_t M, index_t N, index_t K, const XRows& x_rows, const XRow& x_row, const WRows& w_rows,
                 const T* bias, T* y, bool parallel = true, const InPlaceW<T>* in_place = nullptr) {
  using namespace gemm_detail;
  constexpr index_t Nr = panel_width<T>();
  if (M <= 0 || N <= 0) return;
  if (K == 0) {
    for (index_t m = 0; m < M; ++m)
      for (index_t n = 0; n < N; ++n) y[m * N + n] = bias ? bias[n] : T(0);
    return;
  }
  const index_t panels = (N + Nr - 1) / Nr;
  const index_t k_blocks = (K + kKc - 1) / kKc;
  // Panels [0, first_packed) are read in place; the others are packed once: panel j, K block kb
  // at w_pack + ((j - first_packed) * K + kb * kKc) * Nr, rows of Nr (zero-padded columns).
  const index_t first_packed = in_place ? N / Nr : 0;
  const auto run = [parallel](index_t n, const auto& body) {
    if (parallel)
      parallel_for(n, body, /*dynamic=*/true);
    else
      for (index_t i = 0; i < n; ++i) body(i);
  };
  const Scratch<T, PackedWTag> w_pack(static_cast<size_t>((panels - first_packed) * K * Nr));
  if (first_packed < panels)
    run((panels - first_packed) * k_blocks, [&](index_t task) {
      const index_t j = first_packed + task / k_blocks, k0 = (task % k_blocks) * kKc, kc = std::min(kKc, K - k0);
      const index_t n0 = j * Nr, cols = std::min(Nr, N - n0);
      T* dst = w_pack.data() + ((j - first_packed) * K + k0) * Nr;
      if (cols < Nr) std::fill(dst, dst + kc * Nr, T(0));
      w_rows(n0, cols, k0, kc, dst, Nr);
    });
  // Panel j's K block from k0: its first row, and the row stride through *ld.
  const auto w_panel = [&](index_t j, index_t k0, index_t* ld) -> const T* {
    if (j < first_packed) {
      *ld = in_place->ld;
      return in_place->data + k0 * in_place->ld + j * Nr;
    }
    *ld = Nr;
    return w_pack.data() + ((j - first_packed) * K + k0) * Nr;
  };
  std::vector<T, Eigen::aligned_allocator<T>> bias_pad(bias ? static_cast<size_t>(panels * Nr) : 0, T(0));
  if (bias) std::copy(bias, bias + N, bias_pad.data());

  // Tasks: blocks of kMc rows; when there are few, the columns are split too (one decoding
  // step still uses every thread). The split depends on M and N only.
  const index_t row_tasks = (M + kMc - 1) / kMc;
  const index_t col_chunk = row_tasks >= 8 ? panels * Nr : kNc;
  const index_t col_tasks = (panels * Nr + col_chunk - 1) / col_chunk;
  run(row_tasks * col_tasks, [&](index_t task) {
    const index_t m0 = (task / col_tasks) * kMc, rows = std::min(kMc, M - m0);
    const index_t c0 = (task % col_tasks) * col_chunk, c1 = std::min(panels * Nr, c0 + col_chunk);
    const index_t micro_rows = (rows + kMr - 1) / kMr;
    const Scratch<T, PackedXTag> a_pack(static_cast<size_t>(micro_rows * kMr * kKc));
    alignas(64) T edge[kMr * Nr] = {};  // columns beyond a partial panel are computed, never used
    RowsInPlace<T> rows_in_place[kMc / kMr] = {};
    bool in_place_x[kMc / kMr];
    for (index_t i = 0; i < micro_rows; ++i) {
      const index_t r = std::min<index_t>(kMr, rows - i * kMr);
      in_place_x[i] = true;
      for (index_t rr = 0; rr < r && in_place_x[i]; ++rr)
        in_place_x[i] = (rows_in_place[i].row[rr] = x_row(m0 + i * kMr + rr)) != nullptr;
    }
    for (index_t k0 = 0; k0 < K; k0 += kKc) {
      const index_t kc = std::min(kKc, K - k0);
      const bool accumulate = k0 > 0, last = k0 + kc == K;
      for (index_t i = 0; i < micro_rows; ++i) {
        if (in_place_x[i]) continue;
        T* dst = a_pack.data() + i * kMr * kc;
        x_rows(m0 + i * kMr, std::min<index_t>(kMr, rows - i * kMr), k0, kc, dst, kMr);
      }
      for (index_t nc0 = c0; nc0 < c1; nc0 += kNc) {
        const index_t nc1 = std::min(c1, nc0 + kNc);
        for (index_t i = 0; i < micro_rows; ++i) {
          const index_t m = m0 + i * kMr, r = std::min<index_t>(kMr, rows - i * kMr);
          const auto tiles = [&](const auto& a) {
            for (index_t n0 = nc0; n0 < nc1; n0 += Nr) {
              index_t ldb = 0;
              const T* b = w_panel(n0 / Nr, k0, &ldb);
              const index_t cols = std::min(Nr, N - n0);
              const T* bias_panel = bias && last ? bias_pad.data() + n0 : nullptr;
              T* c = y + m * N + n0;
              if (cols == Nr) {
                micro_kernel_rows<T>(int(r), a, b, ldb, kc, c, N, accumulate, bias_panel);
              } else {  // a partial panel goes through a full-width tile
                if (accumulate)
                  for (index_t rr = 0; rr < r; ++rr) std::memcpy(edge + rr * Nr, c + rr * N, sizeof(T) * cols);
                micro_kernel_rows<T>(int(r), a, b, ldb, kc, edge, Nr, accumulate, bias_panel);
                for (index_t rr = 0; rr < r; ++rr) std::memcpy(c + rr * N, edge + rr * Nr, sizeof(T) * cols);
              }
            }
          };
          if (in_place_x[i]) {
            RowsInPlace<T> a = rows_in_place[i];
            for (index_t rr = 0; rr < r; ++rr) a.row[rr] += k0;
            tiles(a);
          } else {
            tiles(PackedRows<T>{a_pack.data() + i * kMr * kc});
          }
        }
      }
    }
  });
}

}  // namespace attnext
