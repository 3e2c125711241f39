"""The undocumented exceptions of issue 13, each now a documented TypeError/ValueError or an
accepted input."""

from __future__ import annotations

import numpy as np
import pytest

import attnext

rng = np.random.default_rng(0)
Q = rng.standard_normal((2, 3, 4))
K = rng.standard_normal((2, 5, 4))
V = rng.standard_normal((2, 5, 3))


def test_torch_tensor_requiring_grad_points_to_attnext_torch():
    torch = pytest.importorskip("torch")
    q = torch.tensor(Q, requires_grad=True)
    for call in (lambda: attnext.scaled_dot_product_attention(q, K, V),
                 lambda: attnext.attention(Q, K, V, mask=torch.ones(3, 5, requires_grad=True)),
                 lambda: attnext.softmax(q),
                 lambda: attnext.MultiHeadAttention(4, 2, dtype=np.float64)(q)):
        with pytest.raises(TypeError, match=r"requires grad.*attnext\.torch"):
            call()
    # a tensor without requires_grad converts as before
    out = attnext.scaled_dot_product_attention(torch.tensor(Q), K, V)
    np.testing.assert_allclose(out, attnext.scaled_dot_product_attention(Q, K, V))


def test_masked_arrays_are_refused_with_the_convention_explained():
    masked = np.ma.masked_array(Q, mask=Q > 1)
    with pytest.raises(TypeError, match=r"masked array.*True = may attend"):
        attnext.scaled_dot_product_attention(masked, K, V)
    with pytest.raises(TypeError, match=r"attn_mask is a numpy.ma masked array"):
        attnext.scaled_dot_product_attention(Q, K, V, np.ma.masked_array(np.ones((3, 5), bool)))
    with pytest.raises(TypeError, match=r"masked array"):
        attnext.softmax(np.ma.masked_array(Q))


@pytest.mark.parametrize("p, error, match", [
    (np.zeros(2), TypeError, "dropout_p must be a real number"),
    ("0", TypeError, "dropout_p must be a real number"),
    (None, TypeError, "dropout_p must be a real number"),
    (-0.5, ValueError, r"dropout_p must lie in \[0, 1\]"),
    (1.5, ValueError, r"dropout_p must lie in \[0, 1\]"),
    (float("nan"), ValueError, r"dropout_p must lie in \[0, 1\]"),
])
def test_dropout_p_errors(p, error, match):
    with pytest.raises(error, match=match):
        attnext.scaled_dot_product_attention(Q, K, V, dropout_p=p)


def test_dropout_p_zero_in_every_spelling():
    want = attnext.scaled_dot_product_attention(Q, K, V)
    for p in (0, 0.0, np.float64(0), np.array(0.0), np.int64(0)):
        np.testing.assert_array_equal(attnext.scaled_dot_product_attention(Q, K, V, dropout_p=p), want)


@pytest.mark.parametrize("axis, error", [(None, TypeError), ((0, 1), TypeError), (True, TypeError),
                                         (1.0, TypeError), (3, ValueError), (-4, ValueError)])
def test_softmax_axis_must_be_one_int(axis, error):
    with pytest.raises(error, match="axis"):
        attnext.softmax(Q, axis=axis)


def test_softmax_numpy_int_axis():
    np.testing.assert_array_equal(attnext.softmax(Q, axis=np.int64(1)), attnext.softmax(Q, axis=1))


@pytest.mark.parametrize("scale", ["2", b"2", True, np.bool_(True), [2.0], np.ones(2), 1j])
def test_scale_must_be_a_real_number(scale):
    with pytest.raises(TypeError, match="scale must be a real number"):
        attnext.scaled_dot_product_attention(Q, K, V, scale=scale)
    with pytest.raises(TypeError, match="scale must be a real number"):
        attnext.score(Q, K, scale=scale)


def test_scale_numbers_accepted():
    want = attnext.scaled_dot_product_attention(Q, K, V, scale=2.0)
    for s in (2, np.float32(2), np.int64(2), np.array(2.0)):
        np.testing.assert_array_equal(attnext.scaled_dot_product_attention(Q, K, V, scale=s), want)


