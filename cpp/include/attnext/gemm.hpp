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
// Types: x and W are read as `In`, y is accumulated as `Acc` and written as Acc or as a 16-bit
// `Out` (a task's float tile rounded once, after its last K block). The packed layout
// (a Layout: what a panel holds, how PanelWriter fills it, the micro-kernel that reads it) is
// the only code that knows what In is; the driver (packed_gemm) and the callers' packers,
// which only say "element (k, lane) is x" through a PanelWriter<In>, are the same for all:
// - PackedLayout<In, Acc>: panels of Acc. In == Acc reads operands in place where their
//   layout allows; bfloat16/float16 inputs are converted to float by the packers (only the
//   packed panels are float, never a whole operand) and the float micro-kernel runs;
// - Bf16PairLayout (AVX512_BF16 builds, while bf16_dot_active()): panels of bfloat16 with k
//   pairs interleaved as vdpbf16ps reads them (an odd K pads its last pair with zero), and a
//   vdpbf16ps micro-kernel. bfloat16 products are exact in float32 and the sums are float32;
// - AmxLayout (AMX-BF16 builds, while amx_active()): the same pair panels padded to whole
//   tiles of 32 k, x packed row-major, and its own task driver (amx_task_acc) of AMX tiles.
// packed_gemm picks the layout once per call.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include <Eigen/Core>

#include "amx.hpp"
#include "lowp.hpp"
#include "parallel.hpp"
#include "scratch.hpp"
#include "strided.hpp"
#include "vmath.hpp"

