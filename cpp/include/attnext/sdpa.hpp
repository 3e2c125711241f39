// Fused scaled dot-product attention: out = softmax(Q K^T * scale + masks) V, flash-style.
//
// Memory stays O(threads x tile): the (L, S) score matrix is never built (unless the caller
// asks for the weights). Two paths, chosen by shape only:
// * sdpa/blocked.hpp, any L: queries in the SIMD lanes, keys in tiles, online softmax.
// * sdpa/decode.hpp, L <= kDecodeMaxQueries without weights: key chunks over all cores.
// Both build on sdpa/micro.hpp (the micro-kernels and packers, the only code that reads the
// input type) and use the same rules: mask.hpp's visible_keys and mask_scores/mask_tile,
// online_softmax.hpp's update, merge and lse, vmath.hpp's prob_exp. So lse, probabilities and
// the treatment of hidden keys do not depend on the path: a query row with no visible key
// gives zeros and lse -inf, and a hidden key's score, mask entry and value row never reach
// the output (also when they are NaN or inf).
//
// Every split (query blocks, key tiles, decode chunks) depends only on the shapes, so results
// are bit-identical for any thread count. Per-thread work buffers are scratch.hpp's: above
// 16 MB they are released after use.
//
// Dropout (dropout.hpp): every path applies the same coordinate rule to its probabilities
// after they entered the softmax sums, so lse and the normaliser are those of the undropped P,
// out = (P o Z / (1 - p)) V and the weights returned are P o Z / (1 - p). When it is inactive
// (p = 0) no kernel looks at it.
#pragma once

#include "dropout.hpp"
#include "lowp.hpp"
#include "sdpa/blocked.hpp"
#include "sdpa/decode.hpp"
#include "sdpa/micro.hpp"
#include "sdpa/problem.hpp"

namespace attnext {

// out (N..., L, Ev), weights (N..., L, S) or null, lse (N..., L) or null: all C-contiguous.
// In: the type of q, k and v; Acc: the type scores and sums are accumulated in, and of weights
// and lse (float for the 16-bit types); Out: the type of out (In, or Acc when a 16-bit call
// asks for a float32 output: written from the accumulators, never through In).
// drop: dropout with n = the flat C-order index of N...
template <typename In, typename Acc = acc_t<In>, typename Out = In>
void scaled_dot_product_attention(const SdpaProblem<In>& p, Out* out, Acc* weights, Acc* lse,
                                  const Dropout& drop = Dropout{}) {
  const index_t N = p.q.batch_count(2);
  const index_t L = p.q.dim(-2), Ev = p.v.dim(-1);
  // Empty outputs return at once (O(1)); with Ev = 0 only weights or lse need any work.
  if (N == 0 || L == 0 || (Ev == 0 && !weights && !lse)) return;
  if (L <= sdpa_detail::kDecodeMaxQueries && !weights) {
    sdpa_detail::decode<In, Acc, Out>(p, N, out, lse, drop);
    return;
  }
  sdpa_detail::blocked<In, Acc, Out>(p, N, out, weights, lse, drop);
}

}  // namespace attnext
