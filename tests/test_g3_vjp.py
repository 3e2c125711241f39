"""attnext.vjp and the backward functions: float64 central finite differences for every function
and option, the compiled path against the NumPy reference's own backward, and the pullback's
contract (Gradients' shapes, dtypes, None rules and names; cotangent structures; calling it
twice; independence from the caller's arrays after vjp returns)."""

from __future__ import annotations

import numpy as np
import pytest

import attnext
from attnext import reference
from attnext.grad import Gradients, vjp

EPS = 1e-6
FD_RTOL = 1e-6  # the bar for float64 central differences (max abs error / max abs gradient)


@pytest.fixture(autouse=True)
def one_thread():
    """Finite differences make thousands of tiny calls: one thread each (results do not depend
    on the count; a busy machine makes OpenMP's wake-ups the whole cost of a tiny call)."""
    with attnext.threads(1):
        yield


def _outputs(result):
    return result if isinstance(result, tuple) else (result,)


def _cotangents(result, rng):
    outs = _outputs(result)
    cts = []
    for o in outs:
        ct = rng.standard_normal(o.shape)
        cts.append(np.where(np.isfinite(o), ct, 0.0))  # lse -inf rows: no cotangent there
    return tuple(cts) if isinstance(result, tuple) else cts[0]


def _loss(fn, args, kwargs, cts):
    outs = _outputs(fn(*args, **kwargs))
    cts = _outputs(cts)
    with np.errstate(invalid="ignore"):
        return sum(float(np.sum(np.where(c != 0, o * c, 0.0))) for o, c in zip(outs, cts))


def _finite_difference(fn, args, kwargs, cts, x):
    """d loss / d x by central differences, perturbing x in place (x is one of args/kwargs)."""
    g = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        old = x[i]
        if not np.isfinite(old):
            continue  # a -inf mask entry: no gradient flows there
        x[i] = old + EPS
        up = _loss(fn, args, kwargs, cts)
        x[i] = old - EPS
        down = _loss(fn, args, kwargs, cts)
        x[i] = old
        g[i] = (up - down) / (2 * EPS)
    return g


def _relative(a, b):
    scale = max(float(np.max(np.abs(b))), 1e-12) if b.size else 1.0
    return float(np.max(np.abs(a - b))) / scale if a.size else 0.0


def check_against_finite_differences(fn, args, kwargs, rng, expect=None):
    """vjp's gradients of every float array argument against central differences."""
    out, pullback = vjp(fn, *args, **kwargs)
    for a, b in zip(_outputs(out), _outputs(fn(*args, **kwargs))):
        np.testing.assert_array_equal(a, b)  # out is exactly fn(*args, **kwargs)
    cts = _cotangents(out, rng)
    grads = pullback(cts)
    named = dict(zip(grads.names(), [grads[n] for n in grads.names()]))
    arrays = {**{name: a for name, a in zip(grads.names(), args)}, **kwargs}
    checked = []
    for name, x in arrays.items():
        if not (isinstance(x, np.ndarray) and x.dtype == np.float64):
            assert named[name] is None, name
            continue
        assert named[name].shape == x.shape and named[name].dtype == x.dtype, name
        want = _finite_difference(fn, args, kwargs, cts, x)
        assert _relative(named[name], want) <= FD_RTOL, (name, _relative(named[name], want))
        checked.append(name)
    if expect is not None:
        assert sorted(checked) == sorted(expect)
    return grads


# ---- scaled_dot_product_attention ---------------------------------------------------------

SDPA_OPTIONS = {
    "plain": {},
    "scale": {"scale": 0.3},
    "causal": {"is_causal": True},
    "causal_bottom_right": {"is_causal": "bottom_right"},
    "window": {"window": (1, 2)},
    "window_left_only": {"window": (2, None)},
    "key_lengths": {"key_lengths": np.array([5, 3])},
    "weights": {"return_weights": True},
    "lse": {"return_lse": True},
    "weights_and_lse": {"return_weights": True, "return_lse": True, "is_causal": True},
}


