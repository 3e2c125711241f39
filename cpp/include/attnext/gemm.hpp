// A packed matrix product for the layers' projections: y (M, N) = x (M, K) W^T, W (N, K).
//
// The projections are most of a multi-head attention forward pass and Eigen's GEMM runs them
// about a quarter slower than a packed kernel shaped for them (docs/benchmarks.md), so they
// get their own kernel, in the classic packed form:
// - W is packed once per call into panels of kNr = 4 packets of output columns, each panel
//   (K, kNr) row after row (the vector operand, streamed from L2), unless the caller has it
//   as a row-major (K, N) matrix already (InPlaceW: a projection's weights, attention values),
//   whose full panels are then read in place with the row stride;
// - each task packs its block of x rows into micro-panels of kMr rows, (Kc, kMr) (the
//   broadcast operand, in L1), once per K block, and reuses them for all its columns; rows
//   whose k-run is contiguous are read in place instead (packing them is a scalar transpose);
// - a register micro-kernel keeps a kMr x kNr tile of y in vector registers.
// Every element of y is one micro-kernel accumulation over k in blocks of kKc whose bounds
// depend only on K, so results are bit-identical whatever the task split or thread count.
//
// Types: x and W are read as `In`, y is accumulated and written as `Acc`. The packed layout
// (PanelWriter, PackedRows) and the micro-kernel are the only code that knows what In is: a
// bfloat16 path specialises PackedLayout (no in-place reads), PanelWriter and PackedRows (k
// pairs interleaved, as vdpbf16ps reads them) and adds a micro_kernel for its pair; the
// driver (packed_gemm) and the callers' packers, which only say "element (k, lane) is x",
// stay as they are. Today In == Acc (float or double) and nothing is converted.
#pragma once

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include <Eigen/Core>

#include "parallel.hpp"
#include "scratch.hpp"
#include "strided.hpp"
#include "vmath.hpp"

namespace attnext {

// --- The packed layout: the seam where a reading type plugs in -------------------------------

// What a pair of types can do. in_place: whether operands already laid out like a packed
// panel (contiguous x rows, a row-major W) may be read where they are.
template <typename In, typename Acc>
struct PackedLayout {
  static_assert(std::is_same<In, Acc>::value, "only In == Acc is implemented (a bfloat16 path specialises this)");
  static constexpr bool in_place = true;
};

// Where a packer puts element (k, lane) of a packed block: lane runs over the rows of an x
// micro-panel or the columns of a W panel, ld is the number of lanes of the block.
template <typename In>
struct PanelWriter {
  In* data;
  index_t ld;
  void put(index_t k, index_t lane, In x) const { data[k * ld + lane] = x; }
  // lanes [lane, lane + n) of step k from a contiguous run
  void put_run(index_t k, index_t lane, const In* src, index_t n) const { std::copy_n(src, n, data + k * ld + lane); }
};

// The usual x-side packing step: x(lane, k0 + k) = row[k * stride] for k < kc (row already
// points at element k0; stride 1 is the common case and gets its own loop).
template <typename In>
inline void pack_row(const In* row, index_t stride, index_t kc, const PanelWriter<In>& dst, index_t lane) {
  if (stride == 1)
    for (index_t k = 0; k < kc; ++k) dst.put(k, lane, row[k]);
  else
    for (index_t k = 0; k < kc; ++k) dst.put(k, lane, row[k * stride]);
}

// From this many rows on, callers use packed_gemm; below, packing W would cost as much as the
// product itself (a decoding step), and Eigen's matrix-vector products read W in place.
constexpr index_t kPackedGemmMinRows = 32;

// W already laid out as a row-major (K, N) matrix: w(n, k) = data[k * ld + n].
template <typename In>
struct InPlaceW {
  const In* data = nullptr;
  index_t ld = 0;
};

// A parameter vector (bias, v) in the accumulation type: the caller's memory when In == Acc,
// else a converted copy (the load's conversion, once per call).
template <typename In, typename Acc>
class AccVector {
 public:
  AccVector(const In* src, index_t n) {
    if constexpr (std::is_same<In, Acc>::value) {
      data_ = src;
    } else if (src) {
      copy_.assign(src, src + n);
      data_ = copy_.data();
    }
  }
  const Acc* data() const { return data_; }

