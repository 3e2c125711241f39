"""The three steps (score, softmax, weighted_sum) and their composition (attention) against
the NumPy reference, over dtypes, layouts, odd shapes, broadcast batches and masks."""

from __future__ import annotations

import numpy as np
import pytest

import attnext
from attnext import reference as ref

from hardening.harness import BASIC_LAYOUTS as LAYOUTS
from hardening.harness import DTYPES, assert_close, layout, randn

SIZES = [1, 7, 33, 129]


def additive_params(rng, dq, dk, units, dtype):
    return dict(w_query=(randn(rng, (dq, units), dtype) / np.sqrt(dq)).astype(dtype),
                w_key=(randn(rng, (dk, units), dtype) / np.sqrt(dk)).astype(dtype), v=randn(rng, (units,), dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", ["dot", "scaled_dot", "general", "additive"])
@pytest.mark.parametrize("lq,lk", [(1, 1), (7, 33), (33, 7), (129, 1), (1, 129)])
def test_score_matches_reference(rng, dtype, method, lq, lk):
    dq, dk = (7, 7) if method in ("dot", "scaled_dot") else (7, 5)
    q, k = randn(rng, (2, 3, lq, dq), dtype), randn(rng, (2, 3, lk, dk), dtype)
    args = {}
    if method == "general":
        args["weight"] = randn(rng, (dq, dk), dtype)
    if method == "additive":
        args = additive_params(rng, dq, dk, 33, dtype)
    out = attnext.score(q, k, method, **args)
    assert out.shape == (2, 3, lq, lk) and out.dtype == dtype
    assert_close(out, ref.score(q, k, method, **args), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", LAYOUTS)
@pytest.mark.parametrize("method", ["scaled_dot", "general", "additive"])
def test_score_layouts(rng, dtype, kind, method):
    q, k = randn(rng, (3, 33, 7), dtype), randn(rng, (3, 129, 7), dtype)
    args = {"general": {"weight": randn(rng, (7, 7), dtype)}, "additive": additive_params(rng, 7, 7, 17, dtype)}.get(
        method, {})
    args = {name: layout(a, kind) for name, a in args.items()}
    out = attnext.score(layout(q, kind), layout(k, kind), method, **args)
    assert_close(out, ref.score(q, k, method, **args), dtype)


def test_score_scale_and_broadcast_batch(rng):
    q, k = randn(rng, (4, 1, 5, 8), np.float64), randn(rng, (3, 9, 8), np.float64)
    out = attnext.score(q, k, "dot", scale=0.25)
    assert out.shape == (4, 3, 5, 9)
    assert_close(out, ref.score(q, k, "dot", scale=0.25), np.float64)
    # scaled_dot defaults to 1/sqrt(Dk)
    assert_close(attnext.score(q, k), ref.score(q, k, "dot") / np.sqrt(8), np.float64)


def test_score_additive_has_no_4d_temporary(rng):
    # (8, 128, 128, 256) float32 would be 128 MiB; the kernel keeps only the projections.
    import tracemalloc

    q, k = randn(rng, (8, 128, 256), np.float32), randn(rng, (8, 128, 256), np.float32)
    p = additive_params(rng, 256, 256, 256, np.float32)
    tracemalloc.start()
    out = attnext.score(q, k, "additive", **p)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < out.nbytes + (8 << 20)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("kind", LAYOUTS)
def test_softmax_matches_reference(rng, dtype, n, kind):
    x = randn(rng, (3, 5, n), dtype) * 4
    out = attnext.softmax(layout(x, kind))
    assert out.dtype == dtype
    assert_close(out, ref.softmax(x), dtype)
    np.testing.assert_allclose(out.sum(axis=-1), 1, rtol=1e-5 if dtype == np.float32 else 1e-12)


@pytest.mark.parametrize("axis", [0, 1, -2, 2])
def test_softmax_axis(rng, axis):
    x = randn(rng, (4, 7, 33), np.float64)
    assert_close(attnext.softmax(x, axis=axis), ref.softmax(x, axis=axis), np.float64)


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_masks_broadcast(rng, dtype):
    x = randn(rng, (2, 3, 7, 33), dtype)
    keep = rng.random((1, 3, 1, 33)) > 0.4  # broadcast over batch and queries
    assert_close(attnext.softmax(x, mask=keep), ref.softmax(x, mask=keep), dtype)
    bias = randn(rng, (7, 33), dtype)  # float mask, added
    bias[:, ::5] = -np.inf
    assert_close(attnext.softmax(x, mask=bias), ref.softmax(x, mask=bias), dtype)
    out = attnext.softmax(x, mask=keep)
    assert np.all(out[np.broadcast_to(~keep, x.shape)] == 0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_fully_masked_rows_are_zero(rng, dtype):
    x = randn(rng, (4, 9), dtype)
    keep = np.ones((4, 9), dtype=bool)
    keep[1] = False
    out = attnext.softmax(x, mask=keep)
    assert np.all(out[1] == 0) and np.all(np.isfinite(out))
    x[2] = -np.inf
    out = attnext.softmax(x)
    assert np.all(out[2] == 0) and np.allclose(out[[0, 1, 3]].sum(-1), 1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_huge_scores_stay_finite(rng, dtype):
    x = randn(rng, (6, 129), dtype) * 1e4
    x[0, 3] = 1e4
    x[1, :] = -1e4
    x[2, ::2] = -np.inf
    out = attnext.softmax(x)
    assert np.all(np.isfinite(out))
    assert_close(out, ref.softmax(x), dtype)
    np.testing.assert_allclose(out.sum(-1), 1, rtol=1e-5)


def test_softmax_nan_stays_in_its_row():
    x = np.zeros((3, 5))
    x[1, 2] = np.nan
    out = attnext.softmax(x)
    assert np.all(np.isnan(out[1])) and np.all(np.isfinite(out[[0, 2]]))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", LAYOUTS)
@pytest.mark.parametrize("lq,lk,dv", [(1, 1, 1), (7, 33, 5), (129, 7, 33)])
def test_weighted_sum_matches_reference(rng, dtype, kind, lq, lk, dv):
    w = attnext.softmax(randn(rng, (2, lq, lk), dtype))
    v = randn(rng, (2, lk, dv), dtype)
    out = attnext.weighted_sum(layout(w, kind), layout(v, kind))
    assert out.shape == (2, lq, dv)
    assert_close(out, ref.weighted_sum(w, v), dtype)


def test_weighted_sum_broadcasts_value(rng):
    w = randn(rng, (4, 3, 5, 6), np.float64)
    v = randn(rng, (6, 2), np.float64)[None]  # (1, 6, 2) shared by every batch entry
    assert_close(attnext.weighted_sum(w, v), ref.weighted_sum(w, v), np.float64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", ["dot", "scaled_dot", "general", "additive"])
@pytest.mark.parametrize("is_causal", [False, True, "bottom_right"])
def test_attention_matches_reference(rng, dtype, method, is_causal):
    q, k, v = randn(rng, (2, 7, 6), dtype), randn(rng, (2, 9, 6), dtype), randn(rng, (2, 9, 5), dtype)
    args = {"general": {"weight": randn(rng, (6, 6), dtype)}, "additive": additive_params(rng, 6, 6, 11, dtype)}.get(
        method, {})
    mask = rng.random((1, 7, 9)) > 0.3
    out, w = attnext.attention(q, k, v, method=method, mask=mask, is_causal=is_causal, return_weights=True, **args)
    r_out, r_w = ref.attention(q, k, v, method=method, mask=mask, is_causal=is_causal, return_weights=True, **args)
    assert_close(out, r_out, dtype)
    assert_close(w, r_w, dtype)


def test_attention_promotes_mixed_dtypes(rng):
    q = randn(rng, (3, 4), np.float32)
    k = randn(rng, (5, 4), np.float64)
    v = randn(rng, (5, 2), np.float32)
    out = attnext.attention(q, k, v)
    assert out.dtype == np.float64
    half = attnext.softmax(q.astype(np.float16))
    assert half.dtype == np.float16  # float16 is returned as float16, NumPy's convention
    assert attnext.softmax(q.astype(np.float16), out_dtype=np.float32).dtype == np.float32


@pytest.mark.parametrize("dtype", DTYPES)
def test_sdpa_matches_reference_with_every_mask(rng, dtype):
    q, k, v = randn(rng, (2, 4, 7, 8), dtype), randn(rng, (2, 2, 33, 8), dtype), randn(rng, (2, 2, 33, 5), dtype)
    args = dict(attn_mask=rng.random((7, 33)) > 0.2, is_causal="bottom_right", enable_gqa=True,
                key_lengths=np.array([30, 12]), window=(20, 3), return_weights=True, return_lse=True)
    got, want = attnext.scaled_dot_product_attention(q, k, v, **args), ref.scaled_dot_product_attention(q, k, v, **args)
    for a, b in zip(got, want):
        finite = np.isfinite(b)
        assert np.array_equal(finite, np.isfinite(a))
        assert_close(np.where(finite, a, 0), np.where(finite, b, 0), dtype)


def test_sdpa_matches_torch(rng):
    torch = pytest.importorskip("torch")
    q, k, v = randn(rng, (2, 3, 7, 8), np.float64), randn(rng, (2, 3, 9, 8), np.float64), randn(rng, (2, 3, 9, 4),
                                                                                               np.float64)
    mask = rng.random((2, 1, 7, 9)) > 0.3
    mask[..., 0] = True  # torch gives NaN for rows with nothing to attend; keep one key
    for causal in (False, True):
        m = None if causal else mask
        want = torch.nn.functional.scaled_dot_product_attention(
            *map(torch.from_numpy, (q, k, v)), attn_mask=None if m is None else torch.from_numpy(m),
            is_causal=causal).numpy()
        assert_close(attnext.scaled_dot_product_attention(q, k, v, m, is_causal=causal), want, np.float64)


def test_results_do_not_depend_on_thread_count(rng):
    q, k, v = randn(rng, (3, 200, 16), np.float32), randn(rng, (3, 150, 16), np.float32), randn(rng, (3, 150, 8),
                                                                                               np.float32)
    p = additive_params(rng, 16, 16, 20, np.float32)
    before = attnext.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3, 8):
            attnext.set_num_threads(n)
            results.append((attnext.score(q, k, "additive", **p), attnext.softmax(q), attnext.attention(q, k, v)))
    finally:
        attnext.set_num_threads(before)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert np.array_equal(a, b)