@pytest.mark.parametrize("option", sorted(SDPA_OPTIONS))
def test_sdpa_matches_finite_differences(option, rng):
    q, k, v = rng.standard_normal((2, 2, 3, 4)), rng.standard_normal((2, 2, 5, 4)), rng.standard_normal((2, 2, 5, 3))
    check_against_finite_differences(attnext.scaled_dot_product_attention, (q, k, v), dict(SDPA_OPTIONS[option]), rng,
                                     expect=["query", "key", "value"])


def test_sdpa_float_mask_gets_its_gradient(rng):
    q, k, v = rng.standard_normal((2, 2, 3, 4)), rng.standard_normal((2, 2, 5, 4)), rng.standard_normal((2, 2, 5, 3))
    mask = rng.standard_normal((3, 5))  # broadcast over batch and heads: its gradient is summed back
    mask[0, 4] = -np.inf
    grads = check_against_finite_differences(attnext.scaled_dot_product_attention, (q, k, v, mask), {}, rng,
                                             expect=["query", "key", "value", "attn_mask"])
    assert grads[3].shape == (3, 5) and grads[3][0, 4] == 0.0
    assert grads["attn_mask"] is grads[3]


def test_sdpa_bool_mask_gets_none(rng):
    q, k, v = rng.standard_normal((2, 3, 4)), rng.standard_normal((2, 5, 4)), rng.standard_normal((2, 5, 3))
    mask = rng.random((3, 5)) < 0.7
    mask[:, 0] = True
    grads = check_against_finite_differences(attnext.scaled_dot_product_attention, (q, k, v, mask), {}, rng)
    assert grads[3] is None and grads["attn_mask"] is None


def test_sdpa_gqa_and_broadcast_batch_are_summed_back(rng):
    q = rng.standard_normal((2, 4, 3, 4))
    k, v = rng.standard_normal((1, 2, 5, 4)), rng.standard_normal((1, 2, 5, 2))  # shared over the batch
    mask = rng.standard_normal((4, 3, 5))
    grads = check_against_finite_differences(
        attnext.scaled_dot_product_attention, (q, k, v), {"attn_mask": mask, "enable_gqa": True,
                                                          "key_lengths": np.array([5, 4]), "is_causal": "bottom_right"},
        rng, expect=["query", "key", "value", "attn_mask"])
    assert grads[1].shape == (1, 2, 5, 4) and grads["attn_mask"].shape == (4, 3, 5)


def test_sdpa_two_dimensional_inputs(rng):
    q, k, v = rng.standard_normal((3, 4)), rng.standard_normal((5, 4)), rng.standard_normal((5, 2))
    check_against_finite_differences(attnext.scaled_dot_product_attention, (q, k, v), {"return_lse": True}, rng,
                                     expect=["query", "key", "value"])


def test_sdpa_rows_that_see_nothing_get_zero_gradients(rng):
    q, k, v = rng.standard_normal((2, 1, 3, 4)), rng.standard_normal((2, 1, 5, 4)), rng.standard_normal((2, 1, 5, 3))
    out, pullback = vjp(attnext.scaled_dot_product_attention, q, k, v, key_lengths=np.array([0, 2]),
                        return_weights=True)
    dq, dk, dv = pullback((np.ones(out[0].shape), np.ones(out[1].shape)))[:3]
    assert not np.any(dq[0]) and not np.any(dk[0]) and not np.any(dv[0])
    assert not np.any(dk[1, :, 2:]) and not np.any(dv[1, :, 2:])  # hidden keys: exactly zero
    assert np.all(np.isfinite(dq))


# ---- dropout ---------------------------------------------------------------------------------

@pytest.mark.parametrize("fn", [attnext.scaled_dot_product_attention, reference.scaled_dot_product_attention])
@pytest.mark.parametrize("option", [{}, {"return_weights": True, "is_causal": True}, {"return_lse": True}])
def test_dropout_with_a_seed_matches_finite_differences(fn, option, rng):
    q, k, v = rng.standard_normal((2, 2, 3, 4)), rng.standard_normal((2, 2, 6, 4)), rng.standard_normal((2, 2, 6, 3))
    check_against_finite_differences(fn, (q, k, v), {"dropout_p": 0.3, "seed": 12345, **option}, rng,
                                     expect=["query", "key", "value"])