 private:
  std::vector<Acc, Eigen::aligned_allocator<Acc>> copy_;
  const Acc* data_ = nullptr;
};

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
template <typename Acc>
constexpr index_t panel_width() {
  return kNp * vm::packet_size<Acc>();
}

// Block sizes, chosen by measuring the transformer projection (x (2048, 512) times W^T
// (512, 1536), 2 threads; the sweep is in docs/benchmarks.md): kKc = 512 is one K block for
// the usual embed sizes (y is written once); kMc = 8 micro-rows per task also leaves enough
// tasks for 16 threads; kNc = 256 columns keep a packed W block (kKc x kNc) in L2.
constexpr index_t kKc = 512;
constexpr index_t kMc = 8 * kMr;
constexpr index_t kNc = 256;

// The x operand of one micro-kernel call, up to kMr rows from column k0 on: a packed
// micro-panel (kc, kMr) as PanelWriter lays it out, or the rows where they are.
template <typename In>
struct PackedRows {
  const In* panel;
  In at(index_t k, int r) const { return panel[k * kMr + r]; }
};
template <typename In>
struct RowsInPlace {
  const In* row[kMr];
  In at(index_t k, int r) const { return row[r][k]; }
};

// tile (R x kNr, row stride ldc) (+)= a (kc, R)^T b_panel (kc, kNr, row stride ldb) for the
// first R <= kMr rows of a (+ bias (kNr,) on every row when given: the last K block adds it
// while the tile is still in registers). A micro-row of fewer than kMr rows (the end of a
// block) runs an R-row kernel rather than computing padding.
template <typename In, typename Acc, int R, typename A>
inline void micro_kernel(const A& a, const In* b, index_t ldb, index_t kc, Acc* c, index_t ldc, bool accumulate,
                         const Acc* bias) {
  static_assert(std::is_same<In, Acc>::value, "a reading type other than Acc brings its own micro_kernel");
  constexpr index_t P = vm::packet_size<Acc>();
  Pk<Acc> acc[R][kNp];
  for (int r = 0; r < R; ++r)
    for (int p = 0; p < kNp; ++p)
      acc[r][p] = accumulate ? ei::ploadu<Pk<Acc>>(c + r * ldc + p * P) : ei::pset1<Pk<Acc>>(Acc(0));
  for (index_t k = 0; k < kc; ++k) {
    Pk<Acc> bv[kNp];
    for (int p = 0; p < kNp; ++p) bv[p] = ei::ploadu<Pk<Acc>>(b + k * ldb + p * P);
    for (int r = 0; r < R; ++r) {
      const Pk<Acc> ab = ei::pset1<Pk<Acc>>(a.at(k, r));
      for (int p = 0; p < kNp; ++p) acc[r][p] = ei::pmadd(ab, bv[p], acc[r][p]);
    }
  }
  if (bias)
    for (int p = 0; p < kNp; ++p) {
      const Pk<Acc> bp = ei::pload<Pk<Acc>>(bias + p * P);
      for (int r = 0; r < R; ++r) acc[r][p] = ei::padd(acc[r][p], bp);
    }
  for (int r = 0; r < R; ++r)
    for (int p = 0; p < kNp; ++p) ei::pstoreu(c + r * ldc + p * P, acc[r][p]);
}

// micro_kernel with R = rows (1 <= rows <= kMr), chosen at run time.
template <typename In, typename Acc, int R = kMr, typename A>
inline void micro_kernel_rows(int rows, const A& a, const In* b, index_t ldb, index_t kc, Acc* c, index_t ldc,
                              bool accumulate, const Acc* bias) {
  if constexpr (R > 1)
    if (rows < R) return micro_kernel_rows<In, Acc, R - 1>(rows, a, b, ldb, kc, c, ldc, accumulate, bias);
  micro_kernel<In, Acc, R>(a, b, ldb, kc, c, ldc, accumulate, bias);
}

// The W operand of one call: panels [0, first_packed) read in place, the others packed once:
// panel j's K block from k0 at packed + ((j - first_packed) * K + k0) * Nr, rows of Nr.
template <typename In>
struct WPanels {
  const In* packed;
  index_t K, first_packed, width;
  const InPlaceW<In>* in_place;
  // Panel j's K block from k0: its first row, and the row stride through *ld.
  const In* at(index_t j, index_t k0, index_t* ld) const {
    if (j < first_packed) {
      *ld = in_place->ld;
      return in_place->data + k0 * in_place->ld + j * width;
    }
    *ld = width;
    return packed + ((j - first_packed) * K + k0) * width;
  }
};

// The output of one call: y (M, N) row-major, and the bias padded to whole panels (or null).
template <typename Acc>
struct GemmOut {
  Acc* y;
  index_t N;
  const Acc* bias_pad;
};

// The tiles of one micro-row (r rows from row m) in columns [nc0, nc1), K block [k0, k0 + kc).
// edge: a (kMr, Nr) tile for a partial last panel (its extra columns are computed, never used).
template <typename In, typename Acc, typename A>
inline void micro_row_tiles(const A& a, int r, index_t m, index_t nc0, index_t nc1, index_t k0, index_t kc, bool last,
                            const WPanels<In>& w, const GemmOut<Acc>& out, Acc* edge) {
  constexpr index_t Nr = panel_width<Acc>();
  const bool accumulate = k0 > 0;
  const index_t N = out.N;
  for (index_t n0 = nc0; n0 < nc1; n0 += Nr) {
    index_t ldb = 0;
    const In* b = w.at(n0 / Nr, k0, &ldb);
    const index_t cols = std::min(Nr, N - n0);
    const Acc* bias_panel = out.bias_pad && last ? out.bias_pad + n0 : nullptr;
    Acc* c = out.y + m * N + n0;
    if (cols == Nr) {
      micro_kernel_rows<In, Acc>(r, a, b, ldb, kc, c, N, accumulate, bias_panel);
    } else {  // a partial panel goes through a full-width tile
      if (accumulate)
        for (index_t rr = 0; rr < r; ++rr) std::memcpy(edge + rr * Nr, c + rr * N, sizeof(Acc) * cols);
      micro_kernel_rows<In, Acc>(r, a, b, ldb, kc, edge, Nr, accumulate, bias_panel);
      for (index_t rr = 0; rr < r; ++rr) std::memcpy(c + rr * N, edge + rr * Nr, sizeof(Acc) * cols);
    }
  }
}

// One task: rows [m0, m0 + rows) of y, columns [c0, c1) (whole panels), all K blocks.
template <typename In, typename Acc, typename XRows, typename XRow>
void gemm_task(index_t m0, index_t rows, index_t c0, index_t c1, index_t K, const XRows& x_rows, const XRow& x_row,
               const WPanels<In>& w, const GemmOut<Acc>& out) {
  constexpr index_t Nr = panel_width<Acc>();
  const index_t micro_rows = (rows + kMr - 1) / kMr;
  const Scratch<In, PackedXTag> a_pack(static_cast<size_t>(micro_rows * kMr * kKc));
  alignas(64) Acc edge[kMr * Nr] = {};
  RowsInPlace<In> rows_in_place[kMc / kMr] = {};
  bool in_place_x[kMc / kMr];
  for (index_t i = 0; i < micro_rows; ++i) {
    const index_t r = std::min<index_t>(kMr, rows - i * kMr);
    in_place_x[i] = PackedLayout<In, Acc>::in_place;
    for (index_t rr = 0; rr < r && in_place_x[i]; ++rr)
      in_place_x[i] = (rows_in_place[i].row[rr] = x_row(m0 + i * kMr + rr)) != nullptr;
  }
  for (index_t k0 = 0; k0 < K; k0 += kKc) {
    const index_t kc = std::min(kKc, K - k0);
    const bool last = k0 + kc == K;
    for (index_t i = 0; i < micro_rows; ++i)
      if (!in_place_x[i])
        x_rows(m0 + i * kMr, std::min<index_t>(kMr, rows - i * kMr), k0, kc,
               PanelWriter<In>{a_pack.data() + i * kMr * kc, kMr});
    for (index_t nc0 = c0; nc0 < c1; nc0 += kNc) {
      const index_t nc1 = std::min(c1, nc0 + kNc);
      for (index_t i = 0; i < micro_rows; ++i) {
        const index_t m = m0 + i * kMr;
        const int r = int(std::min<index_t>(kMr, rows - i * kMr));
        if (in_place_x[i]) {
          RowsInPlace<In> a = rows_in_place[i];
          for (int rr = 0; rr < r; ++rr) a.row[rr] += k0;
          micro_row_tiles<In, Acc>(a, r, m, nc0, nc1, k0, kc, last, w, out, edge);
        } else {
          micro_row_tiles<In, Acc>(PackedRows<In>{a_pack.data() + i * kMr * kc}, r, m, nc0, nc1, k0, kc, last, w,
                                   out, edge);
        }
      }
    }
  }
}

// Runs body(i) for i < n on the library's threads, or on the calling thread.
template <typename F>
inline void run_tasks(bool parallel, index_t n, const F& body) {
  if (parallel)
    parallel_for(n, body, /*dynamic=*/true);
  else
    for (index_t i = 0; i < n; ++i) body(i);
}

}  // namespace gemm_detail