@pytest.mark.parametrize("window", [(True, False), (np.True_, 1), (1, 2.0), (-1, 0), (1,), 3, "ab"])
def test_window_refusals(window):
    with pytest.raises(ValueError, match="window"):
        attnext.scaled_dot_product_attention(Q, K, V, window=window)


def test_numpy_bools_and_ints_are_accepted():
    want = attnext.scaled_dot_product_attention(Q, K, V, is_causal=True)
    np.testing.assert_array_equal(attnext.scaled_dot_product_attention(Q, K, V, is_causal=np.True_), want)
    np.testing.assert_array_equal(attnext.scaled_dot_product_attention(Q, K, V, is_causal=np.False_),
                                  attnext.scaled_dot_product_attention(Q, K, V))
    np.testing.assert_array_equal(attnext.attention(Q, K, V, is_causal=np.True_), want)
    with pytest.raises(ValueError, match="is_causal must be"):
        attnext.scaled_dot_product_attention(Q, K, V, is_causal="yes")
    with pytest.raises(ValueError, match="is_causal must be"):
        attnext.scaled_dot_product_attention(Q, K, V, is_causal=np.array([True, False]))
    np.testing.assert_array_equal(
        attnext.scaled_dot_product_attention(Q, K, V, window=(np.int64(1), np.int32(0))),
        attnext.scaled_dot_product_attention(Q, K, V, window=(1, 0)))


def test_numpy_int_thread_counts():
    # The core checks n (h2a's bindings: ints and np.integer in [1, thread_cap]); a core built
    # before it reported its cap refuses np.integer itself.
    cap = attnext.build_info().get("thread_cap")
    if cap is None:
        pytest.skip("this _core predates the documented thread cap")
    before = attnext.get_num_threads()
    try:
        attnext.set_num_threads(np.int64(2))
        assert attnext.get_num_threads() == 2
        for bad in (2**31, 10**30, cap + 1, 0, -1):
            with pytest.raises(ValueError, match=rf"n must be in \[1, {cap}\]"):
                attnext.set_num_threads(bad)
        for bad in (True, np.True_, 2.0, "2", None):
            with pytest.raises(TypeError, match="n must be an int"):
                attnext.set_num_threads(bad)
    finally:
        attnext.set_num_threads(before)


@pytest.mark.parametrize("method, args", [
    ("general", {"weight": rng.standard_normal((4, 4))}),
    ("dot", {}),
    ("scaled_dot", {}),
    ("additive", {"w_query": rng.standard_normal((4, 6)), "w_key": rng.standard_normal((4, 6)),
                  "v": rng.standard_normal(6)}),
])
def test_attention_weights_are_writable(method, args):
    out, w = attnext.attention(Q, K, V, method=method, return_weights=True, **args)
    assert w.flags.writeable and out.flags.writeable
    w[...] = 0  # the caller owns them


def test_general_and_additive_attention_match_the_reference():
    weight = rng.standard_normal((4, 4))
    mask = rng.random((3, 5)) < 0.7
    for method, args in (("general", {"weight": weight, "scale": 0.5}),
                         ("additive", {"w_query": rng.standard_normal((4, 6)), "w_key": rng.standard_normal((4, 6)),
                                       "v": rng.standard_normal(6), "scale": 1.5})):
        for causal in (False, True, "bottom_right"):
            got = attnext.attention(Q, K, V, method=method, mask=mask, is_causal=causal, return_weights=True, **args)
            want = attnext.reference.attention(Q, K, V, method=method, mask=mask, is_causal=causal,
                                               return_weights=True, **args)
            for g, w in zip(got, want):
                np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-12)


def test_key_lengths_copied_before_use():
    lengths = np.array([5, 2])
    out = attnext.scaled_dot_product_attention(Q[:, None], K[:, None], V[:, None], key_lengths=lengths)
    lengths[...] = 1 << 40  # too late to matter, and never read again
    assert np.all(np.isfinite(out))
    for bad in (np.array([6, 1]), np.array([-1, 1]), np.array([2**63 + 1, 1], np.uint64)):
        with pytest.raises(ValueError, match=r"key_lengths must lie in \[0, 5\]"):
            attnext.scaled_dot_product_attention(Q[:, None], K[:, None], V[:, None], key_lengths=bad)