@pytest.mark.parametrize("case", ["plain", "gqa_causal", "broadcast_lengths"])
def test_dropout_forward_matches_the_reference_twin(case, rng):
    q, k, v = rng.standard_normal((2, 4, 3, 8)), rng.standard_normal((2, 4, 9, 8)), rng.standard_normal((2, 4, 9, 5))
    kwargs = {"plain": {},
              "gqa_causal": {"enable_gqa": True, "is_causal": "bottom_right"},
              "broadcast_lengths": {"key_lengths": np.array([9, 6])}}[case]
    if case == "gqa_causal":
        k, v = k[:, :2], v[:, :2]
    if case == "broadcast_lengths":
        k, v = k[:1], v[:1]
    got = attnext.scaled_dot_product_attention(q, k, v, None, 0.4, seed=2024, return_weights=True, **kwargs)
    want = reference.scaled_dot_product_attention(q, k, v, None, 0.4, seed=2024, return_weights=True, **kwargs)
    np.testing.assert_array_equal(got[1] == 0, want[1] == 0)  # the same elements dropped, bit for bit
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-13)


def test_attention_dropout_matches_the_reference_and_refuses_additive(rng):
    q, k, v = rng.standard_normal((2, 3, 4)), rng.standard_normal((2, 5, 4)), rng.standard_normal((2, 5, 2))
    w = rng.standard_normal((4, 4))
    for kwargs in ({}, {"key_lengths": np.array([5, 3])}, {"method": "general", "weight": w}):
        got = attnext.attention(q, k, v, dropout_p=0.5, seed=7, return_weights=True, **kwargs)
        want = reference.attention(q, k, v, dropout_p=0.5, seed=7, return_weights=True, **kwargs)
        for a, b in zip(got, want):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-13)
    with pytest.raises(ValueError, match="dropout is not supported by method='additive'"):
        attnext.attention(q, k, v, method="additive", w_query=w, w_key=w, v=np.ones(4), dropout_p=0.1)


@pytest.mark.parametrize("fn", [attnext.attention, reference.attention])
def test_attention_dropout_matches_finite_differences(fn, rng):
    q, k, v = rng.standard_normal((2, 3, 4)), rng.standard_normal((2, 5, 4)), rng.standard_normal((2, 5, 2))
    check_against_finite_differences(fn, (q, k, v), {"dropout_p": 0.3, "seed": 99, "key_lengths": np.array([5, 4]),
                                                     "method": "general", "weight": rng.standard_normal((4, 4)),
                                                     "return_weights": True},
                                     rng, expect=["query", "key", "value", "weight"])


def test_dropout_seed_is_drawn_and_recorded(rng):
    q, k, v = rng.standard_normal((2, 3, 4)), rng.standard_normal((2, 5, 4)), rng.standard_normal((2, 5, 3))
    out, pullback = vjp(attnext.scaled_dot_product_attention, q, k, v, None, 0.5)
    assert isinstance(pullback.seed, int) and 0 <= pullback.seed < 2 ** 64
    np.testing.assert_array_equal(out, attnext.scaled_dot_product_attention(q, k, v, None, 0.5, seed=pullback.seed))
    ct = rng.standard_normal(out.shape)
    want = vjp(attnext.scaled_dot_product_attention, q, k, v, None, 0.5, seed=pullback.seed)[1](ct)
    for a, b in zip(pullback(ct)[:3], want[:3]):
        np.testing.assert_array_equal(a, b)
    _, no_dropout = vjp(attnext.scaled_dot_product_attention, q, k, v)
    assert no_dropout.seed is None
    for fn in (attnext.attention, reference.attention, reference.scaled_dot_product_attention):
        out, pullback = vjp(fn, q, k, v, dropout_p=0.5)
        assert isinstance(pullback.seed, int)
        np.testing.assert_array_equal(out, fn(q, k, v, dropout_p=0.5, seed=pullback.seed))


# ---- additive_attention, attention, score, softmax, weighted_sum ----------------------------------

def _resolve(option, extra):
    """An option's keyword arguments, "@name" standing for the array extra[name]."""
    return {name: extra[value[1:]] if isinstance(value, str) and value.startswith("@") else value
            for name, value in option.items()}


