"""Kernels against the reference twin in float16 and bfloat16 (issue 17's correctness matrix):
masks, causal in both alignments, windows, key lengths, GQA, strided inputs and rows with
nothing to attend, for every public function that takes 16-bit inputs, on both bfloat16 product
paths (vdpbf16ps where the CPU has it, and the float32 fallback).

The reference applies the same rounding points to an exact (float64) computation; the
tolerance is ``low_precision_tolerance(dtype, roundings) * scale`` (docs/precision.md): one
unit in the last place per rounding point at which the two may land on either side of a
rounding boundary, times the magnitude of what is being rounded.
"""

from __future__ import annotations

import numpy as np
import pytest

import attnext
from attnext import _core
from attnext import reference as ref
from conftest import BF16_CAPS, bf16_cap
from hardening.harness import assert_low_precision_close as check
from hardening.harness import layout, low_precision_tolerance

ml_dtypes = pytest.importorskip("ml_dtypes")
BF16 = np.dtype(ml_dtypes.bfloat16)
F16, F32 = np.dtype(np.float16), np.dtype(np.float32)


@pytest.fixture(params=[("float16", "auto")] + [("bfloat16", cap) for cap in BF16_CAPS],
                ids=["float16"] + [f"bfloat16-{cap}" for cap in BF16_CAPS])
def dtype(request):
    """The 16-bit type of a test, with the bfloat16 product path it runs on (restored after)."""
    name, cap = request.param
    with bf16_cap(cap):
        yield F16 if name == "float16" else BF16


def normal(rng, shape, dtype, kind="C"):
    return layout(rng.standard_normal(shape).astype(dtype), kind)


def mask_for(rng, kind, shape):
    if kind == "none":
        return None
    if kind == "bool":
        m = rng.random(shape) < 0.7
        m[..., 0, :] = False  # a row with nothing to attend
        return m
    m = rng.standard_normal(shape).astype(np.float32)
    if kind == "float_ninf":
        m[rng.random(shape) < 0.3] = -np.inf
        m[..., 1, :] = -np.inf
    return m


def sdpa_both(dtype, *args, out_dtype=None, **kw):
    """(attnext, reference) results of the same SDPA call, each as a tuple."""
    got = attnext.scaled_dot_product_attention(*args, out_dtype=out_dtype, **kw)
    want = ref.scaled_dot_product_attention(*args, out_dtype=out_dtype, **kw)
    return (got if isinstance(got, tuple) else (got,)), (want if isinstance(want, tuple) else (want,))


def check_sdpa(dtype, q, k, v, out_dtype=None, **kw):
    got, want = sdpa_both(dtype, q, k, v, out_dtype=out_dtype, return_weights=True, return_lse=True, **kw)
    scale = float(np.abs(v.astype(np.float64)).max())
    # bfloat16: the store and P (rounded against different maxima); float16: the store only.
    check(got[0], want[0], dtype, 2 if dtype == BF16 else 1, scale, "output")
    check(got[1], want[1], dtype, 0, 1.0, "weights")
    finite = np.isfinite(want[2])
    np.testing.assert_array_equal(np.isfinite(got[2]), finite)
    check(got[2][finite], want[2][finite], dtype, 0, max(1.0, float(np.abs(want[2][finite]).max(initial=0))), "lse")
    return got


@pytest.mark.parametrize("mask", ["none", "bool", "float", "float_ninf"])
@pytest.mark.parametrize("causal", [False, True, "bottom_right"])
def test_sdpa_masks_and_causal(rng, dtype, mask, causal):
    q, k, v = normal(rng, (2, 3, 37, 16), dtype), normal(rng, (2, 3, 70, 16), dtype), normal(rng, (2, 3, 70, 8), dtype)
    got = check_sdpa(dtype, q, k, v, attn_mask=mask_for(rng, mask, (2, 3, 37, 70)), is_causal=causal)
    if mask in ("bool", "float_ninf"):  # the row with nothing to attend: zeros, never NaN
        empty = 0 if mask == "bool" else 1
        assert np.all(got[0][..., empty, :].astype(np.float32) == 0) and np.all(got[1][..., empty, :] == 0)


@pytest.mark.parametrize("out_dtype", [None, np.float32])
@pytest.mark.parametrize("lq", [1, 3, 130])
def test_sdpa_window_key_lengths_and_decode(rng, dtype, lq, out_dtype):
    q, k, v = normal(rng, (3, 2, lq, 32), dtype), normal(rng, (3, 2, 150, 32), dtype), normal(rng, (3, 2, 150, 16), dtype)
    lengths = np.array([0, 5, 150])  # the first batch row attends to nothing
    got = check_sdpa(dtype, q, k, v, out_dtype, key_lengths=lengths, window=(40, 3), is_causal="bottom_right")
    assert np.all(got[0][0].astype(np.float32) == 0)
    assert got[0].dtype == (F32 if out_dtype else dtype)


