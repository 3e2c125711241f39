"""The softmax kernel under the shared rules (mask.hpp's visible_keys and mask_scores,
vmath.hpp's prob_exp): causal-hidden keys are hidden before the mask is read, any int64 causal
offset is safe, and a row's probabilities match the SDPA kernel's weights for the same scores."""

import numpy as np
import pytest

from attnext import _core

DTYPES = [np.float32, np.float64]
TOL = {np.float32: 2e-6, np.float64: 1e-14}


@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_mask_entry_on_causal_hidden_key_is_ignored(dtype):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 7, 9)).astype(dtype)
    mask = rng.standard_normal((2, 7, 9)).astype(dtype)
    clean = _core.softmax(x, mask, True, 1)
    dirty = mask.copy()
    i, j = np.indices((7, 9))
    dirty[:, j > i + 1] = np.nan
    got = _core.softmax(x, dirty, True, 1)
    np.testing.assert_array_equal(got, clean)
    assert np.isfinite(got).all()


@pytest.mark.parametrize("offset", [2**63 - 1, -(2**63), 2**62, -(2**62), 0, -3])
def test_any_int64_causal_offset(offset):
    x = np.random.default_rng(1).standard_normal((5, 6))
    got = _core.softmax(x, None, True, offset)
    i, j = np.indices((5, 6))
    keep = j <= i + offset if abs(offset) < 2**61 else np.full((5, 6), offset > 0)
    want = _core.softmax(x, np.ascontiguousarray(keep), False, 0)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_rows_equal_sdpa_weights(dtype):
    """One exponential: softmax of the scores equals the SDPA kernel's returned weights."""
    rng = np.random.default_rng(2)
    q = rng.standard_normal((20, 8)).astype(dtype)
    k = rng.standard_normal((37, 8)).astype(dtype)
    v = rng.standard_normal((37, 3)).astype(dtype)
    _, w, _ = _core.sdpa(q, k, v, None, True, 5, -1, -1, None, 1.0, True, False)
    s = (q.astype(np.float64) @ k.T.astype(np.float64)).astype(dtype)
    got = _core.softmax(s, None, True, 5)
    np.testing.assert_allclose(got, w, rtol=TOL[dtype] * 10, atol=TOL[dtype])