namespace attnext {

// --- What the packers write to ---------------------------------------------------------------

// Where a packer puts element (k, lane) of a packed block: lane runs over the rows of an x
// micro-panel or the columns of a W panel, ld is the number of lanes of the block.
// In == Acc: the block holds In, element (k, lane) at data[k * ld + lane].
template <typename In, typename Enable = void>
struct PanelWriter {
  In* data;
  index_t ld;
  void put(index_t k, index_t lane, In x) const { data[k * ld + lane] = x; }
  // lanes [lane, lane + n) of step k from a contiguous run
  void put_run(index_t k, index_t lane, const In* src, index_t n) const { std::copy_n(src, n, data + k * ld + lane); }
};

// bfloat16/float16: the block is either float (`data`, the converting layout, laid out as
// above) or, when data is null, bfloat16 k pairs (`pairs`: element (k, lane) at
// pairs[((k / 2) * ld + lane) * 2 + k % 2], so lane's pair (k, k + 1) is one 32-bit word).
// A float value (put's second form) is stored exactly in a float block and rounded by
// from_float in a pair block (a float operand of a bfloat16 product).
template <typename In>
struct PanelWriter<In, std::enable_if_t<is_lowp<In>::value>> {
  float* data;
  In* pairs;
  index_t ld;
  void put(index_t k, index_t lane, In x) const {
    if (data)
      data[k * ld + lane] = float(x);
    else
      pairs[((k >> 1) * ld + lane) * 2 + (k & 1)] = x;
  }
  void put(index_t k, index_t lane, float x) const {
    if (data)
      data[k * ld + lane] = x;
    else
      pairs[((k >> 1) * ld + lane) * 2 + (k & 1)] = from_float<In>(x);
  }
  void put_run(index_t k, index_t lane, const In* src, index_t n) const {
    index_t i = 0;
#if defined(__AVX512F__)
    if (data)
      for (float* dst = data + k * ld + lane; i + 16 <= n; i += 16) _mm512_storeu_ps(dst + i, load16(src + i));
#endif
    for (; i < n; ++i) put(k, lane + i, src[i]);
  }
};

// pack_row's contiguous run into a bfloat16 pair block: each pair (k, k + 1) is one 32-bit word.
template <typename In>
inline void pack_pairs(const In* row, index_t kc, const PanelWriter<In>& dst, index_t lane) {
  if (dst.ld == 1) {  // one lane's pairs are the row itself (AMX's row-major x)
    std::memcpy(dst.pairs, row, sizeof(In) * kc);
    return;
  }
  for (index_t kp = 0; kp < kc / 2; ++kp) std::memcpy(dst.pairs + (kp * dst.ld + lane) * 2, row + 2 * kp, 4);
  if (kc % 2) dst.put(kc - 1, lane, row[kc - 1]);
}

// The usual x-side packing step: x(lane, k0 + k) = row[k * stride] for k < kc (row already
// points at element k0; stride 1 is the common case and gets its own loop).
template <typename In>
inline void pack_row(const In* row, index_t stride, index_t kc, const PanelWriter<In>& dst, index_t lane) {
  if constexpr (is_lowp<In>::value)
    if (!dst.data && stride == 1) return pack_pairs(row, kc, dst, lane);
  if (stride == 1)
    for (index_t k = 0; k < kc; ++k) dst.put(k, lane, row[k]);
  else
    for (index_t k = 0; k < kc; ++k) dst.put(k, lane, row[k * stride]);
}

#if defined(__AVX512F__)
// Transposes 16 x 16 32-bit words in r: r[j] becomes column j.
inline void transpose16x16_epi32(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {  // per 128-bit lane: pairs of rows interleaved
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {  // r[i + c], lane L: column 4L + c of rows i..i+3
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int g = 0; g < 16; g += 8)  // then the 128-bit lanes, in two rounds
    for (int c = 0; c < 4; ++c) {
      t[g + c] = _mm512_shuffle_i32x4(r[g + c], r[g + c + 4], 0x88);
      t[g + c + 4] = _mm512_shuffle_i32x4(r[g + c], r[g + c + 4], 0xdd);
    }
  for (int c = 0; c < 8; ++c) {
    r[c] = _mm512_shuffle_i32x4(t[c], t[c + 8], 0x88);
    r[c + 8] = _mm512_shuffle_i32x4(t[c], t[c + 8], 0xdd);
  }
}
#endif

// pack_row for `cols` lanes from `lane` on, lane + c's elements contiguous from rows + c * ld
// (a weight's rows). Into a pair block, whole blocks of 16 lanes x 16 pairs go as one 32-bit
// transpose: 16 stores of a pair row's 16 lanes, where pack_pairs stores one word per line.
template <typename In>
inline void pack_rows(const In* rows, index_t ld, index_t cols, index_t kc, const PanelWriter<In>& dst,
                      index_t lane = 0) {
  index_t c = 0;
#if defined(__AVX512F__)
  if constexpr (is_lowp<In>::value && sizeof(In) == 2)
    if (!dst.data)
      for (; c + 16 <= cols; c += 16) {
        index_t kp = 0;
        for (; 2 * kp + 32 <= kc; kp += 16) {
          __m512i r[16];
          for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(rows + (c + i) * ld + 2 * kp);
          transpose16x16_epi32(r);
          for (int j = 0; j < 16; ++j) _mm512_storeu_si512(dst.pairs + ((kp + j) * dst.ld + lane + c) * 2, r[j]);
        }
        const PanelWriter<In> rest{nullptr, dst.pairs + kp * dst.ld * 2, dst.ld};
        for (index_t i = 0; i < 16; ++i) pack_pairs(rows + (c + i) * ld + 2 * kp, kc - 2 * kp, rest, lane + c + i);
      }
#endif
  for (; c < cols; ++c) pack_row(rows + c * ld, index_t(1), kc, dst, lane + c);
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
// kKc is even, so a K block never splits a bfloat16 k pair.
constexpr index_t kKc = 512;
constexpr index_t kMc = 8 * kMr;
constexpr index_t kNc = 256;

// The x operand of one micro-kernel call, up to kMr rows from column k0 on: a packed
// micro-panel (kc, kMr) as PanelWriter lays it out, or the rows where they are.
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
// block) runs an R-row kernel rather than computing padding.
template <typename Acc, int R, typename A>
inline void micro_kernel(const A& a, const Acc* b, index_t ldb, index_t kc, Acc* c, index_t ldc, bool accumulate,
                         const Acc* bias) {
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

#if defined(__AVX512BF16__)
// The x operand in the pair layout: row r's pair (k, k + 1) = 2 kp as one 32-bit word.
struct PairRows {
  const bf16* panel;
  int32_t pair(index_t kp, int r) const {
    int32_t v;
    std::memcpy(&v, panel + (kp * kMr + r) * 2, sizeof v);
    return v;
  }
};

// micro_kernel for the pair layout: b's pair row kp holds kNr lanes of (w(n, 2kp), w(n, 2kp+1))
// (ldb lanes apart); vdpbf16ps adds both products of a lane's pair to its float sum.
template <int R>
inline void micro_kernel_pairs(const PairRows& a, const bf16* b, index_t ldb, index_t kc, float* c, index_t ldc,
                               bool accumulate, const float* bias) {
  __m512 acc[R][kNp];
  for (int r = 0; r < R; ++r)
    for (int p = 0; p < kNp; ++p) acc[r][p] = accumulate ? _mm512_loadu_ps(c + r * ldc + p * 16) : _mm512_setzero_ps();
  const index_t pairs = (kc + 1) / 2;
  for (index_t kp = 0; kp < pairs; ++kp) {
    __m512bh bv[kNp];
    for (int p = 0; p < kNp; ++p) bv[p] = (__m512bh)_mm512_loadu_si512(b + (kp * ldb + p * 16) * 2);
    for (int r = 0; r < R; ++r) {
      const __m512bh ab = (__m512bh)_mm512_set1_epi32(a.pair(kp, r));
      for (int p = 0; p < kNp; ++p) acc[r][p] = _mm512_dpbf16_ps(acc[r][p], ab, bv[p]);
    }
  }
  if (bias)
    for (int p = 0; p < kNp; ++p) {
      const __m512 bp = _mm512_loadu_ps(bias + p * 16);
      for (int r = 0; r < R; ++r) acc[r][p] = _mm512_add_ps(acc[r][p], bp);
    }
  for (int r = 0; r < R; ++r)
    for (int p = 0; p < kNp; ++p) _mm512_storeu_ps(c + r * ldc + p * 16, acc[r][p]);
}
#endif

}  // namespace gemm_detail

// --- The layouts ------------------------------------------------------------------------------
// A Layout says what a packed panel holds (Panel), how many k a panel row covers (k_step),
// whether operands laid out like a panel may be read in place (in_place), how many rows of y
// one task computes (task_rows), makes the PanelWriter the packers fill, finishes a packed
// block of kc steps (finish: pads a k pair), and runs the micro-kernel on its panels
// (kernel<R>, micro_kernel's contract; AmxLayout has its own task driver instead).

// Panels of Acc: In == Acc reads in place where it can; bfloat16/float16 are converted by the
// packers, and only the packed panels are float.
template <typename In, typename Acc>
struct PackedLayout {
  using Panel = Acc;
  static constexpr bool in_place = std::is_same<In, Acc>::value;
  static constexpr index_t k_step = 1;
  static constexpr index_t task_rows = gemm_detail::kMc;
  static PanelWriter<In> writer(Panel* block, index_t ld) {
    if constexpr (in_place)
      return PanelWriter<In>{block, ld};
    else
      return PanelWriter<In>{block, nullptr, ld};
  }
  static void finish(Panel*, index_t, index_t) {}
  template <int R, typename A>
  static void kernel(const A& a, const Panel* b, index_t ldb, index_t kc, Acc* c, index_t ldc, bool accumulate,
                     const Acc* bias) {
    gemm_detail::micro_kernel<Acc, R>(a, b, ldb, kc, c, ldc, accumulate, bias);
  }
  using Rows = gemm_detail::PackedRows<Panel>;
};

#if defined(__AVX512BF16__)
// bfloat16 k pairs for vdpbf16ps (x and W bfloat16, y float).
struct Bf16PairLayout {
  using Panel = bf16;
  static constexpr bool in_place = false;
  static constexpr index_t k_step = 2;
  static constexpr index_t task_rows = gemm_detail::kMc;
  static PanelWriter<bf16> writer(Panel* block, index_t ld) { return PanelWriter<bf16>{nullptr, block, ld}; }
  // An odd kc leaves the second half of its last pair unwritten: zero, so it adds nothing.
  static void finish(Panel* block, index_t kc, index_t ld) {
    if (kc % 2 == 0) return;
    Panel* last = block + (kc / 2) * ld * 2;
    for (index_t lane = 0; lane < ld; ++lane) last[lane * 2 + 1] = bf16{0};
  }
  template <int R, typename A>
  static void kernel(const A& a, const Panel* b, index_t ldb, index_t kc, float* c, index_t ldc, bool accumulate,
                     const float* bias) {
    gemm_detail::micro_kernel_pairs<R>(a, b, ldb, kc, c, ldc, accumulate, bias);
  }
  struct Rows : gemm_detail::PairRows {
    explicit Rows(const bf16* panel) : PairRows{panel} {}
  };
};
#endif

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
// bfloat16 k pairs for AMX tiles (x and W bfloat16, y float, while amx_active()): W's panels
// are Bf16PairLayout's, each K block padded with zero pairs to whole tiles of 32 k, so that a
// B tile (16 pair rows) never reads past its block. x is packed row-major (gemm_detail::
// amx_task_acc), padded with zeros the same way: the padding multiplies zeros by zeros, never
// a zero by an x or W value (0 x Inf is NaN). 64 rows per task: two 32-row blocks.
struct AmxLayout {
  using Panel = bf16;
  static constexpr bool in_place = false;
  static constexpr index_t k_step = 32;
  static constexpr index_t task_rows = 64;
  static PanelWriter<bf16> writer(Panel* block, index_t ld) { return PanelWriter<bf16>{nullptr, block, ld}; }
  // Zeroes what the packer left of the block's whole tiles: an odd kc's second half of its
  // last pair, and the pair rows after it.
  static void finish(Panel* block, index_t kc, index_t ld) {
    const index_t pairs = (kc + 1) / 2, tile_pairs = (kc + k_step - 1) / k_step * (k_step / 2);
    if (kc % 2)
      for (index_t lane = 0; lane < ld; ++lane) block[((pairs - 1) * ld + lane) * 2 + 1] = bf16{0};
    std::fill(block + pairs * ld * 2, block + tile_pairs * ld * 2, bf16{0});
  }
};
#endif

namespace gemm_detail {

// Layout::kernel with R = rows (1 <= rows <= kMr), chosen at run time.
template <typename Layout, int R = kMr, typename A, typename Acc>
inline void layout_kernel_rows(int rows, const A& a, const typename Layout::Panel* b, index_t ldb, index_t kc, Acc* c,
                               index_t ldc, bool accumulate, const Acc* bias) {
  if constexpr (R > 1)
    if (rows < R) return layout_kernel_rows<Layout, R - 1>(rows, a, b, ldb, kc, c, ldc, accumulate, bias);
  Layout::template kernel<R>(a, b, ldb, kc, c, ldc, accumulate, bias);
}

// micro_kernel with R = rows for In == Acc (the SDPA backward's tiles use it directly).
template <typename In, typename Acc, typename A>
inline void micro_kernel_rows(int rows, const A& a, const In* b, index_t ldb, index_t kc, Acc* c, index_t ldc,
                              bool accumulate, const Acc* bias) {
  static_assert(std::is_same<In, Acc>::value, "other reading types go through their Layout");
  layout_kernel_rows<PackedLayout<In, Acc>>(rows, a, b, ldb, kc, c, ldc, accumulate, bias);
}

// k steps rounded up to whole panel rows of a layout.
template <typename Layout>
constexpr index_t padded_k(index_t k) {
  return (k + Layout::k_step - 1) / Layout::k_step * Layout::k_step;
}

// The W operand of one call: panels [0, first_packed) read in place, the others packed once:
// panel j's K block from k0 at packed + ((j - first_packed) * K + k0) * Nr, rows of Nr (K
// rounded up to whole panel rows).
template <typename P>
struct WPanels {
  const P* packed;
  index_t K, first_packed, width;
  const InPlaceW<P>* in_place;
  // Panel j's K block from k0: its first row, and the row stride (in lanes) through *ld.
  const P* at(index_t j, index_t k0, index_t* ld) const {
    if (j < first_packed) {
      *ld = in_place->ld;
      return in_place->data + k0 * in_place->ld + j * width;
    }
    *ld = width;
    return packed + ((j - first_packed) * K + k0) * width;
  }
};

// Where the micro-kernels write: element (m, n) of y at y + (m - m0) * ld + (n - n0) (y itself,
// or a task's float tile when y is 16-bit), N columns in all, and the bias padded to whole
// panels (or null).
template <typename Acc>
struct GemmOut {
  Acc* y;
  index_t ld, m0, n0, N;
  const Acc* bias_pad;
  Acc* at(index_t m, index_t n) const { return y + (m - m0) * ld + (n - n0); }
};

// The tiles of one micro-row (r rows from row m) in columns [nc0, nc1), K block [k0, k0 + kc).
// edge: a (kMr, Nr) tile for a partial last panel (its extra columns are computed, never used).
template <typename Layout, typename Acc, typename A>
inline void micro_row_tiles(const A& a, int r, index_t m, index_t nc0, index_t nc1, index_t k0, index_t kc, bool last,
                            const WPanels<typename Layout::Panel>& w, const GemmOut<Acc>& out, Acc* edge) {
  constexpr index_t Nr = panel_width<Acc>();
  const bool accumulate = k0 > 0;
  const index_t N = out.N;
  for (index_t n0 = nc0; n0 < nc1; n0 += Nr) {
    index_t ldb = 0;
    const auto* b = w.at(n0 / Nr, k0, &ldb);
    const index_t cols = std::min(Nr, N - n0);
    const Acc* bias_panel = out.bias_pad && last ? out.bias_pad + n0 : nullptr;
    Acc* c = out.at(m, n0);
    const index_t ld = out.ld;
    if (cols == Nr) {
      layout_kernel_rows<Layout>(r, a, b, ldb, kc, c, ld, accumulate, bias_panel);
    } else {  // a partial panel goes through a full-width tile
      if (accumulate)
        for (index_t rr = 0; rr < r; ++rr) std::memcpy(edge + rr * Nr, c + rr * ld, sizeof(Acc) * cols);
      layout_kernel_rows<Layout>(r, a, b, ldb, kc, edge, Nr, accumulate, bias_panel);
      for (index_t rr = 0; rr < r; ++rr) std::memcpy(c + rr * ld, edge + rr * Nr, sizeof(Acc) * cols);
    }
  }
}

// Which micro-rows of a task are read in place (all their rows contiguous along k, and the
// layout allows it), with their row pointers.
template <typename Layout, typename XRow>
inline void find_rows_in_place(index_t m0, index_t rows, const XRow& x_row,
                               RowsInPlace<typename Layout::Panel>* rows_in_place, bool* in_place_x) {
  const index_t micro_rows = (rows + kMr - 1) / kMr;
  for (index_t i = 0; i < micro_rows; ++i) {
    in_place_x[i] = false;
    if constexpr (Layout::in_place) {
      const index_t r = std::min<index_t>(kMr, rows - i * kMr);
      in_place_x[i] = true;
      for (index_t rr = 0; rr < r && in_place_x[i]; ++rr)
        in_place_x[i] = (rows_in_place[i].row[rr] = x_row(m0 + i * kMr + rr)) != nullptr;
    }
  }
}

// One task: rows [m0, m0 + rows) of y, columns [c0, c1) (whole panels), all K blocks, into out.
template <typename Layout, typename Acc, typename XRows, typename XRow>
void gemm_task_acc(index_t m0, index_t rows, index_t c0, index_t c1, index_t K, const XRows& x_rows,
                   const XRow& x_row, const WPanels<typename Layout::Panel>& w, const GemmOut<Acc>& out) {
  using P = typename Layout::Panel;
  constexpr index_t Nr = panel_width<Acc>();
  const index_t micro_rows = (rows + kMr - 1) / kMr;
  const Scratch<P, PackedXTag> a_pack(static_cast<size_t>(micro_rows * kMr * kKc));
  alignas(64) Acc edge[kMr * Nr] = {};
  RowsInPlace<P> rows_in_place[kMc / kMr] = {};
  bool in_place_x[kMc / kMr];
  find_rows_in_place<Layout>(m0, rows, x_row, rows_in_place, in_place_x);
  for (index_t k0 = 0; k0 < K; k0 += kKc) {
    const index_t kc = std::min(kKc, K - k0);
    const bool last = k0 + kc == K;
    const auto panel = [&](index_t i) { return a_pack.data() + i * kMr * padded_k<Layout>(kc); };
    for (index_t i = 0; i < micro_rows; ++i)
      if (!in_place_x[i]) {
        x_rows(m0 + i * kMr, std::min<index_t>(kMr, rows - i * kMr), k0, kc, Layout::writer(panel(i), kMr));
        Layout::finish(panel(i), kc, kMr);
      }
    for (index_t nc0 = c0; nc0 < c1; nc0 += kNc) {
      const index_t nc1 = std::min(c1, nc0 + kNc);
      for (index_t i = 0; i < micro_rows; ++i) {
        const index_t m = m0 + i * kMr;
        const int r = int(std::min<index_t>(kMr, rows - i * kMr));
        if constexpr (Layout::in_place)
          if (in_place_x[i]) {
            RowsInPlace<P> a = rows_in_place[i];
            for (int rr = 0; rr < r; ++rr) a.row[rr] += k0;
            micro_row_tiles<Layout>(a, r, m, nc0, nc1, k0, kc, last, w, out, edge);
            continue;
          }
        micro_row_tiles<Layout>(typename Layout::Rows{panel(i)}, r, m, nc0, nc1, k0, kc, last, w, out, edge);
      }
    }
  }
}

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
// --- The AMX driver: one task of AmxLayout ----------------------------------------------------
// tdpbf16ps: C (16 x 16 float) += A (16 rows x 32 bfloat16, row-major) B (16 pair rows x 16
// lanes, a W panel's layout). A block of y is 32 rows x 32 columns: C tiles 0-3 (row half i,
// column half j: tile 2i + j), A row halves in tiles 4-5, B column halves in tiles 6-7; the
// k loop over a K block runs in steps of 32 in order, so every element of y is the same
// sequence of tile products whatever the task split (the determinism rule of packed_gemm).
constexpr index_t kTile = 16, kTileK = 32;

// One C tile's 16 x 16 block of y: from c (rows ld floats apart), the first rows x cols of it
// inside y (0 to 16 each). A partial tile goes through a bounce tile, so that no load or
// store reaches past y's rows or columns. (The tile intrinsics take literal tile numbers, so
// these helpers only say where a tile goes; amx_block names the tiles.)
struct CTile {
  float* c;
  index_t ld, rows, cols;
  bool whole() const { return rows == kTile && cols == kTile; }
  // Where the tile is loaded from when accumulating: y, or the bounce holding y's part, zeros around.
  const float* source(float* bounce, index_t* stride) const {
    *stride = (whole() ? ld : kTile) * index_t(sizeof(float));
    if (whole()) return c;
    std::fill_n(bounce, kTile * kTile, 0.f);
    for (index_t r = 0; r < rows; ++r) std::copy_n(c + r * ld, cols, bounce + r * kTile);
    return bounce;
  }
  // Where the tile is stored: y, or the bounce, which finish() then copies into y.
  float* target(float* bounce, index_t* stride) const {
    *stride = (whole() ? ld : kTile) * index_t(sizeof(float));
    return whole() ? c : bounce;
  }
  // After the store: the bounce's part into y, + bias (the tile's 16 columns) on the last K
  // block: y = sum + bias, as the vector micro-kernels add it.
  void finish(const float* bounce, const float* bias) const {
    if (!whole())
      for (index_t r = 0; r < rows; ++r) std::copy_n(bounce + r * kTile, cols, c + r * ld);
    if (bias)
      for (index_t r = 0; r < rows; ++r)
        for (index_t n = 0; n < cols; ++n) c[r * ld + n] += bias[n];
  }
};

// H row halves (1 or 2) x 32 columns of y over one K block of kc_pad k (whole tiles):
// a row-major, lda apart; b the block's pair rows from its first column, ldb lanes apart.
template <int H>
inline void amx_block(const bf16* a, index_t lda, const bf16* b, index_t ldb, index_t kc_pad, const CTile (&c)[2][2],
                      bool accumulate, const float* bias, float* bounce) {
  index_t s = 0;
  if (accumulate) {
    _tile_loadd(0, c[0][0].source(bounce, &s), s);
    _tile_loadd(1, c[0][1].source(bounce, &s), s);
    if constexpr (H == 2) {
      _tile_loadd(2, c[1][0].source(bounce, &s), s);
      _tile_loadd(3, c[1][1].source(bounce, &s), s);
    }
  } else {
    _tile_zero(0);
    _tile_zero(1);
    if constexpr (H == 2) {
      _tile_zero(2);
      _tile_zero(3);
    }
  }
  const index_t a_stride = lda * sizeof(bf16), b_stride = ldb * 2 * sizeof(bf16);
  for (index_t k = 0; k < kc_pad; k += kTileK) {
    const bf16* bk = b + k * ldb;  // pair row k / 2
    _tile_loadd(6, bk, b_stride);
    _tile_loadd(7, bk + 2 * kTile, b_stride);
    _tile_loadd(4, a + k, a_stride);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    if constexpr (H == 2) {
      _tile_loadd(5, a + kTile * lda + k, a_stride);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
  }
  const float* bias_right = bias ? bias + kTile : nullptr;
  _tile_stored(0, c[0][0].target(bounce, &s), s);
  c[0][0].finish(bounce, bias);
  _tile_stored(1, c[0][1].target(bounce, &s), s);
  c[0][1].finish(bounce, bias_right);
  if constexpr (H == 2) {
    _tile_stored(2, c[1][0].target(bounce, &s), s);
    c[1][0].finish(bounce, bias);
    _tile_stored(3, c[1][1].target(bounce, &s), s);
    c[1][1].finish(bounce, bias_right);
  }
}

// x rows [m0, m0 + rows), k in [k0, k0 + kc), row-major into a (lda = kc in whole tiles), zero
// past kc and on the rows up to rows_pad: the A tiles. A pair block of one lane is one row.
template <typename XRows>
void pack_x_amx(const XRows& x_rows, index_t m0, index_t rows, index_t rows_pad, index_t k0, index_t kc, index_t lda,
                bf16* a) {
  for (index_t r = 0; r < rows; ++r) {
    x_rows(m0 + r, 1, k0, kc, AmxLayout::writer(a + r * lda, 1));
    AmxLayout::finish(a + r * lda, kc, 1);
  }
  std::fill(a + rows * lda, a + rows_pad * lda, bf16{0});
}

// gemm_task_acc for AmxLayout: per K block, the task's x rows packed once, then blocks of
// 32 x 32 over columns in groups of kNc (their W in L2) and the rows (32 at a time, in L1).
template <typename XRows>
void amx_task_acc(index_t m0, index_t rows, index_t c0, index_t c1, index_t K, const XRows& x_rows,
                  const WPanels<bf16>& w, const GemmOut<float>& out) {
  constexpr index_t Nr = panel_width<float>();
  const TileScope tiles(full_tiles());  // this thread's tiles, for this task
  const index_t rows_pad = (rows + kTile - 1) / kTile * kTile, n_end = std::min(c1, out.N);
  const Scratch<bf16, PackedXTag> a_pack(static_cast<size_t>(rows_pad * kKc));
  alignas(64) float bounce[kTile * kTile];
  const auto tile = [&](index_t r, index_t n) {
    return CTile{out.at(m0 + r, n), out.ld, std::clamp<index_t>(rows - r, 0, kTile),
                 std::clamp<index_t>(out.N - n, 0, kTile)};
  };
  for (index_t k0 = 0; k0 < K; k0 += kKc) {
    const index_t kc = std::min(kKc, K - k0), lda = padded_k<AmxLayout>(kc);
    const bool accumulate = k0 > 0, last = k0 + kc == K;
    pack_x_amx(x_rows, m0, rows, rows_pad, k0, kc, lda, a_pack.data());
    for (index_t nc0 = c0; nc0 < n_end; nc0 += kNc)
      for (index_t r = 0; r < rows; r += 2 * kTile)
        for (index_t n = nc0; n < std::min(nc0 + kNc, n_end); n += 2 * kTile) {
          index_t ldb = 0;
          const bf16* b = w.at(n / Nr, k0, &ldb) + (n % Nr) * 2;
          const CTile c[2][2] = {{tile(r, n), tile(r, n + kTile)}, {tile(r + kTile, n), tile(r + kTile, n + kTile)}};
          const float* bias = last && out.bias_pad ? out.bias_pad + n : nullptr;
          const bf16* a = a_pack.data() + r * lda;
          if (rows - r > kTile)
            amx_block<2>(a, lda, b, ldb, lda, c, accumulate, bias, bounce);
          else
            amx_block<1>(a, lda, b, ldb, lda, c, accumulate, bias, bounce);
        }
  }
}
#endif

// A task's rows of y into out: the AMX driver for AmxLayout, else gemm_task_acc.
template <typename Layout, typename Acc, typename XRows, typename XRow>
void task_acc(index_t m0, index_t rows, index_t c0, index_t c1, index_t K, const XRows& x_rows, const XRow& x_row,
              const WPanels<typename Layout::Panel>& w, const GemmOut<Acc>& out) {
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
  if constexpr (std::is_same<Layout, AmxLayout>::value)
    amx_task_acc(m0, rows, c0, c1, K, x_rows, w, out);
  else
#endif
    gemm_task_acc<Layout>(m0, rows, c0, c1, K, x_rows, x_row, w, out);
}

// Scratch tag (scratch.hpp) of a task's float tile when y is 16-bit.
struct TaskTileTag {};

// gemm_task_acc into y (M, N) of Out: in place when Out is Acc; else into a float tile of the
// task's block (in L2), stored rounded (store_row: lowp.hpp's rule) once all K blocks are in.
template <typename Layout, typename Acc, typename Out, typename XRows, typename XRow>
void gemm_task(index_t m0, index_t rows, index_t c0, index_t c1, index_t K, const XRows& x_rows, const XRow& x_row,
               const WPanels<typename Layout::Panel>& w, index_t N, const Acc* bias_pad, Out* y) {
  if constexpr (std::is_same<Out, Acc>::value) {
    task_acc<Layout>(m0, rows, c0, c1, K, x_rows, x_row, w, GemmOut<Acc>{y, N, 0, 0, N, bias_pad});
  } else {
    const index_t width = c1 - c0, cols = std::min(c1, N) - c0;
    const Scratch<Acc, TaskTileTag> tile(static_cast<size_t>(rows * width));
    task_acc<Layout>(m0, rows, c0, c1, K, x_rows, x_row, w, GemmOut<Acc>{tile.data(), width, m0, c0, N, bias_pad});
    for (index_t r = 0; r < rows; ++r) store_row(tile.data() + r * width, cols, y + (m0 + r) * N + c0);
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

// Packs W's panels [first_packed, panels) into w_pack in Layout's panels (K rounded up to whole
// panel rows, Kp): panel j's K block from k0 at w_pack + ((j - first_packed) * Kp + k0) * Nr.
// Each (panel, K block) is one task.
template <typename Layout, typename Acc, typename WRows>
void pack_w(index_t N, index_t K, index_t first_packed, const WRows& w_rows, typename Layout::Panel* w_pack,
            bool parallel) {
  using P = typename Layout::Panel;
  constexpr index_t Nr = panel_width<Acc>();
  const index_t panels = (N + Nr - 1) / Nr, k_blocks = (K + kKc - 1) / kKc, Kp = padded_k<Layout>(K);
  run_tasks(parallel, (panels - first_packed) * k_blocks, [&](index_t task) {
    const index_t j = first_packed + task / k_blocks, k0 = (task % k_blocks) * kKc, kc = std::min(kKc, K - k0);
    const index_t n0 = j * Nr, cols = std::min(Nr, N - n0);
    P* dst = w_pack + ((j - first_packed) * Kp + k0) * Nr;
    if (cols < Nr) std::fill(dst, dst + padded_k<Layout>(kc) * Nr, P{0});
    w_rows(n0, cols, k0, kc, Layout::writer(dst, Nr));
    Layout::finish(dst, kc, Nr);
  });
}

// packed_gemm for one layout (packed_gemm's contract).
template <typename Layout, typename In, typename Acc, typename Out, typename XRows, typename XRow, typename WRows>
void packed_gemm_with(index_t M, index_t N, index_t K, const XRows& x_rows, const XRow& x_row, const WRows& w_rows,
                      const Acc* bias, Out* y, bool parallel, const InPlaceW<In>* in_place) {
  using P = typename Layout::Panel;
  constexpr index_t Nr = panel_width<Acc>();
  const InPlaceW<P>* w_in_place = nullptr;
  if constexpr (Layout::in_place) w_in_place = in_place;
  const index_t panels = (N + Nr - 1) / Nr;
  const index_t first_packed = w_in_place ? N / Nr : 0;
  const index_t Kp = padded_k<Layout>(K);
  const Scratch<P, PackedWTag> w_pack(static_cast<size_t>((panels - first_packed) * Kp * Nr));
  if (first_packed < panels) pack_w<Layout, Acc>(N, K, first_packed, w_rows, w_pack.data(), parallel);
  const WPanels<P> w{w_pack.data(), Kp, first_packed, Nr, w_in_place};
  std::vector<Acc, Eigen::aligned_allocator<Acc>> bias_pad(bias ? static_cast<size_t>(panels * Nr) : 0, Acc(0));
  if (bias) std::copy(bias, bias + N, bias_pad.data());

  // Tasks: blocks of task_rows rows; when there are few, the columns are split too (one
  // decoding step still uses every thread). The split depends on M and N only.
  constexpr index_t task_rows = Layout::task_rows;
  const index_t row_tasks = (M + task_rows - 1) / task_rows;
  const index_t col_chunk = row_tasks >= 8 ? panels * Nr : kNc;
  const index_t col_tasks = (panels * Nr + col_chunk - 1) / col_chunk;
  run_tasks(parallel, row_tasks * col_tasks, [&](index_t task) {
    const index_t m0 = (task / col_tasks) * task_rows;
    const index_t c0 = (task % col_tasks) * col_chunk;
    gemm_task<Layout, Acc>(m0, std::min(task_rows, M - m0), c0, std::min(panels * Nr, c0 + col_chunk), K, x_rows, x_row, w,
                           N, bias ? bias_pad.data() : nullptr, y);
  });
}

}  // namespace gemm_detail

// y[m, n] (+ bias[n]) = sum_k x(m, k) w(n, k) for m < M, n < N, y row-major with row stride N.
//   x_rows(m0, rows, k0, kc, dst): dst.put(k, r, x(m0 + r, k0 + k)) for r < rows, k < kc
//   x_row(m): &x(m, 0) when row m's elements are contiguous along k, else nullptr
//   w_rows(n0, cols, k0, kc, dst): dst.put(k, c, w(n0 + c, k0 + k)) for c < cols, k < kc
// (the packers, dst a PanelWriter<In>; they let each caller read its operands through any
// layout). A micro-row whose x rows are all contiguous is read in place (In == Acc), the others
// are packed through x_rows. `parallel` = false runs everything on the calling thread (a caller
// already inside a task). `in_place`, when given, is w itself: its full panels are read where
// they are (no copy; In == Acc) and only a partial last panel goes through w_rows. The products
// are the same either way. bias (N,) is in the accumulation type (AccVector converts a
// parameter once). y is Acc, or a 16-bit Out rounded once from the float sums (each task keeps
// its block in a float tile until its last K block). bfloat16 with Acc = float runs AMX tiles
// while amx_active(), else the vdpbf16ps layout while bf16_dot_active(). The AMX path loads and
// releases the calling thread's tile configuration per task: a caller must not hold tiles of
// its own across a packed_gemm call.
template <typename In, typename Acc = In, typename XRows, typename XRow, typename WRows, typename Out>
void packed_gemm(index_t M, index_t N, index_t K, const XRows& x_rows, const XRow& x_row, const WRows& w_rows,
                 const Acc* bias, Out* y, bool parallel = true, const InPlaceW<In>* in_place = nullptr) {
  if (M <= 0 || N <= 0) return;
  if (K == 0) {
    for (index_t m = 0; m < M; ++m)
      for (index_t n = 0; n < N; ++n) y[m * N + n] = store_as<Out>(bias ? bias[n] : Acc(0));
    return;
  }
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
  if constexpr (std::is_same<In, bf16>::value && std::is_same<Acc, float>::value)
    if (amx_active())
      return gemm_detail::packed_gemm_with<AmxLayout>(M, N, K, x_rows, x_row, w_rows, bias, y, parallel, in_place);
#endif
#if defined(__AVX512BF16__)
  if constexpr (std::is_same<In, bf16>::value && std::is_same<Acc, float>::value)
    if (bf16_dot_active())
      return gemm_detail::packed_gemm_with<Bf16PairLayout>(M, N, K, x_rows, x_row, w_rows, bias, y, parallel,
                                                            in_place);
#endif
  gemm_detail::packed_gemm_with<PackedLayout<In, Acc>>(M, N, K, x_rows, x_row, w_rows, bias, y, parallel, in_place);
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