@pytest.mark.parametrize("kind", ["F", "strided", "negative"])
def test_sdpa_gqa_and_strided_inputs(rng, dtype, kind):
    q = normal(rng, (2, 4, 21, 16), dtype, kind)
    k, v = normal(rng, (2, 2, 33, 16), dtype, kind), normal(rng, (2, 2, 33, 16), dtype, kind)
    check_sdpa(dtype, q, k, v, enable_gqa=True, attn_mask=mask_for(rng, "bool", (2, 4, 21, 33)))
    check_sdpa(dtype, q, k, v, enable_gqa=True, scale=0.3, is_causal=True)


def test_sdpa_scale_above_one_is_applied_to_the_scores(rng, dtype):
    # |scale| > 1 with finite Q * scale still folds (the overflow rule); with Q ~ 1e10 a scale
    # of 1e30 overflows float32 in Q * scale, so the scores (Q K ~ 1e-10) are scaled after the
    # products instead, to ~1e20.
    q, k, v = normal(rng, (1, 2, 9, 8), dtype), normal(rng, (1, 2, 11, 8), dtype), normal(rng, (1, 2, 11, 8), dtype)
    check_sdpa(dtype, q, k, v, scale=3.0)
    if dtype == BF16:  # float16 cannot hold these magnitudes; bfloat16 has float32's range
        big, tiny = (q.astype(np.float64) * 1e10).astype(dtype), (k.astype(np.float64) * 1e-20).astype(dtype)
        check_sdpa(dtype, big, tiny, v, scale=1e30)


@pytest.mark.parametrize("out_dtype", [None, np.float32])
@pytest.mark.parametrize("method", ["dot", "scaled_dot", "general", "additive"])
def test_score(rng, dtype, method, out_dtype):
    q, k = normal(rng, (2, 6, 8), dtype, "strided"), normal(rng, (2, 9, 8), dtype)
    extra = {"general": dict(weight=normal(rng, (8, 8), dtype)),
             "additive": dict(w_query=normal(rng, (8, 5), dtype), w_key=normal(rng, (8, 5), dtype),
                              v=normal(rng, (5,), dtype))}.get(method, {})
    got = attnext.score(q, k, method, out_dtype=out_dtype, **extra)
    want = ref.score(q, k, method, out_dtype=out_dtype, **extra)
    check(got, want, dtype, 1, float(np.abs(want.astype(np.float64)).max()), method)


@pytest.mark.parametrize("mask", ["none", "bool", "float_ninf"])
@pytest.mark.parametrize("axis", [-1, 1])
def test_softmax(rng, dtype, mask, axis):
    x = normal(rng, (3, 7, 12), dtype, "F") * np.asarray(4, dtype)
    m = mask_for(rng, mask, (3, 7, 12))
    for out_dtype in (None, np.float32):
        check(attnext.softmax(x, mask=m, axis=axis, out_dtype=out_dtype),
              ref.softmax(x, mask=m, axis=axis, out_dtype=out_dtype), dtype, 1, 1.0, "softmax")


def test_weighted_sum(rng, dtype):
    w, v = normal(rng, (2, 5, 40), dtype, "negative"), normal(rng, (1, 40, 6), dtype)
    for out_dtype in (None, np.float32):
        want = ref.weighted_sum(w, v, out_dtype=out_dtype)
        scale = float((np.abs(w.astype(np.float64)) @ np.abs(v.astype(np.float64))).max())
        check(attnext.weighted_sum(w, v, out_dtype=out_dtype), want, dtype, 1, scale, "weighted_sum")


@pytest.mark.parametrize("method", ["scaled_dot", "general", "additive"])
def test_attention(rng, dtype, method):
    q, k, v = normal(rng, (2, 9, 8), dtype), normal(rng, (2, 13, 8), dtype), normal(rng, (2, 13, 4), dtype)
    extra = {"general": dict(weight=normal(rng, (8, 8), dtype) * np.asarray(0.3, dtype)),
             "additive": dict(w_query=normal(rng, (8, 5), dtype), w_key=normal(rng, (8, 5), dtype),
                              v=normal(rng, (5,), dtype), scale=0.5)}.get(method, {})
    kw = dict(method=method, attn_mask=mask_for(rng, "bool", (2, 9, 13)), key_lengths=np.array([13, 4]),
              is_causal="bottom_right", return_weights=True, **extra)
    got, want = attnext.attention(q, k, v, **kw), ref.attention(q, k, v, **kw)
    scale = float(np.abs(v.astype(np.float64)).max())
    check(got[0], want[0], dtype, 2 if dtype == BF16 and method != "additive" else 1, scale, "context")
    # general's q W is rounded to the inputs' type by both; scores from it agree to float32's
    # arithmetic, so the weights do too.
    check(got[1], want[1], dtype, 0, 1.0, "weights")


