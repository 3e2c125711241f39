"""Batch broadcasting, its one function and its inverse (issue 12)."""

from __future__ import annotations

import numpy as np
import pytest

import attnext
from attnext._broadcast import broadcast_batch, reduce_to_shape

SHAPE_PAIRS = [
    ((3, 4), (2, 3, 4)),
    ((1, 4), (5, 4)),
    ((3, 1, 2), (4, 3, 5, 2)),
    ((), (2, 3)),
    ((1,), (0,)),
    ((2, 1, 1), (2, 3, 4)),
    ((4,), (4,)),
]


@pytest.mark.parametrize("shape, target", SHAPE_PAIRS)
def test_reduce_to_shape_is_the_adjoint_of_broadcasting(shape, target):
    # <broadcast(x), g> == <x, reduce(g)> for every x, g: reduce_to_shape is the transpose of
    # the linear map broadcast_to, which is what a gradient needs.
    rng = np.random.default_rng(1)
    x = rng.standard_normal(shape)
    g = rng.standard_normal(target)
    r = reduce_to_shape(g, shape)
    assert r.shape == shape and r.dtype == g.dtype
    np.testing.assert_allclose(np.sum(np.broadcast_to(x, target) * g), np.sum(x * r), rtol=1e-12, atol=1e-12)


def test_reduce_to_shape_keeps_dtype_and_refuses_non_broadcasts():
    g = np.ones((2, 3, 4), np.float32)
    assert reduce_to_shape(g, (3, 1)).dtype == np.float32
    np.testing.assert_array_equal(reduce_to_shape(g, (3, 1)), np.full((3, 1), 8, np.float32))
    assert reduce_to_shape(g, (2, 3, 4)) is g
    for bad in [(5, 4), (2, 3, 4, 1), (3, 3)]:
        with pytest.raises(ValueError, match="cannot come from broadcasting"):
            reduce_to_shape(g, bad)


def test_broadcast_batch_views_and_errors():
    q = np.zeros((3, 1, 5, 4))
    k = np.zeros((2, 6, 4))
    batch, b = broadcast_batch({"query": q, "key": k})
    assert batch == (3, 2)
    assert b["query"].shape == (3, 2, 5, 4) and b["key"].shape == (3, 2, 6, 4)
    assert np.shares_memory(b["query"], q) and b["key"].strides[0] == 0  # views, no copies
    same_batch, same = broadcast_batch({"a": np.zeros((2, 3, 3))})
    assert same_batch == (2,)
    with pytest.raises(ValueError, match=r"batch dimensions do not broadcast: query has shape \(3, 1, 5, 4\), "
                                         r"key has shape \(4, 2, 6, 4\)"):
        broadcast_batch({"query": q, "key": np.zeros((4, 2, 6, 4))})
    # per-argument trailing counts, and a fixed target
    batch, b = broadcast_batch({"x": np.zeros((2, 7)), "ok": np.zeros(2, bool)}, {"x": 1, "ok": 0}, to=(3, 2))
    assert batch == (3, 2) and b["x"].shape == (3, 2, 7) and b["ok"].shape == (3, 2)
    with pytest.raises(ValueError, match=r"do not broadcast to \(3,\)"):
        broadcast_batch({"x": np.zeros((2, 7))}, 1, to=(3,))


def test_projected_keys_broadcast_through_the_same_rule():
    rng = np.random.default_rng(2)
    keys = attnext.project_keys(rng.standard_normal((2, 5, 3)), rng.standard_normal((3, 4)))
    wide = keys.broadcast_to((6, 2))
    assert wide.batch_shape == (6, 2) and wide.projected.shape == (6, 2, 5, 4) and wide.projected.strides[0] == 0
    with pytest.raises(ValueError, match="batch dimensions do not broadcast"):
        keys.broadcast_to((6, 3))
    with pytest.raises(ValueError, match=r"key has batch shape \(2,\)"):
        q = rng.standard_normal((3, 2, 3))
        keys2 = attnext.project_keys(rng.standard_normal((2, 5, 3)), rng.standard_normal((3, 4)))
        attnext.additive_attention(q, keys2, rng.standard_normal((2, 5, 2)), rng.standard_normal((3, 4)), None,
                                   rng.standard_normal(4))


def test_batch_broadcasting_everywhere_matches_the_reference():
    rng = np.random.default_rng(3)
    q = rng.standard_normal((2, 1, 3, 4))
    k = rng.standard_normal((5, 6, 4))
    v = rng.standard_normal((1, 6, 3))
    want = attnext.reference.attention(q, k, v)
    np.testing.assert_allclose(attnext.attention(q, k, v), want, rtol=1e-12, atol=1e-12)
    v5 = np.broadcast_to(v, (5, 6, 3))  # SDPA, as PyTorch's, wants key and value of one batch shape
    np.testing.assert_allclose(attnext.scaled_dot_product_attention(q, k, v5), want, rtol=1e-12, atol=1e-12)
    wq, wk, vv = rng.standard_normal((4, 5)), rng.standard_normal((4, 5)), rng.standard_normal(5)
    np.testing.assert_allclose(attnext.additive_attention(q, k, v, wq, wk, vv),
                               attnext.reference.additive_attention(q, k, v, wq, wk, vv), rtol=1e-10, atol=1e-12)