// y[m, n] (+ bias[n]) = sum_k x(m, k) w(n, k) for m < M, n < N, y row-major with row stride N.
//   x_rows(m0, rows, k0, kc, dst): dst.put(k, r, x(m0 + r, k0 + k)) for r < rows, k < kc
//   x_row(m): &x(m, 0) when row m's elements are contiguous along k, else nullptr
//   w_rows(n0, cols, k0, kc, dst): dst.put(k, c, w(n0 + c, k0 + k)) for c < cols, k < kc
// (the packers, dst a PanelWriter<In>; they let each caller read its operands through any
// layout). A micro-row whose x rows are all contiguous is read in place, the others are packed
// through x_rows. `parallel` = false runs everything on the calling thread (a caller already
// inside a task). `in_place`, when given, is w itself: its full panels are read where they are
// (no copy) and only a partial last panel goes through w_rows. The products are the same
// either way. bias (N,) is in the accumulation type (AccVector converts a parameter once).
template <typename In, typename Acc = In, typename XRows, typename XRow, typename WRows>
void packed_gemm(index_t M, index_t N, index_t K, const XRows& x_rows, const XRow& x_row, const WRows& w_rows,
                 const Acc* bias, Acc* y, bool parallel = true, const InPlaceW<In>* in_place = nullptr) {
  using namespace gemm_detail;
  constexpr index_t Nr = panel_width<Acc>();
  if (M <= 0 || N <= 0) return;
  if (K == 0) {
    for (index_t m = 0; m < M; ++m)
      for (index_t n = 0; n < N; ++n) y[m * N + n] = bias ? bias[n] : Acc(0);
    return;
  }
  if (!PackedLayout<In, Acc>::in_place) in_place = nullptr;
  const index_t panels = (N + Nr - 1) / Nr;
  const index_t k_blocks = (K + kKc - 1) / kKc;
  const index_t first_packed = in_place ? N / Nr : 0;
  const Scratch<In, PackedWTag> w_pack(static_cast<size_t>((panels - first_packed) * K * Nr));
  if (first_packed < panels)
    run_tasks(parallel, (panels - first_packed) * k_blocks, [&](index_t task) {
      const index_t j = first_packed + task / k_blocks, k0 = (task % k_blocks) * kKc, kc = std::min(kKc, K - k0);
      const index_t n0 = j * Nr, cols = std::min(Nr, N - n0);
      In* dst = w_pack.data() + ((j - first_packed) * K + k0) * Nr;
      if (cols < Nr) std::fill(dst, dst + kc * Nr, In(0));
      w_rows(n0, cols, k0, kc, PanelWriter<In>{dst, Nr});
    });
  const WPanels<In> w{w_pack.data(), K, first_packed, Nr, in_place};
  std::vector<Acc, Eigen::aligned_allocator<Acc>> bias_pad(bias ? static_cast<size_t>(panels * Nr) : 0, Acc(0));
  if (bias) std::copy(bias, bias + N, bias_pad.data());
  const GemmOut<Acc> out{y, N, bias ? bias_pad.data() : nullptr};

  // Tasks: blocks of kMc rows; when there are few, the columns are split too (one decoding
  // step still uses every thread). The split depends on M and N only.
  const index_t row_tasks = (M + kMc - 1) / kMc;
  const index_t col_chunk = row_tasks >= 8 ? panels * Nr : kNc;
  const index_t col_tasks = (panels * Nr + col_chunk - 1) / col_chunk;
  run_tasks(parallel, row_tasks * col_tasks, [&](index_t task) {
    const index_t m0 = (task / col_tasks) * kMc;
    const index_t c0 = (task % col_tasks) * col_chunk;
    gemm_task<In, Acc>(m0, std::min(kMc, M - m0), c0, std::min(panels * Nr, c0 + col_chunk), K, x_rows, x_row, w,
                       out);
  });
}