@pytest.mark.parametrize("projected", [False, True])
def test_additive_attention(rng, dtype, projected):
    q, k, v = normal(rng, (2, 7, 6), dtype, "strided"), normal(rng, (2, 11, 6), dtype), normal(rng, (2, 11, 3), dtype)
    wq, wk, vv = normal(rng, (6, 5), dtype), normal(rng, (6, 5), dtype), normal(rng, (5,), dtype)
    bias = rng.standard_normal(5).astype(np.float32).astype(dtype)
    key, w_key = (attnext.project_keys(k, wk), None) if projected else (k, wk)
    kw = dict(bias=bias, attn_mask=mask_for(rng, "float_ninf", (2, 7, 11)), key_lengths=np.array([11, 0]),
              is_causal=True, return_weights=True)
    for out_dtype in (None, np.float32):
        got = attnext.additive_attention(q, key, v, wq, w_key, vv, out_dtype=out_dtype, **kw)
        want = ref.additive_attention(q, k, v, wq, wk, vv, out_dtype=out_dtype, **kw)
        check(got[0], want[0], dtype, 1, float(np.abs(v.astype(np.float64)).max()), "context")
        check(got[1], want[1], dtype, 0, 1.0, "weights")
        assert np.all(got[0][1].astype(np.float32) == 0)  # key length 0: nothing to attend


# MultiHeadAttention rounds Q, K, V and the attention output to the 16-bit type between its
# kernels; values on either side of a boundary there move what follows by an ulp of theirs.
# Counted: the store of each (4), SDPA's own two, the output projection's store (1), and one
# more for the projections of near-boundary values amplified through the softmax.
MHA_ROUNDINGS = 8


def mha_reference(layer, x, out_dtype=None, **kw):
    state = layer.state_dict()
    w = state["in_proj_weight"]
    e, kv = layer.embed_dim, layer.num_kv_heads * layer.head_dim
    b = state.get("in_proj_bias")
    biases = {} if b is None else dict(q_bias=b[:e], k_bias=b[e:e + kv], v_bias=b[e + kv:],
                                        out_bias=state["out_proj.bias"])
    return ref.multi_head_attention(x, x, x, layer.num_heads, w[:e], w[e:e + kv], w[e + kv:],
                                    state["out_proj.weight"], num_kv_heads=layer.num_kv_heads, out_dtype=out_dtype,
                                    **biases, **kw)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2)])
def test_multi_head_attention(rng, dtype, heads, kv_heads):
    layer = attnext.MultiHeadAttention(32, heads, num_kv_heads=kv_heads, dtype=dtype, rng=5)
    state = layer.state_dict()
    state["in_proj_bias"] = normal(rng, state["in_proj_bias"].shape, dtype)
    layer.load_state_dict(state)
    x = normal(rng, (2, 19, 32), dtype)
    key_mask = np.arange(19) < np.array([[19], [7]])
    for out_dtype in (None, np.float32):
        out, w = layer(x, key_mask=key_mask, is_causal=True, need_weights=True, average_attn_weights=False,
                       out_dtype=out_dtype)
        want, want_w = mha_reference(layer, x, out_dtype, key_mask=key_mask, is_causal=True)
        scale = float(np.abs(want.astype(np.float64)).max())
        check(out, want, dtype, MHA_ROUNDINGS, scale, "output")
        assert w.dtype == F32
        np.testing.assert_allclose(w, want_w, rtol=0, atol=low_precision_tolerance(dtype, MHA_ROUNDINGS))


def test_step_with_a_16_bit_cache_matches_the_full_causal_pass(rng, dtype):
    layer = attnext.MultiHeadAttention(16, 4, num_kv_heads=2, dtype=dtype, rng=6)
    x = normal(rng, (2, 9, 16), dtype)
    full, _ = layer(x, is_causal=True)
    cache = attnext.KVCache(dtype=dtype)
    steps = [layer.step(x[:, :4], cache)] + [layer.step(x[:, t], cache)[:, None] for t in range(4, 9)]
    got = np.concatenate(steps, axis=1)
    assert got.dtype == dtype and cache.keys.dtype == dtype
    # The same rounding points in both; only the tiling of the keys differs (decode path).
    check(got, full, dtype, 2, float(np.abs(full.astype(np.float64)).max()), "step")
    check(layer.step(x[:, 0], attnext.KVCache(dtype=dtype), out_dtype=np.float32),
          full[:, 0].astype(np.float32), dtype, 2, float(np.abs(full.astype(np.float64)).max()), "out_dtype")
