"""Grouped-query attention with batch broadcasting and every mask shape, against the reference
(issue 13, findings 7 and 8)."""

from __future__ import annotations

import zlib

import numpy as np
import pytest

import attnext
from attnext import reference as ref

TOL = {np.float32: 2e-5, np.float64: 1e-12}


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    if a.size == 0:
        return 0.0
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def test_finding_7_gqa_with_batch_broadcasting_has_the_right_shape():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((4, 2, 6))  # (Hq, L, E), no batch axis
    k = rng.standard_normal((3, 2, 5, 6))  # (B, Hk, S, E)
    v = rng.standard_normal((3, 2, 5, 6))
    out = attnext.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    assert out.shape == (3, 4, 2, 6)
    want = ref.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    assert want.shape == (3, 4, 2, 6)
    assert rel_err(out, want) <= TOL[np.float64]
    # L != Hk used to end in a NumPy "cannot reshape" that named no argument
    q3 = rng.standard_normal((4, 3, 6))
    out3 = attnext.scaled_dot_product_attention(q3, k, v, enable_gqa=True)
    assert out3.shape == (3, 4, 3, 6)
    assert rel_err(out3, ref.scaled_dot_product_attention(q3, k, v, enable_gqa=True)) <= TOL[np.float64]


def test_finding_7_errors_name_the_arguments():
    rng = np.random.default_rng(1)
    q = rng.standard_normal((2, 4, 3, 6))
    k = rng.standard_normal((3, 2, 5, 6))
    with pytest.raises(ValueError, match=r"batch dimensions do not broadcast: query has shape \(2, 4, 3, 6\), "
                                         r"key has shape \(3, 2, 5, 6\)"):
        attnext.scaled_dot_product_attention(q, k, k, enable_gqa=True)
    with pytest.raises(ValueError, match=r"enable_gqa needs query heads to be a multiple of key heads"):
        attnext.scaled_dot_product_attention(rng.standard_normal((3, 3, 6)), k, k, enable_gqa=True)


def test_finding_8_a_mask_with_kv_heads_is_refused():
    rng = np.random.default_rng(2)
    q = rng.standard_normal((2, 4, 3, 6))
    k = rng.standard_normal((2, 2, 5, 6))
    for mask in (rng.random((2, 3, 5)) < 0.7, rng.standard_normal((2, 2, 3, 5))):  # Hk = 2 heads, not Hq = 4
        with pytest.raises(ValueError, match=r"attn_mask has shape .* which does not broadcast to the scores' "
                                             r"shape \(2, 4, 3, 5\)"):
            attnext.scaled_dot_product_attention(q, k, k, mask, enable_gqa=True)
        with pytest.raises(ValueError):
            ref.scaled_dot_product_attention(q, k, k, mask, enable_gqa=True)


BATCHES = [  # (query batch, key batch): the axes before the heads
    ((), ()),
    ((), (3,)),
    ((3,), ()),
    ((1,), (3,)),
    ((2, 1), (3,)),
    ((2, 3), (1, 3)),
]
MASKS = ["none", "LS", "HqLS", "1LS", "BHqLS", "B1LS", "key_only"]


def _mask_shape(kind, batch, hq, lq, lk):
    return {"LS": (lq, lk), "HqLS": (hq, lq, lk), "1LS": (1, lq, lk), "BHqLS": batch + (hq, lq, lk),
            "B1LS": batch + (1, 1, lk), "key_only": (lk,)}[kind]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("mask_dtype", ["bool", "float"])
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("qb, kb", BATCHES)
def test_gqa_batch_broadcasting_mask_shapes_against_reference(qb, kb, mask_kind, mask_dtype, dtype):
    # crc32 of the case's text: hash() of a str is salted per process, so it gave each CI run other inputs
    rng = np.random.default_rng(zlib.crc32(repr((qb, kb, mask_kind, mask_dtype)).encode()))
    hq, hk, lq, lk, e = 6, 2, 3, 7, 5
    q = rng.standard_normal(qb + (hq, lq, e)).astype(dtype)
    k = rng.standard_normal(kb + (hk, lk, e)).astype(dtype)
    v = rng.standard_normal(kb + (hk, lk, 4)).astype(dtype)
    batch = np.broadcast_shapes(qb, kb)
    mask = None
    if mask_kind != "none":
        shape = _mask_shape(mask_kind, batch, hq, lq, lk)
        mask = rng.random(shape) < 0.7 if mask_dtype == "bool" else rng.standard_normal(shape).astype(dtype)
    lengths = None if not batch else rng.integers(0, lk + 1, size=batch)
    for kwargs in ({}, {"is_causal": "bottom_right"}, {"key_lengths": lengths}, {"window": (1, 0)}):
        # a random mask may hide every key of a batch entry: that case is under test, its warning is not
        got = attnext.scaled_dot_product_attention(q, k, v, mask, enable_gqa=True, return_weights=True,
                                                   return_lse=True, warn=False, **kwargs)
        want = ref.scaled_dot_product_attention(q, k, v, mask, enable_gqa=True, return_weights=True,
                                                return_lse=True, **kwargs)
        assert got[0].shape == batch + (hq, lq, 4)
        for g, w in zip(got, want):
            assert g.shape == w.shape and g.dtype == dtype
            fin = np.isfinite(w)
            assert np.array_equal(fin, np.isfinite(g)), kwargs
            assert np.array_equal(g[~fin], w[~fin])
            assert rel_err(np.where(fin, g, 0), np.where(fin, w, 0)) <= TOL[dtype], kwargs


def test_gqa_output_of_grouped_heads_equals_repeated_heads():
    # enable_gqa is exactly SDPA with key/value heads repeated G times (no copies made for it)
    rng = np.random.default_rng(5)
    q = rng.standard_normal((2, 8, 4, 6))
    k = rng.standard_normal((2, 2, 9, 6))
    v = rng.standard_normal((2, 2, 9, 3))
    got = attnext.scaled_dot_product_attention(q, k, v, enable_gqa=True, is_causal=True)
    want = attnext.scaled_dot_product_attention(q, np.repeat(k, 4, axis=1), np.repeat(v, 4, axis=1), is_causal=True)
    assert rel_err(got, want) <= 1e-12
