// One scaled dot-product attention problem, as the binding hands it to the kernels.
#pragma once

#include <cstdint>

#include "../lowp.hpp"
#include "../mask.hpp"
#include "../strided.hpp"

namespace attnext {

// All four operands share the batch axes N... (the binding checks it; the Python front
// broadcasts them with stride-0 views, which is also how GQA reaches here). In is the element
// type the kernels read: float, double, bf16 or f16.
template <typename In>
struct SdpaProblem {
  Strided<const In> q;   // (N..., L, E)
  Strided<const In> k;   // (N..., S, E)
  Strided<const In> v;   // (N..., S, Ev)
  Mask<acc_t<In>> mask;  // (N..., L, S) or kind none; float32 for a 16-bit call
  Causal causal;        // key j visible to query i iff j <= i + offset; any int64 offset
  index_t window_left = -1;   // query i sees keys >= i - left; -1 = unbounded; any size
  index_t window_right = -1;  // query i sees keys <= i + right; -1 = unbounded; any size
  Strided<const std::int64_t> key_lengths;  // (N...) keys >= length are padding; data null = none
  double scale = 1.0;  // converted to the accumulation type once per kernel call
};

// What hides keys by position in batch entry b (mask.hpp's visible_keys takes it).
template <typename In>
inline Visibility visibility(const SdpaProblem<In>& p, index_t b) {
  Visibility v;
  v.causal = p.causal;
  v.window_left = p.window_left;
  v.window_right = p.window_right;
  if (p.key_lengths.data) v.length = p.key_lengths.data[p.key_lengths.batch_offset(b, 0)];
  return v;
}

}  // namespace attnext