// c (M, N) = a (M, K) b (K, N) through packed_gemm (a gradient through a projection: dx = dy W).
//   a_row(m): &a(m, 0), row m's elements a_cs apart; b row-major (K, N), row stride ldb, read in place.
template <typename T, typename ARow>
void gemm_rows_times(index_t M, index_t N, index_t K, const ARow& a_row, index_t a_cs, const T* b, index_t ldb, T* c,
                     bool parallel = true) {
  const auto x_rows = [&](index_t m0, index_t rows, index_t k0, index_t kc, const PanelWriter<T>& dst) {
    for (index_t r = 0; r < rows; ++r) pack_row(a_row(m0 + r) + k0 * a_cs, a_cs, kc, dst, r);
  };
  const auto x_row = [&](index_t m) -> const T* { return a_cs == 1 ? a_row(m) : nullptr; };
  const auto w_rows = [&](index_t n0, index_t cols, index_t k0, index_t kc, const PanelWriter<T>& dst) {
    for (index_t k = 0; k < kc; ++k) dst.put_run(k, 0, b + (k0 + k) * ldb + n0, cols);
  };
  const InPlaceW<T> b_in_place{b, ldb};
  packed_gemm<T, T>(M, N, K, x_rows, x_row, w_rows, static_cast<const T*>(nullptr), c, parallel, &b_in_place);
}

