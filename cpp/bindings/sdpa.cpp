// Fused scaled dot-product attention.
#include <attnext/sdpa.hpp>

#include "common.hpp"
#include "dropout_args.hpp"
#include "sdpa_args.hpp"

#include <cstdint>
#include <limits>

namespace attnext {
namespace bind {

namespace {

// In: the inputs' type; Out: the output's (In, or float when a 16-bit call asks for float32).
// Weights and lse are of the accumulation type (float32 for 16-bit inputs).
template <typename In, typename Out>
py::tuple sdpa_impl(const py::array& q, const py::array& k, const py::array& v, const py::object& attn_mask,
                    bool causal, const py::object& causal_offset_arg, const py::object& window_left_arg,
                    const py::object& window_right_arg, const py::object& key_lengths, double scale,
                    bool return_weights, bool return_lse, double dropout_p, const py::object& seed) {
  using Acc = acc_t<In>;
  const Dropout drop = dropout_arg(dropout_p, seed);
  SdpaProblem<In> p = sdpa_problem<In>(q, k, v, attn_mask, causal, causal_offset_arg, window_left_arg,
                                       window_right_arg, scale);
  const index_t L = p.q.dim(-2), S = p.k.dim(-2);
  const std::vector<index_t> batch = batch_shape_with(p, {});
  const std::vector<index_t> score_shape = batch_shape_with(p, {L, S});
  const OwnedBatch<std::int64_t> lengths = own_key_lengths(key_lengths, batch, S);
  if (lengths.get()) p.key_lengths = lengths.view();
  py::array out = new_output_like<Out>(q, batch_shape_with(p, {L, p.v.dim(-1)}), "attention output");
  py::array_t<Acc> w, l;
  if (return_weights) w = new_output<Acc>(score_shape, "attention weights");
  if (return_lse) l = new_output<Acc>(batch_shape_with(p, {L}), "log-sum-exp");
  const py::object weights = return_weights ? py::object(w) : py::none();
  const py::object lse = return_lse ? py::object(l) : py::none();
  if (all_empty({&out, return_weights ? &w : nullptr, return_lse ? &l : nullptr}))
    return py::make_tuple(out, weights, lse);
  Out* op = data_of<Out>(out);
  Acc* wp = return_weights ? w.mutable_data() : nullptr;
  Acc* lp = return_lse ? l.mutable_data() : nullptr;
  {
    // Safe without the GIL: every array read or written is kept alive by this frame's
    // references (q, k, v, attn_mask, out, w, l), key_lengths is the binding's own copy, and
    // no Python object is touched.
    py::gil_scoped_release nogil;
    scaled_dot_product_attention<In, Acc, Out>(p, op, wp, lp, drop);
  }
  return py::make_tuple(out, weights, lse);
}

// The test hook behind tests/test_g1b_dropout.py: apply_dropout_tile on a 2-d array in place,
// its element (r, c) being (n, i0 + r, j0 + c), in whatever layout the array has (a transposed
// view is the blocked path's queries-in-lanes tile, a C-contiguous row the decode path's);
// with a second array of the same shape and strides, apply_dropout_tiles on both.
template <typename T>
void dropout_tile_impl(py::array& tile, const py::object& other, const Dropout& drop, std::uint64_t n, index_t i0,
                       index_t j0) {
  require_ndim(tile, "tile", 2, 2);
  if (!tile.writeable()) fail_value("tile must be writeable");
  const Strided<const T> t = view<T>(tile, "tile");
  if (i0 < 0 || j0 < 0) fail_value("i0 and j0 must be >= 0");
  T* a = static_cast<T*>(tile.mutable_data());
  if (other.is_none()) {
    apply_dropout_tile<T>(drop, n, i0, t.dim(0), j0, t.dim(1), a, t.stride(0), t.stride(1));
    return;
  }
  py::array second = require_array(other, "other");
  require_same_dtype(tile, "tile", second, "other");
  const Strided<const T> o = view<T>(second, "other");
  if (!second.writeable() || o.shape != t.shape || o.strides != t.strides)
    fail_value("other must be a writeable array of the shape and strides of tile");
  T* b = static_cast<T*>(second.mutable_data());
  apply_dropout_tiles<T>(drop, n, i0, t.dim(0), j0, t.dim(1), a, b, t.stride(0), t.stride(1));
}

}  // namespace

void register_sdpa(py::module_& m) {
  m.def(
      "_philox4x32_10",
      [](std::uint32_t c0, std::uint32_t c1, std::uint32_t c2, std::uint32_t c3, std::uint32_t key0,
         std::uint32_t key1) {
        const std::uint32_t ctr[4] = {c0, c1, c2, c3};
        std::uint32_t out[4];
        philox4x32_10(ctr, key0, key1, out);
        return py::make_tuple(out[0], out[1], out[2], out[3]);
      },
      py::arg("c0"), py::arg("c1"), py::arg("c2"), py::arg("c3"), py::arg("key0"), py::arg("key1"),
      "Testing hook: dropout.hpp's Philox4x32-10 of one counter (c0, c1, c2, c3) under key (key0, key1), "
      "as a tuple of four ints.");
  m.def(
      "_dropout_apply_tile",
      [](py::array tile, double dropout_p, const py::object& seed, const py::object& n, const py::object& i0,
         const py::object& j0, const py::object& other) {
        const Dropout drop = dropout_arg(dropout_p, seed);
        const std::uint64_t nn = uint64_arg(n, "n");
        const index_t ii = saturating_index(i0, "i0"), jj = saturating_index(j0, "j0");
        dispatch_wide(wide_float_dtype(tile, "tile", "_dropout_apply_tile"),
                      [&](auto t) { dropout_tile_impl<decltype(t)>(tile, other, drop, nn, ii, jj); });
      },
      py::arg("tile").noconvert(), py::arg("dropout_p"), py::arg("seed"), py::arg("n"), py::arg("i0"), py::arg("j0"),
      py::arg("other") = py::none(),
      "Testing hook: applies dropout to tile (rows, cols) in place, element (r, c) being (n, i0 + r, j0 + c) "
      "(multiplied by 1 / (1 - dropout_p) when kept, set to 0 when dropped); the same decisions to other, "
      "an array of tile's shape and strides, when given.");
  m.def(
      "sdpa",
      [](const py::array& q, const py::array& k, const py::array& v, const py::object& attn_mask, bool causal,
         const py::object& causal_offset, const py::object& window_left, const py::object& window_right,
         const py::object& key_lengths, double scale, bool return_weights, bool return_lse, double dropout_p,
         const py::object& seed, bool out_float32) -> py::tuple {
        return dispatch_out(float_dtype(q, "query"), out_float32, [&](auto in, auto out) {
          return sdpa_impl<decltype(in), decltype(out)>(q, k, v, attn_mask, causal, causal_offset, window_left,
                                                        window_right, key_lengths, scale, return_weights, return_lse,
                                                        dropout_p, seed);
        });
      },
      py::arg("query").noconvert(), py::arg("key").noconvert(), py::arg("value").noconvert(),
      py::arg("attn_mask") = py::none(), py::arg("causal") = false, py::arg("causal_offset") = 0,
      py::arg("window_left") = -1, py::arg("window_right") = -1, py::arg("key_lengths") = py::none(),
      py::arg("scale") = 1.0, py::arg("return_weights") = false, py::arg("return_lse") = false,
      py::arg("dropout_p") = 0.0, py::arg("seed") = 0, py::arg("out_float32") = false,
      "Fused attention softmax(query key^T * scale + masks) value: query (..., L, E), key (..., S, E), "
      "value (..., S, Ev) with equal batch shapes; attn_mask (..., L, S) bool (True = attend) or float (added); "
      "causal hides key j from query i when j > i + causal_offset; window_left/right bound i - j and j - i "
      "(-1 = unbounded); offsets and window sides are ints of any size; key_lengths (...,) int64. "
      "dropout_p in [0, 1] with seed (an int in [0, 2**64 - 1]) drops element (n, i, j) of the weights by "
      "dropout.hpp's Philox rule (n = the flat C-order index of the batch entry) and scales the kept ones by "
      "1 / (1 - p); lse is of the undropped weights, the weights returned are the dropped ones that multiplied "
      "value. float16 and bfloat16 inputs compute in float32 (a float mask is then float32): out in the inputs' "
      "dtype (float32 with out_float32), weights and lse float32. Returns (out, weights or None, lse or None).");
}

}  // namespace bind
}  // namespace attnext