ADDITIVE_OPTIONS = {
    "plain": {},
    "bias": {"bias": "@bias"},
    "float_mask": {"attn_mask": "@mask"},
    "key_lengths_causal": {"key_lengths": np.array([4, 2]), "is_causal": "bottom_right"},
    "window_weights": {"window": (1, 1), "return_weights": True},
}


@pytest.mark.parametrize("option", sorted(ADDITIVE_OPTIONS))
def test_additive_attention_matches_finite_differences(option, rng):
    q, k, val = rng.standard_normal((2, 3, 4)), rng.standard_normal((1, 4, 3)), rng.standard_normal((2, 4, 2))
    wq, wk, v = rng.standard_normal((4, 5)), rng.standard_normal((3, 5)), rng.standard_normal(5)
    extra = {"bias": rng.standard_normal(5), "mask": rng.standard_normal((3, 4))}
    kwargs = _resolve(ADDITIVE_OPTIONS[option], extra)
    expect = ["query", "key", "value", "w_query", "w_key", "v"] + [n for n in ("bias", "attn_mask") if n in kwargs]
    check_against_finite_differences(attnext.additive_attention, (q, k, val, wq, wk, v), kwargs, rng, expect=expect)


ATTENTION_OPTIONS = {
    "scaled_dot": {},
    "dot_causal": {"method": "dot", "is_causal": True},
    "general": {"method": "general", "weight": "@weight"},
    "general_key_lengths": {"method": "general", "weight": "@weight", "key_lengths": np.array([4, 2])},
    "additive": {"method": "additive", "w_query": "@w_query", "w_key": "@w_key", "v": "@v", "scale": 0.7},
    "float_mask_weights": {"attn_mask": "@mask", "return_weights": True},
    "old_mask_name": {"mask": "@mask", "window": (1, None)},
}


@pytest.mark.parametrize("option", sorted(ATTENTION_OPTIONS))
def test_attention_matches_finite_differences(option, rng):
    q, k, val = rng.standard_normal((2, 3, 4)), rng.standard_normal((2, 4, 4)), rng.standard_normal((2, 4, 2))
    extra = {"weight": rng.standard_normal((4, 4)), "w_query": rng.standard_normal((4, 5)),
             "w_key": rng.standard_normal((4, 5)), "v": rng.standard_normal(5), "mask": rng.standard_normal((3, 4))}
    kwargs = _resolve(ATTENTION_OPTIONS[option], extra)
    expect = ["query", "key", "value"] + [n for n, x in kwargs.items() if isinstance(x, np.ndarray) and x.dtype.kind == "f"]
    check_against_finite_differences(attnext.attention, (q, k, val), kwargs, rng, expect=expect)


@pytest.mark.parametrize("method", ["dot", "scaled_dot", "general", "additive"])
def test_score_matches_finite_differences(method, rng):
    q, k = rng.standard_normal((2, 3, 4)), rng.standard_normal((1, 5, 3 if method in ("general", "additive") else 4))
    kwargs = {"general": {"weight": rng.standard_normal((4, 3))},
              "additive": {"w_query": rng.standard_normal((4, 6)), "w_key": rng.standard_normal((3, 6)),
                           "v": rng.standard_normal(6), "scale": 0.5}}.get(method, {})
    check_against_finite_differences(attnext.score, (q, k, method), kwargs, rng,
                                     expect=["query", "key"] + [n for n in kwargs if n != "scale"])


@pytest.mark.parametrize("axis", [-1, 1])
def test_softmax_matches_finite_differences(axis, rng):
    x = rng.standard_normal((2, 3, 4))
    mask = rng.standard_normal((3, 4))
    mask[1, 2] = -np.inf
    grads = check_against_finite_differences(attnext.softmax, (x,), {"mask": mask, "axis": axis}, rng,
                                             expect=["x", "mask"])
    assert grads["mask"][1, 2] == 0.0


def test_weighted_sum_matches_finite_differences(rng):
    check_against_finite_differences(attnext.weighted_sum, (rng.standard_normal((2, 3, 4)), rng.standard_normal((4, 2))),
                                     {}, rng, expect=["weights", "value"])


# ---- the compiled path against the reference's backward -----------------------------------------

