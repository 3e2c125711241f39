"""The NumPy reference states the rules every path follows (PLAN.md rules 2 and 3): hidden is
hidden, rows that see no key are zeros, lse is a natural log."""

from __future__ import annotations

import numpy as np
import pytest

from attnext import reference as ref


def data(seed=0, b=2, h=2, lq=4, lk=6, e=3, ev=2):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((b, h, lq, e)), rng.standard_normal((b, h, lk, e)),
            rng.standard_normal((b, h, lk, ev)))


HIDING = {
    "causal": dict(is_causal=True),  # top-left with L < S: the last keys are hidden from every query
    "window": dict(window=(1, 0)),
    "key_lengths": dict(key_lengths=np.array([4, 2])),
    "bool_mask": dict(attn_mask=np.tril(np.ones((4, 6), bool), 1)),
    "float_ninf_mask": dict(attn_mask=np.where(np.tril(np.ones((4, 6), bool), 1), 0.0, -np.inf)),
}


def _hidden(kwargs, q, k, v):
    w = ref.scaled_dot_product_attention(q, k, v, return_weights=True, **kwargs)[1]
    mask = ref.dense_mask(q.shape[-2], k.shape[-2], **{n: a for n, a in kwargs.items()})
    return np.broadcast_to(mask == -np.inf, w.shape)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("case", HIDING)
def test_hidden_value_rows_never_reach_the_output(case, bad):
    q, k, v = data()
    kw = HIDING[case]
    clean_out, clean_w, clean_lse = ref.scaled_dot_product_attention(q, k, v, return_weights=True, return_lse=True,
                                                                     **kw)
    hidden = _hidden(kw, q, k, v)
    hidden_keys = np.all(hidden, axis=(-2,))  # (b, h, S): keys no query sees
    assert hidden_keys.any()
    bad_v = np.where(hidden_keys[..., None], bad, v)
    out, w, lse = ref.scaled_dot_product_attention(q, k, bad_v, return_weights=True, return_lse=True, **kw)
    np.testing.assert_allclose(out, clean_out, rtol=1e-12, atol=1e-14)
    np.testing.assert_array_equal(w, clean_w)
    np.testing.assert_array_equal(lse, clean_lse)
    # a bad value row some query sees: rows that see it follow the formula, the others do not change
    j = int(np.argmin(hidden[0, 0].sum(axis=0)))  # the key seen by the most rows of (0, 0)
    partly = v.copy()
    partly[0, 0, j] = bad
    out2 = ref.scaled_dot_product_attention(q, k, partly, **kw)
    sees = ~hidden[0, 0, :, j]
    assert np.all(~np.isfinite(out2[0, 0][sees]))
    np.testing.assert_allclose(out2[0, 0][~sees], clean_out[0, 0][~sees], rtol=1e-12, atol=1e-14)


def test_rows_that_see_no_key_are_zeros_and_lse_minus_inf():
    q, k, v = data(lq=8, lk=4)
    v[..., 1, :] = np.nan  # even NaN values change nothing
    for kw in (dict(is_causal="bottom_right"), dict(window=(0, 0), key_lengths=np.array([0, 3])),
               dict(attn_mask=np.zeros((8, 4), bool)), dict(attn_mask=np.full((8, 4), -np.inf))):
        out, w, lse = ref.scaled_dot_product_attention(q, k, v, return_weights=True, return_lse=True, **kw)
        empty = np.all(w == 0, axis=-1)
        assert empty.any()
        assert np.all(out[empty] == 0) and np.all(lse[empty] == -np.inf)
        assert not np.any(np.isnan(w))


def test_nan_in_a_float_mask_on_a_structurally_hidden_key_is_ignored():
    q, k, v = data()
    for kw in (dict(is_causal=True), dict(window=(1, 1)), dict(key_lengths=np.array([3, 5]))):
        clean = ref.scaled_dot_product_attention(q, k, v, attn_mask=np.zeros((4, 6)), return_lse=True, **kw)
        hidden = ref.dense_mask(4, 6, **kw) == -np.inf
        mask = np.where(np.broadcast_to(hidden, (2, 2, 4, 6)), np.nan, 0.0)
        got = ref.scaled_dot_product_attention(q, k, v, attn_mask=mask, return_lse=True, **kw)
        for g, c in zip(got, clean):
            np.testing.assert_array_equal(g, c)
        assert not np.any(np.isnan(ref.dense_mask(4, 6, attn_mask=mask, **kw)))
    # a NaN on a visible key makes its row NaN (the plain formula), hidden weights stay 0
    mask = np.zeros((4, 6))
    mask[1, 0] = np.nan
    out, w = ref.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=True, return_weights=True)
    assert np.all(np.isnan(out[:, :, 1])) and np.all(w[:, :, 1, 2:] == 0)
    assert np.all(np.isfinite(out[:, :, [0, 2, 3]]))


def test_lse_is_the_natural_log():
    q, k, v = data()
    _, lse = ref.scaled_dot_product_attention(q, k, v, scale=1.0, return_lse=True)
    np.testing.assert_allclose(lse, np.log(np.sum(np.exp(q @ np.swapaxes(k, -1, -2)), axis=-1)), rtol=1e-13)


def test_huggingface_finfo_min_mask_rows_give_the_mean_of_v():
    q, k, v = data()
    for dtype in (np.float32, np.float64):
        mask = np.full((4, 6), np.finfo(dtype).min, dtype)
        out = ref.scaled_dot_product_attention(q.astype(dtype), k.astype(dtype), v.astype(dtype), attn_mask=mask)
        np.testing.assert_allclose(out, np.broadcast_to(v.astype(dtype).mean(axis=-2, keepdims=True), out.shape),
                                   rtol=1e-5 if dtype == np.float32 else 1e-12)


def test_every_reference_path_keeps_hidden_values_out():
    rng = np.random.default_rng(4)
    q, k = rng.standard_normal((2, 3, 4)), rng.standard_normal((2, 5, 4))
    v = rng.standard_normal((2, 5, 3))
    v_bad = v.copy()
    v_bad[:, 4] = np.nan  # key 4 is hidden below in every path
    mask = np.array([True] * 4 + [False])
    lengths = np.array([4, 4])
    wq, wk, u = rng.standard_normal((4, 6)), rng.standard_normal((4, 6)), rng.standard_normal(6)
    pairs = [
        lambda val: ref.attention(q, k, val, mask=mask),
        lambda val: ref.attention(q, k, val, method="additive", w_query=wq, w_key=wk, v=u, mask=mask),
        lambda val: ref.additive_attention(q, k, val, wq, wk, u, key_lengths=lengths),
        lambda val: ref.bahdanau_attention(q[:, 0], k, val, wq, wk, u, key_lengths=lengths)[0],
        lambda val: ref.luong_attention(q, k, val, np.ones((7, 2)), key_lengths=lengths)[1],
        lambda val: ref.luong_attention(q, k, val, np.ones((7, 2)), mask=mask)[1],
    ]
    for i, f in enumerate(pairs):
        np.testing.assert_allclose(f(v_bad), f(v), rtol=1e-12, atol=1e-14, err_msg=str(i))
