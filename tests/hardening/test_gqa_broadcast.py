"""Grouped-query attention x batch broadcasting x mask shapes against the reference.

Query (*bq, Hq, L, E) and key/value (*bk, Hk, S, E) with batch shapes that broadcast against
each other (either side may lack axes or have size 1), Hq = group x Hk, and masks of every shape
that broadcasts against the scores (*b, Hq, L, S). The output has shape (*b, Hq, L, Ev). A mask
whose heads axis has Hk != Hq entries (and != 1) does not broadcast against the scores and is a
ValueError, as in PyTorch and the reference; so is a query/key batch pair that does not broadcast.
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import attnext
from attnext import reference as ref

from .harness import HIDES_EVERY_KEY
from .sdpa_cases import same_rows

sdpa = attnext.scaled_dot_product_attention

BATCH_PAIRS = [((), ()), ((3,), ()), ((), (3,)), ((3,), (1,)), ((1,), (3,)), ((2, 1), (1, 3)), ((2, 3), (3,)),
               ((3,), (2, 3)), ((1, 1), ())]


@st.composite
def gqa_cases(draw):
    bq, bk = draw(st.sampled_from(BATCH_PAIRS))
    hk = draw(st.integers(1, 3))
    group = draw(st.sampled_from([1, 2, 3]))
    hq = hk * group
    lq, lk = draw(st.sampled_from([1, 2, 5, 17, 20])), draw(st.sampled_from([0, 1, 3, 6, 18]))
    e, ev = draw(st.integers(1, 6)), draw(st.integers(1, 5))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    q = rng.standard_normal(bq + (hq, lq, e)).astype(dtype)
    k = rng.standard_normal(bk + (hk, lk, e)).astype(dtype)
    v = rng.standard_normal(bk + (hk, lk, ev)).astype(dtype)
    batch = np.broadcast_shapes(bq, bk)
    full = batch + (hq, lq, lk)
    # A mask shape: a suffix of the full scores shape with any axis possibly 1.
    ndim = draw(st.integers(2, len(full)))
    mshape = tuple(d if draw(st.booleans()) else 1 for d in full[len(full) - ndim:])
    kind = draw(st.sampled_from(["none", "bool", "float"]))
    mask = None if kind == "none" else (rng.random(mshape) < 0.7 if kind == "bool" else
                                        np.where(rng.random(mshape) < 0.3, -np.inf,
                                                 rng.standard_normal(mshape)).astype(dtype))
    causal = draw(st.sampled_from([False, True, "bottom_right"]))
    return q, k, v, mask, causal, full[:-1] + (ev,)


@pytest.mark.filterwarnings(HIDES_EVERY_KEY)
@settings(max_examples=60)
@given(case=gqa_cases())
def test_gqa_broadcast_masks_match_reference(case):
    q, k, v, mask, causal, shape = case
    gqa = q.shape[-3] != k.shape[-3]
    r_out, r_w = ref.scaled_dot_product_attention(q, k, v, mask, is_causal=causal, enable_gqa=gqa, return_weights=True)
    assert r_out.shape == shape
    out = sdpa(q, k, v, mask, is_causal=causal, enable_gqa=gqa)
    assert out.shape == shape, f"output shape {out.shape}, expected {shape}"
    assert not same_rows(out, r_out, q.dtype), same_rows(out, r_out, q.dtype)
    out, w = sdpa(q, k, v, mask, is_causal=causal, enable_gqa=gqa, return_weights=True)
    assert out.shape == shape and w.shape == r_w.shape
    assert not same_rows(out, r_out, q.dtype), same_rows(out, r_out, q.dtype)
    assert not same_rows(w, r_w, q.dtype), same_rows(w, r_w, q.dtype)


def test_issue_13_gqa_query_without_batch_key_with_batch():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((4, 2, 6))  # Hq = 4, L = 2
    k = rng.standard_normal((3, 2, 5, 6))  # B = 3, Hk = 2
    v = rng.standard_normal((3, 2, 5, 6))
    out = sdpa(q, k, v, enable_gqa=True)
    assert out.shape == (3, 4, 2, 6)
    np.testing.assert_allclose(out, ref.scaled_dot_product_attention(q, k, v, enable_gqa=True), rtol=1e-12, atol=1e-14)
    q3 = rng.standard_normal((4, 3, 6))  # L = 3 != Hk
    out = sdpa(q3, k, v, enable_gqa=True)
    np.testing.assert_allclose(out, ref.scaled_dot_product_attention(q3, k, v, enable_gqa=True), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("mask_heads", [2])
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_gqa_mask_with_kv_heads_is_refused(mask_heads, kind):
    rng = np.random.default_rng(1)
    q, k, v = rng.standard_normal((2, 4, 3, 5)), rng.standard_normal((2, 2, 7, 5)), rng.standard_normal((2, 2, 7, 5))
    m = rng.random((2, mask_heads, 3, 7)) < 0.5 if kind == "bool" else rng.standard_normal((2, mask_heads, 3, 7))
    with pytest.raises(ValueError):
        ref.scaled_dot_product_attention(q, k, v, m, enable_gqa=True)
    with pytest.raises(ValueError, match="attn_mask"):
        sdpa(q, k, v, m, enable_gqa=True)
    with pytest.raises(ValueError, match="attn_mask"):
        sdpa(q, k, v, m, enable_gqa=True, return_weights=True)


def test_batches_that_do_not_broadcast_are_refused():
    q, k = np.ones((2, 4, 3, 5)), np.ones((3, 2, 7, 5))
    with pytest.raises(ValueError, match="query|key"):
        sdpa(q, k, k, enable_gqa=True)
