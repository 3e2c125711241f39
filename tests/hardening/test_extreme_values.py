"""Extreme finite values against the reference (rule 3 of docs/robustness.md: a finite formula
gives the formula's answer): scores within a factor 1.05 of the float maximum, HuggingFace-style
masks filled with finfo.min, and a scale that would overflow if folded into the query
(q = 1e20, k = 1e-20, scale = 1e30). Each on the decode path (L <= 16) and the blocked path
(L > 16, or return_weights=True), and across every registry entry that takes a float mask.
"""

import numpy as np
import pytest

import attnext
from attnext import _core
from attnext import reference as ref

from .harness import relative_error, tolerance
from .kernels import FULL_OPTIONS, KERNELS, Case, check_against_reference

sdpa = attnext.scaled_dot_product_attention
LENGTHS = [1, 4, 16, 17, 40, 130]
# Per dtype: a factor whose square is just below the float maximum (scores up to ~0.95 max).
NEAR_MAX = {np.float32: 1.8e19, np.float64: 1.3e154}


def _near_max_inputs(dtype, l, s=23, seed=0):
    """E = 1, so each score is one product (rounded once, the same in every engine): scores
    spread over (-0.95, 0.95) x the float maximum."""
    rng = np.random.default_rng(seed)
    a = dtype(NEAR_MAX[dtype])
    q = (rng.uniform(-1, 1, (2, l, 1)) * a).astype(dtype)
    k = (rng.uniform(-1, 1, (2, s, 1)) * a).astype(dtype)
    v = rng.standard_normal((2, s, 3)).astype(dtype)
    return q, k, v


def _check(got, want, dtype, what):
    err = relative_error(got, want)
    assert err <= 10 * tolerance(dtype), f"{what}: relative error {err:.3g} (NaN/inf placement counts as inf)"


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("l", LENGTHS)
def test_scores_near_float_max(dtype, l):
    q, k, v = _near_max_inputs(dtype, l)
    with np.errstate(all="ignore"):
        r_out, r_w, r_lse = ref.scaled_dot_product_attention(q, k, v, scale=1.0, return_weights=True, return_lse=True)
    assert np.isfinite(r_out).all()
    out, lse = sdpa(q, k, v, scale=1.0, return_lse=True)
    _check(out, r_out, dtype, "output")
    _check(lse, r_lse, dtype, "lse")
    out, w = sdpa(q, k, v, scale=1.0, return_weights=True)
    _check(out, r_out, dtype, "output (return_weights)")
    _check(w, r_w, dtype, "weights")
    # attention() and softmax() of the same scores.
    _check(attnext.attention(q, k, v, method="dot"), r_out, dtype, "attention(method='dot')")
    s = ref.score(q, k, "dot")
    _check(attnext.softmax(s), r_w, dtype, "softmax")
    _check(_core.softmax(s), r_w, dtype, "_core.softmax")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("l", LENGTHS)
@pytest.mark.parametrize("causal", [False, True])
def test_huggingface_finfo_min_mask(dtype, l, causal):
    """An additive padding mask of finfo.min (not -inf): a row whose every key carries it gives
    the mean of V, as in the reference and PyTorch; other rows ignore those keys."""
    rng = np.random.default_rng(1)
    s = 19
    q, k, v = (rng.standard_normal(sh).astype(dtype) for sh in ((2, 3, l, 8), (2, 3, s, 8), (2, 3, s, 5)))
    m = np.zeros((2, 1, l, s), dtype)
    m[0, :, :, 7:] = np.finfo(dtype).min  # padding of batch entry 0
    m[1, :, ::3, :] = np.finfo(dtype).min  # rows with every key padded
    r_out, r_w = ref.scaled_dot_product_attention(q, k, v, m, is_causal=causal, return_weights=True)
    _check(sdpa(q, k, v, m, is_causal=causal), r_out, dtype, "output")
    out, w = sdpa(q, k, v, m, is_causal=causal, return_weights=True)
    _check(out, r_out, dtype, "output (return_weights)")
    _check(w, r_w, dtype, "weights")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("l", LENGTHS)
def test_scale_that_overflows_when_folded_into_query(dtype, l):
    """q * scale overflows but (q . k) * scale does not: the answer is the formula's."""
    big, small, scale = (1e20, 1e-20, 1e30) if dtype == np.float32 else (1e200, 1e-200, 1e300)
    rng = np.random.default_rng(2)
    q = (rng.standard_normal((1, 2, l, 4)) * big).astype(dtype)
    k = (rng.standard_normal((1, 2, 9, 4)) * small).astype(dtype)
    v = rng.standard_normal((1, 2, 9, 3)).astype(dtype)
    with np.errstate(all="ignore"):
        r_out, r_w = ref.scaled_dot_product_attention(q, k, v, scale=scale, return_weights=True)
    assert np.isfinite(r_out).all()
    _check(sdpa(q, k, v, scale=scale), r_out, dtype, "output")
    out, w = sdpa(q, k, v, scale=scale, return_weights=True)
    _check(out, r_out, dtype, "output (return_weights)")
    _check(w, r_w, dtype, "weights")
    _check(attnext.score(q, k, "dot", scale=scale), ref.score(q, k, "dot", scale=scale), dtype, "score")


MASKED = [k for k in KERNELS if k.uses_mask]


@pytest.mark.parametrize("kernel", MASKED, ids=lambda k: k.name)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("lq", [5, 17])
def test_finfo_min_masks_in_every_entry(kernel, dtype, lq):
    """Every entry taking a float mask, with masks holding finfo.min (some rows entirely)."""
    kw = kernel.make(Case(seed=8, dtype=dtype, mask="float", batch=(2, 3), lq=lq, lk=9, options=FULL_OPTIONS))
    name = "attn_mask" if "attn_mask" in kw else "mask"
    m = kw.get(name)
    if m is None:
        pytest.skip("this configuration draws no mask")
    rng = np.random.default_rng(3)
    m = np.where(rng.random(m.shape) < 0.4, np.finfo(m.dtype).min, 0).astype(m.dtype)
    if m.ndim >= 2 and m.shape[-2] > 1:
        m[..., ::4, :] = np.finfo(m.dtype).min
    with np.errstate(all="ignore"):
        check_against_reference(kernel, dict(kw, **{name: m}), tol_dtype=None)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_large_scores_in_additive_and_softmax_paths(dtype):
    """softmax of rows near the float maximum (and a finfo.min mask) equals the reference."""
    a = NEAR_MAX[dtype] ** 2 * 0.95
    x = (np.random.default_rng(4).uniform(-1, 1, (3, 17, 40)) * a).astype(dtype)
    m = np.zeros(x.shape, dtype)
    m[:, ::2, 5:] = np.finfo(dtype).min
    with np.errstate(all="ignore"):
        for mask in (None, m):
            _check(attnext.softmax(x, mask=mask), ref.softmax(x, mask=mask), dtype, f"softmax mask={mask is not None}")