TWIN_CASES = [
    ("scaled_dot_product_attention", lambda r: ((r.standard_normal((2, 4, 3, 8)), r.standard_normal((2, 2, 6, 8)),
                                                 r.standard_normal((2, 2, 6, 5)), r.standard_normal((4, 3, 6))),
                                                {"enable_gqa": True, "is_causal": True, "return_weights": True,
                                                 "return_lse": True})),
    ("additive_attention", lambda r: ((r.standard_normal((2, 3, 4)), r.standard_normal((2, 5, 3)),
                                       r.standard_normal((2, 5, 2)), r.standard_normal((4, 6)),
                                       r.standard_normal((3, 6)), r.standard_normal(6)),
                                      {"bias": r.standard_normal(6), "key_lengths": np.array([5, 3])})),
    ("attention", lambda r: ((r.standard_normal((2, 3, 4)), r.standard_normal((2, 5, 4)), r.standard_normal((2, 5, 2))),
                             {"method": "general", "weight": r.standard_normal((4, 4)), "return_weights": True})),
    ("score", lambda r: ((r.standard_normal((2, 3, 4)), r.standard_normal((2, 5, 4)), "dot"), {})),
    ("softmax", lambda r: ((r.standard_normal((2, 3, 4)),), {"axis": 0})),
    ("weighted_sum", lambda r: ((r.standard_normal((2, 3, 4)), r.standard_normal((2, 4, 5))), {})),
]


@pytest.mark.parametrize("name, make", TWIN_CASES, ids=[c[0] for c in TWIN_CASES])
def test_vjp_matches_the_reference_twin(name, make, rng):
    args, kwargs = make(rng)
    out, pullback = vjp(getattr(attnext, name), *args, **kwargs)
    ref_out, ref_pullback = vjp(getattr(reference, name), *args, **kwargs)
    for a, b in zip(_outputs(out), _outputs(ref_out)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
    cts = _cotangents(out, rng)
    got, want = pullback(cts), ref_pullback(cts)
    assert got.names() == want.names()
    for n in got.names():
        if want[n] is None:
            assert got[n] is None, n
        else:
            np.testing.assert_allclose(got[n], want[n], rtol=1e-9, atol=1e-11, err_msg=n)


# ---- the pullback's contract --------------------------------------------------------------------

def test_gradients_shapes_dtypes_and_none_rules(rng):
    q = rng.standard_normal((2, 1, 3, 4)).astype(np.float32)
    k = rng.standard_normal((2, 1, 5, 4))  # float64: the computation promotes, each gradient keeps its dtype
    v = rng.standard_normal((2, 1, 5, 3)).astype(np.float32)
    mask = np.ones((3, 5), dtype=bool)
    out, pullback = vjp(attnext.scaled_dot_product_attention, q, k, v, mask, 0.0, True,
                        key_lengths=np.array([5, 4]))
    grads = pullback(np.ones(out.shape))
    assert isinstance(grads, Gradients) and isinstance(grads, tuple) and len(grads) == 6
    assert [g.dtype for g in grads[:3]] == [np.float32, np.float64, np.float32]
    assert [g.shape for g in grads[:3]] == [q.shape, k.shape, v.shape]
    assert grads[3] is None and grads[4] is None and grads[5] is None  # bool mask, dropout_p, is_causal
    assert grads["key_lengths"] is None and grads["query"] is grads[0]
    assert grads.names() == ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "key_lengths")
    with pytest.raises(KeyError, match="weight"):
        grads["weight"]
    assert grads.get("weight") is None
    dq, dk, dv = pullback(np.ones(out.shape))[:3]
    assert dq.shape == q.shape


def test_float16_and_list_inputs(rng):
    q = rng.standard_normal((3, 4)).astype(np.float16)
    k = rng.standard_normal((5, 4)).tolist()
    out, pullback = vjp(attnext.score, q, k, "dot")
    dq, dk, _ = pullback(np.ones(out.shape))
    assert dq.dtype == np.float16 and dk.dtype == np.float64 and dk.shape == (5, 4)


