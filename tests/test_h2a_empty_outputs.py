"""A call whose every output is empty returns at once: no kernel work, no key projections
(issue 13, finding 4). The inputs behind the empty outputs are huge stride-0 views, so any
work proportional to them would take minutes and show as a timeout here."""
import time

import numpy as np
import pytest

import attnext
from attnext import _core

HUGE = 2**34  # keys (or rows) behind the empty output: any per-key loop would take minutes


def huge(shape, dtype=np.float64):
    return np.broadcast_to(np.ones((), dtype), shape)


def quick(call, limit=2.0):
    start = time.perf_counter()
    result = call()
    assert time.perf_counter() - start < limit
    return result


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sdpa_empty_value_dim(dtype):
    q, k, v = huge((1, 3, 4), dtype), huge((1, HUGE, 4), dtype), huge((1, HUGE, 0), dtype)
    out, w, lse = quick(lambda: _core.sdpa(q, k, v, None, False, 0, -1, -1, np.array([5]), 0.5, False, False))
    assert out.shape == (1, 3, 0) and out.dtype == dtype and w is None and lse is None
    out = quick(lambda: attnext.scaled_dot_product_attention(q, k, v, is_causal="bottom_right"))
    assert out.shape == (1, 3, 0)


def test_sdpa_empty_queries_with_weights_and_lse():
    q, k, v = huge((2, 0, 4)), huge((2, HUGE, 4)), huge((2, HUGE, 3))
    out, w, lse = quick(lambda: _core.sdpa(q, k, v, None, True, 0, -1, -1, None, 1.0, True, True))
    assert out.shape == (2, 0, 3) and w.shape == (2, 0, HUGE) and lse.shape == (2, 0)


def test_sdpa_lse_still_computed_when_only_the_output_is_empty():
    rng = np.random.default_rng(0)
    q, k = rng.standard_normal((2, 3, 4)), rng.standard_normal((2, 5, 4))
    v = np.zeros((2, 5, 0))
    out, w, lse = _core.sdpa(q, k, v, None, False, 0, -1, -1, None, 0.5, True, True)
    s = q @ k.transpose(0, 2, 1) * 0.5
    expected_lse = np.log(np.exp(s).sum(-1))
    np.testing.assert_allclose(lse, expected_lse, rtol=1e-12)
    np.testing.assert_allclose(w, np.exp(s - expected_lse[..., None]), rtol=1e-12)
    assert out.shape == (2, 3, 0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_additive_empty_value_dim_builds_no_projection(dtype):
    q = huge((2, 3, 4), dtype)
    key, value = huge((2, HUGE, 5), dtype), huge((2, HUGE, 0), dtype)
    wq, wk, v = np.ones((4, 6), dtype), np.ones((5, 6), dtype), np.ones(6, dtype)
    out = quick(lambda: _core.additive_attention_keys(q, wq, None, key, wk, value, v, None, None, False))
    assert out.shape == (2, 3, 0) and out.dtype == dtype
    out = quick(lambda: attnext.additive_attention(q, key, value, wq, wk, v))
    assert out.shape == (2, 3, 0)


def test_additive_empty_queries_with_weights():
    q = huge((2, 0, 4))
    key, value = huge((2, HUGE, 5)), huge((2, HUGE, 3))
    out, w = quick(lambda: _core.additive_attention_keys(q, np.ones((4, 6)), None, key, np.ones((5, 6)), value,
                                                         np.ones(6), None, None, True))
    assert out.shape == (2, 0, 3) and w.shape == (2, 0, HUGE)


def test_additive_keys_empty():
    raw, expo, ok = quick(lambda: _core.additive_keys(huge((0, HUGE, 5)), np.ones((5, 6))))
    assert raw.shape == expo.shape == (0, HUGE, 6) and ok.shape == (0,)


def test_other_entries_empty():
    assert quick(lambda: _core.score_product(huge((3, 0, HUGE)), huge((3, 4, HUGE)))).shape == (3, 0, 4)
    assert quick(lambda: _core.score_additive(huge((HUGE, 0, 4)), huge((HUGE, 2, 5)), np.ones((4, 6)),
                                              np.ones((5, 6)), np.ones(6))).shape == (HUGE, 0, 2)
    assert quick(lambda: _core.softmax(huge((HUGE, 0)))).shape == (HUGE, 0)
    assert quick(lambda: _core.weighted_sum(huge((2, 3, HUGE)), huge((2, HUGE, 0)))).shape == (2, 3, 0)
    assert quick(lambda: _core.linear(huge((2, 3, 1, HUGE)), huge((0, HUGE)), None)).shape == (2, 3, 0)
