"""The reference twin's 16-bit rules (attnext.reference, docs/precision.md): float16 is computed
exactly and rounded once at the store; bfloat16 SDPA adds Q * scale and P; outputs, weights
and lse come in the documented types. These hold the reference to the plan, so that the kernel
tests (test_l4_lowp_kernels.py) hold the kernels to the right thing."""

from __future__ import annotations

import numpy as np
import pytest

from attnext import reference as ref

ml_dtypes = pytest.importorskip("ml_dtypes")
BF16 = np.dtype(ml_dtypes.bfloat16)


def normal(rng, shape, dtype):
    return rng.standard_normal(shape).astype(dtype)


def test_float16_is_the_exact_result_rounded_once(rng):
    q, k, v = (normal(rng, (2, 3, 6, 8), np.float16) for _ in range(3))
    exact = ref.scaled_dot_product_attention(*(x.astype(np.float64) for x in (q, k, v)), is_causal=True)
    out = ref.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert out.dtype == np.float16
    np.testing.assert_array_equal(out, exact.astype(np.float16))
    wide = ref.scaled_dot_product_attention(q, k, v, is_causal=True, out_dtype=np.float32)
    np.testing.assert_array_equal(wide, exact.astype(np.float32))


@pytest.mark.parametrize("fn", ["score", "softmax", "weighted_sum"])
def test_one_step_functions_round_once_at_the_store(rng, fn):
    a, b = normal(rng, (3, 4, 5), BF16), normal(rng, (3, 5, 4), BF16)
    args = {"score": (a, np.swapaxes(b, -1, -2)), "softmax": (a,), "weighted_sum": (a, b)}[fn]
    exact = getattr(ref, fn)(*(x.astype(np.float64) for x in args))
    got = getattr(ref, fn)(*args)
    assert got.dtype == BF16
    np.testing.assert_array_equal(got, exact.astype(BF16))
    np.testing.assert_array_equal(getattr(ref, fn)(*args, out_dtype=np.float32), exact.astype(np.float32))


def test_bfloat16_sdpa_rounds_q_scale_and_p(rng):
    q, k, v = (normal(rng, (1, 2, 5, 8), BF16) for _ in range(3))
    scale = 0.3  # Q * 0.3 is not a bfloat16 value: the rounding point shows
    exact = ref.scaled_dot_product_attention(*(x.astype(np.float64) for x in (q, k, v)), scale=scale)
    got = ref.scaled_dot_product_attention(q, k, v, scale=scale, out_dtype=np.float32)
    # By hand: Q * scale rounded (computed in float32), P rounded, l over the unrounded P.
    qs = (q.astype(np.float32) * np.float32(scale)).astype(BF16).astype(np.float64)
    s = qs @ np.swapaxes(k.astype(np.float64), -1, -2)
    p = np.exp(s - s.max(axis=-1, keepdims=True))
    by_hand = (p.astype(BF16).astype(np.float64) @ v.astype(np.float64)) / p.sum(axis=-1, keepdims=True)
    np.testing.assert_allclose(got, by_hand, rtol=1e-6, atol=1e-6)
    assert not np.allclose(got, exact, rtol=0, atol=1e-6)  # the rounding points change the result
    np.testing.assert_allclose(got, exact, rtol=0, atol=4 * 2.0 ** -8 * np.abs(v.astype(np.float64)).max())


def test_weights_and_lse_are_float32_and_unrounded(rng):
    q, k, v = (normal(rng, (2, 4, 6), BF16) for _ in range(3))
    out, w, lse = ref.scaled_dot_product_attention(q, k, v, return_weights=True, return_lse=True)
    assert (out.dtype, w.dtype, lse.dtype) == (BF16, np.float32, np.float32)
    np.testing.assert_allclose(w.sum(axis=-1), 1, rtol=1e-6)


def test_a_single_visible_key_returns_its_value_exactly(rng):
    q, k, v = (normal(rng, (1, 3, 4, 8), BF16) for _ in range(3))
    mask = np.zeros((4, 4), bool)
    mask[:, 2] = True  # P = exp(0) = 1 is exact: the output is value row 2 itself
    out = ref.scaled_dot_product_attention(q, k, v, mask)
    np.testing.assert_array_equal(out, np.broadcast_to(v[..., 2:3, :], out.shape))


def test_mixed_inputs_compute_as_float32(rng):
    q = normal(rng, (2, 4, 6), BF16)
    k = normal(rng, (2, 4, 6), np.float32)
    assert ref.scaled_dot_product_attention(q, k, k).dtype == np.float32
    assert ref.weighted_sum(q, np.swapaxes(k, -1, -2).astype(np.float16)).dtype == np.float32


def test_multi_head_attention_rounds_its_projections(rng):
    e, h = 8, 2
    x = normal(rng, (2, 3, e), BF16)
    ws = [normal(rng, (e, e), BF16) for _ in range(4)]
    out, w = ref.multi_head_attention(x, x, x, h, *ws)
    assert (out.dtype, w.dtype) == (BF16, np.float32)
    # By hand through the SDPA reference, with every projection rounded to bfloat16.
    proj = [(x.astype(np.float64) @ wi.astype(np.float64).T).astype(BF16) for wi in ws[:3]]
    heads = [p.reshape(2, 3, h, e // h).transpose(0, 2, 1, 3) for p in proj]
    o = ref.scaled_dot_product_attention(*heads).transpose(0, 2, 1, 3).reshape(2, 3, e)
    want = (o.astype(np.float64) @ ws[3].astype(np.float64).T).astype(BF16)
    np.testing.assert_array_equal(out, want)