def test_named_keyword_gradients(rng):
    q, k, v = rng.standard_normal((2, 3, 4)), rng.standard_normal((2, 5, 4)), rng.standard_normal((2, 5, 2))
    w = rng.standard_normal((4, 4))
    out, pullback = vjp(attnext.attention, q, k, v, method="general", weight=w)
    grads = pullback(np.ones(out.shape))
    assert len(grads) == 3 and grads["weight"].shape == (4, 4) and grads["method"] is None


def test_pullback_twice_gives_identical_results(rng):
    q, k, v = rng.standard_normal((2, 3, 4)), rng.standard_normal((2, 5, 4)), rng.standard_normal((2, 5, 3))
    out, pullback = vjp(attnext.scaled_dot_product_attention, q, k, v, is_causal=True)
    ct = rng.standard_normal(out.shape)
    first, second = pullback(ct), pullback(ct)
    for a, b in zip(first[:3], second[:3]):
        np.testing.assert_array_equal(a, b)
        assert a is not b


@pytest.mark.parametrize("fn", [attnext.scaled_dot_product_attention, attnext.additive_attention, attnext.attention,
                                attnext.softmax, attnext.weighted_sum])
def test_mutating_the_callers_arrays_after_vjp_changes_nothing(fn, rng):
    q, k, v = rng.standard_normal((2, 3, 4)), rng.standard_normal((2, 5, 4)), rng.standard_normal((2, 5, 3))
    args = {attnext.scaled_dot_product_attention: (q, k, v),
            attnext.additive_attention: (q, k, v, rng.standard_normal((4, 6)), rng.standard_normal((4, 6)),
                                         rng.standard_normal(6)),
            attnext.attention: (q, k, v),
            attnext.softmax: (q,),
            attnext.weighted_sum: (rng.standard_normal((2, 3, 5)), v)}[fn]
    out, pullback = vjp(fn, *args)
    ct = rng.standard_normal(out.shape)
    before = pullback(ct)
    for a in args:
        a[...] = rng.standard_normal(a.shape)
    out[...] = 0.0  # the caller's output too: the pullback kept its own
    after = pullback(ct)
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)


def test_cotangent_structures(rng):
    q, k, v = rng.standard_normal((2, 3, 4)), rng.standard_normal((2, 5, 4)), rng.standard_normal((2, 5, 3))
    (out, w, lse), pullback = vjp(attnext.scaled_dot_product_attention, q, k, v, return_weights=True, return_lse=True)
    g_out, g_w, g_lse = rng.standard_normal(out.shape), rng.standard_normal(w.shape), rng.standard_normal(lse.shape)
    full = pullback((g_out, g_w, g_lse))
    parts = [pullback((g_out, None, None)), pullback((None, g_w, None)), pullback((None, None, g_lse))]
    for i in range(3):  # linear in the cotangent: the parts add up to the whole
        np.testing.assert_allclose(full[i], sum(p[i] for p in parts), rtol=1e-12, atol=1e-12)
    zeros = pullback((None, None, None))
    assert not any(np.any(g) for g in zeros[:3])
    with pytest.raises(TypeError, match="tuple of 3"):
        pullback(g_out)
    with pytest.raises(TypeError, match="tuple of 3"):
        pullback((g_out, g_w))
    with pytest.raises(ValueError, match=r"cotangent 1 has shape \(2, 3, 4\) but the output has shape \(2, 3, 5\)"):
        pullback((g_out, np.ones((2, 3, 4)), None))
    (out, w), pullback = vjp(attnext.scaled_dot_product_attention, q, k, v, return_weights=True)
    np.testing.assert_array_equal(pullback((g_out, None))[0], parts[0][0])
    _, single = vjp(attnext.scaled_dot_product_attention, q, k, v)
    with pytest.raises(ValueError, match="the cotangent has shape"):
        single(g_w)
    with pytest.raises(TypeError, match="real array"):
        single(np.ones(out.shape, dtype=complex))


def test_vjp_refuses_other_functions():
    with pytest.raises(TypeError, match="vjp supports"):
        vjp(np.tanh, np.ones(3))
    with pytest.raises(TypeError):
        vjp(attnext.softmax, np.ones(3), bogus=1)


# ---- the public backward functions against their reference twins -----------------------------