// c (M, N) = a (M, K) b^T, b (N, K) given by rows (an attention's dP = dO V^T): packed_gemm's own form.
//   a_row(m): &a(m, 0), elements a_cs apart; b_row(n): &b(n, 0), elements b_cs apart.
template <typename T, typename ARow, typename BRow>
void gemm_rows_times_transposed(index_t M, index_t N, index_t K, const ARow& a_row, index_t a_cs, const BRow& b_row,
                                index_t b_cs, T* c, bool parallel = true) {
  const auto x_rows = [&](index_t m0, index_t rows, index_t k0, index_t kc, const PanelWriter<T>& dst) {
    for (index_t r = 0; r < rows; ++r) pack_row(a_row(m0 + r) + k0 * a_cs, a_cs, kc, dst, r);
  };
  const auto x_row = [&](index_t m) -> const T* { return a_cs == 1 ? a_row(m) : nullptr; };
  const auto w_rows = [&](index_t n0, index_t cols, index_t k0, index_t kc, const PanelWriter<T>& dst) {
    for (index_t col = 0; col < cols; ++col) pack_row(b_row(n0 + col) + k0 * b_cs, b_cs, kc, dst, col);
  };
  packed_gemm<T, T>(M, N, K, x_rows, x_row, w_rows, static_cast<const T*>(nullptr), c, parallel);
}

// c (N1, N2) = a^T b = sum over rows m < M of a(m, :)^T b(m, :) (a weight's gradient: x^T dy).
//   a_row(m): &a(m, 0), elements a_cs apart (N1 of them); b_row(m) likewise for b (N2, stride b_cs);
//   b_in_place: b itself when its rows are one row-major matrix with unit columns (read in place).
// The sum over M runs in packed_gemm's K blocks, in a fixed order: the same bits for any thread count.
template <typename T, typename ARow, typename BRow>
void gemm_transposed_rows(index_t M, index_t N1, index_t N2, const ARow& a_row, index_t a_cs, const BRow& b_row,
                          index_t b_cs, T* c, const InPlaceW<T>* b_in_place = nullptr, bool parallel = true) {
  const auto x_rows = [&](index_t m0, index_t rows, index_t k0, index_t kc, const PanelWriter<T>& dst) {
    for (index_t k = 0; k < kc; ++k) {
      const T* row = a_row(k0 + k) + m0 * a_cs;
      for (index_t r = 0; r < rows; ++r) dst.put(k, r, row[r * a_cs]);
    }
  };
  const auto x_row = [](index_t) -> const T* { return nullptr; };  // a^T's rows are a's columns: packed
  const auto w_rows = [&](index_t n0, index_t cols, index_t k0, index_t kc, const PanelWriter<T>& dst) {
    for (index_t k = 0; k < kc; ++k) {
      const T* row = b_row(k0 + k) + n0 * b_cs;
      if (b_cs == 1)
        dst.put_run(k, 0, row, cols);
      else
        for (index_t col = 0; col < cols; ++col) dst.put(k, col, row[col * b_cs]);
    }
  };
  packed_gemm<T, T>(N1, N2, M, x_rows, x_row, w_rows, static_cast<const T*>(nullptr), c, parallel, b_in_place);
}

}  // namespace attnext