def _assert_same_gradients(got, want, rtol=1e-9):
    items = got.items() if isinstance(got, dict) else enumerate(got)
    for name, g in items:
        w = want[name]
        if w is None:
            assert g is None, name
        else:
            assert g.shape == w.shape and g.dtype == w.dtype, name
            np.testing.assert_allclose(g, w, rtol=rtol, atol=1e-11, err_msg=str(name))


@pytest.mark.parametrize("shared_keys", [False, True])
@pytest.mark.parametrize("mask_kind", [None, "float", "bool"])
def test_additive_backward_matches_the_reference(shared_keys, mask_kind, rng):
    q, val = rng.standard_normal((2, 3, 4)), rng.standard_normal((2, 5, 2))
    k = rng.standard_normal((1 if shared_keys else 2, 5, 3))
    wq, wk, v, b = rng.standard_normal((4, 6)), rng.standard_normal((3, 6)), rng.standard_normal(6), rng.standard_normal(6)
    mask = {None: None, "float": rng.standard_normal((3, 5)), "bool": rng.random((2, 3, 5)) < 0.8}[mask_kind]
    kwargs = {"bias": b, "attn_mask": mask, "key_lengths": np.array([5, 4]), "is_causal": "bottom_right"}
    out = attnext.additive_attention(q, k, val, wq, wk, v, **kwargs)
    g, gw = rng.standard_normal(out.shape), rng.standard_normal((2, 3, 5))
    got = attnext.additive_attention_backward(g, q, k, val, wq, wk, v, out, None, grad_weights=gw, **kwargs)
    want = reference.additive_attention_backward(g, q, k, val, wq, wk, v, out, None, grad_weights=gw, **kwargs)
    _assert_same_gradients(got, want)
    assert sorted(got) == ["attn_mask", "bias", "key", "query", "v", "value", "w_key", "w_query"]


def test_additive_backward_of_projected_keys_is_the_projection_gradient(rng):
    q, k, val = rng.standard_normal((2, 3, 4)), rng.standard_normal((2, 5, 3)), rng.standard_normal((2, 5, 2))
    wq, wk, v = rng.standard_normal((4, 6)), rng.standard_normal((3, 6)), rng.standard_normal(6)
    keys = attnext.project_keys(k, wk)
    out, pullback = vjp(attnext.additive_attention, q, keys, val, wq, None, v)
    ct = rng.standard_normal(out.shape)
    grads = pullback(ct)
    assert grads[1].shape == keys.projected.shape and grads[4] is None
    raw = vjp(attnext.additive_attention, q, k, val, wq, wk, v)[1](ct)
    # d(key w_key) chained through key and w_key gives the raw-key gradients
    np.testing.assert_allclose(grads[1] @ wk.T, raw[1], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(np.einsum("bjd,bju->du", k, grads[1]), raw[4], rtol=1e-9, atol=1e-12)
    want = reference.additive_attention_backward(ct, q, keys, val, wq, None, v, out, None)
    np.testing.assert_allclose(grads[1], want["key"], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("method", ["dot", "scaled_dot", "general", "additive"])
def test_score_backward_matches_the_reference(method, rng, monkeypatch):
    from attnext import grad as grad_module

    monkeypatch.setattr(grad_module, "_ADDITIVE_BLOCK_ELEMENTS", 7)  # several query blocks
    q, k = rng.standard_normal((2, 1, 5, 4)), rng.standard_normal((3, 6, 3 if method in ("general", "additive") else 4))
    kwargs = {"general": {"weight": rng.standard_normal((4, 3))},
              "additive": {"w_query": rng.standard_normal((4, 6)), "w_key": rng.standard_normal((3, 6)),
                           "v": rng.standard_normal(6)}}.get(method, {})
    g = rng.standard_normal((2, 3, 5, 6))
    _assert_same_gradients(attnext.score_backward(g, q, k, method, scale=0.4, **kwargs),
                           reference.score_backward(g, q, k, method, scale=0.4, **kwargs))


def test_softmax_weighted_sum_and_linear_backward_match_the_reference(rng):
    w, g = attnext.softmax(rng.standard_normal((2, 3, 4)), axis=0), rng.standard_normal((2, 3, 4))
    np.testing.assert_allclose(attnext.softmax_backward(g, w, axis=0), reference.softmax_backward(g, w, axis=0),
                               rtol=1e-12)
    a, val, g = rng.standard_normal((2, 3, 4)), rng.standard_normal((4, 5)), rng.standard_normal((2, 3, 5))
    _assert_same_gradients(attnext.weighted_sum_backward(g, a, val), reference.weighted_sum_backward(g, a, val))
    for shape in [(6,), (3, 6), (2, 3, 6), (2, 2, 3, 6)]:
        x, w, b = rng.standard_normal(shape), rng.standard_normal((5, 6)), rng.standard_normal(5)
        g = rng.standard_normal(shape[:-1] + (5,))
        _assert_same_gradients(attnext.linear_backward(g, x, w, b), reference.linear_backward(g, x, w, b))
        assert attnext.linear_backward(g, x, w)[2] is None


def test_sdpa_backward_matches_the_reference_with_float32_inputs(rng):
    q = rng.standard_normal((2, 4, 3, 8)).astype(np.float32)
    k, v = rng.standard_normal((2, 2, 6, 8)).astype(np.float32), rng.standard_normal((2, 2, 6, 5)).astype(np.float32)
    mask = rng.standard_normal((4, 3, 6)).astype(np.float32)
    kwargs = {"enable_gqa": True, "window": (2, 1), "key_lengths": np.array([6, 5])}
    out, lse = attnext.scaled_dot_product_attention(q, k, v, mask, return_lse=True, **kwargs)
    g, gl = rng.standard_normal(out.shape).astype(np.float32), rng.standard_normal(lse.shape).astype(np.float32)
    got = attnext.scaled_dot_product_attention_backward(g, q, k, v, out, lse, mask, grad_lse=gl, **kwargs)
    want = reference.scaled_dot_product_attention_backward(g, q, k, v, out, lse, mask, grad_lse=gl, **kwargs)
    _assert_same_gradients(got, want, rtol=2e-4)


def test_backward_argument_errors(rng):
    q, k, v = rng.standard_normal((2, 3, 4)), rng.standard_normal((2, 5, 4)), rng.standard_normal((2, 5, 3))
    out, lse = attnext.scaled_dot_product_attention(q, k, v, return_lse=True)
    with pytest.raises(ValueError, match=r"grad_out has shape \(2, 3, 4\) but the forward's gives \(2, 3, 3\)"):
        attnext.scaled_dot_product_attention_backward(np.ones((2, 3, 4)), q, k, v, out, lse)
    with pytest.raises(ValueError, match=r"lse has shape"):
        attnext.scaled_dot_product_attention_backward(out, q, k, v, out, lse[..., :2])
    with pytest.raises(ValueError, match="seed is required"):
        attnext.scaled_dot_product_attention_backward(out, q, k, v, out, lse, dropout_p=0.5)
    with pytest.raises(ValueError, match=r"grad has shape \(3, 4\) but weights has \(2, 3, 4\)"):
        attnext.softmax_backward(np.ones((3, 4)), q)
    with pytest.raises(ValueError, match=r"grad has shape \(2, 3, 4\) but the forward's output has \(2, 3, 5\)"):
        attnext.score_backward(q, q, k, "dot")
    with pytest.raises(ValueError, match=r"weight has shape \(3, 3\)"):
        attnext.score_backward(np.ones((2, 3, 5)), q, k, "general", weight=np.ones((3, 3)))
    with pytest.raises(ValueError, match="needs weight"):
        attnext.score_backward(np.ones((2, 3, 5)), q, k, "general")
    with pytest.raises(ValueError, match=r"grad has shape"):
        attnext.weighted_sum_backward(np.ones((2, 3, 4)), np.ones((2, 3, 5)), v)


def test_broadcast_view_arguments_are_kept_compact_and_owned(rng):
    q, v = rng.standard_normal((4, 3, 5)), rng.standard_normal((4, 6, 2))
    base = rng.standard_normal((1, 6, 5))
    k = np.broadcast_to(base, (4, 6, 5))  # a stride-0 view of the caller's array
    out, pullback = vjp(attnext.attention, q, k, v)
    ct = rng.standard_normal(out.shape)
    before = pullback(ct)
    base[...] = 0.0
    after = pullback(ct)
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)
    assert before[1].shape == (4, 6, 5)
